"""Data sets: input arrays (one, or several named ones) and integer labels from .npz, .safetensors, .h5 files or
the built-in digits, validated (every bad input raises `BadInputError`)."""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from safetensors import safe_open

from ntk_explain.errors import BadInputError, UsageError, first_line
from ntk_explain.loading import zoo
from ntk_explain.loading.adapter import Batch
from ntk_explain.loading.files import Invalid, existing_file, listed, one_line, sha256_file

DATA_FORMATS = (".npz", ".safetensors", ".h5", ".hdf5")


_MAX_LABEL = 2**31 - 1


@dataclass(frozen=True)
class Dataset:
    """A validated data set: inputs (one array, or several named ones), integer labels and the source row of each
    point."""

    inputs: Batch
    y: torch.Tensor
    index: np.ndarray
    source: str
    sha256: str
    split: str = "train"

    @property
    def x(self) -> torch.Tensor:
        """The one input array of a data set that has one."""
        if self.inputs.keyword:
            raise ValueError(f"{self.source} has several input arrays: {', '.join(self.inputs.names)}")
        return next(iter(self.inputs.arrays.values()))


def _require_keys(present: list[str], keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if k not in present]
    if missing:
        raise Invalid(f"no array named {listed(missing)} (arrays present: {listed(sorted(present)) or 'none'})")


def _read_npz(path: Path, keys: tuple[str, ...]) -> list[np.ndarray]:
    if not zipfile.is_zipfile(path):
        raise Invalid("cannot read file (not a .npz zip archive)")
    with np.load(path, allow_pickle=False) as f:
        _require_keys(f.files, keys)
        return [f[k] for k in keys]


def _tensor_to_numpy(t: torch.Tensor) -> np.ndarray:
    if t.is_floating_point() and t.dtype not in (torch.float16, torch.float32, torch.float64):
        t = t.float()  # bfloat16 and float8 have no numpy dtype
    return t.numpy()


def _read_safetensors(path: Path, keys: tuple[str, ...]) -> list[np.ndarray]:
    with safe_open(path, framework="pt") as f:
        _require_keys(list(f.keys()), keys)
        return [_tensor_to_numpy(f.get_tensor(k)) for k in keys]


def _read_h5(path: Path, keys: tuple[str, ...]) -> list[np.ndarray]:
    with h5py.File(path, "r") as f:
        present: list[str] = []
        f.visititems(lambda name, obj: present.append(name) if isinstance(obj, h5py.Dataset) else None)
        _require_keys(present, keys)
        return [np.asarray(f[k][()]) for k in keys]


_READERS: dict[str, Callable[[Path, tuple[str, ...]], list[np.ndarray]]] = {
    ".npz": _read_npz,
    ".safetensors": _read_safetensors,
    ".h5": _read_h5,
    ".hdf5": _read_h5,
}


def _file_arrays(
    spec: str, x_keys: tuple[str, ...], y_key: str
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, str]:
    path = existing_file(spec, DATA_FORMATS)
    try:
        *xs, y = _READERS[path.suffix.lower()](path, (*x_keys, y_key))
    except Invalid:
        raise
    except Exception as exc:  # any parser failure on a user file is a corrupt input
        raise Invalid(f"cannot read file ({first_line(exc)})") from exc
    for x, x_key in zip(xs, x_keys, strict=True):
        _check_shapes(x, y, x_key, y_key)
    return xs, y, np.arange(len(y), dtype=np.int64), sha256_file(path)


def _zoo_arrays(spec: str, split: str) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, str]:
    name, _, forced = spec.removeprefix("zoo:").partition(":")
    if name != "digits":
        raise Invalid(f"unknown zoo data set {name!r} (available: digits)")
    split = forced or split
    if split not in zoo.SPLITS:
        raise Invalid(f"unknown split {split!r} (available: {', '.join(zoo.SPLITS)})")
    x, y, index = zoo.digits(split)
    digest = hashlib.sha256()
    for array in (x, y, index):
        digest.update(array.tobytes())
    return [x], y, index, digest.hexdigest()


