"""Training trajectories: `Recorder` writes one from the user's loop; `optimizers` turns each recorded step into a
linear function of per-sample gradients (what the path kernel attributes)."""

from ntk_explain.trajectory.recorder import Recorder

__all__ = ["Recorder"]
