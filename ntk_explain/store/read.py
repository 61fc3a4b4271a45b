"""Readers of a run file: attributes, metrics, a walk of its contents, and kernels (cosine-normalised on request)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ntk_explain.errors import BadInputError
from ntk_explain.kernel.normalize import cosine_normalize
from ntk_explain.store import layout
from ntk_explain.store.attrs import attrs_dict
from ntk_explain.store.files import open_run

# Root attributes shown by `info`; the others (params, hashes, versions) are in `info --json`.
INFO_ROOT_KEYS = ("format_version", "ntk_explain_version", "created", "device", "seed")


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
        names = (layout.FAITHFULNESS, layout.within(layout.DISTILL, layout.FAITHFULNESS))
        found = {name: attrs_dict(f[name]) for name in names if name in f}
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


def _kernel_dataset(f: h5py.File, path: Path, name: str, key: str) -> np.ndarray:
    group = f.get(layout.kernel(name))
    if not isinstance(group, h5py.Group):
        available = sorted(f[layout.KERNEL]) if isinstance(f.get(layout.KERNEL), h5py.Group) else []
        raise BadInputError(f"{path}: no kernel {name!r} (available: {', '.join(available) or 'none'})")
    ds = group.get(key)
    if not isinstance(ds, h5py.Dataset):
        raise BadInputError(f"{path}: kernel {name!r} has no {key!r} dataset")
    return ds[()]


def read_kernel(path: str | os.PathLike, name: str, block: str = "train_train", normalize: bool = False) -> np.ndarray:
    """Read ``/kernel/<name>/<block>``; with ``normalize`` apply cosine normalisation on read.

    ``block`` is "train_train" or "test_train" (rows = test points, columns = train points).
    An incomplete kernel (attr ``complete`` false) is refused.
    """
    if block not in layout.BLOCKS:
        raise BadInputError(f"unknown kernel block {block!r} (expected one of {', '.join(layout.BLOCKS)})")
    path = Path(path)
    with open_run(path) as f:
        kernel = _kernel_dataset(f, path, name, block)
        if not bool(f[layout.kernel(name)].attrs.get("complete", True)):
            raise BadInputError(f"{path}: kernel {name!r} is incomplete; rerun compute with --resume")
        if not normalize:
            return kernel
        diag_cols = _kernel_dataset(f, path, name, layout.diag("train"))
        rows = layout.SPLITS[layout.BLOCKS.index(block)]
        diag_rows = diag_cols if rows == "train" else _kernel_dataset(f, path, name, layout.diag(rows))
    return cosine_normalize(kernel, diag_rows, diag_cols)
