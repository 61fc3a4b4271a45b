"""The shard files of a distributed compute, and their join into one run file."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Sequence
from pathlib import Path

import h5py

from ntk_explain.store import layout
from ntk_explain.store.attrs import attrs_dict
from ntk_explain.store.files import CACHE_BYTES, create_run, open_hdf5


def shard_path(path: str | os.PathLike, rank: int, world: int) -> Path:
    """The shard file that rank `rank` of `world` writes for the run file `path` (`join_shards` joins them)."""
    path = Path(path)
    return path.with_name(f".{path.name}.rank{rank}-of-{world}")


def join_shards(path: str | os.PathLike, shards: Sequence[Path], *, overwrite: bool) -> None:
    """Write the run file `path` from the shard files of a distributed compute (`create_run`, atomic), then delete
    them. Each kernel dataset of `layout.SHARDED` holds in each shard the row tiles of one rank and zeros elsewhere,
    so it is their sum (exact: every entry is written by one rank); everything else is the first shard's."""
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(open_hdf5(Path(shard), "r")) for shard in shards]
        first = files[0]
        attrs = {**attrs_dict(first), "world_size": len(files)}
        with create_run(path, overwrite=overwrite, attrs=attrs) as run:
            for name in first:
                first.copy(first[name], run, name)
            kernels = [layout.kernel(kernel) for kernel in run.get(layout.KERNEL, {})]
            for name in [f"{kernel}/{block}" for kernel in kernels for block in layout.SHARDED]:
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
