"""Supports of m ≪ N points from tangent features φ (N, D): class-balanced sizes, subsets of the real points (random,
kmeans, leverage, farthest) and synthetic features in gradient space."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ntk_explain.kernel.normalize import unit_rows
from ntk_explain.options import SELECTIONS


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


def centred_one_hot(classes: Tensor, n_classes: int, dtype: torch.dtype) -> Tensor:
    """y = e_c − 1/C (n, C)."""
    return F.one_hot(classes, n_classes).to(dtype) - 1.0 / n_classes
