"""The run file: one HDF5 file per run, written atomically, validated on open (SPEC §6).

The library never prints; :func:`info_table` builds a rich table that the CLI prints.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import platform
import shutil
import traceback
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from rich.table import Table

from ntk_explain import __version__
from ntk_explain.errors import BadInputError

FORMAT = "ntk-explain"
FORMAT_VERSION = 1

CHUNK_BYTES = 1 << 20  # target size of one chunk (~1 MiB)
CACHE_BYTES = 64 << 20  # per-file chunk cache, so tile writes rarely re-read a chunk
GZIP_LEVEL = 4
KERNEL_BLOCKS = ("train_train", "test_train")
# Root attributes shown by `info`; the others (params, hashes, versions) are in `info --json`.
INFO_ROOT_KEYS = ("format_version", "ntk_explain_version", "created", "device", "seed")


# --------------------------------------------------------------------------------------------------
# Provenance and attributes


def _dist_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return ""


def provenance(
    command: list[str],
    params: dict,
    device: str,
    seed: int,
    model_sha256: str,
    weights_sha256: str | None,
    data_sha256: dict[str, str] | str,
) -> dict:
    """The root attributes of a run file (SPEC §6); JSON-valued ones are JSON strings."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "ntk_explain_version": __version__,
        "torch_version": _dist_version("torch"),
        "numpy_version": np.__version__,
        "h5py_version": h5py.version.version,
        "hdf5_version": h5py.version.hdf5_version,
        "command": json.dumps([str(a) for a in command]),
        "params": json.dumps(params, sort_keys=True, default=str),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "device": str(device),
        "model_sha256": model_sha256,
        "weights_sha256": weights_sha256 or "",
        "data_sha256": data_sha256 if isinstance(data_sha256, str) else json.dumps(data_sha256, sort_keys=True),
        "seed": int(seed),
    }


def _attr_value(value: Any) -> Any:
    """An HDF5-storable form of ``value``: None -> "", mappings -> JSON, paths -> str."""
    if value is None:
        return ""
    if isinstance(value, Mapping):
        return json.dumps(value, sort_keys=True, default=str)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return np.array(value, dtype=h5py.string_dtype())
    return value


def set_attrs(obj: h5py.Group | h5py.Dataset, attrs: Mapping[str, Any]) -> None:
    """Set attributes on ``obj``, converting None, mappings and paths to storable values."""
    for key, value in attrs.items():
        obj.attrs[key] = _attr_value(value)


def _py(value: Any) -> Any:
    """A JSON-friendly Python value for an HDF5 attribute value."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        return [_py(v) for v in value.tolist()]
    if isinstance(value, list):
        return [_py(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def attrs_dict(obj: h5py.Group | h5py.Dataset) -> dict[str, Any]:
    """The attributes of `obj` as Python values."""
    return {key: _py(obj.attrs[key]) for key in obj.attrs}


# --------------------------------------------------------------------------------------------------
# Opening, creating and updating run files


# h5py's errors on damaged metadata: reading an object, an attribute or a dataset's description
_H5_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError)


def _reason(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _validate(f: h5py.File, path: Path) -> None:
    try:
        fmt, version = _py(f.attrs.get("format", "")), _py(f.attrs.get("format_version", 0))
    except _H5_ERRORS as exc:
        raise BadInputError(f"{path}: damaged run file: cannot read its attributes ({_reason(exc)})") from exc
    if fmt != FORMAT:
        raise BadInputError(f"{path}: not an ntk-explain run file (no format={FORMAT!r} attribute)")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise BadInputError(
            f"{path}: run file format version {version} is newer than this ntk-explain supports "
            f"({FORMAT_VERSION}); upgrade ntk-explain"
        )


def _open_hdf5(path: Path, mode: str) -> h5py.File:
    """Open ``path`` as HDF5, turning every failure into a one-line BadInputError."""
    try:
        if not path.exists():
            raise BadInputError(f"{path}: no such file")
        if not path.is_file():
            raise BadInputError(f"{path}: not a file")
    except (OSError, ValueError) as exc:  # a name too long, with a NUL byte, in an unreadable directory
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else _reason(exc)
        raise BadInputError(f"{path}: cannot access the run file ({reason})") from exc
    try:
        return h5py.File(path, mode, rdcc_nbytes=CACHE_BYTES)
    except OSError as exc:
        reason = "not an HDF5 file" if not h5py.is_hdf5(path) else str(exc).splitlines()[0]
        raise BadInputError(f"{path}: cannot open run file: {reason}") from exc


def open_run(path: str | os.PathLike) -> h5py.File:
    """Open a run file read-only after checking it is an ntk-explain run file with the layout its readers rely on
    (`_check_layout`); the caller closes it."""
    path = Path(path)
    f = _open_hdf5(path, "r")
    try:
        _validate(f, path)
        _check_layout(f, path)
    except BaseException:
        f.close()
        raise
    return f


class _Damaged(Exception):
    """A run file whose layout breaks SPEC §6; reported by `_check_layout` with the file's name."""


