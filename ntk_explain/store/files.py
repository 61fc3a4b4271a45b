"""The run file's life: opened after checks, created and updated atomically under a writer lock, kept partial for
`--resume` after an interrupt."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py

from ntk_explain.errors import BadInputError, first_line
from ntk_explain.store.attrs import FORMAT, FORMAT_VERSION, H5_ERRORS, py_value, set_attrs, storable
from ntk_explain.store.validate import check_layout

CACHE_BYTES = 64 << 20  # per-file chunk cache, so tile writes rarely re-read a chunk


# h5py's errors on damaged metadata: reading an object, an attribute or a dataset's description


def _validate(f: h5py.File, path: Path) -> None:
    try:
        fmt, version = py_value(f.attrs.get("format", "")), py_value(f.attrs.get("format_version", 0))
    except H5_ERRORS as exc:
        raise BadInputError(f"{path}: damaged run file: cannot read its attributes ({first_line(exc)})") from exc
    if fmt != FORMAT:
        raise BadInputError(f"{path}: not an ntk-explain run file (no format={FORMAT!r} attribute)")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise BadInputError(
            f"{path}: run file format version {version} is newer than this ntk-explain supports "
            f"({FORMAT_VERSION}); upgrade ntk-explain"
        )


def open_hdf5(path: Path, mode: str) -> h5py.File:
    """Open ``path`` as HDF5, turning every failure into a one-line BadInputError."""
    try:
        if not path.exists():
            raise BadInputError(f"{path}: no such file")
        if not path.is_file():
            raise BadInputError(f"{path}: not a file")
    except (OSError, ValueError) as exc:  # a name too long, with a NUL byte, in an unreadable directory
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else first_line(exc)
        raise BadInputError(f"{path}: cannot access the run file ({reason})") from exc
    try:
        return h5py.File(path, mode, rdcc_nbytes=CACHE_BYTES)
    except OSError as exc:
        reason = "not an HDF5 file" if not h5py.is_hdf5(path) else first_line(exc)
        raise BadInputError(f"{path}: cannot open run file: {reason}") from exc


def open_run(path: str | os.PathLike) -> h5py.File:
    """Open a run file read-only after checking it is an ntk-explain run file with the layout its readers rely on
    (`check_layout`); the caller closes it."""
    path = Path(path)
    f = open_hdf5(path, "r")
    try:
        _validate(f, path)
        check_layout(f, path)
    except BaseException:
        f.close()
        raise
    return f


def partial_path(path: str | os.PathLike) -> Path:
    """Where the run file `path` is written until it is complete: `.<name>.partial` beside it (one writer at a time,
    `_writer_lock`). An interrupted `compute` leaves it there for `--resume`."""
    path = Path(path)
    return path.with_name(f".{path.name}.partial")


# Root attributes that must match for a partial run to be resumed: what the numbers depend on.
RESUME_KEYS = ("params", "model_sha256", "weights_sha256", "data_sha256", "seed", "device", "torch_version")


def partial_params(path: str | os.PathLike) -> dict | None:
    """The recorded options of the partial run of `path`, or None when there is none (or it is unreadable)."""
    tmp = partial_path(path)
    if not tmp.is_file():
        return None
    try:
        with h5py.File(tmp, "r") as f:
            return json.loads(py_value(f.attrs["params"]))
    except (OSError, KeyError, ValueError):
        return None


def _failed(tmp: Path, f: h5py.File | None, keep: bool) -> None:
    """Close the partial file `tmp` of a failed write; `keep` it, flushed, for `--resume` (an interrupt of a resumable
    write), else delete it."""
    if f is not None:
        with contextlib.suppress(Exception):  # the original error matters more than a failing flush or close
            if keep:
                f.flush()
            f.close()
    if not keep:
        tmp.unlink(missing_ok=True)


def _commit(tmp: Path, f: h5py.File, path: Path) -> None:
    f.flush()
    f.close()
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


SIDE_FILE_ROOM = 32  # bytes the side files add to a name: `.<name>.rank<r>-of-<w>.partial`, `.<name>.lock`


def check_target(path: str | os.PathLike, *, overwrite: bool) -> None:
    """Refuse an output path that is a directory, exists (without overwrite), has no directory, or whose name leaves
    no room for its side files (`partial_path`, `shard_path`, `_writer_lock`) in the file system's name limit."""
    path = Path(path)
    try:
        if path.is_dir():
            raise BadInputError(f"{path} is a directory")
        if path.exists() and not overwrite:
            raise BadInputError(f"{path} exists; pass --overwrite to replace it")
        if not path.parent.is_dir():
            raise BadInputError(f"{path.parent}: no such directory")
        longest = os.pathconf(path.parent, "PC_NAME_MAX") - SIDE_FILE_ROOM
    except OSError as error:
        raise BadInputError(f"{path}: {error.strerror}") from None
    if len(os.fsencode(path.name)) > longest:
        raise BadInputError(f"{path}: file name too long (at most {longest} bytes)")


