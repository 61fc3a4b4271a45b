"""The options of every stage as validated dataclasses, and the names they may take. Nothing heavy is imported
here, so that the command line builds its help and checks its options without loading torch."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

KERNELS = ("full", "diagonal", "trace", "pseudo", "ck")
PROJECTIONS = ("none", "gaussian", "rademacher", "sparse", "tensorsketch", "kronecker")
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


@dataclass(frozen=True)
class KernelSpec:
    """One kernel to compute: its variant, projection and parameter selection."""

    kernel: str
    projection: str = "none"
    dim: int | None = None
    seed: int = 0
    params: tuple[str, ...] | None = None
    feature_dtype: str | None = None  # storage of projected features: float32, float16, bfloat16 (None: as computed)

    def __post_init__(self) -> None:
        if self.feature_dtype not in (None, *FEATURE_DTYPES):
            raise ValueError(f"feature dtype must be one of {FEATURE_DTYPES}")
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}")
        if self.projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}")

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
    """Where and within how many bytes the work runs."""

    device: torch.device
    bytes: int
    batch_size: int | None = None
    shard: Shard = field(default_factory=Shard)  # which row tiles this process computes


@dataclass(frozen=True)
class KipSettings:
    """kip's optimiser: Adam steps, learning rate, the ridge λ of K_ss + λ tr(K_ss)/m I, real targets per step, and
    whether the support's labels are learned too."""

    steps: int = 200
    lr: float = 1e-2
    reg: float = 1e-3
    batch_size: int = 256
    learn_labels: bool = True


@dataclass(frozen=True)
class DistillSpec:
    """How `distill` builds its support: the method, its size (m = N/reduction, or per_class per class), the classes
    (the network's predictions or the labels) and, for kip, the optimiser's settings."""

    method: str = "kip"
    selection: str = "random"
    reduction: float | None = DEFAULT_REDUCTION
    per_class: int | None = None
    target: str = "model"
    kip: KipSettings = field(default_factory=KipSettings)
    neighbours: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}")

    def options(self) -> dict:
        """The settings as recorded in the run file's provenance."""
        kip = {f.name: getattr(self.kip, f.name) for f in fields(self.kip)}
        return {**{f.name: getattr(self, f.name) for f in fields(self) if f.name != "kip"}, "kip": kip}


@dataclass(frozen=True)
class SurrogateSpec:
    """The surrogate fitted by `attribute`: its kind, penalty, targets and kernel normalisation."""

    kind: str = "kglm"
    alpha: float = 1e-4
    target: str = "model"
    normalize: str = "cosine"  # cosine | scale | none
    balanced: bool = False
    fit_on: str = "support"  # a distilled support's kGLM: on the support's labels, or on the N training points
