"""The distilled NTK (SPEC §4): a support of m ≪ N points whose kernel keeps the structure of the full kernel and
the predictions of a surrogate built on it, so that later kernels need m Jacobians instead of N.

Everything works on tangent features φ(x) ∈ R^D, K(x, x') = ⟨φ(x), φ(x')⟩ (projected features in practice); Φ_c
stacks the rows of class c, classes being the network's predictions (or the labels).

- `KIP`: synthetic inputs X_s (and optionally labels y_s) minimising the kernel ridge loss `kip_loss`; its gradient
  w.r.t. X_s runs through the per-sample gradients φ(X_s) (double backward).
- `gradient_support`: synthetic features φ̂ = Φ_cᵀu in the span of one class's features: the top eigen-direction
  of each k-means cluster of the class, then the leading global directions those miss ("gaps").
- `select`: subsets of the real points (random, kmeans, leverage, farthest).
- Diagnostics: `effective_rank`, `rank_at` (r_ε), `kernel_alignment` (of `centred` kernels too),
  `predictor_kernel`, `nearest`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

METHODS = ("kip", "gradient", "select")
SELECTIONS = ("random", "kmeans", "leverage", "farthest")
# added to the faithfulness of a surrogate on a distilled support
DISTILL_METRICS = ("reduction", "kernel_alignment", "kernel_alignment_centred")


# --------------------------------------------------------------------------------------------------
# Spectra, alignment, neighbours


def spectrum(features: Tensor) -> Tensor:
    """Eigenvalues (descending) of K = ΦΦᵀ for Φ (n, D): the squared singular values, min(n, D) of them."""
    return torch.linalg.svdvals(features.double()).square()


def effective_rank(eigenvalues: Tensor) -> float:
    """exp(−Σ p_i log p_i), p_i = λ_i / Σ_j λ_j over the positive λ; 0 for a zero spectrum."""
    positive = eigenvalues[eigenvalues > 0].double()
    if not len(positive):
        return 0.0
    p = positive / positive.sum()
    return float(torch.exp(-(p * p.log()).sum()))


def rank_at(eigenvalues: Tensor, eps: float) -> int:
    """r_ε: the fewest leading eigenvalues whose sum is at least (1 − ε) Σ λ (λ < 0 counted as 0)."""
    lam = eigenvalues.double().clamp_min(0).sort(descending=True).values
    total = lam.sum()
    if total <= 0:
        return 0
    return min(len(lam), int((lam.cumsum(0) < (1 - eps) * total).sum()) + 1)


def class_ranks(features: Tensor, classes: Tensor, n_classes: int, eps: tuple[float, ...]) -> tuple[Tensor, Tensor]:
    """Per class c, of K_c = Φ_cΦ_cᵀ: the effective rank (C,) and r_ε for every ε (C, len(eps)); 0 for no points."""
    entropy = torch.zeros(n_classes, dtype=torch.float64)
    ranks = torch.zeros((n_classes, len(eps)), dtype=torch.int64)
    for c in range(n_classes):
        rows = features[classes == c]
        if len(rows):
            lam = spectrum(rows)
            entropy[c] = effective_rank(lam)
            ranks[c] = torch.tensor([rank_at(lam, e) for e in eps])
    return entropy, ranks


def centred(kernel: Tensor) -> Tensor:
    """HKH with H = I − 11ᵀ/n: the kernel of the features less their mean."""
    return kernel - kernel.mean(0, keepdim=True) - kernel.mean(1, keepdim=True) + kernel.mean()


def kernel_alignment(a: Tensor, b: Tensor) -> float:
    """tr(K₁K₂) / (‖K₁‖_F ‖K₂‖_F) for symmetric K₁, K₂ (n, n): 1 when one is a positive multiple of the other.

    Of `centred` kernels it is the centred alignment (Cortes et al. 2012), blind to the features' common mean, which
    dominates eNTK features and keeps the plain alignment near 1.
    """
    a, b = a.double(), b.double()
    return float((a * b).sum() / (a.norm() * b.norm()))


def predictor_kernel(test: Tensor, support: Tensor, ridge: float = 1e-6) -> Tensor:
    """The test×test kernel seen through a predictor's support: K_TS (K_SS + εI)⁻¹ K_ST, ε = ridge·tr(K_SS)/n.

    test (M, D), support (n, D). It is the kernel of the test features projected onto the span of the support's
    features; solved in the smaller of the n- and D-spaces (Φ_Sᵀ(Φ_SΦ_Sᵀ + εI)⁻¹Φ_S = (Φ_SᵀΦ_S + εI)⁻¹Φ_SᵀΦ_S).
    """
    test, support = test.double(), support.double()
    n, d = support.shape
    eps = ridge * support.square().sum() / n
    if n <= d:
        cross = support @ test.T
        gram = support @ support.T + eps * torch.eye(n, dtype=support.dtype, device=support.device)
        return cross.T @ torch.linalg.solve(gram, cross)
    covariance = support.T @ support
    system = covariance + eps * torch.eye(d, dtype=support.dtype, device=support.device)
    return test @ covariance @ torch.linalg.solve(system, test.T)


def unit_rows(features: Tensor) -> Tensor:
    """Rows scaled to unit norm (zero rows stay zero): the features of the cosine-normalised kernel."""
    return F.normalize(features, dim=1)


def nearest(support: Tensor, train: Tensor, k: int, rows: int = 1024) -> tuple[Tensor, Tensor]:
    """The k training points nearest each support point by cosine kernel: indices and values (m, k), best first.

    Computed `rows` support points at a time, so memory is rows × N.
    """
    k = min(k, len(train))
    unit_train = unit_rows(train)
    found = [(unit_rows(support[s : s + rows]) @ unit_train.T).topk(k, dim=1) for s in range(0, len(support), rows)]
    return torch.cat([f.indices for f in found]), torch.cat([f.values for f in found])


def allocate(class_sizes: list[int], total: int) -> list[int]:
    """m_c for every class: `total` split in proportion to the class sizes (largest remainders), at most n_c and at
    least one per class that has points."""
    present = [n for n in class_sizes if n]
    total = max(len(present), min(total, sum(class_sizes)))
    shares = [total * n / sum(class_sizes) for n in class_sizes]
    counts = [min(n, max(1 if n else 0, int(share))) for n, share in zip(class_sizes, shares, strict=True)]
    order = sorted(range(len(shares)), key=lambda c: counts[c] - shares[c])
    while sum(counts) < total:
        c = next(c for c in order if counts[c] < class_sizes[c])
        counts[c] += 1
        order.remove(c)
        order.append(c)
    return counts


# --------------------------------------------------------------------------------------------------
# Subset selection


def _draw_seed(generator: torch.Generator) -> int:
    return int(torch.randint(0, 2**31 - 1, (), generator=generator))


def _kmeans(points: Tensor, k: int, seed: int) -> Tensor:
    """Cluster labels (n,) of k-means (k-means++ start, Lloyd, scikit-learn) on rows `points`."""
    from sklearn.cluster import KMeans  # lazy: slow import, needed only here

    model = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(points.double().cpu().numpy())
    return torch.from_numpy(model.labels_).to(points.device)


def _select_class(unit: Tensor, k: int, method: str, generator: torch.Generator) -> Tensor:
    """k row indices of one class's unit features (n, D) by `method`."""
    n = len(unit)
    if k >= n:
        return torch.arange(n, device=unit.device)
    if method == "random":
        return torch.randperm(n, generator=generator, device="cpu")[:k].to(unit.device)
    if method == "kmeans":
        labels = _kmeans(unit, k, _draw_seed(generator))
        chosen = []
        for j in range(k):
            members = torch.nonzero(labels == j).flatten()
            centre = unit[members].mean(0)
            chosen.append(members[(unit[members] @ centre).argmax()])
        return torch.stack(chosen)
    if method == "leverage":
        # ridge leverage ℓ_i = Σ_r A_ir² σ_r² / (σ_r² + λ), λ = Σσ²/k so that Σℓ ≈ k; sampled without replacement ∝ ℓ
        left, sigma, _ = torch.linalg.svd(unit.double(), full_matrices=False)
        ridge = sigma.square().sum() / k
        scores = (left.square() * (sigma.square() / (sigma.square() + ridge))).sum(1)
        return torch.multinomial(scores.cpu(), k, replacement=False, generator=generator).to(unit.device)
    if method == "farthest":
        # greedy k-centre in cosine distance, from the point nearest the class mean
        first = (unit @ unit.mean(0)).argmax()
        chosen = [first]
        similarity = unit @ unit[first]
        for _ in range(k - 1):
            nxt = similarity.argmin()
            chosen.append(nxt)
            similarity = torch.maximum(similarity, unit @ unit[nxt])
        return torch.stack(chosen)
    raise ValueError(f"selection must be one of {SELECTIONS}, not {method!r}")


