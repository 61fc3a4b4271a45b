"""The `ntk-explain` Typer application: expected failures as one line and an exit code, progress bars on stderr."""

from __future__ import annotations

import functools
import json
import signal
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ntk_explain.cli.options import Debug, Json, Quiet, gathered
from ntk_explain.errors import NtkExplainError, OutOfMemoryError, first_line
from ntk_explain.resources import retain_freed_memory

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Explain trained PyTorch networks through their empirical neural tangent kernel.",
)


stderr = Console(stderr=True)


stdout = Console(width=None if sys.stdout.isatty() else 160)  # piped tables keep whole lines


@dataclass(frozen=True)
class Output:
    """What a command prints: nothing but errors (quiet: no progress bars, messages or warnings), one JSON summary
    on stdout (as_json), tracebacks of failures (debug)."""

    quiet: bool = False
    as_json: bool = False
    debug: bool = False


def report(summary: dict, output: Output, describe: Callable[[dict], None]) -> None:
    """A stage's summary: one JSON object with --json; else, unless --quiet, `describe(summary)`, or a line saying
    that the stage had nothing to do (a finished run of the same request, under --resume)."""
    if output.as_json:
        typer.echo(json.dumps(summary, default=str))
    elif output.quiet:
        return
    elif summary.get("skipped"):
        typer.echo(f"{summary['out']} is done already with these options: nothing to do")
    else:
        describe(summary)


def reported(command: Callable) -> Callable:
    """Give a command the options --quiet, --json and --debug (as `output`) and turn its expected failures into one
    stderr line and their exit codes (130 for an interrupt); --quiet silences warnings too."""
    options = {"quiet": (Quiet, False), "as_json": (Json, False), "debug": (Debug, False)}

    def run(output: Output, **kwargs: Any) -> Any:
        try:
            with warnings.catch_warnings():
                if output.quiet:  # torch's warnings that our calls trigger, too
                    warnings.simplefilter("ignore")
                return command(output=output, **kwargs)
        except Exception as error:
            if output.debug:
                raise
            raise typer.Exit(_exit_code(error)) from None
        except KeyboardInterrupt as interrupt:
            stderr.print(f"interrupted{f': {interrupt}' if str(interrupt) else ''}", style="red", highlight=False)
            raise typer.Exit(130) from None

    functools.update_wrapper(run, command)
    return gathered(options, "output", lambda values: Output(**values))(run)


def _exit_code(error: Exception) -> int:
    if isinstance(error, NtkExplainError):
        message, code = first_line(error), error.exit_code
    elif isinstance(error, MemoryError) or _torch_out_of_memory(error):
        message, code = "out of memory: lower --max-memory or --batch-size", OutOfMemoryError.exit_code
    else:
        message, code = f"unexpected failure: {type(error).__name__}: {first_line(error)} (rerun with --debug)", 1
    stderr.print(f"error: {message}", style="red", highlight=False, markup=False, soft_wrap=True)
    return code


def _torch_out_of_memory(error: Exception) -> bool:
    """Whether `error` is torch's out-of-memory error (torch is only consulted when a command has loaded it)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(error, torch.OutOfMemoryError)


class RichProgress:
    """The library's Progress as a rich bar on stderr."""

    def __init__(self, bar: Progress) -> None:
        self.bar, self.task = bar, None

    def start(self, description: str, total: int) -> None:
        if self.task is not None:
            self.bar.update(self.task, completed=self.bar.tasks[self.task].total)
        self.task = self.bar.add_task(description, total=total)

    def advance(self, steps: int = 1) -> None:
        self.bar.advance(self.task, steps)


@contextmanager
def progress_bar(quiet: bool) -> Iterator[RichProgress]:
    """A stage's progress as a rich bar on stderr while inside; none when quiet or stderr is not a terminal."""
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=stderr,
        disable=quiet or not sys.stderr.isatty(),
        transient=False,
    )
    with bar:
        yield RichProgress(bar)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    """Entry point: SIGTERM stops like Ctrl-C (exit 130, nothing half-written); freed memory is kept for reuse."""
    signal.signal(signal.SIGTERM, _interrupt)
    retain_freed_memory()
    app()
