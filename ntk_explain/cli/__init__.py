"""The `ntk-explain` command line: one module per command, sharing the options of `options` and the app of `app`."""

from ntk_explain.cli import attribute, compute, demo, distill, path_kernel, show, train  # noqa: F401  (each registers its command)
from ntk_explain.cli.app import app, main

__all__ = ["app", "main"]
