"""What a checkpoint holds: megatron's sharded state of the model chunks, optimizer and scheduler, the
RNG states, the model's shape and parallel layout, and the strategies megatron reads and writes it with."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from atpo_megatron import distributed

# Model-shape fields compared on load; a mismatch means the checkpoint is of another model.
SHAPE_KEYS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
              "num_query_groups", "kv_channels", "vocab_size")

# --------------------------------------------------------------------------------------------
# What goes into a checkpoint
# --------------------------------------------------------------------------------------------


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The inner GPTModel: the DDP wrapper adds a ``module.`` prefix to its sharded state dict
    that its own load_state_dict does not strip, so state dicts are built from the inner module."""
    from megatron.core.utils import unwrap_model

    return unwrap_model(model)


def model_metadata(models: Sequence[torch.nn.Module]) -> dict[str, Any]:
    """The shape of the model (what must match for a checkpoint to load)."""
    if not models:
        return {}
    inner = unwrap(models[0])
    c = inner.config
    return {
        "num_layers": c.num_layers,
        "hidden_size": c.hidden_size,
        "ffn_hidden_size": c.ffn_hidden_size,
        "num_attention_heads": c.num_attention_heads,
        "num_query_groups": c.num_query_groups or c.num_attention_heads,
        "kv_channels": c.kv_channels,
        "vocab_size": getattr(inner, "vocab_size", None),  # padded (see _same_vocab_up_to_padding)
        "tp": c.tensor_model_parallel_size,
        "params_dtype": str(c.params_dtype).replace("torch.", ""),
    }


def parallel_layout(models: Sequence[torch.nn.Module]) -> dict[str, int]:
    from megatron.core import parallel_state as ps

    layout = {"world": distributed.world_size(), "tp": 1, "pp": 1, "dp": distributed.world_size(), "cp": 1, "ep": 1,
              "vpp": max(len(models), 1)}
    if ps.model_parallel_is_initialized():
        layout.update(tp=ps.get_tensor_model_parallel_world_size(),
                      pp=ps.get_pipeline_model_parallel_world_size(),
                      dp=ps.get_data_parallel_world_size(),
                      cp=ps.get_context_parallel_world_size(),
                      ep=ps.get_expert_model_parallel_world_size())
    return layout


