"""Datasets of the run file: chunked along rows (aligned to the tiles that write them), compressed, with `dims`, their
row tiles checkpointed; projected features in their storage dtype."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import h5py
import numpy as np
import torch

from ntk_explain.store.attrs import mark

CHUNK_BYTES = 1 << 20  # target size of one chunk (~1 MiB)


GZIP_LEVEL = 4


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
