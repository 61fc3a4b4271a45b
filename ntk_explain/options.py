"""The options of every stage as validated dataclasses, and the names they may take. Nothing heavy is imported
here, so that the command line builds its help and checks its options without loading torch."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

from ntk_explain.errors import UsageError

if TYPE_CHECKING:
    import torch

KERNELS = ("full", "diagonal", "trace", "pseudo", "ck")
PROJECTIONS = ("none", "gaussian", "rademacher", "sparse", "tensorsketch", "kronecker")
PATH_PROJECTIONS = ("none", "sparse")  # path-kernel projects formed Jacobians (an elementwise preconditioner first)
SKETCHES = ("tensorsketch", "kronecker")  # per-layer sketches of Σ_s δ_s ã_sᵀ that never form it
FEATURE_DTYPES = ("float32", "float16", "bfloat16")
DEFAULT_DIMS = {"pseudo": 4096, "trace": 10240, "diagonal": 10240, "full": 10240}
SURROGATES = ("kglm", "ridge")
NORMALIZATIONS = {
    "cosine": "K(x,x')/sqrt(K(x,x) K(x',x'))",
    "scale": "K(x,x')/mean_j K(x_j,x_j), the mean training self-kernel: raw structure, α on a fixed scale",
    "none": "K(x,x') as computed",
}
METHODS = ("kip", "gradient", "select")
SELECTIONS = ("random", "kmeans", "leverage", "farthest")
DISTILL_METRICS = ("reduction", "kernel_alignment", "kernel_alignment_centred")  # added to a support's faithfulness
DEFAULT_REDUCTION = 20.0  # N/m when neither --reduction nor --per-class is given
DTYPES = ("float32", "float64")
TARGETS = ("model", "labels")
FIT_ON = ("support", "train")
SEED_MAX = 2**63 - 1  # seeds are stored as HDF5 int64 attributes


def _check(holds: bool, message: str) -> None:
    """A usage error (exit 2) unless `holds`."""
    if not holds:
        raise UsageError(message)


def _one_of(value: object, allowed: tuple | Mapping, option: str) -> None:
    _check(value in allowed, f"{option} {value!r}: expected one of {', '.join(map(str, allowed))}")


class Params:
    """A config object that is saved in the run file's `params` (`to_params`) and read back (`from_params`)."""

    def to_params(self) -> dict[str, Any]:
        """The JSON-friendly settings: every field, nested config objects as dicts, tuples as lists."""
        return json_friendly(asdict(self))

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> Any:
        """The config object whose `to_params` gave `params` (other keys are ignored)."""
        values = {f.name: params[f.name] for f in fields(cls) if f.name in params}
        return cls(**{name: _restored(cls, name, value) for name, value in values.items()})


def json_friendly(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: json_friendly(v) for key, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [json_friendly(v) for v in value]
    return value


def _restored(cls: type, name: str, value: Any) -> Any:
    """A field's value from its JSON form: lists back to tuples, dicts of nested config objects back to them."""
    nested = {"kip": KipSettings, "surrogate": SurrogateSpec}.get(name)
    if nested is not None and isinstance(value, Mapping):
        return nested.from_params(value)
    return tuple(value) if isinstance(value, list) else value


@dataclass(frozen=True)
class Shard:
    """This process's rank among `world` processes (torchrun): rank r computes the row tiles i ≡ r (mod world)."""

    rank: int = 0
    world: int = 1

    def owns(self, index: int) -> bool:
        """Whether this rank computes the row tile `index`."""
        return index % self.world == self.rank

    def owner(self, index: int) -> int:
        return index % self.world

    @staticmethod
    def from_environment() -> Shard:
        """The shard that torchrun's RANK and WORLD_SIZE variables describe (one process without them)."""
        return Shard(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))


@dataclass(frozen=True)
class KernelSpec(Params):
    """One kernel to compute: its variant, projection (d = `dim`, default by kernel), seed and parameter selection
    (globs), and the storage dtype of projected features."""

    kernel: str
    projection: str = "none"
    dim: int | None = None
    seed: int = 0
    params: tuple[str, ...] | None = None
    feature_dtype: str | None = None  # storage of projected features: float32, float16, bfloat16 (None: as computed)

    def __post_init__(self) -> None:
        _one_of(self.kernel, KERNELS, "--kernel")
        _one_of(self.projection, PROJECTIONS, "--projection")
        _check(self.feature_dtype in (None, *FEATURE_DTYPES), f"--feature-dtype: one of {', '.join(FEATURE_DTYPES)}")
        _check(self.dim is None or self.dim >= 1, "--proj-dim must be positive")
        _check(0 <= self.seed <= SEED_MAX, f"--seed must be in [0, {SEED_MAX}]")
        _check(self.params is None or bool(self.params), "--params: expected at least one glob")

    @property
    def projected(self) -> bool:
        """ck is a feature kernel already: it is never projected."""
        return self.projection != "none" and self.kernel != "ck"

    @property
    def proj_dim(self) -> int:
        return (self.dim or DEFAULT_DIMS[self.kernel]) if self.projected else 0

    @property
    def name(self) -> str:
        """The group name under /kernel: `trace`, or `trace-gaussian-4096` when projected."""
        return f"{self.kernel}-{self.projection}-{self.proj_dim}" if self.projected else self.kernel


