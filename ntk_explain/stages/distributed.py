"""Row sharding over torch.distributed ranks (`torchrun --nproc-per-node K -m ntk_explain compute …`).

Rank r of W computes the row tiles i with i mod W = r: the stripes of every Gram and the projected features of
those tiles, which are broadcast so that every rank holds all of them. Each rank writes its own shard file; rank 0
joins them into the run file (`store.join_shards`); path-kernel's ranks send their row tiles to rank 0, which writes
the file (`send`, `receive`). NCCL on CUDA, gloo on CPU. One process is W = 1: no collectives at all.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ntk_explain.options import Shard


def start(shard: Shard, device: torch.device) -> None:
    """Join the process group (NCCL on CUDA, gloo on CPU) when there is more than one rank."""
    if shard.world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=_device_id(device))


def _device_id(device: torch.device) -> torch.device | None:
    return device if device.type == "cuda" else None


def stop(shard: Shard) -> None:
    if shard.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def barrier(shard: Shard) -> None:
    if shard.world > 1:
        dist.barrier()


def broadcast(values: Tensor, source: int, shard: Shard) -> Tensor:
    """`values` of rank `source` on every rank (the others pass a tensor of the same shape, dtype and device)."""
    if shard.world > 1:
        dist.broadcast(values, source)
    return values


def smallest(value: int, shard: Shard, device: torch.device) -> int:
    """The least of every rank's `value` (exchanged on `device`, the process group's)."""
    if shard.world == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


def send(tensors: Sequence[Tensor], destination: int) -> None:
    """Send `tensors` (contiguous copies, in order) to rank `destination`, which `receive`s them."""
    for tensor in tensors:
        dist.send(tensor.contiguous(), destination)


def receive(tensors: Sequence[Tensor], source: int) -> None:
    """Fill `tensors` (of the sent shapes and dtypes) in place with what rank `source` `send`s, in order."""
    for tensor in tensors:
        dist.recv(tensor, source)
