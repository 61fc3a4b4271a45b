"""The one resumable row-tile loop of every stage: a dataset written a row tile at a time, each tile checkpointed
after it is written, and the tiles that an interrupted run checkpointed (or that another rank owns) skipped."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from ntk_explain import store
from ntk_explain.stages.execution import Progress


def resumable_tiles(
    dataset: store.H5Dataset,
    n: int,
    tile: int,
    progress: Progress,
    description: str,
    *,
    done: int | None = None,
    owned: Callable[[int], bool] = lambda index: True,
) -> Iterator[tuple[int, slice]]:
    """(index, rows) of every row tile of the n rows of `dataset` still to write, in order: those from `done` (by
    default the dataset's own checkpoint, `store.tiles_done`) on that this process `owned`. The caller writes the
    tile's rows; the next step records the checkpoint (`store.checkpoint`) before going on."""
    done = store.tiles_done(dataset) if done is None else done
    progress.start(description, n)
    for index, start in enumerate(range(0, n, tile)):
        rows = slice(start, min(n, start + tile))
        if index >= done and owned(index):
            yield index, rows
            store.checkpoint(dataset, index + 1)
        progress.advance(rows.stop - rows.start)
