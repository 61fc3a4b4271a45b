"""Loading and validating data sets and models (SPEC §7). Every bad input raises `BadInputError`."""

from __future__ import annotations

import functools
import hashlib
import importlib
import itertools
import json
import logging
import os
import pickle
import re
import sys
import types
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ParamSpec, TypeVar

import h5py
import numpy as np
import safetensors.torch
import torch
from safetensors import safe_open
from torch import nn

from ntk_explain import zoo
from ntk_explain.adapter import Batch, ModelAdapter
from ntk_explain.errors import BadInputError, NtkExplainError, UsageError

DATA_FORMATS = (".npz", ".safetensors", ".h5", ".hdf5")
WEIGHT_FORMATS = (".safetensors", ".pt", ".pth")
_MAX_NAMES = 5
_MAX_LABEL = 2**31 - 1
_FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")  # what breaks a line or a terminal
_P = ParamSpec("_P")
_T = TypeVar("_T")


class _Invalid(Exception):
    """A problem with an input, reported by the caller prefixed with what the input is."""


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


@dataclass(frozen=True)
class LoadedModel:
    """A model in eval() mode with the provenance recorded in run files."""

    module: nn.Module
    spec: str
    kwargs: dict
    model_sha256: str
    weights_sha256: str | None


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _sha256_files(paths: list[Path]) -> str | None:
    """The SHA-256 of one file, of several files' digests in order, or None for none."""
    if len(paths) < 2:
        return sha256_file(paths[0]) if paths else None
    return hashlib.sha256("".join(sha256_file(p) for p in paths).encode()).hexdigest()


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _one_line(function: Callable[_P, _T]) -> Callable[_P, _T]:
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


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_NAMES])
    return shown + (f", … ({len(names) - _MAX_NAMES} more)" if len(names) > _MAX_NAMES else "")


def _existing_file(path: str, formats: tuple[str, ...]) -> Path:
    p = Path(path)
    try:
        if not p.exists():
            raise _Invalid("file not found")
        if not p.is_file():
            raise _Invalid("not a file")
    except (OSError, ValueError) as exc:  # a name too long, with a NUL byte, in an unreadable directory
        raise _Invalid(f"cannot access file ({_first_line(exc)})") from exc
    if p.suffix.lower() not in formats:
        raise _Invalid(f"unknown format {p.suffix!r} (expected one of {', '.join(formats)})")
    return p


# --- data ---------------------------------------------------------------------------------------------


def _require_keys(present: list[str], keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if k not in present]
    if missing:
        raise _Invalid(f"no array named {_names(missing)} (arrays present: {_names(sorted(present)) or 'none'})")


def _read_npz(path: Path, keys: tuple[str, ...]) -> list[np.ndarray]:
    if not zipfile.is_zipfile(path):
        raise _Invalid("cannot read file (not a .npz zip archive)")
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
    path = _existing_file(spec, DATA_FORMATS)
    try:
        *xs, y = _READERS[path.suffix.lower()](path, (*x_keys, y_key))
    except _Invalid:
        raise
    except Exception as exc:  # any parser failure on a user file is a corrupt input
        raise _Invalid(f"cannot read file ({_first_line(exc)})") from exc
    for x, x_key in zip(xs, x_keys, strict=True):
        _check_shapes(x, y, x_key, y_key)
    return xs, y, np.arange(len(y), dtype=np.int64), sha256_file(path)


def _zoo_arrays(spec: str, split: str) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, str]:
    name, _, forced = spec.removeprefix("zoo:").partition(":")
    if name != "digits":
        raise _Invalid(f"unknown zoo data set {name!r} (available: digits)")
    split = forced or split
    if split not in zoo.SPLITS:
        raise _Invalid(f"unknown split {split!r} (available: {', '.join(zoo.SPLITS)})")
    x, y, index = zoo.digits(split)
    digest = hashlib.sha256()
    for array in (x, y, index):
        digest.update(array.tobytes())
    return [x], y, index, digest.hexdigest()