@contextmanager
def _writer_lock(path: Path) -> Iterator[None]:
    """Hold the exclusive lock of the run file `path` (flock on `.<name>.lock` beside it, removed on release); a
    second writer of the same file is refused with bad input instead of racing it."""
    lock = path.with_name(f".{path.name}.lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_ino != os.stat(lock).st_ino:  # the lock file was replaced before we locked it
                raise BlockingIOError
        except (BlockingIOError, FileNotFoundError):
            raise BadInputError(f"{path} is being written by another process (lock {lock})") from None
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)
    finally:
        os.close(fd)


@contextmanager
def create_run(
    path: str | os.PathLike,
    *,
    overwrite: bool,
    attrs: Mapping[str, Any],
    resumable: bool = False,
    resume: bool = False,
) -> Iterator[h5py.File]:
    """Write a new run file atomically: yields a file open for writing under `partial_path(path)`, root attribute
    complete=False until it is done.

    On success it gets complete=True and is renamed onto ``path``. On an exception the partial file is deleted,
    except that a ``resumable`` one is kept on an interrupt (KeyboardInterrupt: Ctrl-C, SIGTERM) for a later
    ``resume``; either way an existing ``path`` is left untouched and the exception propagates. With ``resume`` an
    existing partial file is reopened instead of replaced, provided its `RESUME_KEYS` attributes equal ``attrs``'
    (else BadInputError). Another process writing the same path at the time is refused (`_writer_lock`).
    """
    path = Path(path)
    check_target(path, overwrite=overwrite)
    with _writer_lock(path):
        yield from _create(path, attrs, resumable, resume)


def _resumable(tmp: Path, attrs: Mapping[str, Any]) -> h5py.File:
    """The partial run file `tmp` open for writing, after checking (read-only) it was started by the same
    computation."""
    with open_hdf5(tmp, "r") as f:
        _validate(f, tmp)
        if "update" in f.attrs:
            raise BadInputError(f"cannot resume: the partial file {tmp} is an interrupted update (attribute --resume)")
        differ = [key for key in RESUME_KEYS if py_value(f.attrs.get(key)) != py_value(storable(attrs.get(key)))]
    if differ:
        raise BadInputError(
            f"cannot resume: the partial run {tmp} differs in {', '.join(differ)}; run again without --resume"
        )
    f = open_hdf5(tmp, "r+")
    f.attrs["resumed"] = int(f.attrs.get("resumed", 0)) + 1
    return f


def _create(path: Path, attrs: Mapping[str, Any], resumable: bool, resume: bool) -> Iterator[h5py.File]:
    tmp = partial_path(path)
    f = _resumable(tmp, attrs) if resume and tmp.exists() else None
    try:
        if f is None:
            f = h5py.File(tmp, "w", rdcc_nbytes=CACHE_BYTES)
            set_attrs(f, {**attrs, "complete": False})
        yield f
        f.attrs["complete"] = True
        _commit(tmp, f, path)
    except BaseException as error:
        _failed(tmp, f, keep=resumable and isinstance(error, KeyboardInterrupt))
        raise


@contextmanager
def update_run(
    path: str | os.PathLike, *, request: Mapping[str, Any] | None = None, resume: bool = False
) -> Iterator[tuple[h5py.File, bool]]:
    """Add to an existing run file atomically: yields a writable copy under `partial_path(path)` (root attribute
    complete=False until it is done) and whether it is a resumed one; the copy is renamed onto ``path`` on success.

    On an exception the copy is deleted and the original file is left unchanged, except that the copy of a
    resumable update, one given the ``request`` it answers (the options its numbers depend on, recorded with the
    original's size and modification time as the root attribute `update`), is kept on an interrupt. With ``resume``
    such a copy is reopened instead of made again, provided it answers the same request on the same file (else
    BadInputError, the copy unchanged). The partial file that an interrupted compute of ``path`` kept is not
    replaced (BadInputError), nor is another process writing the same file at the time (`_writer_lock`).
    """
    path = Path(path)
    open_run(path).close()
    with _writer_lock(path), _h5py_errors_as_bad_input(path):
        yield from _update(path, request, resume)


