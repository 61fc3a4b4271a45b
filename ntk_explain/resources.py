"""Devices, memory budgets, and the process's allocator."""

from __future__ import annotations

import ctypes
import os
import re
import sys
from typing import TYPE_CHECKING

from ntk_explain.errors import UsageError
from ntk_explain.options import Budget, Resources, Shard

if TYPE_CHECKING:
    import torch

_UNITS = {
    "": 1,
    "B": 1,
    "K": 1e3,
    "KB": 1e3,
    "M": 1e6,
    "MB": 1e6,
    "G": 1e9,
    "GB": 1e9,
    "T": 1e12,
    "TB": 1e12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
DEFAULT_FRACTION = 0.5


def resolve_device(spec: str) -> torch.device:
    """`auto` (CUDA when available), `cpu`, `cuda` or `cuda:i`."""
    import torch

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as error:
        raise UsageError(f"--device {spec!r} is not a device (use auto, cpu, cuda or cuda:i)") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec}: CUDA is not available on this machine")
        if (device.index or 0) >= torch.cuda.device_count():
            raise UsageError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise UsageError(f"--device {spec!r} is not supported (use auto, cpu, cuda or cuda:i)")
    return device


def parse_bytes(text: str) -> int:
    """'2GB', '512MiB', '1.5G' or a plain byte count → bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = match and match.group(2).upper()
    if not match or unit not in _UNITS or float(match.group(1)) <= 0:
        raise UsageError(f"--max-memory {text!r} is not a size (e.g. 2GB, 512MiB)")
    return int(float(match.group(1)) * _UNITS[unit])


def available_bytes(device: torch.device) -> int:
    """Free memory on `device`: CUDA's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        import torch

        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 2**30


def memory_budget(device: torch.device, limit: str | None) -> int:
    """Bytes the work may use: `limit` when given, else a safe fraction of the free memory."""
    return parse_bytes(limit) if limit else int(DEFAULT_FRACTION * available_bytes(device))


def budget(resources: Resources, shard: Shard | None = None) -> Budget:
    """The budget of `resources` on this process's device (under torchrun, rank r's `cuda:LOCAL_RANK`)."""
    shard = shard or Shard()
    device = resolve_device(resources.device)
    if shard.world > 1 and device.type == "cuda" and device.index is None:
        device = type(device)("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return Budget(device, memory_budget(device, resources.max_memory), resources.batch_size, shard, resources.tile)


def retain_freed_memory() -> bool:
    """Let glibc keep freed memory for reuse (Linux): blocks under 32 MB come from the heap, whose free top is not
    returned below 1 GB. Featurising allocates and frees tens of MB per batch; by default glibc hands much of it back
    to the kernel and page-faults it in again on the next batch, a third of the zoo CNN's featurising time on a 2-core
    machine. Whether the settings took (False elsewhere)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # another C library
        return False
    trim_threshold, mmap_threshold = -1, -3  # M_TRIM_THRESHOLD, M_MMAP_THRESHOLD (malloc.h)
    return bool(mallopt(mmap_threshold, 32 << 20)) and bool(mallopt(trim_threshold, 1 << 30))
