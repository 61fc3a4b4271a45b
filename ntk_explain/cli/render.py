"""Rich tables of run files and results, for the commands to print."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from ntk_explain import store
from ntk_explain.options import DISTILL_METRICS
from ntk_explain.store import layout
from ntk_explain.store.files import open_run
from ntk_explain.store.read import INFO_ROOT_KEYS, summarize
from ntk_explain.surrogate.metrics import METRIC_NAMES


def metrics_table(metrics: dict, distilled: dict | None = None) -> Table:
    """The faithfulness metrics; beside them those of the surrogate on the distilled support, when given."""
    columns = {
        "value" if distilled is None else "full data": metrics,
        **({"distilled": distilled} if distilled else {}),
    }
    table = Table(title="faithfulness", title_justify="left")
    table.add_column("metric")
    for label in columns:
        table.add_column(label, justify="right")
    keys = [key for key in (*METRIC_NAMES, *DISTILL_METRICS) if any(key in c for c in columns.values())]
    for key in keys:
        cells = [c.get(key, "") for c in columns.values()]
        table.add_row(key, *(f"{v:.4f}" if isinstance(v, float) else str(v) for v in cells))
    return table


PATH_METRICS = ("mean_kendall_tau", "mean_top10_overlap", "relative_residual", "steps", "optimizer")


def path_table(attrs: dict) -> Table:
    """The kGLM's explanation against the exact path kernel's, and how exact that was."""
    table = Table(title="kGLM against the path kernel", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in PATH_METRICS:
        if key in attrs:
            value = attrs[key]
            table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    return table


def proponents_table(run: Path, rows: int, top: int) -> Table:
    """The strongest training proponents of the first `rows` explained points (rows of the source files)."""
    with store.open_run(run) as f:
        split = "test" if layout.data("test") in f else "train"
        data, explained, train = f[layout.data(split)], f[layout.ATTRIBUTION], f[layout.data("train")]
        source, labels, predicted = data["index"][:rows], data["labels"][:rows], explained["class"][:rows]
        index, score = explained["topk_index"][:rows, :top], explained["topk_score"][:rows, :top]
        train_source, train_labels = train["index"][()], train["labels"][()]
    table = Table(title=f"top-{top} proponents (training points, attribution score)", title_justify="left")
    table.add_column(f"{split} row")
    table.add_column("label")
    table.add_column("network")
    for rank in range(top):
        table.add_column(f"#{rank + 1}")
    for row in range(len(source)):
        cells = [
            f"train row {train_source[j]} (label {train_labels[j]}) {s:+.3f}"
            for j, s in zip(index[row], score[row], strict=True)
        ]
        table.add_row(str(source[row]), str(labels[row]), str(predicted[row]), *cells)
    return table


def _short(value: Any, width: int = 40) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= width else text[: width - 1] + "…"


def info_table(path: str | os.PathLike) -> Table:
    """A rich table of the run file's groups and datasets (the CLI prints it)."""
    items = summarize(path)
    table = Table(title=str(path), title_justify="left")
    table.add_column("path", no_wrap=True)
    for column in ("kind", "shape", "dtype", "dims", "attrs"):
        table.add_column(column, overflow="fold")
    for item in items:
        attrs = item["attrs"]
        if item["path"] == "/":
            attrs = {k: attrs[k] for k in INFO_ROOT_KEYS if k in attrs}
        table.add_row(
            item["path"],
            item["kind"],
            "" if item["shape"] is None else "×".join(map(str, item["shape"])) or "scalar",
            item["dtype"] or "",
            "" if item["dims"] is None else ", ".join(item["dims"]),
            "  ".join(f"{k}={_short(v)}" for k, v in attrs.items()),
        )
    return table


def distill_table(path: str | os.PathLike) -> Table | None:
    """Per class: support size, and effective rank and r_ε of the full and the distilled kernel; None without
    /distill."""
    with open_run(path) as f:
        if layout.DISTILL not in f:
            return None
        group = f[layout.DISTILL]
        eps = [float(e) for e in group.attrs["eps"]]
        support = np.bincount(group["classes"][()], minlength=len(group["effective_rank_full"]))
        columns = {
            "support": support,
            "eff. rank full": group["effective_rank_full"][()],
            "eff. rank distilled": group["effective_rank_distilled"][()],
            **{f"r_{e:g} full": group["r_eps_full"][:, j] for j, e in enumerate(eps)},
            **{f"r_{e:g} distilled": group["r_eps_distilled"][:, j] for j, e in enumerate(eps)},
        }
        title = (
            f"/{layout.DISTILL}: {group.attrs['method']}, m={group.attrs['m']} of N={group.attrs['n_train']} "
            f"({group.attrs['reduction']:.1f}× fewer Jacobians in later kernels)"
        )
    table = Table(title=title, title_justify="left")
    table.add_column("class", justify="right")
    for name in columns:
        table.add_column(name, justify="right")
    for c in range(len(support)):
        cells = [f"{v[c]:.2f}" if np.issubdtype(v.dtype, np.floating) else str(v[c]) for v in columns.values()]
        table.add_row(str(c), *cells)
    return table