@dataclass(frozen=True)
class Budget:
    """Where and within how many bytes the work runs, how many samples go through one forward/backward pass, and,
    unless set, rows per tile from the budget."""

    device: torch.device
    bytes: int
    batch_size: int | None = None  # samples per forward/backward pass (None: auto, a whole tile)
    shard: Shard = field(default_factory=Shard)  # which row tiles this process computes
    tile: int | None = None  # rows per Gram tile and checkpoint (None: from the memory budget)


@dataclass(frozen=True)
class KipSettings(Params):
    """kip's optimiser: Adam steps, learning rate, the ridge λ of K_ss + λ tr(K_ss)/m I, real targets per step, and
    whether the support's labels are learned too."""

    steps: int = 200
    lr: float = 1e-2
    reg: float = 1e-3
    batch_size: int = 256
    learn_labels: bool = True

    def __post_init__(self) -> None:
        _check(self.steps >= 1 and self.batch_size >= 1, "--steps and --kip-batch must be positive")
        _check(self.lr >= 0 and self.reg >= 0, "--lr and --reg must not be negative")


@dataclass(frozen=True)
class DistillSpec(Params):
    """How `distill` builds its support: the method, its size (m = N/reduction, or per_class per class), the classes
    (the network's predictions or the labels) and, for kip, the optimiser's settings."""

    method: str = "kip"
    selection: str = "random"
    reduction: float | None = None  # None: DEFAULT_REDUCTION, unless per_class is given
    per_class: int | None = None
    target: str = "model"
    kip: KipSettings = field(default_factory=KipSettings)
    neighbours: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        _one_of(self.method, METHODS, "--method")
        _one_of(self.selection, SELECTIONS, "--select")
        _one_of(self.target, TARGETS, "--target")
        _check(self.reduction is None or self.per_class is None, "give --reduction or --per-class, not both")
        _check(self.reduction is None or self.reduction >= 1, "--reduction must be at least 1")
        _check(self.per_class is None or self.per_class >= 1, "--per-class must be positive")

    @staticmethod
    def check_kernel(kernel: KernelSpec) -> None:
        """What distillation works on: the projected features of a pseudo or trace kernel."""
        _check(kernel.kernel in ("pseudo", "trace"), f"--kernel {kernel.kernel!r}: distil a pseudo or trace kernel")
        _check(kernel.projected, "--projection none: distillation works on projected features; choose a projection")


@dataclass(frozen=True)
class SurrogateSpec(Params):
    """The surrogate fitted by `attribute`: its kind, penalty, targets and kernel normalisation."""

    kind: str = "kglm"
    alpha: float = 1e-4
    target: str = "model"
    normalize: str = "cosine"  # cosine | scale | none
    balanced: bool = False
    fit_on: str = "support"  # a distilled support's kGLM: on the support's labels, or on the N training points

    def __post_init__(self) -> None:
        _one_of(self.kind, SURROGATES, "--surrogate")
        _check(self.alpha > 0, "--alpha must be positive")
        _one_of(self.target, TARGETS, "--target")
        _one_of(self.normalize, NORMALIZATIONS, "--normalize")
        _one_of(self.fit_on, FIT_ON, "--fit-on")


@dataclass(frozen=True)
class AttributeSpec(Params):
    """What `attribute` explains with (the kernel group; None: trace, or the only one), its surrogate, and what it
    keeps: the top-k proponents and opponents, and the scores of every class."""

    kernel: str | None = None
    surrogate: SurrogateSpec = field(default_factory=SurrogateSpec)
    top_k: int = 10
    all_classes: bool = False

    def __post_init__(self) -> None:
        _check(self.top_k >= 1, "--top-k must be positive")