def _check_shapes(x: np.ndarray, y: np.ndarray, x_key: str, y_key: str) -> None:
    if x.ndim == 0:
        raise Invalid(f"array {x_key!r} is a scalar, expected one row per point")
    if y.ndim != 1:
        raise Invalid(f"labels {y_key!r} must be 1-D, got shape {y.shape}")
    if len(x) != len(y):
        raise Invalid(f"array {x_key!r} has {len(x)} rows but labels {y_key!r} have {len(y)}")
    if len(y) == 0:
        raise Invalid("the data set is empty")
    if x.dtype.kind not in "biuf":
        raise Invalid(f"array {x_key!r} must be numeric, got dtype {x.dtype}")


def _labels(y: np.ndarray, y_key: str) -> torch.Tensor:
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or not np.array_equal(y, np.round(y)):
            raise Invalid(f"labels {y_key!r} must be integer class indices, got non-integer values")
    elif y.dtype.kind not in "biu":
        raise Invalid(f"labels {y_key!r} must be integer class indices, got dtype {y.dtype}")
    exact = y.astype(np.float64) if y.dtype.kind == "f" else y  # float16 cannot hold _MAX_LABEL
    negative, huge = np.flatnonzero(exact < 0), np.flatnonzero(exact > _MAX_LABEL)  # before a cast could wrap them
    if negative.size:
        raise Invalid(f"labels {y_key!r} must be ≥ 0, found {y[negative[0]]} at row {negative[0]}")
    if huge.size:
        raise Invalid(f"labels {y_key!r} must be class indices ≤ {_MAX_LABEL}, found {y[huge[0]]} at row {huge[0]}")
    return torch.from_numpy(y.astype(np.int64))


def _input_array(x: np.ndarray, x_key: str, dtype: torch.dtype) -> torch.Tensor:
    """A floating array in the compute dtype, checked finite; an integer array (token ids, a mask) as int64 and a
    boolean one as it is: gradients never reach them."""
    if x.dtype.kind in "iu":
        if x.dtype.kind == "u" and x.size and x.max() > np.iinfo(np.int64).max:
            raise Invalid(f"array {x_key!r} has values beyond int64")
        return torch.from_numpy(np.ascontiguousarray(x).astype(np.int64))
    if x.dtype.kind == "b":
        return torch.from_numpy(np.ascontiguousarray(x))
    if x.dtype not in (np.float16, np.float32, np.float64):
        x = x.astype(np.float64)  # long double (float96/float128): no torch dtype; beyond float64's range → inf
    features = torch.from_numpy(np.ascontiguousarray(x)).to(dtype)
    rows = (~torch.isfinite(features).reshape(len(features), -1).all(1)).nonzero()
    if len(rows):
        raise Invalid(f"array {x_key!r} has NaN or infinite values in {len(rows)} rows (first: row {rows[0, 0]})")
    return features


def input_keys(x_key: str | Sequence[str]) -> tuple[str, ...]:
    """The input array names: one name, a comma-separated list of names, or a sequence of them (once each)."""
    names = x_key.split(",") if isinstance(x_key, str) else list(x_key)
    keys = tuple(dict.fromkeys(name.strip() for name in names))
    if not keys or not all(keys):
        raise UsageError(f"--x-key {x_key!r}: expected an array name or a comma-separated list of names")
    return keys


@one_line
def load_dataset(
    spec: str,
    split: str,
    *,
    x_key: str | Sequence[str] = "x",
    y_key: str = "y",
    dtype: torch.dtype = torch.float32,
    limit: int | None = None,
) -> Dataset:
    """Load and validate `spec` (.npz, .safetensors, .h5 file or `zoo:digits[:split]`), first `limit` rows. Several
    input arrays (`x_key="input_ids,attention_mask"`) are passed to the model as keyword arguments, one positionally;
    floating arrays are cast to `dtype`, integer ones stay integers."""
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be floating, got {dtype}")
    if limit is not None and limit < 1:
        raise UsageError(f"the row limit must be ≥ 1, got {limit}")
    keys = input_keys(x_key)
    try:
        if spec.startswith("zoo:"):
            keys = ("x",)
            xs, y, index, digest = _zoo_arrays(spec, split)
        else:
            xs, y, index, digest = _file_arrays(spec, keys, y_key)
        arrays = {key: _input_array(x[:limit], key, dtype) for key, x in zip(keys, xs, strict=True)}
        inputs = Batch(arrays, keyword=len(arrays) > 1)
        return Dataset(inputs, _labels(y[:limit], y_key), index[:limit], spec, digest, split)
    except Invalid as exc:
        raise BadInputError(f"{split} data {spec}: {exc}") from exc.__cause__
