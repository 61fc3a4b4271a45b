"""Recording a trajectory (SPEC §5.1, §6): what the file holds, what is refused, and a recording resumed after it
was cut off giving the very file of an uninterrupted one."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from ntk_explain.errors import BadInputError
from ntk_explain.store import partial_path
from ntk_explain.store.trajectory import Trajectory
from ntk_explain.trajectory import Recorder
from tests.models import cnn, mlp
from tests.trajectories import explain, record


def _data(n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn((n, 6), generator=generator, dtype=torch.float64), torch.randint(0, 3, (n,), generator=generator)


def test_the_file_holds_every_step(tmp_path: Path) -> None:
    x, y = _data()
    model = mlp()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    with Recorder(tmp_path / "t.h5", model, optimizer) as recorder:
        for step in range(5):
            rows = torch.arange(step, step + 4)
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[rows]), y[rows]).backward()
            optimizer.step()
            recorder.step(rows)
            schedule.step()
    with Trajectory(tmp_path / "t.h5") as trajectory:
        assert trajectory.steps == 5 and trajectory.header.optimizer == "sgd"
        assert trajectory.header.groups[0]["momentum"] == 0.5
        assert [float(trajectory.lr(s)[0]) for s in range(5)] == [0.1, 0.1, 0.05, 0.05, 0.025]
        assert np.array_equal(trajectory.rows(3), np.arange(3, 7))
        for name, value in trajectory.weights(0).items():
            assert np.array_equal(value, initial[name].numpy())
        for name, value in trajectory.weights(5).items():
            assert np.array_equal(value, dict(model.named_parameters())[name].detach().numpy())
    with h5py.File(tmp_path / "t.h5") as f:
        assert f.attrs["format"] == "ntk-explain-trajectory" and f["weights/1.weight"].chunks[0] == 1
        assert "resume" not in f  # the resume slots go once the file is complete


def _refused(tmp_path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, match: str) -> None:
    with pytest.raises(BadInputError, match=match):
        Recorder(tmp_path / "t.h5", model, optimizer)
    assert not (tmp_path / "t.h5").exists() and not partial_path(tmp_path / "t.h5").exists()


def test_what_the_decomposition_cannot_follow_is_refused(tmp_path: Path) -> None:
    model = mlp()
    _refused(tmp_path, model, torch.optim.RMSprop(model.parameters()), "RMSprop")
    _refused(tmp_path, model, torch.optim.Adam(model.parameters(), amsgrad=True), "amsgrad")
    _refused(tmp_path, model, torch.optim.SGD(model.parameters(), lr=0.1, maximize=True), "maximize")
    _refused(tmp_path, model, torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1), "not the model's")
    _refused(tmp_path, cnn().train(), torch.optim.SGD(cnn().parameters(), lr=0.1), "train mode with BatchNorm2d")
    used = torch.optim.Adam(model.parameters())
    model(torch.zeros(1, 6, dtype=torch.float64)).sum().backward()
    used.step()
    _refused(tmp_path, model, used, "state already")


def test_a_parameter_without_a_gradient_stops_the_recording(tmp_path: Path) -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    recorder = Recorder(tmp_path / "t.h5", model, optimizer)
    model[-1].weight.grad = torch.zeros_like(model[-1].weight)
    with pytest.raises(BadInputError, match=r"no gradient for 1\.weight"):
        recorder.step([0, 1])


@pytest.mark.parametrize(
    "make",
    [
        lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, nesterov=True),
        lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1),
    ],
    ids=["nesterov", "adamw"],
)
def test_a_resumed_recording_gives_the_file_of_an_uninterrupted_one(tmp_path: Path, make) -> None:
    x, y = _data()
    whole = mlp()
    record(tmp_path / "whole.h5", whole, make(whole), x, y, 9, 8)
    cut = mlp()
    optimizer = make(cut)
    with pytest.raises(KeyboardInterrupt), Recorder(tmp_path / "cut.h5", cut, optimizer) as recorder:
        for rows in torch.randperm(24, generator=torch.Generator().manual_seed(0)).split(8):
            optimizer.zero_grad()
            nn.functional.cross_entropy(cut(x[rows]), y[rows]).backward()
            optimizer.step()
            recorder.step(rows)
            if recorder.steps == 2:
                raise KeyboardInterrupt  # stopped after 2 steps: the partial file is kept
    assert partial_path(tmp_path / "cut.h5").exists()
    fresh = mlp()  # a new process: the model at its initialisation, a fresh optimiser
    optimizer = make(fresh)
    generator = torch.Generator().manual_seed(0)
    with Recorder(tmp_path / "cut.h5", fresh, optimizer, resume=True) as recorder:
        assert recorder.steps == 2
        step = 0
        while recorder.steps < 9:
            for rows in torch.randperm(24, generator=generator).split(8):
                step += 1
                if step <= 2 or recorder.steps == 9:
                    continue
                optimizer.zero_grad()
                nn.functional.cross_entropy(fresh(x[rows]), y[rows]).backward()
                optimizer.step()
                recorder.step(rows)
    with Trajectory(tmp_path / "whole.h5") as a, Trajectory(tmp_path / "cut.h5") as b:
        assert a.steps == b.steps == 9
        for s in range(10):
            assert all(np.array_equal(a.weights(s)[n], b.weights(s)[n]) for n in a.header.params)
        assert np.array_equal(a.all_rows(), b.all_rows())
    assert explain(tmp_path / "cut.h5", fresh, x, y, x[:3], depth=0).relative_residual <= 1e-10