@dataclass(frozen=True)
class InputSpec(Params):
    """The model and data of a stage that runs the model: the model (zoo:NAME, pkg.module:factory, hf:DIR or .pt2)
    with its factory's kwargs and weights, the data files (or zoo:digits), the input arrays (several go to the model
    by keyword) and labels, the logits' entry in the output, the first rows used, and the compute dtype."""

    model: str
    train: str
    test: str | None = None
    weights: str | None = None
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    x_key: tuple[str, ...] = ("x",)
    y_key: str = "y"
    output_key: str | None = None
    n_train: int | None = None
    n_test: int | None = None
    dtype: str = "float32"

    def __post_init__(self) -> None:
        _check(isinstance(self.model_kwargs, Mapping), "--model-kwargs must be a JSON object")
        _check(bool(self.x_key) and all(self.x_key), "--x-key: expected an array name or a comma-separated list")
        _check(self.output_key is None or bool(self.output_key.strip()), "--output-key must name an output entry")
        _check(all(n is None or n >= 1 for n in (self.n_train, self.n_test)), "--n-train/--n-test must be positive")
        _one_of(self.dtype, DTYPES, "--dtype")


@dataclass(frozen=True)
class Resources(Params):
    """Where the work runs (auto, cpu, cuda, cuda:i) and within what: the memory budget (e.g. 2GB; None: half the
    free memory), samples per forward/backward pass (None: auto) and rows per tile (None: from the budget)."""

    device: str = "auto"
    max_memory: str | None = None
    batch_size: int | None = None
    tile: int | None = None

    def __post_init__(self) -> None:
        _check(self.batch_size is None or self.batch_size >= 1, "--batch-size must be a positive integer or auto")
        _check(self.tile is None or self.tile >= 1, "--tile must be positive")


OPTIMIZERS = ("sgd", "adam", "adamw")


@dataclass(frozen=True)
class PathSpec(Params):
    """What `path-kernel` explains with: the trajectory file, Gauss–Legendre nodes on each of `panels` equal parts of a
    segment (a composite rule shared by every point), the window of steps
    [start, stop) (None: all), whether every class's contributions are kept (else the network's predicted class),
    the top-k kept, and the adaptive refinement of each segment: split until a point's quadrature error on the step
    is at most `tolerance` (relative; None: 1e-12 in float64, 1e-5 in float32) × its change over the window / S,
    at most `depth` halvings (0: never split); `projection` (sparse: a CountSketch of `proj_dim` rows drawn from `seed`)
    for unbiased projected contributions and kernel."""

    trajectory: str
    nodes: int = 8
    steps: tuple[int, int | None] | None = None
    all_classes: bool = False
    top_k: int = 10
    tolerance: float | None = None
    depth: int = 40
    panels: int = 1
    projection: str = "none"
    proj_dim: int = 10240
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.projection in PATH_PROJECTIONS, f"--projection: path-kernel takes {', '.join(PATH_PROJECTIONS)}")
        _check(self.proj_dim >= 1, "--proj-dim must be positive")
        _check(1 <= self.nodes <= 64, "--nodes must be in [1, 64]")
        _check(1 <= self.panels <= 64, "--panels must be in [1, 64]")
        _check(self.top_k >= 1, "--top-k must be positive")
        _check(self.tolerance is None or self.tolerance > 0, "--tolerance must be positive")
        _check(0 <= self.depth <= 50, "--depth must be in [0, 50]")
        if self.steps is not None:
            start, stop = self.steps
            _check(start >= 0 and (stop is None or stop > start), "--steps a:b needs 0 <= a < b")

    def relative_tolerance(self, dtype: str) -> float:
        return self.tolerance if self.tolerance is not None else (1e-12 if dtype == "float64" else 1e-5)


def step_window(text: str | None) -> tuple[int, int | None] | None:
    """--steps a:b (a or b may be left out) as (a, b), b None for the last step."""
    if text is None:
        return None
    start, colon, stop = text.partition(":")
    try:
        window = (int(start or 0), int(stop) if stop else None)
    except ValueError:
        raise UsageError(f"--steps {text!r}: expected a:b, e.g. 0:100") from None
    _check(bool(colon), f"--steps {text!r}: expected a:b, e.g. 0:100")
    return window


@dataclass(frozen=True)
class TrainSpec(Params):
    """A plain training recipe: the optimiser (sgd, adam, adamw), its learning rate, momentum (SGD's; Adam's β₁ is
    `betas[0]`), weight decay, epochs over the shuffled training set in batches of `batch_size`, and the seed of
    the initialisation and the shuffling."""

    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    epochs: int = 2
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        _one_of(self.optimizer, OPTIMIZERS, "--optimizer")
        _check(self.lr > 0, "--lr must be positive")
        _check(0 <= self.momentum < 1, "--momentum must be in [0, 1)")
        _check(self.momentum == 0 or self.optimizer == "sgd", "--momentum applies to sgd (Adam has its own betas)")
        _check(self.weight_decay >= 0, "--weight-decay must not be negative")
        _check(self.epochs >= 1 and self.batch_size >= 1, "--epochs and --batch-size must be positive")
        _check(0 <= self.seed <= SEED_MAX, f"--seed must be in [0, {SEED_MAX}]")
