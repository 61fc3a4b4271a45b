"""Shared helpers of the path-kernel tests: a model trained with a Recorder, and the path kernel of its trajectory
through the library (no run file)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ntk_explain.analyses.path import TileExplanation, explain_tile
from ntk_explain.analyses.segments import Quadrature, panel_tolerance
from ntk_explain.features.projections import Projection
from ntk_explain.loading.adapter import Batch, ModelAdapter
from ntk_explain.loading.data import Dataset
from ntk_explain.stages.path_steps import check_trajectory, steps, tangent_plan, weights_state, window
from ntk_explain.store.trajectory import Trajectory
from ntk_explain.trajectory import Recorder

CPU, F64 = torch.device("cpu"), torch.float64


def record(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    n_steps: int,
    batch_size: int,
    seed: int = 0,
) -> Path:
    """Train `model` (eval mode) for `n_steps` steps of shuffled batches on the mean cross-entropy, recording."""
    generator = torch.Generator().manual_seed(seed)
    model.eval()
    with Recorder(path, model, optimizer) as recorder:
        while recorder.steps < n_steps:
            for rows in torch.randperm(len(x), generator=generator).split(batch_size):
                if recorder.steps == n_steps:
                    break
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x[rows]), y[rows]).backward()
                optimizer.step()
                recorder.step(rows)
    return path


@dataclass
class Explained:
    """The path kernel of explained points: values at the window's ends (M, C) and the tile's explanation."""

    f_start: Tensor
    f_stop: Tensor
    result: TileExplanation

    @property
    def residual(self) -> Tensor:
        return self.f_stop - self.f_start - self.result.contributions.sum(1) - self.result.decay

    @property
    def relative_residual(self) -> float:
        return float(self.residual.abs().max() / (self.f_stop - self.f_start).abs().max())


def explain(
    path: Path,
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    explained: Tensor,
    nodes: int = 8,
    depth: int = 40,
    relative: float = 1e-12,
    span: tuple[int, int | None] | None = None,
    panels: int = 1,
    tangents: bool = True,
    classes: Tensor | None = None,
    projection: Projection | None = None,
) -> Explained:
    """The path kernel of `explained` over the trajectory `path` of `model` trained on (x, y), in float64: Jacobians at
    shared weights from the tangent engine (`tangents`, as `path-kernel` does) or by vmap(jacrev); every class's
    contributions, or those of `classes`; projected by `projection`."""
    net, inputs = ModelAdapter(model), Batch.of(explained)
    train = Dataset(Batch.of(x), y, np.arange(len(x)), "memory", "")
    with Trajectory(path) as trajectory:
        check_trajectory(trajectory, net, len(x))
        chosen = window(trajectory, span)
        with torch.no_grad():
            f_start = net.functional(weights_state(trajectory, chosen.start, CPU, F64), inputs)
            f_stop = net.functional(weights_state(trajectory, chosen.stop, CPU, F64), inputs)
        tolerance = panel_tolerance(f_start, f_stop, chosen.size, relative)
        plan = tangent_plan(trajectory, net, inputs[:2], 2**28) if tangents else None
        forward, backward = (
            steps(trajectory, net, train, chosen, CPU, F64, tangents=plan, forward=o) for o in (True, False)
        )
        result = explain_tile(
            inputs,
            forward,
            backward,
            len(x),
            chosen.size,
            Quadrature(nodes, depth, panels),
            tolerance,
            256,
            classes,
            projection,
        )
    return Explained(f_start, f_stop, result)


def optimizers() -> dict[str, Callable[[nn.Module], torch.optim.Optimizer]]:
    """The recorded optimisers, by name."""
    return {
        "sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
        "momentum": lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3),
        "nesterov": lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
        "dampened": lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.8, dampening=0.3),
        "adam": lambda m: torch.optim.Adam(m.parameters(), lr=1e-2, weight_decay=1e-2),
        "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1),
    }
