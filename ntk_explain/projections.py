"""Random projections R ∈ R^{d×P} of tangent features, E[RᵀR] = I, never formed whole.

R is defined column-chunk by column-chunk: chunk j (a fixed number of columns, set by d alone)
is drawn from a generator seeded by (seed, j) on the compute device, so any column range
[start, stop) is reproducible whatever the tiling, and equal on machines of the same device type.

- gaussian:   R_ij ~ N(0, 1/d)
- rademacher: R_ij = ±1/√d
- sparse:     CountSketch, one ±1 per column in a hashed row: R g costs O(P)
"""

from __future__ import annotations

import math
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

    def _generator(self, index: int, device: torch.device) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(self.seed * 0x9E3779B1 + index)

    def _draw(self, index: int, device: torch.device) -> Tensor:
        """Chunk `index`: dense (d, chunk) float32 entries, or sparse (2, chunk) int64 rows and signs."""
        g = self._generator(index, device)
        if self.kind == "gaussian":
            return torch.randn(self.dim, self.chunk, generator=g, device=device) / math.sqrt(self.dim)
        signs = (
            torch.randint(0, 2, (self.dim if self.kind == "rademacher" else 1, self.chunk), generator=g, device=device)
            * 2
            - 1
        )
        if self.kind == "rademacher":
            return signs.float() / math.sqrt(self.dim)
        rows = torch.randint(0, self.dim, (1, self.chunk), generator=g, device=device)
        return torch.cat([rows, signs])

    def columns(self, start: int, stop: int, device: torch.device) -> Tensor:
        """Columns [start, stop) of R: (d, stop − start), or for sparse (2, stop − start)."""
        first, last = start // self.chunk, (stop - 1) // self.chunk
        pieces = [self._draw(j, device) for j in range(first, last + 1)]
        block = torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]
        offset = start - first * self.chunk
        return block[:, offset : offset + stop - start]

    def add_projection(self, out: Tensor, grads: Tensor, start: int) -> None:
        """out += grads @ R[:, start:start+c]ᵀ for grads (..., c) and out (..., d), in place."""
        cols = self.columns(start, start + grads.shape[-1], grads.device)
        if self.kind == "sparse":
            rows, signs = cols
            out.index_add_(out.dim() - 1, rows, grads * signs.to(grads.dtype))
        else:
            out.add_(grads @ cols.to(grads.dtype).T)