def select(features: Tensor, classes: Tensor, per_class: list[int], method: str, seed: int) -> Tensor:
    """Indices of per_class[c] real points of every class c (class by class), chosen by `method` on the
    cosine-normalised features (N, D)."""
    generator = torch.Generator().manual_seed(seed)
    unit = unit_rows(features)
    chosen = []
    for c, k in enumerate(per_class):
        rows = torch.nonzero(classes == c).flatten()
        if k and len(rows):
            chosen.append(rows[_select_class(unit[rows], k, method, generator)])
    return torch.cat(chosen)


# --------------------------------------------------------------------------------------------------
# Distillation in gradient space


def _synthetic(block: Tensor, direction: Tensor) -> Tensor:
    """φ̂ = Φᵀu with u = Φv for the rows Φ (n, D) and a direction v (D,): the class's features weighted by their
    alignment with v, signed to agree with the block's mean and scaled to the block's mean norm."""
    feature = block.T @ (block @ direction)
    if feature @ block.mean(0) < 0:
        feature = -feature
    return feature * (block.norm(dim=1).mean() / feature.norm().clamp_min(1e-30))


def gradient_support(
    features: Tensor, classes: Tensor, per_class: list[int], seed: int, gap_fraction: float = 0.25
) -> tuple[Tensor, Tensor]:
    """Synthetic features (m, D) and their classes (m,), m = Σ per_class (DNTK stage 3).

    Local: class c's unit features are split by k-means into l_c = m_c − ⌊gap_fraction·m_c⌋ clusters; each gives
    φ̂ = Φ_Gᵀu with u the top eigenvector of the cluster's kernel Φ_GΦ_Gᵀ. Gaps: the leading right singular
    vectors of all unit features, less their part in the span of the local φ̂, taken by σ·‖residual‖ (each then
    added to the span); a gap v goes to the class with the most energy ‖Φ_c v‖² as φ̂ = Φ_cᵀ(Φ_c v).
    """
    generator = torch.Generator().manual_seed(seed)
    unit = unit_rows(features)
    local, local_classes = [], []
    for c, k in enumerate(per_class):
        rows = torch.nonzero(classes == c).flatten()
        if not (k and len(rows)):
            continue
        clusters = min(len(rows), max(1, k - int(gap_fraction * k)))
        labels = _kmeans(unit[rows], clusters, _draw_seed(generator))
        for j in labels.unique():  # k-means may find fewer distinct clusters among repeated points
            block = features[rows[labels == j]]
            top = torch.linalg.svd(block.double(), full_matrices=False).Vh[0].to(block.dtype)
            local.append(_synthetic(block, top))
            local_classes.append(c)
    support, support_classes = torch.stack(local), torch.tensor(local_classes, device=features.device)
    gaps = sum(per_class) - len(local)
    if gaps <= 0:
        return support, support_classes
    basis = torch.linalg.qr(support.double().T).Q  # (D, l): the span of the local features
    with torch.random.fork_rng(devices=[unit.device] if unit.device.type == "cuda" else []):
        torch.manual_seed(seed)  # svd_lowrank draws its test matrix from the global generator of the device
        _, sigma, directions = torch.svd_lowrank(unit.double(), q=min(2 * len(support) + gaps, *unit.shape))
    extra, extra_classes = [], []
    for _ in range(gaps):
        residual = directions - basis @ (basis.T @ directions)
        best = int((sigma * residual.norm(dim=0)).argmax())
        v = F.normalize(residual[:, best], dim=0)
        basis = torch.cat([basis, v[:, None]], dim=1)
        energy = torch.stack([(features[classes == c].double() @ v).square().sum() for c in range(len(per_class))])
        c = int(energy.argmax())
        extra.append(_synthetic(features[classes == c], v.to(features.dtype)))
        extra_classes.append(c)
    return (
        torch.cat([support, torch.stack(extra)]),
        torch.cat([support_classes, torch.tensor(extra_classes, device=features.device)]),
    )


