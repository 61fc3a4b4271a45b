"""The run file's layout: every group path, and the datasets named by path, in one place.

    /data/<split>/                labels, index, nn_logits
    /kernel/<name>/               train_train, test_train, diag_train, diag_test, features/<split>
                                  (/kernel/distilled, the support's kernel: also full_train, diag_full)
    /surrogate/, /attribution/, /faithfulness/            of the full training set
    /distill/                     the support; its /distill/{surrogate,attribution,faithfulness}
    /path/                        the exact path kernel of a recorded trajectory (contributions, kernel, residual)

Splits are `train` and `test`; a kernel block `<split>_train` has the points of <split> as rows and the training
points as columns.
"""

from __future__ import annotations

SPLITS = ("train", "test")
DATA = "data"
KERNEL = "kernel"
DISTILL = "distill"
SURROGATE = "surrogate"
ATTRIBUTION = "attribution"
FAITHFULNESS = "faithfulness"
PATH = "path"
DISTILLED = "distilled"  # the kernel name of a distilled support
EXPLANATION = (SURROGATE, ATTRIBUTION, FAITHFULNESS)  # what attribute writes, beside the kernel it explains
BLOCKS = ("train_train", "test_train")  # the kernel blocks readers serve
SHARDED = ("train_train", "test_train", "diag_train", "diag_test")  # kernel datasets split by row tiles over ranks


def data(split: str) -> str:
    """/data/<split>: labels, source rows and network logits of a data set."""
    return f"{DATA}/{split}"


def kernel(name: str) -> str:
    """/kernel/<name>: one kernel's blocks, self-kernels and (projected) features."""
    return f"{KERNEL}/{name}"


def block(split: str) -> str:
    """The kernel block of <split> × train, inside a kernel group."""
    return f"{split}_train"


def diag(split: str) -> str:
    """The self-kernels K(x, x) of <split>, inside a kernel group."""
    return f"diag_{split}"


def features(split: str) -> str:
    """The projected features of <split>, inside a kernel group."""
    return f"features/{split}"


def within(parent: str, name: str) -> str:
    """A group of the explanation (`EXPLANATION`) under `parent`: the root ("") or /distill."""
    return f"{parent}/{name}" if parent else name
