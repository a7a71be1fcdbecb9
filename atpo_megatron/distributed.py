"""torch.distributed helpers that also work in a single process (no process group): this rank, the
world, the device collectives use, and the two collectives every module needs to agree on a decision."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def device() -> torch.device:
    """This rank's compute device, where collectives' tensors live: the current CUDA device (NCCL),
    else the CPU (gloo)."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def all_true(flag: bool) -> bool:
    """True on every rank iff ``flag`` is True on every rank."""
    if not initialized():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank (so every rank takes the same decision)."""
    if not initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=device())
    return box[0]
