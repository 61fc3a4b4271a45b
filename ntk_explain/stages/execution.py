"""How a stage runs: whether it may replace what exists, whether it continues an interrupted run, and where it
reports progress (a protocol the CLI implements with a rich bar; silent by default)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


class Progress(Protocol):
    def start(self, description: str, total: int) -> None: ...

    def advance(self, steps: int = 1) -> None: ...


class Silent:
    """A Progress that reports nothing."""

    def start(self, description: str, total: int) -> None:
        pass

    def advance(self, steps: int = 1) -> None:
        pass


@dataclass(frozen=True)
class Execution:
    """overwrite: replace an existing output; resume: continue the partial run that an interrupted or killed run of
    the same request kept (the numbers of an uninterrupted run); progress: where the stage reports how far it is."""

    overwrite: bool = False
    resume: bool = False
    progress: Progress = field(default_factory=Silent)
