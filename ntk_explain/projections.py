"""Random projections R ∈ R^{d×P} of tangent features, E[RᵀR] = I, never formed whole.

R is defined column-chunk by column-chunk: chunk j (a fixed number of columns, set by d alone)
is drawn from a generator seeded by (seed, j) on the compute device, so any column range
[start, stop) is reproducible whatever the tiling, and equal on machines of the same device type.

- gaussian:   R_ij ~ N(0, 1/d)
- rademacher: R_ij = ±1/√d
- sparse:     CountSketch, one ±1 per column in a hashed row: R g costs O(P)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

PROJECTIONS = ("none", "gaussian", "rademacher", "sparse")
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


@functools.lru_cache(maxsize=4)  # consecutive column blocks reuse a chunk instead of drawing it again
def _draw(projection: Projection, index: int, device: torch.device) -> Tensor:
    """Chunk `index` of Z: dense (d, chunk) float32, or for sparse (2, chunk) int64 rows and signs."""
    dim, chunk = projection.dim, projection.chunk
    g = torch.Generator(device=device).manual_seed(projection.seed * 0x9E3779B1 + index)
    if projection.kind == "gaussian":
        return torch.randn(dim, chunk, generator=g, device=device)
    if projection.kind == "rademacher":
        bits = torch.randint(0, 2, (dim, chunk), generator=g, device=device, dtype=torch.int8)
        return bits.float().mul_(2).sub_(1)
    rows = torch.randint(0, dim, (chunk,), generator=g, device=device)
    signs = torch.randint(0, 2, (chunk,), generator=g, device=device) * 2 - 1
    return torch.stack([rows, signs])
