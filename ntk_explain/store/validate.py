"""The layout that readers rely on, checked when a run file is opened: a damaged file is refused before a reader
trips over it."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from ntk_explain.errors import BadInputError, first_line
from ntk_explain.store import layout
from ntk_explain.store.attrs import H5_ERRORS, py_value


class _Damaged(Exception):
    """A run file whose layout breaks `layout`'s; reported by `check_layout` with the file's name."""


# The datasets that readers rely on: dtype kinds and axes. A dataset present must have these axes, and an axis the
# same size wherever it appears; "…" stands for a kernel's class axes (none, (C,) or (C, C)). In a kernel group
# {train} is the training set, or for the distilled kernel (attribute support="distill") its support. Kernel groups
# without a "kernel" attribute are not checked: readers refuse them.
_DATA_AXES = {"labels": ("iu", "{split}"), "index": ("iu", "{split}"), "nn_logits": ("f", "{split}", "classes")}


_KERNEL_AXES = {
    layout.diag("train"): ("f", "{train}", "{g} …"),
    layout.block("train"): ("f", "{train}", "{train}", "{g} …"),
    layout.block("test"): ("f", "test", "{train}", "{g} …"),
    layout.diag("test"): ("f", "test", "{g} …"),
    layout.features("train"): ("fu", "{train}", "{g} outputs", "{g} proj"),
    layout.features("test"): ("fu", "test", "{g} outputs", "{g} proj"),
    "full_train": ("f", "train", "{train}"),
    "diag_full": ("f", "train"),
}


_DISTILL_AXES = {"classes": ("iu", "{train}"), "labels": ("f", "{train}", "classes")}


def _read_metadata(name: str, obj: h5py.Group | h5py.Dataset) -> None:
    """Read an object's attributes and description (damaged metadata raises); check a dataset's dims names its axes."""
    attrs = dict(obj.attrs)
    if isinstance(obj, h5py.Dataset) and obj.dtype is not None and "dims" in attrs:
        names = py_value(attrs["dims"])
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


def check_layout(f: h5py.File, path: Path) -> None:
    """Refuse a damaged run file before a reader trips over it: every object's metadata readable, and the datasets of
    /data, /kernel/* and /distill that are present with the axes of `layout`, of the same sizes wherever they appear.
    Reads metadata and the labels, not the kernels."""
    try:
        _read_metadata("/", f)
        f.visititems(_read_metadata)
        groups = {layout.data(split): (_DATA_AXES, {"split": split}) for split in layout.SPLITS}
        for name in f[layout.KERNEL] if isinstance(f.get(layout.KERNEL), h5py.Group) else ():
            if "kernel" not in f[layout.kernel(name)].attrs:  # not (yet) a kernel that readers would read
                continue
            distilled = py_value(f[layout.kernel(name)].attrs.get("support", "")) == layout.DISTILL
            train = f"/{layout.kernel(name)} support" if distilled else "train"
            groups[layout.kernel(name)] = (_KERNEL_AXES, {"g": f"/{layout.kernel(name)}", "train": train})
        groups[layout.DISTILL] = (_DISTILL_AXES, {"train": f"/{layout.kernel(layout.DISTILLED)} support"})
        sizes: dict[str, object] = {}
        for name, (specs, names) in groups.items():
            group = f.get(name)
            if group is not None and not isinstance(group, h5py.Group):
                raise _Damaged(f"/{name} is not a group")
            if group is not None:
                _bind(sizes, group, specs, **names)
        labels = [f"{layout.data(split)}/labels" for split in layout.SPLITS]
        for name in [*labels, f"{layout.DISTILL}/classes"]:
            _check_classes(f.get(name), sizes.get("classes"))
    except _Damaged as exc:
        raise BadInputError(f"{path}: damaged run file: {exc}") from None
    except H5_ERRORS as exc:
        raise BadInputError(f"{path}: damaged run file: {first_line(exc)}") from exc
