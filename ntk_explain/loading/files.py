"""Reading the user's files safely: existence and format checks, hashes, one-line messages."""

from __future__ import annotations

import functools
import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import ParamSpec, TypeVar

from ntk_explain.errors import NtkExplainError, first_line

_MAX_NAMES = 5


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")  # what breaks a line or a terminal


_P = ParamSpec("_P")


_T = TypeVar("_T")


class Invalid(Exception):
    """A problem with an input, reported by the caller prefixed with what the input is."""


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_files(paths: list[Path]) -> str | None:
    """The SHA-256 of one file, of several files' digests in order, or None for none."""
    if len(paths) < 2:
        return sha256_file(paths[0]) if paths else None
    return hashlib.sha256("".join(sha256_file(p) for p in paths).encode()).hexdigest()


def one_line(function: Callable[_P, _T]) -> Callable[_P, _T]:
    """Keep an expected failure's message on one line whatever the names in it (a path with a newline, ...): control
    and line-separator characters are shown escaped."""

    @functools.wraps(function)
    def checked(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return function(*args, **kwargs)
        except NtkExplainError as exc:
            exc.args = (_CONTROL.sub(lambda m: repr(m.group())[1:-1], str(exc)),)
            raise

    return checked


def listed(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_NAMES])
    return shown + (f", … ({len(names) - _MAX_NAMES} more)" if len(names) > _MAX_NAMES else "")


def existing_file(path: str, formats: tuple[str, ...]) -> Path:
    p = Path(path)
    try:
        if not p.exists():
            raise Invalid("file not found")
        if not p.is_file():
            raise Invalid("not a file")
    except (OSError, ValueError) as exc:  # a name too long, with a NUL byte, in an unreadable directory
        raise Invalid(f"cannot access file ({first_line(exc)})") from exc
    if p.suffix.lower() not in formats:
        raise Invalid(f"unknown format {p.suffix!r} (expected one of {', '.join(formats)})")
    return p
