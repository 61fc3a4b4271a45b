"""Random projections R ∈ R^{d×P} of tangent features, E[RᵀR] = I, never formed whole.

R is defined column-chunk by column-chunk: chunk j (a fixed number of columns, set by d alone)
is drawn from a generator seeded by (seed, j) on the compute device, so any column range
[start, stop) is reproducible whatever the tiling, and equal on machines of the same device type.

- gaussian:   R_ij ~ N(0, 1/d)
- rademacher: R_ij = ±1/√d
- sparse:     CountSketch, one ±1 per column in a hashed row: R g costs O(P)

`kronecker` (LoGra-style) projects each side instead: (R_outᵀ δ_s) ⊗ (R_inᵀ ã_s) summed over sites, R_out (d_out, a),
R_in (d_in, b) Gaussian with variances 1/a, 1/b and a·b ≤ the layer's share of d; E⟨·,·⟩ = ⟨δ,δ'⟩⟨ã,ã'⟩, so it is
unbiased too, cheaper than the FFT, and noisier at the same d.

`tensorsketch` (Pham & Pagh 2013) sketches a factorised layer's gradient G = Σ_s δ_s ã_sᵀ without forming it:
TS(G) = IFFT(Σ_s FFT(CS₁ δ_s) ⊙ FFT(CS₂ ã_s)), two independent CountSketches CS₁, CS₂ of the output and input
sides, O(S(d_out + d_in + d log d)) per sample; E⟨TS G, TS G'⟩ = ⟨G, G'⟩.

Both sketch only factorised layers (`nn.Linear`, `nn.Conv2d`), and only the part of G off the layer's mean directions
(`kernels.SketchLayout`: the rows and columns along them are kept exactly or CountSketched). The remaining parameters
form one generic group: a CountSketch of the dense gradients (normalisation γ, β among them) plus, for every
embedding, a CountSketch of its gradient Σ_s δ_s e_{i_s}ᵀ through the coordinates of the rows i_s it touches
(`lookup_sketch`), hashed independently. `sketch_shares` gives every group its share of d.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from ntk_explain.options import PROJECTIONS

_CHUNK_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class Projection:
    kind: str
    dim: int
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in PROJECTIONS[1:]:
            raise ValueError(f"projection must be one of {PROJECTIONS[1:]}, not {self.kind!r}")
        if self.dim < 1:
            raise ValueError("projection dimension must be positive")

    @property
    def chunk(self) -> int:
        """Columns per generator chunk."""
        return max(1, _CHUNK_ELEMENTS // self.dim) if self.kind != "sparse" else _CHUNK_ELEMENTS

    @property
    def scale(self) -> float:
        """R = scale · Z with Z the drawn N(0, 1) or ±1 entries (1/√d), or 1 for the CountSketch."""
        return 1.0 if self.kind == "sparse" else 1 / math.sqrt(self.dim)

    def _pieces(self, start: int, stop: int, device: torch.device) -> Iterator[tuple[int, int, Tensor]]:
        """(first, last, Z's columns) covering columns [start, stop), positions relative to `start`."""
        for index in range(start // self.chunk, (stop - 1) // self.chunk + 1):
            low, high = max(start, index * self.chunk), min(stop, (index + 1) * self.chunk)
            chunk_start = index * self.chunk
            yield low - start, high - start, _draw(self, index, device)[:, low - chunk_start : high - chunk_start]

    def columns(self, start: int, stop: int, device: torch.device) -> Tensor:
        """Columns [start, stop) of R: (d, stop − start), or for sparse (2, stop − start) rows and signs."""
        block = torch.cat([piece for _, _, piece in self._pieces(start, stop, device)], dim=1)
        return block if self.kind == "sparse" else block * self.scale

    def add_projection(self, out: Tensor, grads: Tensor, start: int) -> None:
        """out += grads @ R[:, start:start+c]ᵀ for grads (..., c) and out (..., d), in place."""
        for first, last, piece in self._pieces(start, start + grads.shape[-1], grads.device):
            part = grads[..., first:last]
            if self.kind == "sparse":
                out.index_add_(out.dim() - 1, piece[0], part * piece[1].to(part.dtype))
            else:
                out.add_(part @ piece.to(part.dtype).T, alpha=self.scale)


def generator(seed: int, salt: int, device: torch.device) -> torch.Generator:
    """A generator on `device` seeded by (seed · 0x9E3779B1 + salt) mod 2⁶⁴: any seed and salt, distinct streams."""
    return torch.Generator(device=device).manual_seed((seed * 0x9E3779B1 + salt) % 2**64)


@functools.lru_cache(maxsize=4)  # consecutive column blocks reuse a chunk instead of drawing it again
def _draw(projection: Projection, index: int, device: torch.device) -> Tensor:
    """Chunk `index` of Z: dense (d, chunk) float32, or for sparse (2, chunk) int64 rows and signs."""
    dim, chunk = projection.dim, projection.chunk
    g = generator(projection.seed, index, device)
    if projection.kind == "gaussian":
        return torch.randn(dim, chunk, generator=g, device=device)
    if projection.kind == "rademacher":
        bits = torch.randint(0, 2, (dim, chunk), generator=g, device=device, dtype=torch.int8)
        return bits.float().mul_(2).sub_(1)
    rows = torch.randint(0, dim, (chunk,), generator=g, device=device)
    signs = torch.randint(0, 2, (chunk,), generator=g, device=device) * 2 - 1
    return torch.stack([rows, signs])


def split_dims(dim: int, sizes: list[int]) -> list[int]:
    """d split over groups in proportion to their sizes (largest remainders); a group left with 0 takes 1 from
    the largest share."""
    if dim < len(sizes):
        raise ValueError(f"a {dim}-dimensional sketch cannot give each of {len(sizes)} layers a dimension")
    shares = [dim * size / sum(sizes) for size in sizes]
    dims = [math.floor(share) for share in shares]
    for i in sorted(range(len(sizes)), key=lambda i: dims[i] - shares[i])[: dim - sum(dims)]:
        dims[i] += 1
    for i in range(len(dims)):
        if dims[i] == 0:
            dims[i] = 1
            dims[dims.index(max(dims))] -= 1
    return dims


def fft_dims(dims: list[int], fast: list[bool], spare: int | None) -> list[int]:
    """Shares with fast FFT sizes: each `fast` share (a TensorSketch's) rounded down to a 3-smooth size 2^a·3^b (an
    FFT of a size with a large prime factor is up to 10× slower), then, largest first, raised to the next 3-smooth
    size as far as the dimensions so freed allow. What is left goes to share `spare` (a CountSketch's, of any size),
    else stays unused (zero features)."""
    bits = (2 * max(dims)).bit_length()  # some 2^a lies in (d, 2d]
    sizes = sorted(2**a * 3**b for a in range(bits) for b in range(bits) if 2**a * 3**b <= 2 * max(dims))
    sized = [max(size for size in sizes if size <= d) if quick else d for d, quick in zip(dims, fast, strict=True)]
    left = sum(dims) - sum(sized)
    for i in sorted((i for i in range(len(dims)) if fast[i]), key=lambda i: -dims[i]):
        bigger = min(size for size in sizes if size > sized[i])
        if bigger - sized[i] <= left:
            left, sized[i] = left - (bigger - sized[i]), bigger
    if spare is not None:
        sized[spare] += left
    return sized


def sketch_shares(
    dim: int, energies: list[float], sizes: list[int | None], fast: list[bool]
) -> tuple[list[int], list[bool]]:
    """How d is shared out among groups of coordinates with energies E_g = Σ_x ‖g(x)‖²: (dims, exact).

    A group of s_g coordinates kept exactly costs s_g dimensions and adds no variance; a sketched one with d_g
    dimensions adds variance ~ E_g²/d_g, so the sketched groups' total Σ E_g²/d_g is least, (Σ E_g)²/d_left, for
    d_g ∝ E_g. Groups that may be kept exactly (`sizes[g]` not None) are taken greedily by energy per coordinate
    while that lowers the bound, (E − E_g)²/(d − s_g) < E²/d; the dimensions left are split in proportion to the
    sketched groups' energies (`split_dims`: each at least 1, as a group's energy on the probe rows may be 0 where
    other rows' is not), the `fast` ones (TensorSketches) then sized by `fft_dims`, their spare dimensions going to
    the first other sketched group."""
    exact = [False] * len(energies)
    energy, left = sum(energies), dim
    candidates = [g for g, size in enumerate(sizes) if size is not None]
    for g in sorted(candidates, key=lambda g: -energies[g] / max(sizes[g], 1)):
        size, sketched = sizes[g], len(energies) - sum(exact) - 1
        if left - size >= sketched and (size == 0 or (energy - energies[g]) ** 2 * left < energy**2 * (left - size)):
            exact[g], energy, left = True, energy - energies[g], left - size
    sketched = [g for g in range(len(energies)) if not exact[g]]
    dims = [size if exact[g] else 0 for g, size in enumerate(sizes)]
    shares = split_dims(left, [max(energies[g], 1e-30) for g in sketched]) if sketched else []
    for g, share in zip(sketched, shares, strict=True):
        dims[g] = share
    if any(fast[g] for g in sketched):
        spare = next((g for g in sketched if not fast[g]), None)
        dims = fft_dims(dims, [fast[g] and not exact[g] for g in range(len(dims))], spare)
    return dims, exact


@functools.lru_cache(maxsize=64)  # every batch sketches with the same hashes
def hashes(seed: int, stream: int, size: int, dim: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """A CountSketch [size] → [dim]: buckets and ±1 signs, drawn from (seed, stream)."""
    g = generator(seed, 0x632BE5AB * (stream + 1), device)
    buckets = torch.randint(0, dim, (size,), generator=g, device=device)
    signs = torch.randint(0, 2, (size,), generator=g, device=device) * 2 - 1
    return buckets, signs


def count_sketch(x: Tensor, buckets: Tensor, signs: Tensor, out: Tensor) -> Tensor:
    """out += CS(x), CS(x)_b = Σ_{i: h(i)=b} s(i) x_i along the last axis, in place: x (..., size), out (..., dim)."""
    return out.index_add_(x.dim() - 1, buckets, x * signs.to(x.dtype))


def tensor_sketch(delta: Tensor, inputs: Tensor, dim: int, seed: int, stream: int) -> Tensor:
    """TS(Σ_s δ_s ã_sᵀ) (n, K, dim) for δ (n, K, S, O) and ã (n, S, I): the sketch of the O×I gradient."""
    zeros = delta.new_zeros((*delta.shape[:-1], dim)), inputs.new_zeros((*inputs.shape[:-1], dim))
    out_side = count_sketch(delta, *hashes(seed, 2 * stream, delta.shape[-1], dim, delta.device), zeros[0])
    in_side = count_sketch(inputs, *hashes(seed, 2 * stream + 1, inputs.shape[-1], dim, inputs.device), zeros[1])
    product = torch.einsum("nksf,nsf->nkf", torch.fft.rfft(out_side, n=dim), torch.fft.rfft(in_side, n=dim))
    return torch.fft.irfft(product, n=dim)


def kronecker_sketch(delta: Tensor, inputs: Tensor, dim: int, seed: int, stream: int) -> Tensor:
    """Σ_s (R_outᵀ δ_s) ⊗ (R_inᵀ ã_s) (n, K, dim) for δ (n, K, S, O), ã (n, S, I); a·b ≤ dim used (a = ⌊√dim⌋,
    b = ⌊dim/a⌋), the rest zero."""
    a = max(1, math.isqrt(dim))
    b = dim // a
    g = generator(seed, 0x2545F491 * (stream + 1), delta.device)
    out_side = torch.randn(delta.shape[-1], a, generator=g, device=delta.device).to(delta.dtype) / math.sqrt(a)
    in_side = torch.randn(inputs.shape[-1], b, generator=g, device=delta.device).to(delta.dtype) / math.sqrt(b)
    product = torch.einsum("nksa,nsb->nkab", delta @ out_side, inputs @ in_side).flatten(2)
    return torch.nn.functional.pad(product, (0, dim - a * b))


def lookup_sketch(delta: Tensor, rows: Tensor, vocabulary: int, dim: int, seed: int, stream: int) -> Tensor:
    """CS(G) (n, K, dim) of an embedding's gradient G = Σ_s δ_s e_{i_s}ᵀ (vocabulary × d, flattened row-major) for
    δ (n, K, S, d) and rows i (n, S): entry (i_s, j) is coordinate i_s·d + j, so CS(G)_b = Σ_{s,j: h(i_s·d + j) = b}
    s(i_s·d + j) δ_sj, O(S·d) per sample without forming G. Hashes from (seed, 2·stream)."""
    n, k, _, d = delta.shape
    buckets, signs = hashes(seed, 2 * stream, vocabulary * d, dim, delta.device)
    coords = (rows[..., None] * d + torch.arange(d, device=delta.device)).flatten(1)  # (n, S·d)
    values = delta.flatten(2) * signs[coords][:, None].to(delta.dtype)
    return delta.new_zeros((n, k, dim)).scatter_add_(2, buckets[coords][:, None].expand(n, k, -1), values)
