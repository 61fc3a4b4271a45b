"""Kernels tile by tile: row tiles of a data set, their features kept when they fit, and the blocks of a Gram."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from torch import Tensor

from ntk_explain.kernel.factors import Factors
from ntk_explain.kernel.grams import gram, mirror


@dataclass
class Tiles:
    """A set of n samples seen in row tiles, their features kept in memory when `keep`."""

    featurize: Callable[[int, int], Factors]
    n: int
    tile: int
    keep: bool

    def __post_init__(self) -> None:
        self._kept: dict[int, Factors] = {}

    @property
    def bounds(self) -> list[tuple[int, int]]:
        return [(s, min(self.n, s + self.tile)) for s in range(0, self.n, self.tile)]

    def get(self, start: int, stop: int) -> Factors:
        if start in self._kept:
            return self._kept[start]
        factors = self.featurize(start, stop)
        if self.keep:
            self._kept[start] = factors
        return factors


def kernel_blocks(
    rows: Tiles, cols: Tiles | None, how: str, stripes: Callable[[int], bool] | None = None
) -> Iterator[tuple[slice, slice, Tensor]]:
    """Blocks (row slice, column slice, block) of the rows × cols Gram, stripe by stripe: the blocks of one row tile.

    cols None: the symmetric rows × rows Gram, each off-diagonal block computed once and mirrored (the stripe of row
    tile r is its blocks from the diagonal on and their mirrors). `stripes(i)` says whether the stripe of the i-th
    row tile is wanted (default: all).
    """
    for index, (r0, r1) in enumerate(rows.bounds):
        if stripes is not None and not stripes(index):
            continue
        a = rows.get(r0, r1)
        for c0, c1 in (cols or rows).bounds:
            if cols is None and c0 < r0:
                continue
            block = gram(a, a if cols is None and c0 == r0 else (cols or rows).get(c0, c1), how)
            yield slice(r0, r1), slice(c0, c1), block
            if cols is None and c0 != r0:
                yield slice(c0, c1), slice(r0, r1), mirror(block)


def self_kernel(tiles: Tiles, how: str, stripes: Callable[[int], bool] | None = None) -> Iterator[tuple[slice, Tensor]]:
    """K(x, x) of the samples of every (wanted: `stripes(i)`) tile: (n,), (n, C) or (n, C, C)."""
    for index, (start, stop) in enumerate(tiles.bounds):
        if stripes is None or stripes(index):
            yield slice(start, stop), gram(tiles.get(start, stop), None, how)
