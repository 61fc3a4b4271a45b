"""The one place that calls the user's model: its inputs as named arrays, its output as logits.

A model takes one input array x, passed positionally (`model(x)`), or several named arrays passed as keyword
arguments (`model(input_ids=…, attention_mask=…)`). Floating arrays are in the compute dtype; integer arrays (token
ids, masks) stay integers, so gradients reach embeddings, never the inputs. The output may be a tensor, a tuple or
list (its first element), a mapping or an object with `.logits` (Hugging Face's `ModelOutput`), or the entry
`output_key` of either.

Every call runs PyTorch's plain (differentiable) code paths: the fused inference fast path of
`nn.MultiheadAttention` / `nn.TransformerEncoder`, which it takes under `no_grad` and which computes padded positions
differently (nested tensors), is switched off, so that the logits and their gradients are of one function.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ntk_explain.errors import BadInputError


@dataclass(frozen=True)
class Batch:
    """n rows of the model's inputs: named arrays (n, …) of equal length; `keyword`: passed as keyword arguments,
    else the one array is passed positionally."""

    arrays: Mapping[str, Tensor]
    keyword: bool = False

    def __post_init__(self) -> None:
        lengths = {name: len(a) if a.dim() else 0 for name, a in self.arrays.items()}
        if not lengths:
            raise ValueError("a batch needs at least one array")
        if len(set(lengths.values())) > 1:
            raise ValueError(f"input arrays of different lengths: {lengths}")
        if not self.keyword and len(lengths) > 1:
            raise ValueError("several input arrays are passed as keyword arguments")

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def __getitem__(self, rows: slice | Tensor) -> Batch:
        return Batch({name: a[rows] for name, a in self.arrays.items()}, self.keyword)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.arrays)

    @property
    def device(self) -> torch.device:
        return next(iter(self.arrays.values())).device

    @property
    def floating(self) -> Tensor | None:
        """The one floating array of a positional batch (what kip and attacks perturb), else None."""
        if self.keyword:
            return None
        (array,) = self.arrays.values()
        return array if array.is_floating_point() else None

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Batch:
        """On `device`, floating arrays cast to `dtype` (integer arrays stay as they are)."""
        return Batch(
            {
                name: a.to(device=device, dtype=dtype if dtype is not None and a.is_floating_point() else None)
                for name, a in self.arrays.items()
            },
            self.keyword,
        )

    def repeat(self, times: int) -> Batch:
        """The rows `times` over, e.g. a batch of two from a single row."""
        return Batch({name: torch.cat([a] * times) for name, a in self.arrays.items()}, self.keyword)

    def call_arguments(self) -> tuple[tuple[Tensor, ...], dict[str, Tensor]]:
        """(args, kwargs) of the model call."""
        if self.keyword:
            return (), dict(self.arrays)
        return (next(iter(self.arrays.values())),), {}

    @staticmethod
    def of(x: Tensor | Mapping[str, Tensor] | Batch) -> Batch:
        """A batch from one array (positional) or named arrays (keyword)."""
        if isinstance(x, Batch):
            return x
        if isinstance(x, Tensor):
            return Batch({"x": x})
        return Batch(dict(x), keyword=True)


@contextmanager
def plain_paths() -> Iterator[None]:
    """PyTorch's differentiable code paths only: no fused attention fast path (nested tensors) while inside."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def _describe(output: object) -> str:
    if isinstance(output, Tensor):
        return f"a tensor of shape {tuple(output.shape)}"
    if isinstance(output, Mapping):
        return f"a mapping with keys {', '.join(map(str, output)) or 'none'}"
    return type(output).__name__


@dataclass(frozen=True)
class ModelAdapter:
    """The user's model as a function of a `Batch` to logits (n, C); `output_key` picks the logits in its output."""

    module: nn.Module
    output_key: str | None = None

    def __call__(self, batch: Batch | Tensor) -> Tensor:
        """f(x) (n, C) with the module's own parameters and buffers."""
        args, kwargs = Batch.of(batch).call_arguments()
        with plain_paths():
            return self.logits(self.module(*args, **kwargs))

    def functional(self, state: Mapping[str, Tensor], batch: Batch) -> Tensor:
        """f(x) (n, C) with the parameters and buffers of `state` in place of the module's (`functional_call`)."""
        args, kwargs = batch.call_arguments()
        with plain_paths():
            return self.logits(functional_call(self.module, dict(state), args, kwargs))

    def logits(self, output: object) -> Tensor:
        """The logits in a model's output: the tensor itself, the first element of a tuple or list, the `output_key`
        (default `logits`) entry of a mapping or attribute of an object."""
        key = self.output_key
        if isinstance(output, Tensor) and key is None:
            return output
        if isinstance(output, Sequence) and not isinstance(output, str) and key is None:
            if output and isinstance(output[0], Tensor):
                return output[0]
            first = f" whose first element is {_describe(output[0])}" if output else " that is empty"
            raise BadInputError(f"model output must hold logits: got {type(output).__name__}{first}")
        name = key or "logits"
        if isinstance(output, Mapping) and name in output:
            found = output[name]
        elif not isinstance(output, Mapping) and hasattr(output, name):
            found = getattr(output, name)
        else:
            hint = f"no {name!r}" if key is not None or isinstance(output, Mapping) else "no logits"
            raise BadInputError(f"model output has {hint}: it is {_describe(output)} (choose with --output-key)")
        if not isinstance(found, Tensor):
            raise BadInputError(f"model output {name!r} is {type(found).__name__}, not a tensor of logits")
        return found


def as_adapter(model: nn.Module | ModelAdapter) -> ModelAdapter:
    """The model as its adapter (a module is called with its own output, the tensor or `logits`)."""
    return model if isinstance(model, ModelAdapter) else ModelAdapter(model)
