"""Process groups and seeds for the Megatron actor.

    torchrun --nproc-per-node 4 train.py    # every rank: init_distributed(tp=2, pp=2, seed=1234)

``init_distributed`` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT);
without it, a single process runs as world size 1. The backend is NCCL with CUDA, gloo without
(then ``cpu_compat`` adapts megatron to the CPU). Data parallelism takes the remaining ranks.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from atpo_megatron.actor import cpu_compat
from atpo_megatron.config import ParallelConfig


def init_distributed(tp: int = 1, pp: int = 1, vpp: int = 1, seed: int = 1234) -> int:
    """Start torch.distributed (if needed) and megatron's TP x PP (x VPP) groups; seed all RNGs.

    Returns the data-parallel size. Raises ``ConfigError`` when tp * pp does not divide the world.
    """
    cpu_compat.install()
    if not dist.is_initialized():
        _init_process_group()
    dp = ParallelConfig(tp=tp, pp=pp, vpp=vpp).validate_world(dist.get_world_size())
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
    )
    set_seed(seed)
    return dp


def _init_process_group() -> None:
    """NCCL on the local GPU under CUDA, gloo otherwise; world size 1 without torchrun."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if "RANK" in os.environ:  # launched by torchrun (or srun exporting the same variables)
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def set_seed(seed: int) -> None:
    """Seed as Megatron-LM does: python's, numpy's and torch's default generators with ``seed + 100
    * pp_rank`` (the same on every TP and DP rank, so CPU-initialised weights are identical for any
    TP size and a checkpoint's RNG states serve any DP size), then megatron's tracker
    (model-parallel dropout state, different per TP rank)."""
    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_distributed() -> None:
    """Tear down megatron's groups and the default process group (safe to call twice)."""
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