# The datasets that readers rely on: dtype kinds and axes. A dataset present must have these axes, and an axis the
# same size wherever it appears; "…" stands for a kernel's class axes (none, (C,) or (C, C)). In a kernel group
# {train} is the training set, or for the distilled kernel (attribute support="distill") its support. Kernel groups
# without a "kernel" attribute are not checked: readers refuse them.
_DATA_AXES = {"labels": ("iu", "{split}"), "index": ("iu", "{split}"), "nn_logits": ("f", "{split}", "classes")}
_KERNEL_AXES = {
    "diag_train": ("f", "{train}", "{g} …"),
    "train_train": ("f", "{train}", "{train}", "{g} …"),
    "test_train": ("f", "test", "{train}", "{g} …"),
    "diag_test": ("f", "test", "{g} …"),
    "features/train": ("fu", "{train}", "{g} outputs", "{g} proj"),
    "features/test": ("fu", "test", "{g} outputs", "{g} proj"),
    "full_train": ("f", "train", "{train}"),
    "diag_full": ("f", "train"),
}
_DISTILL_AXES = {"classes": ("iu", "{train}"), "labels": ("f", "{train}", "classes")}


def _read_metadata(name: str, obj: h5py.Group | h5py.Dataset) -> None:
    """Read an object's attributes and description (damaged metadata raises); check a dataset's dims names its axes."""
    attrs = dict(obj.attrs)
    if isinstance(obj, h5py.Dataset) and obj.dtype is not None and "dims" in attrs:
        names = _py(attrs["dims"])
        if not isinstance(names, list) or len(names) != obj.ndim or not all(isinstance(n, str) for n in names):
            raise _Damaged(f"{obj.name}: attribute dims {names!r} does not name its {obj.ndim} axes")


def _bind(sizes: dict[str, object], group: h5py.Group, specs: dict[str, tuple[str, ...]], **names: str) -> None:
    """Check the datasets of `group` named in `specs` that are present against the sizes of their axes seen so far
    (`sizes`, updated); axis names are formatted with `names`."""
    for name, (kinds, *template) in specs.items():
        ds = group.get(name)
        if ds is None:
            continue
        axes = [axis.format(**names) for axis in template]
        rank = len(axes) - axes[-1].endswith("…")  # the axes before the class axes, which may be several
        is_dataset = isinstance(ds, h5py.Dataset)
        if not is_dataset or ds.dtype.kind not in kinds or (ds.ndim < rank if rank < len(axes) else ds.ndim != rank):
            got = f"shape {ds.shape} of {ds.dtype}" if is_dataset else "a group"
            raise _Damaged(f"{ds.name} is {got}, expected axes ({', '.join(axes)}) of dtype kind {kinds!r}")
        pairs = [*zip(axes[:rank], ds.shape[:rank], strict=True)]
        if rank < len(axes):
            pairs.append((axes[-1], ds.shape[rank:]))
        for axis, size in pairs:
            if sizes.setdefault(axis, size) != size:
                raise _Damaged(f"{ds.name}: axis {axis} of size {size}, elsewhere {sizes[axis]}")