def _check_shapes(x: np.ndarray, y: np.ndarray, x_key: str, y_key: str) -> None:
    if x.ndim == 0:
        raise _Invalid(f"array {x_key!r} is a scalar, expected one row per point")
    if y.ndim != 1:
        raise _Invalid(f"labels {y_key!r} must be 1-D, got shape {y.shape}")
    if len(x) != len(y):
        raise _Invalid(f"array {x_key!r} has {len(x)} rows but labels {y_key!r} have {len(y)}")
    if len(y) == 0:
        raise _Invalid("the data set is empty")
    if x.dtype.kind not in "biuf":
        raise _Invalid(f"array {x_key!r} must be numeric, got dtype {x.dtype}")


def _labels(y: np.ndarray, y_key: str) -> torch.Tensor:
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or not np.array_equal(y, np.round(y)):
            raise _Invalid(f"labels {y_key!r} must be integer class indices, got non-integer values")
    elif y.dtype.kind not in "biu":
        raise _Invalid(f"labels {y_key!r} must be integer class indices, got dtype {y.dtype}")
    exact = y.astype(np.float64) if y.dtype.kind == "f" else y  # float16 cannot hold _MAX_LABEL
    negative, huge = np.flatnonzero(exact < 0), np.flatnonzero(exact > _MAX_LABEL)  # before a cast could wrap them
    if negative.size:
        raise _Invalid(f"labels {y_key!r} must be ≥ 0, found {y[negative[0]]} at row {negative[0]}")
    if huge.size:
        raise _Invalid(f"labels {y_key!r} must be class indices ≤ {_MAX_LABEL}, found {y[huge[0]]} at row {huge[0]}")
    return torch.from_numpy(y.astype(np.int64))


def _input_array(x: np.ndarray, x_key: str, dtype: torch.dtype) -> torch.Tensor:
    """A floating array in the compute dtype, checked finite; an integer array (token ids, a mask) as int64 and a
    boolean one as it is: gradients never reach them."""
    if x.dtype.kind in "iu":
        if x.dtype.kind == "u" and x.size and x.max() > np.iinfo(np.int64).max:
            raise _Invalid(f"array {x_key!r} has values beyond int64")
        return torch.from_numpy(np.ascontiguousarray(x).astype(np.int64))
    if x.dtype.kind == "b":
        return torch.from_numpy(np.ascontiguousarray(x))
    features = torch.from_numpy(np.ascontiguousarray(x)).to(dtype)
    rows = (~torch.isfinite(features).reshape(len(features), -1).all(1)).nonzero()
    if len(rows):
        raise _Invalid(f"array {x_key!r} has NaN or infinite values in {len(rows)} rows (first: row {rows[0, 0]})")
    return features


def input_keys(x_key: str | Sequence[str]) -> tuple[str, ...]:
    """The input array names: one name, a comma-separated list of names, or a sequence of them (once each)."""
    names = x_key.split(",") if isinstance(x_key, str) else list(x_key)
    keys = tuple(dict.fromkeys(name.strip() for name in names))
    if not keys or not all(keys):
        raise UsageError(f"--x-key {x_key!r}: expected an array name or a comma-separated list of names")
    return keys


@_one_line
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
    except _Invalid as exc:
        raise BadInputError(f"{split} data {spec}: {exc}") from exc.__cause__


# --- models -------------------------------------------------------------------------------------------


@contextmanager
def _cwd_importable() -> Iterator[None]:
    """Let `pkg.module:factory` name modules in the working directory, as `python -m` would."""
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added:
            sys.path.remove(cwd)


