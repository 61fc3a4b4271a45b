"""Recording a training trajectory from the user's own loop (SPEC §5.1).

    with Recorder("run.traj.h5", model, optimizer) as recorder:
        for rows in batches:                    # rows: indices into the training set
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x[rows]), y[rows])
            loss.backward()
            optimizer.step()
            recorder.step(rows)

The path kernel recomputes every step's per-sample gradients in eval() mode, so the model must train as it is
evaluated: a model in train mode with BatchNorm or dropout is refused (call `model.eval()` first; BatchNorm then
uses its running statistics, which stay fixed). The optimiser must be fresh (no state) unless the recording resumes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ntk_explain.errors import BadInputError
from ntk_explain.store.trajectory import TrajectoryHeader, TrajectoryWriter
from ntk_explain.trajectory.optimizers import describe, learning_rates

LOSSES = ("cross_entropy",)
REDUCTIONS = ("mean", "sum")
_STOCHASTIC = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd, nn.AlphaDropout)
_STATE_KEYS = {"sgd": ("momentum_buffer",), "adam": ("exp_avg", "exp_avg_sq"), "adamw": ("exp_avg", "exp_avg_sq")}


def _numpy(tensor: Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy().copy()


def check_eval_mode(model: nn.Module) -> None:
    """Refuse a model whose training-mode forward differs from its eval-mode one (BatchNorm, dropout in train mode)."""
    moving = sorted({type(m).__name__ for m in model.modules() if isinstance(m, _STOCHASTIC) and m.training})
    if moving:
        raise BadInputError(
            f"the model is in train mode with {', '.join(moving)}: the path kernel follows eval-mode training "
            "(call model.eval() before training)"
        )


class Recorder:
    """Records w_0, and after every `optimizer.step()` (`step(rows)`) the weights, learning rates, batch rows and
    the optimiser state, into the trajectory file `path` (atomic: complete once `close`d). `loss`/`reduction`: the
    training loss (cross-entropy of the logits, mean or sum over the batch). With `resume`, a recording that a kill
    interrupted continues: the model and optimiser are put back to its last recorded step (`steps` of them)."""

    def __init__(
        self,
        path: str | os.PathLike,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        loss: str = "cross_entropy",
        reduction: str = "mean",
        extra: Mapping[str, Any] | None = None,
        overwrite: bool = False,
        resume: bool = False,
    ) -> None:
        if loss not in LOSSES or reduction not in REDUCTIONS:
            raise BadInputError(f"loss {loss!r} with reduction {reduction!r}: recorded are {LOSSES} with {REDUCTIONS}")
        check_eval_mode(model)
        self.model, self.optimizer = model, optimizer
        named = dict(model.named_parameters())
        kind, groups = describe(optimizer, {id(p): name for name, p in named.items()})
        self.kind, self.names = kind, [name for group in groups for name in group["params"]]
        if len(set(self.names)) != len(self.names):
            raise BadInputError("a parameter is in two param groups of the optimiser")
        if optimizer.state and not resume:
            raise BadInputError("the optimiser has state already: record from its first step (a fresh optimiser)")
        self.params = {name: named[name] for name in self.names}
        dtypes = {str(p.dtype).removeprefix("torch.") for p in self.params.values()}
        if len(dtypes) != 1:
            raise BadInputError(f"the trained parameters have several dtypes ({', '.join(sorted(dtypes))})")
        self.constants = {
            **{name: _numpy(p) for name, p in named.items() if name not in self.params},
            **{name: _numpy(b) for name, b in model.named_buffers()},
        }
        header = TrajectoryHeader(
            kind,
            loss,
            reduction,
            tuple(self.names),
            tuple(tuple(p.shape) for p in self.params.values()),
            dtypes.pop(),
            tuple(groups),
            dict(extra or {}),
        )
        initial = {name: _numpy(p) for name, p in self.params.items()}
        self.writer = TrajectoryWriter(path, header, initial, self.constants, overwrite=overwrite, resume=resume)
        if self.writer.steps:
            self._restore()

    @property
    def steps(self) -> int:
        """How many steps are recorded."""
        return self.writer.steps

    def _restore(self) -> None:
        """Put the model and optimiser back to the last recorded step (a resumed recording)."""
        weights, state = self.writer.weights(self.steps), self.writer.state()
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(torch.from_numpy(weights[name]))
                if name in state:
                    entries = {
                        key: torch.as_tensor(np.asarray(v), device=param.device) for key, v in state[name].items()
                    }
                    if "step" in entries:
                        entries["step"] = entries["step"].to("cpu", torch.float32)
                    self.optimizer.state[param] = entries

    def _checked_state(self) -> dict[str, dict[str, np.ndarray]]:
        """The optimiser state after this step, after checking the step was one the decomposition follows: every
        trained parameter had a gradient, buffers and frozen parameters unchanged, Adam's step count in line."""
        check_eval_mode(self.model)
        missing = [name for name, p in self.params.items() if p.grad is None]
        if missing:
            raise BadInputError(
                f"step {self.steps}: no gradient for {', '.join(missing[:3])}: every trained "
                "parameter must take part in every step"
            )
        current = {**dict(self.model.named_parameters()), **dict(self.model.named_buffers())}
        changed = [n for n, v in self.constants.items() if not np.array_equal(_numpy(current[n]), v)]
        if changed:
            raise BadInputError(
                f"step {self.steps}: {', '.join(changed[:3])} changed, but the trajectory keeps it fixed"
            )
        state: dict[str, dict[str, np.ndarray]] = {}
        for name, param in self.params.items():
            entries = self.optimizer.state.get(param, {})
            kept = {key: _numpy(entries[key]) for key in _STATE_KEYS[self.kind] if entries.get(key) is not None}
            if "step" in entries:
                if float(entries["step"]) != self.steps + 1:
                    raise BadInputError(f"step {self.steps}: Adam's step count of {name} is {float(entries['step'])}")
                kept["step"] = np.asarray(float(entries["step"]))
            state[name] = kept
        return state

    def step(self, rows: Sequence[int] | np.ndarray | Tensor) -> None:
        """Record the step `optimizer.step()` just took, on the training rows `rows` (its batch)."""
        batch = np.asarray(rows.cpu() if isinstance(rows, Tensor) else rows)
        if batch.ndim != 1 or not len(batch) or (batch.dtype.kind not in "iu") or batch.min() < 0:
            raise BadInputError("Recorder.step: the batch rows must be a non-empty 1-d array of training-set indices")
        state = self._checked_state()
        weights = {name: _numpy(p) for name, p in self.params.items()}
        moments = {name: state[name]["exp_avg_sq"] for name in self.names} if self.kind != "sgd" else None
        self.writer.append(weights, learning_rates(self.optimizer), batch.astype(np.int64), moments, state)

    def close(self) -> None:
        """Finish the trajectory file (renamed onto its path)."""
        self.writer.close()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, traceback: object) -> None:
        if kind is None:
            self.close()
        else:  # an interrupted or failed loop keeps what it recorded for a resumed recording
            self.writer.abandon()
