"""Models and weights: the built-in zoo, `pkg.module:factory`, Hugging Face directories and `torch.export` archives;
weights from safetensors or weights-only torch files (never unpickled otherwise); the model checked on the data."""

from __future__ import annotations

import hashlib
import importlib
import itertools
import json
import logging
import os
import pickle
import sys
import types
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from ntk_explain.errors import BadInputError, UsageError, first_line
from ntk_explain.loading import zoo
from ntk_explain.loading.adapter import ModelAdapter
from ntk_explain.loading.data import Dataset
from ntk_explain.loading.files import Invalid, existing_file, listed, one_line, sha256_file, sha256_files

WEIGHT_FORMATS = (".safetensors", ".pt", ".pth")


_FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


@dataclass(frozen=True)
class LoadedModel:
    """A model in eval() mode with the provenance recorded in run files."""

    module: nn.Module
    model_sha256: str
    weights_sha256: str | None


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
            f"model {spec}: building with kwargs {json.dumps(kwargs)} failed: {first_line(exc)}"
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
        raise BadInputError(f"model {spec}: cannot load the Hugging Face model: {first_line(exc)}") from exc
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
            raise BadInputError(f"model {spec}: cannot import {module_name}: {first_line(exc)}") from exc
        factory = getattr(source, attr, None)
        if not callable(factory):
            raise BadInputError(f"model {spec}: module {module_name} has no callable {attr!r}")
        return _build(spec, factory, kwargs)


@contextmanager
def _safe_torch_load() -> Iterator[None]:
    """Force every torch.load inside to be weights-only (torch.export.load falls back to full unpickling),
    silence torch's warnings and log lines about the file, and turn a refused pickle into `Invalid`."""
    logger = logging.getLogger("torch.export")
    previous_env, previous_disabled = os.environ.get(_FORCE_WEIGHTS_ONLY), logger.disabled
    os.environ[_FORCE_WEIGHTS_ONLY] = "1"
    logger.disabled = True
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            yield
    except pickle.UnpicklingError as exc:
        reason = first_line(exc.__context__ or exc).split(". ")[0]
        raise Invalid(f"refused: not loadable as plain tensors ({reason}); unpickling it could run code") from exc
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
        path = existing_file(spec, (".pt2",))
        with _safe_torch_load():
            module = torch.export.load(path).module()
    except Invalid as exc:
        raise BadInputError(f"model {spec}: {exc}") from exc.__cause__
    except Exception as exc:  # any deserialisation failure means a corrupt or unsafe archive
        raise BadInputError(f"model {spec}: cannot load the exported program: {first_line(exc)}") from exc
    if _exported_in_train_mode(module):
        raise BadInputError(f"model {spec}: exported in train() mode; export the model after calling .eval()")
    # An exported graph's eval/train behaviour is fixed at export; its .eval() raises, so set the flags only.
    for sub in module.modules():
        sub.training = False
    module.eval = types.MethodType(lambda self: self, module)
    return module


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    p = existing_file(path, WEIGHT_FORMATS)
    try:
        if p.suffix.lower() == ".safetensors":
            state = safetensors.torch.load_file(p)
        else:
            with _safe_torch_load():
                state = torch.load(p, weights_only=True, map_location="cpu")
    except Invalid:
        raise
    except Exception as exc:  # any parser failure on a user file is a corrupt input
        raise Invalid(f"cannot read file ({first_line(exc)})") from exc
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise Invalid("not a state dict (a mapping of parameter names to tensors)")
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
    except Invalid as exc:
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
        text = "; ".join(f"{kind}: {listed(names)}" for kind, names in problems.items() if names)
        raise BadInputError(f"weights {path}: {text}")
    if any(t.dtype == torch.float64 for t in state.values()):
        module.double()  # float64 weights load without rounding (the compute dtype is applied afterwards)
    module.load_state_dict(state, strict=True)


@one_line
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
        raise BadInputError(f"{source}: NaN or infinite values in {listed(nonfinite)}")
    if source is not None:
        model_sha256 = sha256_file(source)
    else:
        model_sha256 = hashlib.sha256(json.dumps({"spec": spec, "kwargs": kwargs}, sort_keys=True).encode()).hexdigest()
    return LoadedModel(
        module=module.eval(),
        model_sha256=model_sha256,
        weights_sha256=sha256_file(weights) if weights is not None else sha256_files(bundled),
    )


def _nonfinite(module: nn.Module) -> list[str]:
    """Names of the floating parameters and buffers holding NaN or infinite values."""
    return [k for k, t in module.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]


@one_line
def check_model_on_data(model: nn.Module | ModelAdapter, data: Dataset) -> int:
    """Check the model's values are finite in the compute dtype (too large ones overflow it) and dry-run it in eval()
    mode on one point; return its number of classes C."""
    adapter = model if isinstance(model, ModelAdapter) else ModelAdapter(model)
    module = adapter.module
    nonfinite = _nonfinite(module)
    if nonfinite:
        dtype = next((a.dtype for a in data.inputs.arrays.values() if a.is_floating_point()), torch.float32)
        raise BadInputError(f"model values {listed(nonfinite)} are NaN or infinite in {dtype}")
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
        raise BadInputError(f"model cannot take inputs {what}: {first_line(exc)}") from exc
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
