"""Attributes of the run file: provenance of the root, storable values, markers written after their data."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Mapping
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

import h5py
import numpy as np

from ntk_explain import __version__

FORMAT = "ntk-explain"


FORMAT_VERSION = 1

H5_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError)


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
    """The root attributes of a run file: format, versions, command, params, time, host, device, hashes of the model,
    weights and data, seed; JSON-valued ones are JSON strings."""
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


def storable(value: Any) -> Any:
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
        obj.attrs[key] = storable(value)


def py_value(value: Any) -> Any:
    """A JSON-friendly Python value for an HDF5 attribute value."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        return [py_value(v) for v in value.tolist()]
    if isinstance(value, list):
        return [py_value(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def attrs_dict(obj: h5py.Group | h5py.Dataset) -> dict[str, Any]:
    """The attributes of `obj` as Python values."""
    return {key: py_value(obj.attrs[key]) for key in obj.attrs}


def mark(obj: h5py.Group | h5py.Dataset, key: str, value: Any) -> None:
    """Set the attribute `key` of `obj` once everything written before is on disk, and flush it too: a kill at any
    point leaves a marker that is never ahead of the data it vouches for."""
    obj.file.flush()
    obj.attrs[key] = value
    obj.file.flush()