# --------------------------------------------------------------------------------------------------
# Kernel inducing points


def centred_one_hot(classes: Tensor, n_classes: int, dtype: torch.dtype) -> Tensor:
    """y = e_c − 1/C (n, C)."""
    return F.one_hot(classes, n_classes).to(dtype) - 1.0 / n_classes


def kip_loss(support: Tensor, target: Tensor, support_labels: Tensor, target_outputs: Tensor, reg: float) -> Tensor:
    """½ mean_t ‖K_ts (K_ss + λ tr(K_ss)/m I)⁻¹ y_s − y_t‖² for features φ_s (m, D), φ_t (b, D), y_s (m, C),
    y_t (b, C), with K = ⟨φ, φ'⟩."""
    k_ss = support @ support.T
    m = len(support)
    system = k_ss + reg * torch.trace(k_ss) / m * torch.eye(m, dtype=k_ss.dtype, device=k_ss.device)
    predicted = (target @ support.T) @ torch.linalg.solve(system, support_labels)
    return 0.5 * (predicted - target_outputs).square().sum(1).mean()


@dataclass
class KIP:
    """Kernel inducing points (Nguyen et al. 2021) on the network's eNTK: Adam on the synthetic inputs (and labels).

    Each step draws a class-balanced batch of real targets, recomputes φ(X_s) differentiably and descends
    `objective`; the targets' features are fixed (computed once by the caller). With `cosine` the kernel is the
    cosine-normalised one, K(x,x') = ⟨φ,φ'⟩/(‖φ‖‖φ'‖), as the surrogate sees it. Deterministic given `seed`.
    """

    steps: int = 200
    lr: float = 1e-2
    reg: float = 1e-3
    batch_size: int = 256
    learn_labels: bool = True
    cosine: bool = True
    seed: int = 0
    inputs_: Tensor = field(init=False, repr=False)
    labels_: Tensor = field(init=False, repr=False)
    losses_: list[float] = field(init=False, default_factory=list)

    def objective(
        self,
        feature_map: Callable[[Tensor], Tensor],
        inputs: Tensor,
        labels: Tensor,
        target_features: Tensor,
        target_outputs: Tensor,
    ) -> Tensor:
        """`kip_loss` of the support (inputs, labels) against targets (features φ_t, outputs y_t)."""
        support = feature_map(inputs)
        if self.cosine:
            support, target_features = unit_rows(support), unit_rows(target_features)
        return kip_loss(support, target_features, labels, target_outputs, self.reg)

    def fit(
        self,
        feature_map: Callable[[Tensor], Tensor],
        inputs: Tensor,
        labels: Tensor,
        target_features: Tensor,
        target_outputs: Tensor,
        target_classes: Tensor,
        on_step: Callable[[float], None] | None = None,
    ) -> KIP:
        """Start from real inputs (m, …) with labels (m, C); targets: features (N, D), outputs y_t (N, C), classes."""
        generator = torch.Generator().manual_seed(self.seed)
        x = inputs.detach().clone().requires_grad_(True)
        y = labels.detach().clone().requires_grad_(self.learn_labels)
        optimizer = torch.optim.Adam([x, y] if self.learn_labels else [x], lr=self.lr)
        by_class = [torch.nonzero(target_classes == c).flatten().cpu() for c in range(labels.shape[1])]
        by_class = [rows for rows in by_class if len(rows)]
        per_class = max(1, self.batch_size // len(by_class))
        self.losses_ = []
        for _ in range(self.steps):
            batch = torch.cat(
                [rows[torch.randint(0, len(rows), (per_class,), generator=generator)] for rows in by_class]
            ).to(target_features.device)
            optimizer.zero_grad()
            loss = self.objective(feature_map, x, y, target_features[batch], target_outputs[batch])
            loss.backward()
            optimizer.step()
            self.losses_.append(loss.item())
            if on_step is not None:
                on_step(self.losses_[-1])
        self.inputs_, self.labels_ = x.detach(), y.detach()
        return self
