"""Readers of a run file: attributes, metrics, a walk of its contents, and kernel blocks as stored."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ntk_explain.errors import BadInputError
from ntk_explain.store import layout
from ntk_explain.store.attrs import attrs_dict, py_value
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


def saved_request(path: str | os.PathLike, group: str) -> str | None:
    """The request (JSON) that the stage which finished `group` of the run file `path` recorded on it (attribute
    ``request``); None when the file, the group or the record is absent."""
    if not Path(path).is_file():
        return None
    with open_run(path) as f:
        obj = f.get(group)
        return py_value(obj.attrs["request"]) if obj is not None and "request" in obj.attrs else None


def path_summary(path: str | os.PathLike) -> dict[str, Any] | None:
    """The attributes of a finished /path (how exact the path kernel was, its agreement with the kGLM), or None."""
    with open_run(path) as f:
        group = f.get(layout.PATH)
        return attrs_dict(group) if group is not None and "request" in group.attrs else None


def faithfulness(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The attributes of /faithfulness and /distill/faithfulness, those present; neither is bad input."""
    with open_run(path) as f:
        names = (layout.FAITHFULNESS, layout.within(layout.DISTILL, layout.FAITHFULNESS))
        found = {name: attrs_dict(f[name]) for name in names if name in f}
    if not found:
        raise BadInputError(f"{path} has no /faithfulness (run the stage that writes it first)")
    return found


def read_attribution(path: str | os.PathLike, distilled: bool = False) -> dict[str, np.ndarray]:
    """Every dataset of /attribution (of /distill/attribution with ``distilled``) by name: ``scores`` (M, N) (or
    (M, N, C) with every class), ``class`` (M,) the explained class, ``topk_index``/``topk_score`` (M, k) the
    proponents, ``opp_index``/``opp_score`` (M, k) the opponents."""
    name = layout.within(layout.DISTILL, layout.ATTRIBUTION) if distilled else layout.ATTRIBUTION
    with open_run(path) as f:
        group = f.get(name)
        if not isinstance(group, h5py.Group):
            raise BadInputError(f"{path} has no /{name} (run attribute first)")
        return {key: ds[()] for key, ds in group.items() if isinstance(ds, h5py.Dataset)}


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


def _complete_kernel(f: h5py.File, path: Path, name: str, key: str) -> np.ndarray:
    """One dataset of ``/kernel/<name>``; an incomplete kernel (attr ``complete`` false) is refused."""
    data = _kernel_dataset(f, path, name, key)
    if not bool(f[layout.kernel(name)].attrs.get("complete", True)):
        raise BadInputError(f"{path}: kernel {name!r} is incomplete; rerun compute with --resume")
    return data


def _check_block(block: str) -> None:
    if block not in layout.BLOCKS:
        raise BadInputError(f"unknown kernel block {block!r} (expected one of {', '.join(layout.BLOCKS)})")


def kernel_block(path: str | os.PathLike, name: str, block: str = "train_train") -> np.ndarray:
    """The stored ``/kernel/<name>/<block>`` as computed: "train_train" or "test_train" (rows = test points, columns =
    train points)."""
    _check_block(block)
    with open_run(path) as f:
        return _complete_kernel(f, Path(path), name, block)


def self_kernels(path: str | os.PathLike, name: str, block: str = "train_train") -> tuple[np.ndarray, np.ndarray]:
    """The self-kernels of the rows and of the columns of ``block`` (the ``diag_<split>`` datasets)."""
    _check_block(block)
    path = Path(path)
    with open_run(path) as f:
        columns = _complete_kernel(f, path, name, layout.diag("train"))
        rows = layout.SPLITS[layout.BLOCKS.index(block)]
        return (columns if rows == "train" else _kernel_dataset(f, path, name, layout.diag(rows))), columns
