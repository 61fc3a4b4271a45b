"""The one stage pattern (kronfluence's): a stage declares its group and its request; a group finished for the same
request is skipped, a partial run resumes in the tiles it started with, a different request is refused."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from ntk_explain import store
from ntk_explain.errors import BadInputError
from ntk_explain.options import Resources
from ntk_explain.stages.execution import Execution


def finished(path: Path, group: str, request: Mapping[str, Any], how: Execution) -> bool:
    """Whether a stage has nothing to do (kronfluence's pattern, under `how.resume`): `group` of the run file `path`
    was finished for this very `request`. A group finished for another request is refused (BadInputError); without
    resume, with overwrite, with no record of a finished group, or with an interrupted run's partial file to go on
    with, the stage runs (False)."""
    if not how.resume or how.overwrite or store.partial_path(path).exists():
        return False
    saved = store.saved_request(path, group)
    if saved is None:
        return False
    if saved != store.storable(request):
        made = f"{path}" if group == "/" else f"{path}: /{group}"
        raise BadInputError(f"{made} was made with other options; pass --overwrite to replace it")
    return True


def resumed_resources(resources: Resources, written: Path) -> Resources:
    """The resources of a resumed run writing `written`: the memory budget, batch size and tile it recorded, unless
    given again (so its tiles, and therefore its numbers, stay the same)."""
    recorded = store.partial_params(written)
    if not recorded:
        return resources
    batch = recorded.get("batch_size")
    return replace(
        resources,
        max_memory=resources.max_memory or str(recorded["max_memory"]),
        batch_size=resources.batch_size or (batch if isinstance(batch, int) else None),
        tile=resources.tile or recorded.get("tile"),
    )


def kept_partial(path: Path) -> KeyboardInterrupt:
    """The interrupt of a resumable stage, naming the partial file it keeps (if it got as far as making one)."""
    partial = store.partial_path(path)
    return KeyboardInterrupt(f"the partial run is kept in {partial}; --resume continues it" if partial.exists() else "")