@contextmanager
def _h5py_errors_as_bad_input(path: Path) -> Iterator[None]:
    """Report h5py's KeyError (a dataset that a reader needs is missing) and OSError (a corrupt chunk, a failed write)
    as bad input naming the file; the same errors from elsewhere are left alone."""
    try:
        yield
    except (KeyError, OSError) as exc:
        frames = list(traceback.walk_tb(exc.__traceback__))
        if not frames or not frames[-1][0].f_globals.get("__name__", "").startswith("h5py"):
            raise
        what = "damaged run file" if isinstance(exc, KeyError) else "cannot read or write the run file"
        raise BadInputError(f"{path}: {what} ({first_line(exc)})") from exc


def _update(path: Path, request: Mapping[str, Any] | None, resume: bool) -> Iterator[tuple[h5py.File, bool]]:
    tmp = partial_path(path)
    status = os.stat(path)
    update = json.dumps({"request": request, "source": [status.st_size, status.st_mtime_ns]}, default=str)
    if _interrupted_compute(tmp):
        raise BadInputError(
            f"{tmp} holds an interrupted compute of {path}: finish it with compute --resume or delete it"
        )
    f = _resumed_update(tmp, update) if resume and request is not None and tmp.exists() else None
    resumed = f is not None
    try:
        if f is None:
            shutil.copyfile(path, tmp)
            f = h5py.File(tmp, "r+", rdcc_nbytes=CACHE_BYTES)
            f.attrs["complete"] = False
            f.attrs["update"] = update  # marks the copy as an update's, resumable only with a request
            f.flush()  # on disk before any of the update's own writes: a kill leaves a copy that says what it is
        yield f, resumed
        f.attrs.pop("update", None)
        f.attrs["complete"] = True
        _commit(tmp, f, path)
    except BaseException as error:
        _failed(tmp, f, keep=request is not None and isinstance(error, KeyboardInterrupt))
        raise


def _interrupted_compute(tmp: Path) -> bool:
    """Whether `tmp` is a partial run file that an interrupted compute kept (an update's copy has `update`)."""
    if not tmp.is_file():
        return False
    try:
        with h5py.File(tmp, "r") as f:
            return py_value(f.attrs.get("format", "")) == FORMAT and "update" not in f.attrs
    except H5_ERRORS:
        return False


def _resumed_update(tmp: Path, update: str) -> h5py.File:
    """The kept copy `tmp` of an interrupted update open for writing, after checking (read-only) that it answers
    the same request on the same run file."""
    with open_hdf5(tmp, "r") as f:
        kept = py_value(f.attrs.get("update", ""))
    if kept != update:
        raise BadInputError(
            f"cannot resume: the partial file {tmp} answers other options or an earlier run file; run again without "
            "--resume"
        )
    return open_hdf5(tmp, "r+")


def scratch_path(path: str | os.PathLike) -> Path:
    """The side file of a stage's intermediate state for the run file `path`: `.<name>.scratch` beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}.scratch")


@contextmanager
def scratch(path: str | os.PathLike, request: Mapping[str, Any], *, resume: bool) -> Iterator[h5py.File]:
    """A side file (`scratch_path`) for the intermediate state of a stage writing `path`, made anew, or with `resume`
    reopened when an interrupted run of the same `request` kept it (another request is refused, the file unchanged).
    It is deleted once the stage is done or fails, and kept after an interrupt (KeyboardInterrupt) or a kill."""
    tmp, text = scratch_path(path), storable(request)
    if resume and tmp.exists():
        f = open_hdf5(tmp, "r+")
        if py_value(f.attrs.get("request", "")) != text:
            f.close()
            raise BadInputError(f"cannot resume: {tmp} holds the work of other options; run again without --resume")
    else:
        tmp.unlink(missing_ok=True)
        f = h5py.File(tmp, "w", rdcc_nbytes=CACHE_BYTES)
        f.attrs["request"] = text
    try:
        yield f
    except BaseException as error:
        _failed(tmp, f, keep=isinstance(error, KeyboardInterrupt))
        raise
    f.close()
    tmp.unlink()
