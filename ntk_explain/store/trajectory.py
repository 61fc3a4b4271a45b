"""The trajectory file (SPEC §5.1, §6): what training did, step by step, written one step at a time.

    /                              attrs: format="ntk-explain-trajectory", format_version, versions, created,
                                   optimizer, loss, reduction, params (JSON: trained names, in order), shapes, dtype,
                                   groups (JSON: each param group's hyper-parameters and members), extra (JSON),
                                   steps (how many are recorded, written after each step's data), complete
    /weights/<param>               (S+1, …): w_0 … w_S of every trained parameter
    /constants/<name>              buffers and frozen parameters (the same at every step)
    /steps/lr                      (S, G): each param group's learning rate at each step
    /steps/batch_offsets           (S+1,): step s's rows are batch_rows[offsets[s]:offsets[s+1]]
    /steps/batch_rows              (R,): rows of the training set
    /optimizer/exp_avg_sq/<param>  (S, …): Adam's second moments after each step (its preconditioner)
    /resume/<slot>/<param>/<key>   the optimiser state after the last steps, in two slots (a kill between writing
                                   one and counting its step leaves the other whole)

It is written under `.<name>.partial` beside its path and renamed there when closed; a killed recording leaves the
partial file, whose counted steps a resumed recording continues.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ntk_explain import __version__
from ntk_explain.errors import BadInputError, first_line
from ntk_explain.store.arrays import GZIP_LEVEL
from ntk_explain.store.attrs import H5_ERRORS, _dist_version, mark, py_value
from ntk_explain.store.files import CACHE_BYTES, _commit, _writer_lock, check_target, open_hdf5, partial_path

TRAJECTORY_FORMAT = "ntk-explain-trajectory"
TRAJECTORY_VERSION = 1
WEIGHTS, CONSTANTS, STEPS, SECOND_MOMENTS, RESUME = "weights", "constants", "steps", "optimizer/exp_avg_sq", "resume"


@dataclass(frozen=True)
class TrajectoryHeader:
    """What a trajectory is of: the optimiser (sgd, adam, adamw), the loss (cross_entropy) and its reduction (mean,
    sum), the trained parameters (names, shapes, one dtype), each param group's hyper-parameters with its members'
    names (`params`), and free-form provenance (`extra`: e.g. the data's sha256)."""

    optimizer: str
    loss: str
    reduction: str
    params: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtype: str
    groups: tuple[Mapping[str, Any], ...]
    extra: Mapping[str, Any] = field(default_factory=dict)

    def attrs(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer,
            "loss": self.loss,
            "reduction": self.reduction,
            "params": json.dumps(list(self.params)),
            "shapes": json.dumps([list(s) for s in self.shapes]),
            "dtype": self.dtype,
            "groups": json.dumps([dict(g) for g in self.groups], sort_keys=True),
            "extra": json.dumps(dict(self.extra), sort_keys=True, default=str),
        }

    @staticmethod
    def of(attrs: Mapping[str, Any]) -> TrajectoryHeader:
        return TrajectoryHeader(
            optimizer=str(attrs["optimizer"]),
            loss=str(attrs["loss"]),
            reduction=str(attrs["reduction"]),
            params=tuple(json.loads(attrs["params"])),
            shapes=tuple(tuple(s) for s in json.loads(attrs["shapes"])),
            dtype=str(attrs["dtype"]),
            groups=tuple(json.loads(attrs["groups"])),
            extra=json.loads(attrs["extra"]),
        )


def _growing(group: h5py.Group, name: str, shape: Sequence[int], dtype: Any) -> h5py.Dataset:
    """An empty dataset that grows along its first axis, one step per chunk, compressed."""
    return group.create_dataset(
        name,
        shape=(0, *shape),
        maxshape=(None, *shape),
        dtype=dtype,
        chunks=(1, *shape) if all(shape) else None,
        compression="gzip",
        compression_opts=GZIP_LEVEL,
        shuffle=True,
    )


def _append(dataset: h5py.Dataset, row: int, value: np.ndarray) -> None:
    dataset.resize(row + 1, axis=0)
    dataset[row] = value


class TrajectoryWriter:
    """Writes a trajectory file a step at a time (atomic: under its partial name until `close`). With `resume` an
    existing partial file of the same header is reopened at its last counted step (`steps`); another is refused."""

    def __init__(
        self,
        path: str | os.PathLike,
        header: TrajectoryHeader,
        initial: Mapping[str, np.ndarray],
        constants: Mapping[str, np.ndarray],
        *,
        overwrite: bool = False,
        resume: bool = False,
    ) -> None:
        self.path, self.header = Path(path), header
        check_target(self.path, overwrite=overwrite)
        self._stack = ExitStack()
        self._stack.enter_context(_writer_lock(self.path))
        tmp = partial_path(self.path)
        try:
            if resume and tmp.exists():
                self.file = self._reopened(tmp)
            else:
                self.file = self._created(tmp, initial, constants)
        except BaseException:
            self._stack.close()
            raise

    def _created(self, tmp: Path, initial: Mapping[str, np.ndarray], constants: Mapping[str, np.ndarray]) -> h5py.File:
        f = h5py.File(tmp, "w", rdcc_nbytes=CACHE_BYTES)
        f.attrs.update(
            format=TRAJECTORY_FORMAT,
            format_version=TRAJECTORY_VERSION,
            ntk_explain_version=__version__,
            torch_version=_dist_version("torch"),
            created=_now(),
            complete=False,
            **self.header.attrs(),
        )
        for name, shape in zip(self.header.params, self.header.shapes, strict=True):
            _append(_growing(f, f"{WEIGHTS}/{name}", shape, self.header.dtype), 0, initial[name])
            if self.header.optimizer in ("adam", "adamw"):
                _growing(f, f"{SECOND_MOMENTS}/{name}", shape, self.header.dtype)
        for name, value in constants.items():
            f.create_dataset(f"{CONSTANTS}/{name}", data=value)
        _growing(f, f"{STEPS}/lr", (len(self.header.groups),), "f8")
        _append(_growing(f, f"{STEPS}/batch_offsets", (), "i8"), 0, 0)
        _growing(f, f"{STEPS}/batch_rows", (), "i8")
        mark(f, "steps", 0)
        return f

    def _reopened(self, tmp: Path) -> h5py.File:
        f = open_hdf5(tmp, "r+")
        try:
            if TrajectoryHeader.of({k: py_value(v) for k, v in f.attrs.items()}) != self.header:
                raise BadInputError(f"cannot resume: {tmp} records another model or optimiser; record without resume")
            steps = int(f.attrs["steps"])
            for name in self.header.params:  # drop what a kill left of an uncounted step
                f[f"{WEIGHTS}/{name}"].resize(steps + 1, axis=0)
                if SECOND_MOMENTS in f:
                    f[f"{SECOND_MOMENTS}/{name}"].resize(steps, axis=0)
            f[f"{STEPS}/lr"].resize(steps, axis=0)
            f[f"{STEPS}/batch_offsets"].resize(steps + 1, axis=0)
            f[f"{STEPS}/batch_rows"].resize(int(f[f"{STEPS}/batch_offsets"][steps]), axis=0)
        except (KeyError, *H5_ERRORS) as exc:
            f.close()
            if isinstance(exc, BadInputError):
                raise
            raise BadInputError(f"cannot resume: {tmp} is damaged ({first_line(exc)})") from exc
        return f

    @property
    def steps(self) -> int:
        """How many steps are recorded."""
        return int(self.file.attrs["steps"])

    def weights(self, step: int) -> dict[str, np.ndarray]:
        """w_step of every trained parameter."""
        return {name: self.file[f"{WEIGHTS}/{name}"][step] for name in self.header.params}

    def state(self) -> dict[str, dict[str, np.ndarray]]:
        """The optimiser state saved after the last recorded step: param name → key → array (empty before any)."""
        slot = f"{RESUME}/{self.steps % 2}"
        if self.steps == 0 or slot not in self.file:
            return {}
        return {name: {key: ds[()] for key, ds in group.items()} for name, group in self.file[slot].items()}

    def append(
        self,
        weights: Mapping[str, np.ndarray],
        lr: Sequence[float],
        rows: np.ndarray,
        second_moments: Mapping[str, np.ndarray] | None,
        state: Mapping[str, Mapping[str, np.ndarray]],
    ) -> None:
        """Record one step: the weights after it, each group's learning rate, its batch rows, Adam's second moments
        after it, and the optimiser state to resume from; the step counts once all of it is on disk."""
        f, step = self.file, self.steps
        for name in self.header.params:
            _append(f[f"{WEIGHTS}/{name}"], step + 1, weights[name])
            if second_moments is not None:
                _append(f[f"{SECOND_MOMENTS}/{name}"], step, second_moments[name])
        _append(f[f"{STEPS}/lr"], step, np.asarray(lr, dtype=np.float64))
        start = int(f[f"{STEPS}/batch_offsets"][step])
        batch = f[f"{STEPS}/batch_rows"]
        batch.resize(start + len(rows), axis=0)
        batch[start:] = rows
        _append(f[f"{STEPS}/batch_offsets"], step + 1, start + len(rows))
        slot = f"{RESUME}/{(step + 1) % 2}"
        if slot in f:
            del f[slot]
        for name, entries in state.items():
            for key, value in entries.items():
                f.create_dataset(f"{slot}/{name}/{key}", data=value)
        mark(f, "steps", step + 1)

    def close(self) -> None:
        """Finish the file: complete=True, renamed onto its path."""
        try:
            if RESUME in self.file:
                del self.file[RESUME]
            self.file.attrs["complete"] = True
            _commit(partial_path(self.path), self.file, self.path)
        finally:
            self._stack.close()

    def abandon(self) -> None:
        """Stop writing, keeping the partial file for a resumed recording."""
        try:
            self.file.flush()
            self.file.close()
        finally:
            self._stack.close()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Trajectory:
    """A finished trajectory file open for reading (a context manager): its header, step count, and each step's
    weights, learning rates, batch rows and second moments as arrays."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.file = open_hdf5(self.path, "r")
        try:
            attrs = {key: py_value(value) for key, value in self.file.attrs.items()}
            if attrs.get("format") != TRAJECTORY_FORMAT:
                raise BadInputError(
                    f"{self.path}: not an ntk-explain trajectory file (no format={TRAJECTORY_FORMAT!r})"
                )
            if not attrs.get("complete"):
                raise BadInputError(f"{self.path}: the trajectory is not complete (its recording did not finish)")
            self.header = TrajectoryHeader.of(attrs)
            self.steps = int(attrs["steps"])
            self._offsets = self.file[f"{STEPS}/batch_offsets"][()]
            self._lr = self.file[f"{STEPS}/lr"][()]
            self._check()
        except BaseException as exc:
            self.file.close()
            if isinstance(exc, (KeyError, *H5_ERRORS)) and not isinstance(exc, BadInputError):
                raise BadInputError(f"{self.path}: damaged trajectory file ({first_line(exc)})") from exc
            raise

    def _check(self) -> None:
        """Every step recorded: weights for S+1 points, learning rates, batch offsets and moments for S steps."""
        steps, f = self.steps, self.file
        lengths = {"learning rates": len(self._lr), "batch offsets": len(self._offsets) - 1}
        for name in self.header.params:
            lengths[f"weights of {name}"] = f[f"{WEIGHTS}/{name}"].shape[0] - 1
            if SECOND_MOMENTS in f:
                lengths[f"second moments of {name}"] = f[f"{SECOND_MOMENTS}/{name}"].shape[0]
        missing = [what for what, n in lengths.items() if n != steps]
        if missing or len(f[f"{STEPS}/batch_rows"]) != self._offsets[-1] or np.any(np.diff(self._offsets) < 0):
            raise BadInputError(f"{self.path}: steps are missing ({', '.join(missing) or 'batch rows'} of {steps})")

    def __enter__(self) -> Trajectory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()

    def weights(self, step: int) -> dict[str, np.ndarray]:
        """w_step of every trained parameter."""
        return {name: self.file[f"{WEIGHTS}/{name}"][step] for name in self.header.params}

    def constants(self) -> dict[str, np.ndarray]:
        """The buffers and frozen parameters."""
        return {name: ds[()] for name, ds in self.file.get(CONSTANTS, {}).items()}

    def lr(self, step: int) -> np.ndarray:
        """Each param group's learning rate at `step` (G,)."""
        return self._lr[step]

    def rows(self, step: int) -> np.ndarray:
        """The training rows of step `step`'s batch."""
        return self.file[f"{STEPS}/batch_rows"][self._offsets[step] : self._offsets[step + 1]]

    def all_rows(self) -> np.ndarray:
        """Every step's batch rows, concatenated."""
        return self.file[f"{STEPS}/batch_rows"][()]

    def second_moments(self, step: int) -> dict[str, np.ndarray]:
        """Adam's exp_avg_sq after `step`, of every trained parameter."""
        return {name: self.file[f"{SECOND_MOMENTS}/{name}"][step] for name in self.header.params}
