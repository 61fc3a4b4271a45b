"""ntk-explain: explain trained PyTorch networks through their empirical neural tangent kernel.

The public API, imported on first use (so that `import ntk_explain` stays light):

- stages: `compute`, `attribute`, `distill`, `train`, `path_kernel` (model and data → run file, as the command
  line runs them), and `compute_kernel` (one kernel of in-memory inputs into an open run file);
- training trajectories: `Recorder` (from the user's own loop), `Trajectory` (a recorded one, read);
- options: `InputSpec`, `KernelSpec`, `Resources`, `Budget`, `AttributeSpec`, `SurrogateSpec`, `DistillSpec`,
  `KipSettings`, `PathSpec`, `TrainSpec`, `Execution`;
- run files: `create_run`, `open_run`, `read_kernel`, `read_features`, `read_attribution`, `faithfulness`,
  `summarize`, `root_attrs`;
- estimators: `KernelGLM`, `KernelRidge`, `FeatureKernel`;
- models, data and features: `ModelAdapter`, `Batch`, `load_model`, `load_dataset`, `zoo`, `featurizer` (and its
  `SKETCH_PROBE` rows), `plan_tangents`, `tangent_factors`, `gram`, `cosine_normalize`;
- the process: `resolve_device`, `retain_freed_memory`.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "compute": "ntk_explain.stages.compute",
    "attribute": "ntk_explain.stages.attribute",
    "distill": "ntk_explain.stages.distill",
    "train": "ntk_explain.stages.train",
    "path_kernel": "ntk_explain.stages.path_kernel",
    "compute_kernel": "ntk_explain.stages.kernels",
    "Recorder": "ntk_explain.trajectory",
    "Trajectory": "ntk_explain.store.trajectory",
    "Execution": "ntk_explain.stages.execution",
    "InputSpec": "ntk_explain.options",
    "KernelSpec": "ntk_explain.options",
    "Resources": "ntk_explain.options",
    "Budget": "ntk_explain.options",
    "AttributeSpec": "ntk_explain.options",
    "SurrogateSpec": "ntk_explain.options",
    "DistillSpec": "ntk_explain.options",
    "KipSettings": "ntk_explain.options",
    "PathSpec": "ntk_explain.options",
    "TrainSpec": "ntk_explain.options",
    "create_run": "ntk_explain.store",
    "open_run": "ntk_explain.store",
    "read_kernel": "ntk_explain.kernel.read",
    "read_features": "ntk_explain.store",
    "read_attribution": "ntk_explain.store",
    "faithfulness": "ntk_explain.store",
    "summarize": "ntk_explain.store",
    "root_attrs": "ntk_explain.store",
    "KernelGLM": "ntk_explain.surrogate.estimators",
    "KernelRidge": "ntk_explain.surrogate.estimators",
    "FeatureKernel": "ntk_explain.surrogate.estimators",
    "ModelAdapter": "ntk_explain.loading.adapter",
    "Batch": "ntk_explain.loading.adapter",
    "load_model": "ntk_explain.loading.models",
    "load_dataset": "ntk_explain.loading.data",
    "featurizer": "ntk_explain.features.featurizer",
    "plan_tangents": "ntk_explain.features.planning",
    "tangent_factors": "ntk_explain.features.tangents",
    "gram": "ntk_explain.kernel.grams",
    "cosine_normalize": "ntk_explain.kernel.normalize",
    "SKETCH_PROBE": "ntk_explain.features.featurizer",
    "resolve_device": "ntk_explain.resources",
    "retain_freed_memory": "ntk_explain.resources",
    "zoo": "ntk_explain.loading.zoo",
}
_MODULES = {"zoo"}  # exported as the module itself
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ntk_explain' has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name])
    value = module if name in _MODULES else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
