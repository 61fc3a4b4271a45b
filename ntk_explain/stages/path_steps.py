"""A recorded trajectory as the path kernel reads it: checked against the model and data, and its steps (last first)
as `analyses.path.Step`s on the device, in either order."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from ntk_explain.analyses.path import Step
from ntk_explain.analyses.segments import Segment
from ntk_explain.errors import BadInputError
from ntk_explain.features.plan import TangentPlan
from ntk_explain.features.planning import plan_tangents
from ntk_explain.loading.adapter import ModelAdapter
from ntk_explain.loading.data import Dataset
from ntk_explain.store.trajectory import Trajectory
from ntk_explain.trajectory.optimizers import coefficients, has_momentum


@dataclass(frozen=True)
class Window:
    """The explained steps [start, stop) of a trajectory of `steps` steps, and the first step whose gradients reach
    into it (`first`: 0 when the optimiser carries momentum, else `start`)."""

    start: int
    stop: int
    first: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def _as_numpy(tensor: Tensor) -> np.ndarray:
    return tensor.detach().cpu().to(torch.float64).numpy()


def _numpy_dtype(tensor: Tensor) -> np.dtype:
    return np.dtype(str(tensor.dtype).removeprefix("torch."))


def check_trajectory(trajectory: Trajectory, net: ModelAdapter, n_train: int) -> None:
    """Refuse (BadInputError) a trajectory of another model (parameter names, shapes, fixed buffers), whose recorded
    final weights are not the model's, or whose batches name rows outside the training set."""
    header, path = trajectory.header, trajectory.path
    state = {**dict(net.module.named_parameters()), **dict(net.module.named_buffers())}
    for name, shape in zip(header.params, header.shapes, strict=True):
        if name not in state or tuple(state[name].shape) != tuple(shape):
            have = tuple(state[name].shape) if name in state else "none"
            raise BadInputError(
                f"{path}: a trajectory of another model ({name}: recorded {tuple(shape)}, model {have})"
            )
    for name, value in trajectory.constants().items():
        if name not in state or not np.array_equal(_as_numpy(state[name]), np.asarray(value, dtype=np.float64)):
            raise BadInputError(f"{path}: a trajectory of another model ({name} differs from the model's)")
    final = trajectory.weights(trajectory.steps)  # compared in the model's dtype (a float32 run may be read in float64)
    differ = [
        n
        for n in header.params
        if not np.array_equal(_as_numpy(state[n]), final[n].astype(_numpy_dtype(state[n])).astype(np.float64))
    ]
    if differ:
        raise BadInputError(f"{path}: its recorded final weights differ from the model's --weights ({differ[0]}, …)")
    if header.loss != "cross_entropy" or header.reduction not in ("mean", "sum"):
        raise BadInputError(f"{path}: loss {header.loss} ({header.reduction}) is not one the path kernel follows")
    rows = trajectory.all_rows()
    if len(rows) and (rows.min() < 0 or rows.max() >= n_train):
        raise BadInputError(f"{path}: batch rows out of range: row {int(rows.max())} of {n_train} training points")


def window(trajectory: Trajectory, steps: tuple[int, int | None] | None) -> Window:
    """The window `--steps a:b` names (all steps by default), checked against the trajectory."""
    total = trajectory.steps
    start, stop = steps if steps is not None else (0, None)
    stop = total if stop is None else stop
    if total == 0 or stop > total or start >= stop:
        raise BadInputError(f"{trajectory.path}: --steps {start}:{stop} is not within its {total} steps")
    header = trajectory.header
    return Window(start, stop, 0 if has_momentum(header.groups, header.optimizer) else start)


def weights_state(trajectory: Trajectory, step: int, device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]:
    """w_step with the fixed constants: the model's full state at that step, on the device."""
    constants = {n: torch.as_tensor(v, device=device) for n, v in trajectory.constants().items()}
    floating = {n: v.to(dtype) if v.is_floating_point() else v for n, v in constants.items()}
    weights = {n: torch.as_tensor(v, device=device, dtype=dtype) for n, v in trajectory.weights(step).items()}
    return {**weights, **floating}


def steps(
    trajectory: Trajectory,
    net: ModelAdapter,
    train: Dataset,
    span: Window,
    device: torch.device,
    dtype: torch.dtype,
    pairs: int = 256,
    tangents: TangentPlan | None = None,
    forward: bool = False,
) -> Iterator[Step]:
    """The steps first … stop−1 of `span` (`forward`) or stop−1 … first, as `Step`s on `device` in `dtype`; `pairs`:
    the most points of one JVP, `tangents`: the plan of the trained parameters (`tangent_plan`) for batched
    Jacobians."""
    header = trajectory.header
    sizes = [int(np.prod(shape)) for shape in header.shapes]
    constants = {n: v for n, v in weights_state(trajectory, 0, device, dtype).items() if n not in header.params}

    def weights(index: int) -> dict[str, Tensor]:
        return {n: torch.as_tensor(v, device=device, dtype=dtype) for n, v in trajectory.weights(index).items()}

    order = range(span.first, span.stop) if forward else range(span.stop - 1, span.first - 1, -1)
    held = weights(order[0] if forward else order[0] + 1)  # the weights the next step shares with the last one
    for index in order:
        start, after = (held, weights(index + 1)) if forward else (weights(index), held)
        held = after if forward else start
        moments = trajectory.second_moments(index) if header.optimizer != "sgd" else None
        rows = torch.as_tensor(trajectory.rows(index), device=device)
        yield Step(
            index=index,
            segment=Segment(net, start, {n: after[n] - start[n] for n in start}, constants, pairs, tangents),
            coefficients=coefficients(
                header.optimizer, header.groups, header.params, sizes, index, trajectory.lr(index), moments, dtype
            ).to(device),
            rows=rows,
            inputs=train.inputs[rows.cpu()].to(device, dtype),
            labels=train.y[rows.cpu()].to(device),
            scale=1.0 / len(rows) if header.reduction == "mean" else 1.0,
            in_window=index >= span.start,
        )


def tangent_plan(trajectory: Trajectory, net: ModelAdapter, probe: Tensor, max_check_bytes: int) -> TangentPlan:
    """The tangent plan of the trajectory's trained parameters, in its order, proved on the model at its weights by the
    self-check on the `probe` rows, every ungrouped Linear and conv factorised (the Jacobians of a quadrature's weight
    states are formed at once from their joined sites). The plan is about how each parameter is used, so it holds at
    every step's weights; `Segment` passes each state's values."""
    names = trajectory.header.params
    plan = plan_tangents(net, probe, "logits", names, max_check_bytes=max_check_bytes, factorise=True)
    if set(plan.params) != set(names):
        raise BadInputError(f"{trajectory.path}: the model's trainable parameters are not the recorded ones")
    return replace(plan, params={name: plan.params[name] for name in names})