def _build(spec: str, factory: Callable[..., object], kwargs: dict) -> nn.Module:
    try:
        with warnings.catch_warnings():  # e.g. torch's on zero-element layers: a failure is reported on one line
            warnings.simplefilter("ignore")
            module = factory(**kwargs)
    except Exception as exc:  # the factory is user code: its failure is a bad model input
        raise BadInputError(
            f"model {spec}: building with kwargs {json.dumps(kwargs)} failed: {_first_line(exc)}"
        ) from exc
    if not isinstance(module, nn.Module):
        raise BadInputError(f"model {spec}: the factory returned {type(module).__name__}, not a torch.nn.Module")
    return module


def _hf_model(spec: str, kwargs: dict) -> tuple[nn.Module, Path, list[Path]]:
    """A Hugging Face sequence classifier from a local `save_pretrained` directory (config.json and safetensors
    weights, one file or shards), with local files only and no remote code; returns it with its config and weights
    files."""
    if kwargs:
        raise UsageError(f"model {spec}: model kwargs do not apply to a Hugging Face directory")
    directory = Path(spec.removeprefix("hf:"))
    config = directory / "config.json"
    if not directory.is_dir():
        raise BadInputError(f"model {spec}: not a directory")
    if not config.is_file():
        raise BadInputError(f"model {spec}: no config.json (expected a directory written by save_pretrained)")
    weights = sorted(directory.glob("*.safetensors")) + sorted(directory.glob("*.safetensors.index.json"))
    if not weights:
        raise BadInputError(f"model {spec}: no model.safetensors (pickled weights, pytorch_model.bin, are refused)")
    try:
        import transformers
    except ImportError as exc:
        raise UsageError(f"model {spec}: Hugging Face models need the extra: pip install 'ntk-explain[hf]'") from exc
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = transformers.AutoModelForSequenceClassification.from_pretrained(
                directory, local_files_only=True, use_safetensors=True, trust_remote_code=False
            )
    except Exception as exc:  # a corrupt config or weights file, an unknown architecture
        raise BadInputError(f"model {spec}: cannot load the Hugging Face model: {_first_line(exc)}") from exc
    finally:
        transformers.logging.set_verbosity(verbosity)
    return module, config, weights


def _zoo_model(spec: str, kwargs: dict) -> nn.Module:
    name = spec.removeprefix("zoo:")
    if name not in zoo.MODELS:
        raise BadInputError(f"model {spec}: unknown zoo model (available: {', '.join(zoo.MODELS)})")
    return _build(spec, zoo.MODELS[name], kwargs)


def _factory_model(spec: str, kwargs: dict) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    with _cwd_importable():
        try:
            source = importlib.import_module(module_name)
        except Exception as exc:  # importing runs user code; any failure is a bad model input
            raise BadInputError(f"model {spec}: cannot import {module_name}: {_first_line(exc)}") from exc
        factory = getattr(source, attr, None)
        if not callable(factory):
            raise BadInputError(f"model {spec}: module {module_name} has no callable {attr!r}")
        return _build(spec, factory, kwargs)


@contextmanager
def _safe_torch_load() -> Iterator[None]:
    """Force every torch.load inside to be weights-only (torch.export.load falls back to full unpickling),
    silence torch's warnings and log lines about the file, and turn a refused pickle into `_Invalid`."""
    logger = logging.getLogger("torch.export")
    previous_env, previous_disabled = os.environ.get(_FORCE_WEIGHTS_ONLY), logger.disabled
    os.environ[_FORCE_WEIGHTS_ONLY] = "1"
    logger.disabled = True
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            yield
    except pickle.UnpicklingError as exc:
        reason = _first_line(exc.__context__ or exc).split(". ")[0]
        raise _Invalid(f"refused: not loadable as plain tensors ({reason}); unpickling it could run code") from exc
    finally:
        logger.disabled = previous_disabled
        if previous_env is None:
            del os.environ[_FORCE_WEIGHTS_ONLY]
        else:
            os.environ[_FORCE_WEIGHTS_ONLY] = previous_env


