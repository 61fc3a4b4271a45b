"""A stored kernel block as the surrogate sees it: raw, or cosine-normalised on read (never stored normalised)."""

from __future__ import annotations

import os

import numpy as np

from ntk_explain.kernel.normalize import cosine_normalize
from ntk_explain.store import kernel_block, self_kernels


def read_kernel(path: str | os.PathLike, name: str, block: str = "train_train", normalize: bool = False) -> np.ndarray:
    """``/kernel/<name>/<block>`` of a run file; with ``normalize``, K(x,x')/sqrt(K(x,x) K(x',x')).

    ``block`` is "train_train" (N, N, …) or "test_train" (rows = test points, columns = train points); an incomplete
    kernel is refused.
    """
    kernel = kernel_block(path, name, block)
    return cosine_normalize(kernel, *self_kernels(path, name, block)) if normalize else kernel
