"""The `explaind` package's exact path kernel (EPK) of a trajectory recorded by `ntk-explain train`: the baseline of
`scripts/bench.py` workload 10. It runs in explaind's own venv (`scripts/peers/setup_explaind.sh`), never in the
project's, and prints one JSON line.

How explaind is driven, as its README and code intend (explaind 0.1.0, `ExactPathKernelModel.predict`):
- its EPK follows an NLL loss on log-probabilities (its train features are ∇ log p_y(x_i), the loss gradient of NLL),
  so the network it explains is log_softmax ∘ model, trained by exactly the same steps as cross-entropy on the logits;
- it takes float32 parameters only (`_grad_feature_map` keeps `dtype == torch.float`), so the recorded (float64)
  weights are read in float32;
- `ModelPath` gets every step's state dict, `SGDOptimizerPath` every step's learning rate and the recorded
  momentum / dampening / weight decay (float32 momentum buffer on the CPU, not its float16 default), `DataPath` every
  step's batch; the integral is its midpoint rule with `--midpoints` points per step on every step (its 1000-point
  rule for the first 4 steps is turned off: `early_steps=0`), per-training-point kernels kept (`keep_kernel_matrices`).
- its `exact_path_kernel_step_test` stores into `prev_eval` before anything creates it (a TypeError at step 0 in
  0.1.0); `_EPK` hands it an empty dict instead of None, nothing else. Its per-step evaluation (two extra forward
  passes a step) is off; its printing goes to /dev/null.

Reported: wall time of `predict` (model wrapping and data loading excluded), peak RSS, and the identity's residual
max |EPK prediction − f_final| against max |f_final − f_initial| on the log-probabilities.

    $PEERS/venv-explaind/bin/python scripts/peers/explaind_epk.py --trajectory T.h5 --n-test 32 --midpoints 10
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo's zoo (torch, numpy and scikit-learn only)
from ntk_explain.loading.zoo import digits, make_cnn


class _Rows(torch.utils.data.Dataset):
    """The training set as explaind's DataPath expects one: a `targets` list it rewrites with row indices."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.targets = x, list(y)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.targets[i]


def _epk() -> type:
    """explaind's ExactPathKernelModel with the one crash of `predict` fixed (see the module's docstring)."""
    from explaind.epk_model import ExactPathKernelModel

    class _EPK(ExactPathKernelModel):
        def exact_path_kernel_step_test(self, *args, prev_eval=None, **kwargs):
            return super().exact_path_kernel_step_test(
                *args, prev_eval={} if prev_eval is None else prev_eval, **kwargs
            )

    return _EPK


def _recorded(path: str) -> dict:
    """What the trajectory file holds (SPEC §6), weights in float32."""
    with h5py.File(path, "r") as f:
        params = json.loads(f.attrs["params"])
        (group,) = json.loads(f.attrs["groups"])
        weights = {p: f["weights"][p][()].astype(np.float32) for p in params}
        constants = {n: f["constants"][n][()] for n in f["constants"]}
        offsets, rows = f["steps/batch_offsets"][()], f["steps/batch_rows"][()]
        return {
            "optimizer": f.attrs["optimizer"],
            "group": group,
            "weights": weights,
            "constants": constants,
            "lr": f["steps/lr"][()][:, 0],
            "rows": [rows[offsets[s] : offsets[s + 1]] for s in range(len(offsets) - 1)],
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trajectory", required=True)
    parser.add_argument("--n-train", type=int, default=None, help="the first N training points (as ntk-explain's)")
    parser.add_argument("--n-test", type=int, default=None)
    parser.add_argument("--midpoints", type=int, default=10, help="midpoint-rule points per step (1 / integral_eps)")
    args = parser.parse_args()
    from explaind.data_paths import DataPath
    from explaind.model_paths import ModelPath
    from explaind.optimizer_paths import SGDOptimizerPath

    recorded = _recorded(args.trajectory)
    if recorded["optimizer"] != "sgd":
        raise SystemExit("explaind's EPK is driven here for SGD trajectories only")
    group, lr = recorded["group"], recorded["lr"]
    decay = group["weight_decay"]
    model = make_cnn().append(nn.LogSoftmax(dim=1)).float().eval()
    keys = model.state_dict()
    n_steps = len(recorded["rows"])
    checkpoints = []
    for s in range(n_steps + 1):
        state = {n: torch.from_numpy(w[s]) for n, w in recorded["weights"].items()}
        state |= {n: torch.as_tensor(v).to(keys[n].dtype) for n, v in recorded["constants"].items()}
        checkpoints.append(state)
    x_train, y_train, _ = digits("train")
    x_test, _, _ = digits("test")
    x_test = torch.from_numpy(x_test[: args.n_test])
    x_train, y_train = torch.from_numpy(x_train[: args.n_train]), torch.from_numpy(y_train[: args.n_train])

    path = ModelPath(model, device="cpu", checkpoints=checkpoints, output_dim=10)
    optimizer = SGDOptimizerPath(
        path,
        lr=float(lr[0]),
        weight_decay=decay,
        momentum=group["momentum"],
        dampening=group["dampening"],
        buffer_on_cpu=True,
        buffer_float16=False,
        checkpoints=[
            {"lr": float(lr[max(s - 1, 0)]), "weight_decay": group["weight_decay"]} for s in range(n_steps + 1)
        ],
        device="cpu",
    )
    data = DataPath(torch.utils.data.DataLoader(_Rows(x_train, y_train), batch_size=64), full_batch=False)
    data.checkpoints = [{"X": x_train[r], "y": y_train[r], "indices": torch.from_numpy(r)} for r in recorded["rows"]]
    epk = _epk()(
        path,
        optimizer,
        nn.CrossEntropyLoss(),
        data,
        integral_eps=1 / args.midpoints,
        early_integral_eps=1 / args.midpoints,
        early_steps=0,
        train_set_size=len(x_train),
        device="cpu",
        evaluate_predictions=False,
        kernel_store_interval=10**9,
    )
    began = time.perf_counter()
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        prediction, initial, _, _, _ = epk.predict(x_test, keep_kernel_matrices=True)
    seconds = time.perf_counter() - began
    with torch.no_grad():
        final = path.forward(x_test, step=n_steps)
    change = float((final - initial).detach().abs().max())
    residual = float((prediction - final).detach().abs().max())
    print(
        json.dumps(
            {
                "wall_s": seconds,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6,
                "n_explained": len(x_test),
                "steps": n_steps,
                "midpoints": args.midpoints,
                "max_residual": residual,
                "relative_residual": residual / change if change else 0.0,
                "torch": torch.__version__,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