# (op, position and name of its "training" flag): graphs exported from a model in train() mode
_TRAINING_FLAGS = {
    torch.ops.aten.batch_norm.default: (5, "training"),
    torch.ops.aten.dropout.default: (2, "train"),
    torch.ops.aten.native_dropout.default: (2, "train"),
}


def _exported_in_train_mode(module: nn.Module) -> bool:
    for node in module.graph.nodes:
        if node.target in _TRAINING_FLAGS:
            position, name = _TRAINING_FLAGS[node.target]
            if node.args[position] if len(node.args) > position else node.kwargs.get(name):
                return True
    return False


def _exported_model(spec: str, kwargs: dict) -> nn.Module:
    if kwargs:
        raise UsageError(f"model {spec}: model kwargs do not apply to an exported .pt2 model")
    try:
        path = _existing_file(spec, (".pt2",))
        with _safe_torch_load():
            module = torch.export.load(path).module()
    except _Invalid as exc:
        raise BadInputError(f"model {spec}: {exc}") from exc.__cause__
    except Exception as exc:  # any deserialisation failure means a corrupt or unsafe archive
        raise BadInputError(f"model {spec}: cannot load the exported program: {_first_line(exc)}") from exc
    if _exported_in_train_mode(module):
        raise BadInputError(f"model {spec}: exported in train() mode; export the model after calling .eval()")
    # An exported graph's eval/train behaviour is fixed at export; its .eval() raises, so set the flags only.
    for sub in module.modules():
        sub.training = False
    module.eval = types.MethodType(lambda self: self, module)
    return module


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    p = _existing_file(path, WEIGHT_FORMATS)
    try:
        if p.suffix.lower() == ".safetensors":
            state = safetensors.torch.load_file(p)
        else:
            with _safe_torch_load():
                state = torch.load(p, weights_only=True, map_location="cpu")
    except _Invalid:
        raise
    except Exception as exc:  # any parser failure on a user file is a corrupt input
        raise _Invalid(f"cannot read file ({_first_line(exc)})") from exc
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise _Invalid("not a state dict (a mapping of parameter names to tensors)")
    return dict(state)


def _fill_tied(state: dict[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    """Give tied tensors all their names (`safetensors.torch.save_model` stores shared tensors once)."""
    groups: dict[tuple, list[str]] = {}
    for name, t in expected.items():
        if t.numel():
            groups.setdefault((t.data_ptr(), t.shape, t.stride()), []).append(name)
    for names in groups.values():
        stored = next((n for n in names if n in state), None)
        if stored is not None:
            for name in names:
                state.setdefault(name, state[stored])


def _dtype_kind(t: torch.Tensor) -> str:
    """What a tensor must stay to load into a parameter or buffer: complex, float, bool or integer."""
    if t.is_complex():
        return "complex"
    if t.is_floating_point():
        return "float"
    return "bool" if t.dtype == torch.bool else "integer"


def _load_weights(module: nn.Module, path: str) -> None:
    try:
        state = _read_state_dict(path)
    except _Invalid as exc:
        raise BadInputError(f"weights {path}: {exc}") from exc.__cause__
    expected = module.state_dict()
    _fill_tied(state, expected)
    problems = {
        "missing keys": [k for k in expected if k not in state],
        "unexpected keys": [k for k in state if k not in expected],
        "shape mismatches": [
            f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)} expected"
            for k, v in expected.items()
            if k in state and state[k].shape != v.shape
        ],
        "dtype mismatches": [  # a float stored as integers or booleans, a complex as floats, ...: the wrong file
            f"{k} {state[k].dtype} vs {v.dtype} expected"
            for k, v in expected.items()
            if k in state and _dtype_kind(state[k]) != _dtype_kind(v)
        ],
    }
    if any(problems.values()):
        text = "; ".join(f"{kind}: {_names(names)}" for kind, names in problems.items() if names)
        raise BadInputError(f"weights {path}: {text}")
    module.load_state_dict(state, strict=True)


