"""Expected failures, each carrying its exit code: 1 unexpected, 2 usage, 3 bad input, 4 out of memory."""


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


def first_line(exc: BaseException | None) -> str:
    """The first line of an exception's message, or its type's name when it has none."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
