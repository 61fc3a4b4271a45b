"""`ntk-explain info` and `ntk-explain evaluate`: what a run file holds, and the surrogate's faithfulness."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ntk_explain.cli.app import Output, app, reported, stdout


@app.command()
@reported
def info(
    run: Annotated[Path, typer.Argument(help="A run file written by ntk-explain.")],
    output: Output,
) -> None:
    """Show what a run file holds: provenance, groups and datasets."""
    from ntk_explain import store
    from ntk_explain.cli.render import distill_table, info_table

    if output.as_json:
        typer.echo(json.dumps({"attrs": store.root_attrs(run), "items": store.summarize(run)}, default=str))
    else:
        stdout.print(info_table(run))
        distilled = distill_table(run)
        if distilled is not None:
            stdout.print(distilled)


@app.command()
@reported
def evaluate(
    run: Annotated[Path, typer.Argument(help="A run file with a fitted surrogate.")],
    output: Output,
) -> None:
    """Show the surrogate's faithfulness metrics, beside those of the distilled support's surrogate when both exist,
    and the agreement of its attribution with the exact path kernel's when the run holds /path."""
    from ntk_explain import store
    from ntk_explain.cli.render import PATH_METRICS, metrics_table, path_table
    from ntk_explain.store import layout

    found = store.faithfulness(run)
    full, distilled = found.get(layout.FAITHFULNESS), found.get(layout.within(layout.DISTILL, layout.FAITHFULNESS))
    path = store.path_summary(run)
    exact = {key: path[key] for key in PATH_METRICS if key in path} if path else None
    if output.as_json:
        extra = {**({"distilled": distilled} if distilled else {}), **({"path": exact} if exact else {})}
        typer.echo(json.dumps({**(full or {}), **extra}, default=str))
        return
    stdout.print(metrics_table(distilled) if full is None else metrics_table(full, distilled))
    if exact and "mean_kendall_tau" in exact:
        stdout.print(path_table(exact))
