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


def stripe(rows: Tiles, cols: Tiles | None, how: str, index: int) -> Iterator[tuple[slice, slice, Tensor]]:
    """The blocks (row slice, column slice, block) of the stripe of row tile `index` of the rows × cols Gram.

    cols None: the symmetric rows × rows Gram; the stripe of row tile r is its blocks from the diagonal on, each
    off-diagonal block computed once and also given mirrored, at (c, r).
    """
    r0, r1 = rows.bounds[index]
    a = rows.get(r0, r1)
    for c0, c1 in (cols or rows).bounds:
        if cols is None and c0 < r0:
            continue
        block = gram(a, a if cols is None and c0 == r0 else (cols or rows).get(c0, c1), how)
        yield slice(r0, r1), slice(c0, c1), block
        if cols is None and c0 != r0:
            yield slice(c0, c1), slice(r0, r1), mirror(block)


def self_block(tiles: Tiles, how: str, index: int) -> Tensor:
    """K(x, x) of the samples of row tile `index`: (n,), (n, C) or (n, C, C)."""
    return gram(tiles.get(*tiles.bounds[index]), None, how)