def _check_classes(ds: h5py.Dataset | None, classes: object) -> None:
    values = ds[()] if isinstance(ds, h5py.Dataset) else np.zeros(0)
    if values.size and (values.min() < 0 or (isinstance(classes, int) and values.max() >= classes)):
        raise _Damaged(f"{ds.name} holds classes outside [0, {classes})")


def _check_layout(f: h5py.File, path: Path) -> None:
    """Refuse a damaged run file before a reader trips over it: every object's metadata readable, and the datasets of
    /data, /kernel/* and /distill that are present with the axes of SPEC §6, of the same sizes wherever they appear.
    Reads metadata and the labels, not the kernels."""
    try:
        _read_metadata("/", f)
        f.visititems(_read_metadata)
        groups = {f"data/{split}": (_DATA_AXES, {"split": split}) for split in ("train", "test")}
        for name in f["kernel"] if isinstance(f.get("kernel"), h5py.Group) else ():
            if "kernel" not in f[f"kernel/{name}"].attrs:  # not (yet) a kernel that readers would read
                continue
            distilled = _py(f[f"kernel/{name}"].attrs.get("support", "")) == "distill"
            train = f"/kernel/{name} support" if distilled else "train"
            groups[f"kernel/{name}"] = (_KERNEL_AXES, {"g": f"/kernel/{name}", "train": train})
        groups["distill"] = (_DISTILL_AXES, {"train": "/kernel/distilled support"})
        sizes: dict[str, object] = {}
        for name, (specs, names) in groups.items():
            group = f.get(name)
            if group is not None and not isinstance(group, h5py.Group):
                raise _Damaged(f"/{name} is not a group")
            if group is not None:
                _bind(sizes, group, specs, **names)
        for name in ("data/train/labels", "data/test/labels", "distill/classes"):
            _check_classes(f.get(name), sizes.get("classes"))
    except _Damaged as exc:
        raise BadInputError(f"{path}: damaged run file: {exc}") from None
    except _H5_ERRORS as exc:
        raise BadInputError(f"{path}: damaged run file: {_reason(exc)}") from exc


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
            return json.loads(_py(f.attrs["params"]))
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
    with _open_hdf5(tmp, "r") as f:
        _validate(f, tmp)
        if "update" in f.attrs:
            raise BadInputError(f"cannot resume: the partial file {tmp} is an interrupted update (attribute --resume)")
        differ = [key for key in RESUME_KEYS if _py(f.attrs.get(key)) != _py(_attr_value(attrs.get(key)))]
    if differ:
        raise BadInputError(
            f"cannot resume: the partial run {tmp} differs in {', '.join(differ)}; run again without --resume"
        )
    f = _open_hdf5(tmp, "r+")
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
        raise BadInputError(f"{path}: {what} ({_reason(exc)})") from exc


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
            return _py(f.attrs.get("format", "")) == FORMAT and "update" not in f.attrs
    except _H5_ERRORS:
        return False


def _resumed_update(tmp: Path, update: str) -> h5py.File:
    """The kept copy `tmp` of an interrupted update open for writing, after checking (read-only) that it answers
    the same request on the same run file."""
    with _open_hdf5(tmp, "r") as f:
        kept = _py(f.attrs.get("update", ""))
    if kept != update:
        raise BadInputError(
            f"cannot resume: the partial file {tmp} answers other options or an earlier run file; run again without "
            "--resume"
        )
    return _open_hdf5(tmp, "r+")


def shard_path(path: str | os.PathLike, rank: int, world: int) -> Path:
    """The shard file that rank `rank` of `world` writes for the run file `path` (`join_shards` joins them)."""
    path = Path(path)
    return path.with_name(f".{path.name}.rank{rank}-of-{world}")


