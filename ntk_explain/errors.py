"""Expected failures, each carrying the exit code of SPEC §7."""


class NtkExplainError(Exception):
    """Base class: an expected failure reported as one line on stderr."""

    exit_code = 1


class UsageError(NtkExplainError):
    """An invalid option value (exit 2)."""

    exit_code = 2


class BadInputError(NtkExplainError):
    """A missing, unreadable, corrupt or ill-shaped input, or an existing --out (exit 3)."""

    exit_code = 3


class OutOfMemoryError(NtkExplainError):
    """The work does not fit the memory budget; the message names the option to lower (exit 4)."""

    exit_code = 4