def shape_mismatch(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The shape fields that differ, as "name: checkpoint X vs model Y" strings."""
    out = []
    for k in SHAPE_KEYS:
        a, b = saved.get(k), current.get(k)
        if a is None or b is None or a == b:
            continue
        if k == "vocab_size" and _same_vocab_up_to_padding(a, b, saved, current):
            continue
        out.append(f"{k}: checkpoint {a} vs model {b}")
    return out


def _same_vocab_up_to_padding(a: int, b: int, saved: dict, current: dict) -> bool:
    # build_model pads the vocabulary to a multiple of 128 * tp, so a TP change may change the
    # padded size; megatron marks the embedding and output-layer tensors allow_shape_mismatch
    # (extra rows load as zeros). Padded sizes of one vocabulary differ by < 128 * the larger tp.
    tp = max(saved.get("tp", 1), current.get("tp", 1))
    return abs(a - b) < 128 * tp


def _rng_tracker():
    from megatron.core import tensor_parallel

    try:
        tracker = tensor_parallel.get_cuda_rng_tracker()
    except Exception:  # TE tracker variants may refuse without CUDA
        return None
    return tracker if tracker.is_initialized() else None


def rng_state() -> dict[str, Any]:
    """Every RNG this rank uses: python, numpy, torch CPU, CUDA, megatron's model-parallel tracker."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    tracker = _rng_tracker()
    if tracker is not None:
        state["tracker"] = {k: v.clone() for k, v in tracker.get_states().items()}
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "tracker" in state:
        from megatron.core import tensor_parallel

        tensor_parallel.get_cuda_rng_tracker().set_states(dict(state["tracker"]))


def model_keys(n: int) -> list[str]:
    # Megatron-LM's convention: "model" for one chunk, "model0", "model1", ... for virtual stages.
    return ["model"] if n == 1 else [f"model{i}" for i in range(n)]


def _sharded_metadata(optim_sharding: str) -> dict[str, Any]:
    """What ``optimizer.sharded_state_dict`` needs as ``metadata``: megatron-core 0.19.2's default
    ``fully_sharded_model_space`` raises (shared/notes/megatron-cpu.md, "Optimizer sharding type")."""
    return {
        "distrib_optim_sharding_type": optim_sharding,
        # Gather the optimizer shards over the gloo DP group onto DP rank 0 (the other path
        # all-gathers full optimizer state on every DP rank, and calls .cuda() on CPU).
        "distrib_optim_fully_reshardable_mem_efficient": True,
        "singleton_local_shards": False,
        "chained_optim_avoid_prefix": True,
    }


def build_sharded_state(models, optimizer, scheduler, *, is_loading: bool, optim_sharding: str,
                         with_rng: bool, with_tp_pp_rng: bool) -> dict[str, Any]:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    meta = _sharded_metadata(optim_sharding)
    state: dict[str, Any] = {}
    for key, model in zip(model_keys(len(models)), models):
        state[key] = unwrap(model).sharded_state_dict(metadata=meta)
    if optimizer is not None:
        model_part = {k: state[k] for k in model_keys(len(models))} if models else {}
        state["optimizer"] = optimizer.sharded_state_dict(model_part, is_loading=is_loading,
                                                          metadata=meta)
    if scheduler is not None:
        state["opt_param_scheduler"] = scheduler.state_dict()
    if with_rng:
        # One object per global rank: a resume in the same layout gives each rank its own states.
        state["rng_state"] = ShardedObject("atpo.rng_state", rng_state() if not is_loading else None,
                                           (distributed.world_size(),), (distributed.rank(),), replica_id=0)
    if with_tp_pp_rng:
        # One per TP x PP position, written by DP rank 0 (Megatron-LM's layout): the DP replicas of a
        # position draw the same streams (seeds depend on the PP and TP rank only), so a resume with
        # another DP size gives every rank the states of its position.
        (tp, tp_rank), (pp, pp_rank), (_, dp_rank) = grid()
        state["rng_state_tp_pp"] = ShardedObject("atpo.rng_state_tp_pp", rng_state() if not is_loading else None,
                                                 (pp, tp), (pp_rank, tp_rank), replica_id=dp_rank)
    return state


def grid() -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """((tp, tp_rank), (pp, pp_rank), (dp, dp_rank)) of this rank; world size 1 without megatron."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return (1, 0), (1, 0), (distributed.world_size(), distributed.rank())
    return ((ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()),
            (ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()),
            (ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()))


def bucket_layout(optimizer: Any) -> list[list[int]]:
    """The distributed optimizer's gradient buckets (unpadded elements per bucket, per buffer):
    what a dp_reshardable checkpoint's optimizer state is cut into."""
    return [[n for sizes in buffer.values() for n in sizes]
            for opt in getattr(optimizer, "chained_optimizers", [optimizer])
            for buffer in getattr(opt, "per_bucket_numel_unpadded", [])]


def gather_bucket_layouts(optimizer: Any) -> dict[str, list[list[int]]]:
    """Every TP x PP position's bucket layout, keyed "pp,tp" (the same on its DP replicas)."""
    (_, tp_rank), (_, pp_rank), _ = grid()
    mine = (f"{pp_rank},{tp_rank}", bucket_layout(optimizer))
    everyone = [None] * distributed.world_size()
    if distributed.initialized():
        torch.distributed.all_gather_object(everyone, mine)
    else:
        everyone = [mine]
    return dict(everyone)


def config_text(config: Any) -> str | None:
    if config is None or isinstance(config, str):
        return config
    from atpo_megatron.config import dump_config

    return dump_config(config)


def install_compat() -> None:
    # CPU: the actor-model engineer's device adaptations (dist_checkpointing's writer calls
    # torch.cuda.synchronize()); with or without CUDA: the distributed-optimizer load fixes.
    try:
        from atpo_megatron.actor import cpu_compat
    except ImportError:
        cpu_compat = None
    if cpu_compat is not None:
        cpu_compat.install()
    from atpo_megatron.actor import distopt_compat

    distopt_compat.install()


def strategies(for_load: bool, ckpt: Path | None = None):
    """torch_dist strategies, wrapped to spread the work over data-parallel replicas."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.serialization import (
        get_default_load_sharded_strategy, get_default_save_sharded_strategy)
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelLoadStrategyWrapper, FullyParallelSaveStrategyWrapper)

    base = get_default_load_sharded_strategy(ckpt) if for_load else get_default_save_sharded_strategy()
    if not ps.model_parallel_is_initialized() or ps.get_data_parallel_world_size() == 1:
        return base
    group = ps.get_data_parallel_group(with_context_parallel=True)
    if for_load:
        # "broadcast" (megatron's default) calls Tensor.cuda(); gather_object works everywhere.
        algo = "broadcast" if torch.cuda.is_available() else "gather_object"
        return FullyParallelLoadStrategyWrapper(base, group, exchange_algo=algo)
    return FullyParallelSaveStrategyWrapper(base, group)