SHARDED = ("train_train", "test_train", "diag_train", "diag_test")  # kernel datasets split by row tiles over ranks


def join_shards(path: str | os.PathLike, shards: Sequence[Path], *, overwrite: bool) -> None:
    """Write the run file `path` from the shard files of a distributed compute (`create_run`, atomic), then delete
    them. Each kernel dataset of `SHARDED` holds in each shard the row tiles of one rank and zeros elsewhere, so it
    is their sum (exact: every entry is written by one rank); everything else is the first shard's."""
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(_open_hdf5(Path(shard), "r")) for shard in shards]
        first = files[0]
        attrs = {**attrs_dict(first), "world_size": len(files)}
        with create_run(path, overwrite=overwrite, attrs=attrs) as run:
            for name in first:
                first.copy(first[name], run, name)
            for name in [f"kernel/{kernel}/{block}" for kernel in run.get("kernel", {}) for block in SHARDED]:
                if name in run:
                    _sum_rows(run[name], [f[name] for f in files])
    for shard in shards:
        Path(shard).unlink()


def _sum_rows(target: h5py.Dataset, sources: Sequence[h5py.Dataset]) -> None:
    """target = Σ sources, a block of rows (about CACHE_BYTES) at a time."""
    rows = max(1, CACHE_BYTES // max(1, target.dtype.itemsize * math.prod(target.shape[1:])))
    for start in range(0, target.shape[0], rows):
        block = slice(start, min(target.shape[0], start + rows))
        target[block] = sum(source[block] for source in sources)


# --------------------------------------------------------------------------------------------------
# Datasets


def _itemsize(dtype: Any) -> int:
    size = np.dtype(dtype).itemsize
    return size if size > 0 and np.dtype(dtype).kind != "O" else 16


def _chunks(shape: tuple[int, ...], itemsize: int, tile: int | None, tiled_axes: int) -> tuple[int, ...]:
    """Chunk shape: whole trailing axes and as many rows as fit ~1 MiB (at least one row).

    When a single row is larger than that, the row is split along its leading axes instead. With a `tile`, the
    first `tiled_axes` axes are written in tiles of that many entries: they are chunked by a divisor of `tile`, so
    every tile write fills whole chunks and a chunk, once written and checkpointed, is never rewritten (`checkpoint`).
    """
    dims = [max(1, d) for d in shape]
    if tile is not None:
        inner = math.prod(dims[tiled_axes:])
        side = _aligned_side(tile, max(1, CHUNK_BYTES // (itemsize * inner)), tiled_axes)
        return tuple(min(side, d) for d in dims[:tiled_axes]) + tuple(dims[tiled_axes:])
    budget = max(1, CHUNK_BYTES // itemsize)  # elements per chunk
    row = math.prod(dims[1:])
    if row <= budget:
        return (min(dims[0], budget // row), *dims[1:])
    chunk = [1] * len(dims)
    for k in range(1, len(dims)):
        inner = math.prod(dims[k + 1 :])
        if inner <= budget:
            chunk[k] = max(1, min(dims[k], budget // inner))
            chunk[k + 1 :] = dims[k + 1 :]
            break
    return tuple(chunk)


def _aligned_side(tile: int, budget: int, axes: int) -> int:
    """The largest divisor c of `tile` with c**axes ≤ budget; `tile` itself when that c is below 16 (a tile of
    awkward size gets one chunk per tile rather than tiny chunks)."""
    side = max((c for c in range(1, tile + 1) if tile % c == 0 and c**axes <= budget), default=1)
    return side if side >= min(16, tile) else tile


def create_rows(
    group: h5py.Group,
    name: str,
    shape: tuple[int, ...],
    dtype: Any,
    dims: Sequence[str],
    tile: int | None = None,
    tiled_axes: int = 1,
) -> h5py.Dataset:
    """Create an empty dataset chunked along rows, gzip+shuffle, with a ``dims`` attribute.

    Meant to be filled tile by tile (``ds[r0:r1, c0:c1] = tile``); unwritten entries read as 0. Given the `tile`
    size of its first `tiled_axes` axes, chunks are aligned to the tiles (`_chunks`).
    """
    shape = tuple(int(d) for d in shape)
    if len(dims) != len(shape):
        raise ValueError(f"dims {tuple(dims)} do not match the {len(shape)} axes of shape {shape}")
    if not shape:
        ds = group.create_dataset(name, shape=(), dtype=dtype)
    else:
        maxshape = tuple(None if d == 0 else d for d in shape)
        ds = group.create_dataset(
            name,
            shape=shape,
            dtype=dtype,
            maxshape=maxshape,
            chunks=_chunks(shape, _itemsize(dtype), tile, tiled_axes),
            compression="gzip",
            compression_opts=GZIP_LEVEL,
            shuffle=True,
        )
    ds.attrs["dims"] = np.array([str(d) for d in dims], dtype=h5py.string_dtype())
    return ds


def tiles_done(dataset: h5py.Dataset) -> int:
    """How many leading row tiles of `dataset` (those this process computes) an interrupted run wrote and
    checkpointed."""
    return int(dataset.attrs.get("tiles_done", 0))


def checkpoint(dataset: h5py.Dataset, tiles: int) -> None:
    """Record durably that the first `tiles` row tiles of `dataset` are written (`mark`: attribute `tiles_done`)."""
    mark(dataset, "tiles_done", tiles)


def mark(obj: h5py.Group | h5py.Dataset, key: str, value: Any) -> None:
    """Set the attribute `key` of `obj` once everything written before is on disk, and flush it too: a kill at any
    point leaves a marker that is never ahead of the data it vouches for."""
    obj.file.flush()
    obj.attrs[key] = value
    obj.file.flush()


def write_array(
    group: h5py.Group,
    name: str,
    array: np.ndarray,
    dims: Sequence[str],
) -> h5py.Dataset:
    """Write ``array`` in one shot as a row-chunked, compressed dataset with a ``dims`` attribute."""
    array = np.asarray(array)
    dtype: Any = array.dtype
    if array.dtype.kind in "UO":
        dtype = h5py.string_dtype()
        array = array.astype(object)
    ds = create_rows(group, name, array.shape, dtype, dims)
    if array.size:
        ds[...] = array
    return ds


def features_dataset(
    group: h5py.Group, name: str, shape: tuple[int, ...], dtype: torch.dtype, dims: Sequence[str], tile: int | None
) -> h5py.Dataset:
    """An empty features dataset of torch `dtype`, written in row tiles of `tile`; bfloat16, which HDF5 lacks, is
    kept as its 16 raw bits (uint16) with the attribute encoding="bfloat16" (`read_features` undoes it)."""
    if dtype == torch.bfloat16:
        dataset = create_rows(group, name, shape, np.uint16, dims, tile)
        dataset.attrs["encoding"] = "bfloat16"
        return dataset
    return create_rows(group, name, shape, torch.empty((), dtype=dtype).numpy().dtype, dims, tile)


def encode_features(values: torch.Tensor, dataset: h5py.Dataset) -> np.ndarray:
    """Tensor values in the dataset's storage type (see `features_dataset`)."""
    if dataset.attrs.get("encoding") == "bfloat16":
        return values.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16)
    return values.cpu().numpy().astype(dataset.dtype, copy=False)


def read_features(dataset: h5py.Dataset, rows: slice = slice(None)) -> torch.Tensor:
    """Rows of a features dataset as a tensor of the dtype it was written in."""
    values = dataset[rows]
    if dataset.attrs.get("encoding") == "bfloat16":
        return torch.from_numpy(values.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(values)


# --------------------------------------------------------------------------------------------------
# Reading


def root_attrs(path: str | os.PathLike) -> dict[str, Any]:
    """The root attributes of a run file as Python values (JSON-valued ones stay JSON strings)."""
    return group_attrs(path, "/")


def group_attrs(path: str | os.PathLike, group: str) -> dict[str, Any]:
    """The attributes of one group of a run file; a missing group is bad input."""
    with open_run(path) as f:
        if group not in f:
            raise BadInputError(f"{path} has no /{group.strip('/')} (run the stage that writes it first)")
        return attrs_dict(f[group])


def faithfulness(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The attributes of /faithfulness and /distill/faithfulness, those present; neither is bad input."""
    with open_run(path) as f:
        found = {name: attrs_dict(f[name]) for name in ("faithfulness", "distill/faithfulness") if name in f}
    if not found:
        raise BadInputError(f"{path} has no /faithfulness (run the stage that writes it first)")
    return found


def summarize(path: str | os.PathLike) -> list[dict[str, Any]]:
    """A walk of the run file: one JSON-friendly dict per group or dataset, root first.

    Keys: ``path``, ``kind`` ("group"/"dataset"), ``shape``, ``dtype``, ``dims`` (None for groups)
    and ``attrs`` (every other attribute; for the root, the provenance).
    """
    with open_run(path) as f:
        items = [_describe("/", f)]
        f.visititems(lambda name, obj: items.append(_describe("/" + name, obj)))
    return items


def _describe(name: str, obj: h5py.Group | h5py.Dataset) -> dict[str, Any]:
    attrs = attrs_dict(obj)
    dims = attrs.pop("dims", None)
    is_ds = isinstance(obj, h5py.Dataset)
    return {
        "path": name,
        "kind": "dataset" if is_ds else "group",
        "shape": list(obj.shape) if is_ds else None,
        "dtype": str(obj.dtype) if is_ds else None,
        "dims": dims,
        "attrs": attrs,
    }


def _short(value: Any, width: int = 40) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= width else text[: width - 1] + "…"


def info_table(path: str | os.PathLike) -> Table:
    """A rich table of the run file's groups and datasets (the CLI prints it)."""
    items = summarize(path)
    table = Table(title=str(path), title_justify="left")
    table.add_column("path", no_wrap=True)
    for column in ("kind", "shape", "dtype", "dims", "attrs"):
        table.add_column(column, overflow="fold")
    for item in items:
        attrs = item["attrs"]
        if item["path"] == "/":
            attrs = {k: attrs[k] for k in INFO_ROOT_KEYS if k in attrs}
        table.add_row(
            item["path"],
            item["kind"],
            "" if item["shape"] is None else "×".join(map(str, item["shape"])) or "scalar",
            item["dtype"] or "",
            "" if item["dims"] is None else ", ".join(item["dims"]),
            "  ".join(f"{k}={_short(v)}" for k, v in attrs.items()),
        )
    return table


def distill_table(path: str | os.PathLike) -> Table | None:
    """Per class: support size, and effective rank and r_ε of the full and the distilled kernel; None without
    /distill."""
    with open_run(path) as f:
        if "distill" not in f:
            return None
        group = f["distill"]
        eps = [float(e) for e in group.attrs["eps"]]
        support = np.bincount(group["classes"][()], minlength=len(group["effective_rank_full"]))
        columns = {
            "support": support,
            "eff. rank full": group["effective_rank_full"][()],
            "eff. rank distilled": group["effective_rank_distilled"][()],
            **{f"r_{e:g} full": group["r_eps_full"][:, j] for j, e in enumerate(eps)},
            **{f"r_{e:g} distilled": group["r_eps_distilled"][:, j] for j, e in enumerate(eps)},
        }
        title = (
            f"/distill: {group.attrs['method']}, m={group.attrs['m']} of N={group.attrs['n_train']} "
            f"({group.attrs['reduction']:.1f}× fewer Jacobians in later kernels)"
        )
    table = Table(title=title, title_justify="left")
    table.add_column("class", justify="right")
    for name in columns:
        table.add_column(name, justify="right")
    for c in range(len(support)):
        cells = [f"{v[c]:.2f}" if np.issubdtype(v.dtype, np.floating) else str(v[c]) for v in columns.values()]
        table.add_row(str(c), *cells)
    return table


def _kernel_dataset(f: h5py.File, path: Path, name: str, key: str) -> np.ndarray:
    group = f.get(f"kernel/{name}")
    if not isinstance(group, h5py.Group):
        available = sorted(f["kernel"]) if isinstance(f.get("kernel"), h5py.Group) else []
        raise BadInputError(f"{path}: no kernel {name!r} (available: {', '.join(available) or 'none'})")
    ds = group.get(key)
    if not isinstance(ds, h5py.Dataset):
        raise BadInputError(f"{path}: kernel {name!r} has no {key!r} dataset")
    return ds[()]


def _inv_sqrt(diag: np.ndarray) -> np.ndarray:
    """1/sqrt(d) elementwise, 0 where d <= 0 (a zero self-kernel leaves its entries 0, not NaN)."""
    out = np.zeros(diag.shape, dtype=np.result_type(diag.dtype, np.float32))
    positive = diag > 0
    out[positive] = 1.0 / np.sqrt(diag[positive])
    return out


def _class_diag(diag: np.ndarray, kernel_ndim: int) -> np.ndarray:
    """Per-class self-kernels (n, C) from a stored diagonal; 'full' stores (n, C, C) self blocks."""
    if kernel_ndim == 4 and diag.ndim == 3:
        return np.einsum("ncc->nc", diag)
    return diag


def cosine_normalize(kernel: np.ndarray, diag_rows: np.ndarray, diag_cols: np.ndarray) -> np.ndarray:
    """Cosine-normalise a kernel block given the self-kernels of its row and column points.

    Shapes: (N,M) with diags (N,), (M,); 'diagonal' (N,M,C) with (N,C), (M,C); 'full' (N,M,C,C)
    with (N,C,C), (M,C,C) self blocks (or their (N,C) diagonals): Θ_cc'(x,x')/sqrt(Θ_cc(x,x) Θ_c'c'(x',x')).
    """
    r = _inv_sqrt(_class_diag(np.asarray(diag_rows), kernel.ndim))
    c = _inv_sqrt(_class_diag(np.asarray(diag_cols), kernel.ndim))
    classes = kernel.shape[2:3]
    if kernel.ndim not in (2, 3, 4) or r.shape != kernel.shape[:1] + classes or c.shape != kernel.shape[1:2] + classes:
        raise BadInputError(f"kernel of shape {kernel.shape} does not match self-kernel shapes {r.shape}, {c.shape}")
    if kernel.ndim == 2:
        scale = r[:, None] * c[None, :]
    elif kernel.ndim == 3:
        scale = r[:, None, :] * c[None, :, :]
    else:
        scale = r[:, None, :, None] * c[None, :, None, :]
    return (kernel * scale).astype(np.result_type(kernel.dtype, np.float32), copy=False)


def read_kernel(path: str | os.PathLike, name: str, block: str = "train_train", normalize: bool = False) -> np.ndarray:
    """Read ``/kernel/<name>/<block>``; with ``normalize`` apply cosine normalisation on read.

    ``block`` is "train_train" or "test_train" (rows = test points, columns = train points).
    An incomplete kernel (attr ``complete`` false) is refused.
    """
    if block not in KERNEL_BLOCKS:
        raise BadInputError(f"unknown kernel block {block!r} (expected one of {', '.join(KERNEL_BLOCKS)})")
    path = Path(path)
    with open_run(path) as f:
        kernel = _kernel_dataset(f, path, name, block)
        if not bool(f[f"kernel/{name}"].attrs.get("complete", True)):
            raise BadInputError(f"{path}: kernel {name!r} is incomplete; rerun compute with --resume")
        if not normalize:
            return kernel
        diag_cols = _kernel_dataset(f, path, name, "diag_train")
        diag_rows = diag_cols if block == "train_train" else _kernel_dataset(f, path, name, "diag_test")
    return cosine_normalize(kernel, diag_rows, diag_cols)
