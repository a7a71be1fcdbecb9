"""Megatron DDP, the (distributed) Adam optimizer and the lr schedule for the actor.

    models = build_model(hf_config, cfg.model, cfg.parallel)          # list[GPTModel], one per VPP stage
    models = wrap_ddp(models, use_distributed_optimizer=cfg.optimizer.distributed_optimizer)
    optimizer, scheduler = build_optimizer(models, cfg.optimizer, total_steps=n_updates)
    metrics = train_step(models, optimizer, sequences, ...); scheduler.step(1)

Precision: with fp32 parameters (CPU, tests) the optimizer is megatron's ``FP32Optimizer``; with
bf16 parameters it keeps fp32 main parameters and fp32 main gradients (``Float16OptimizerWith
Float16Params``, or the ``DistributedOptimizer`` that shards those fp32 states across DP ranks).
Without Apex/TE, megatron falls back to ``torch.optim.AdamW`` (decoupled weight decay).

Gradient reduction contract (``train_step`` relies on it): the models' config gets
``calculate_per_token_loss=True`` *before* DDP is built. DDP then sums (does not average) gradients
over DP ranks, the schedules stop dividing the loss by the number of micro-batches, and
``finalize_model_grads`` divides the summed gradients by the global count that the loss function
reports. ``train_step.py`` explains why that is exactly the seq-mean-token-mean gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.utils import get_model_config

from atpo_megatron.config import OptimizerConfig


def wrap_ddp(
    models: Sequence[torch.nn.Module],
    *,
    use_distributed_optimizer: bool = True,
    overlap_grad_reduce: bool = False,
    overlap_param_gather: bool = False,
    bucket_size: int | None = None,
) -> list[DistributedDataParallel]:
    """Wrap each model chunk (one per virtual pipeline stage) in megatron's DDP.

    ``use_distributed_optimizer`` must match ``build_optimizer``'s (the DDP buffers are laid out for
    it). ``overlap_grad_reduce`` starts each bucket's reduce-scatter/all-reduce during the last
    micro-batch's backward; ``overlap_param_gather`` (distributed optimizer only) overlaps the
    parameter all-gather with the next forward. Both change timing only, never the result. With
    ``overlap_param_gather`` the model's parameters are stale after ``optimizer.step()`` until the
    next forward gathers them: before reading weights outside a forward (weight export to the rollout
    engine, checkpoints), call ``m.start_param_sync(force_sync=True)`` on every chunk.
    """
    if overlap_param_gather and not use_distributed_optimizer:
        raise ValueError("overlap_param_gather needs use_distributed_optimizer=True (it overlaps its all-gather)")
    config = get_model_config(models[0])
    # Must be set before DDP reads it: sum gradients over DP, divide by the reported global count.
    config.calculate_per_token_loss = True
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap_grad_reduce,
        overlap_param_gather=overlap_param_gather,
        use_distributed_optimizer=use_distributed_optimizer,
        average_in_collective=False,  # required with calculate_per_token_loss
        bucket_size=bucket_size,
    )
    wrapped = [
        DistributedDataParallel(
            config=get_model_config(m),
            ddp_config=ddp_config,
            module=m,
            # As Megatron-LM: only the first chunk's buffers are bucketed (the others' gradients
            # are ready together at the end of the interleaved schedule).
            disable_bucketing=i > 0,
        )
        for i, m in enumerate(models)
    ]
    for m in wrapped:
        m.broadcast_params()  # identical replicas on every DP rank, whatever each rank drew
    _install_schedule_hooks(wrapped, overlap_grad_reduce, overlap_param_gather)
    return wrapped


def _install_schedule_hooks(models: list[DistributedDataParallel], overlap_grad: bool, overlap_param: bool) -> None:
    """The callbacks megatron's schedules look up on the model config (as Megatron-LM's ``setup``)."""
    config = get_model_config(models[0])
    # Without this the schedules never reduce gradients across DP nor scale them by the count.
    config.finalize_model_grads_func = finalize_model_grads
    if overlap_grad:
        no_sync = [m.no_sync for m in models]
        config.no_sync_func = no_sync[0] if len(models) == 1 else no_sync
        grad_sync = [m.start_grad_sync for m in models]
        config.grad_sync_func = grad_sync[0] if len(models) == 1 else grad_sync
    if overlap_param:
        param_sync = [m.start_param_sync for m in models]
        config.param_sync_func = param_sync[0] if len(models) == 1 else param_sync


def megatron_optimizer_config(cfg: OptimizerConfig, *, bf16: bool) -> MegatronOptimizerConfig:
    """Translate our ``config.OptimizerConfig`` into megatron's (Adam, global-norm clipping)."""
    return MegatronOptimizerConfig(
        optimizer="adam",
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        main_params_dtype=torch.float32,
        main_grads_dtype=torch.float32,
        use_distributed_optimizer=cfg.distributed_optimizer,
    )


def build_optimizer(
    models: Sequence[DistributedDataParallel],
    cfg: OptimizerConfig,
    *,
    total_steps: int,
    bf16: bool | None = None,
    overlap_param_gather: bool = False,
):
    """Megatron optimizer over the DDP-wrapped chunks, plus its ``OptimizerParamScheduler``.

    ``total_steps``: optimizer steps of the whole run (the decay horizon). ``bf16`` defaults to the
    model config's. Warm-up is linear from 0 over ``cfg.lr_warmup_steps`` (megatron's convention:
    the first step after construction uses step 0's lr, so 0 when warming up); then ``constant``,
    ``linear`` or ``cosine`` from ``lr`` to ``min_lr``. Call ``scheduler.step(1)`` after each
    optimizer step. Returns ``(optimizer, scheduler)``.
    """
    if not isinstance(models[0], DistributedDataParallel):
        raise TypeError("build_optimizer needs the DDP-wrapped chunks: call wrap_ddp(models) first")
    if models[0].ddp_config.use_distributed_optimizer != cfg.distributed_optimizer:
        raise ValueError(
            f"optimizer.distributed_optimizer={cfg.distributed_optimizer} but the DDP buffers were built with "
            f"use_distributed_optimizer={models[0].ddp_config.use_distributed_optimizer}; pass the same value to wrap_ddp"
        )
    if not 0.0 <= cfg.min_lr <= cfg.lr:
        raise ValueError(f"need 0 <= optimizer.min_lr <= optimizer.lr, got min_lr={cfg.min_lr}, lr={cfg.lr}")
    config = get_model_config(models[0])
    bf16 = bool(config.bf16) if bf16 is None else bf16
    mcfg = megatron_optimizer_config(cfg, bf16=bf16)
    mcfg.overlap_param_gather = overlap_param_gather
    optimizer = get_megatron_optimizer(mcfg, list(models))
    steps = max(int(total_steps), 1)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=cfg.lr,
        min_lr=cfg.min_lr,
        lr_warmup_steps=cfg.lr_warmup_steps,
        lr_decay_steps=steps,
        lr_decay_style=cfg.lr_decay_style,
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=steps,
        wd_incr_style="constant",
    )
    # The schedules multiply the loss by this before backward (1.0 without an fp16 loss scaler).
    config.grad_scale_func = optimizer.scale_loss
    return optimizer, scheduler