@_one_line
def load_model(spec: str, kwargs: dict | None = None, weights: str | None = None) -> LoadedModel:
    """Build `zoo:NAME`, `pkg.module:factory(**kwargs)`, load a Hugging Face directory `hf:DIR` or a `.pt2` export;
    load weights; eval() mode."""
    kwargs = dict(kwargs or {})
    exported = not spec.startswith(("zoo:", "hf:")) and spec.lower().endswith(".pt2")
    source: Path | None = Path(spec) if exported else None  # the file whose bytes identify the model
    bundled: list[Path] = []  # the weights files a Hugging Face directory holds
    if exported:
        module = _exported_model(spec, kwargs)
    elif spec.startswith("hf:"):
        module, source, bundled = _hf_model(spec, kwargs)
    elif spec.startswith("zoo:"):
        module = _zoo_model(spec, kwargs)
    elif ":" in spec:
        module = _factory_model(spec, kwargs)
    else:
        raise BadInputError(f"model {spec}: expected zoo:NAME, pkg.module:factory or a .pt2 file, or hf:DIR")
    if weights is not None:
        _load_weights(module, weights)
    nonfinite = _nonfinite(module)
    if nonfinite:
        source = f"weights {weights}" if weights is not None else f"model {spec}"
        raise BadInputError(f"{source}: NaN or infinite values in {_names(nonfinite)}")
    if source is not None:
        model_sha256 = sha256_file(source)
    else:
        model_sha256 = hashlib.sha256(json.dumps({"spec": spec, "kwargs": kwargs}, sort_keys=True).encode()).hexdigest()
    return LoadedModel(
        module=module.eval(),
        spec=spec,
        kwargs=kwargs,
        model_sha256=model_sha256,
        weights_sha256=sha256_file(weights) if weights is not None else _sha256_files(bundled),
    )


def _nonfinite(module: nn.Module) -> list[str]:
    """Names of the floating parameters and buffers holding NaN or infinite values."""
    return [k for k, t in module.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]


@_one_line
def check_model_on_data(model: nn.Module | ModelAdapter, data: Dataset) -> int:
    """Check the model's values are finite in the compute dtype (too large ones overflow it) and dry-run it in eval()
    mode on one point; return its number of classes C."""
    adapter = model if isinstance(model, ModelAdapter) else ModelAdapter(model)
    module = adapter.module
    nonfinite = _nonfinite(module)
    if nonfinite:
        dtype = next((a.dtype for a in data.inputs.arrays.values() if a.is_floating_point()), torch.float32)
        raise BadInputError(f"model values {_names(nonfinite)} are NaN or infinite in {dtype}")
    state = next(itertools.chain(module.parameters(), module.buffers()), None)
    x = data.inputs[:1] if state is None else data.inputs[:1].to(state.device)
    module.eval()
    try:
        with torch.no_grad():
            out = adapter(x)
    except BadInputError:
        raise
    except Exception as exc:  # the forward is user code: any failure means the model and data do not fit
        shapes = {name: tuple(a.shape) for name, a in x.arrays.items()}
        what = ", ".join(f"{k} {v}" for k, v in shapes.items()) if x.keyword else f"of shape {shapes.popitem()[1]}"
        raise BadInputError(f"model cannot take inputs {what}: {_first_line(exc)}") from exc
    if out.ndim != 2 or len(out) != 1 or not out.is_floating_point():
        got = f"{tuple(out.shape)} {out.dtype}"
        raise BadInputError(f"model output for one input must be floating logits of shape (1, C), got {got}")
    if not torch.isfinite(out).all():
        raise BadInputError(f"model output on {data.source} row {data.index[0]} is not finite")
    n_classes = out.shape[1]
    if int(data.y.max()) >= n_classes:
        raise BadInputError(
            f"{data.split} data {data.source}: label {int(data.y.max())} but the model has only {n_classes} outputs"
        )
    return n_classes
