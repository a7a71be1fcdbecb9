"""Build the rollout engine that ``rollout.engine`` names (kept apart from the interface in engine.py,
which the engines themselves import)."""

from __future__ import annotations

from pathlib import Path

from atpo_megatron.config import ConfigError, RolloutConfig
from atpo_megatron.rollout.engine import Engine


def make_engine(cfg: RolloutConfig, model_path: str | Path, *, dtype=None, device_index: int | None = None,
                in_job: bool = False) -> Engine:
    """The engine for the Hugging Face folder ``model_path``, on this rank's device.

    ``device_index``: the local device of this rank (``LOCAL_RANK``; None = the default device).
    ``in_job``: called by a rank of a torch.distributed job (the trainer); then
    ``rollout.vllm_executor=auto`` builds vLLM in this process (``external_launcher``: one engine per
    rank, ``rollout.tp_size`` ranks per engine, weights handed over without a copy); alone (``atpo
    rollout``, ``atpo eval``) it runs in child processes (vLLM's default).
    ``dtype``: torch dtype or None = the checkpoint's (the hf engine uses bf16 on GPU when None).
    """
    if cfg.engine == "hf":
        from atpo_megatron.rollout.hf_engine import HFEngine

        if cfg.tp_size != 1:
            raise ConfigError(f"rollout.tp_size={cfg.tp_size}: the hf engine has no tensor parallelism; "
                              f"set rollout.tp_size=1 or rollout.engine=vllm")
        device = None
        if device_index is not None:
            import torch

            device = f"cuda:{device_index}" if torch.cuda.is_available() else "cpu"
        return HFEngine(model_path, device=device, dtype=dtype, generation_batch_size=cfg.generation_batch_size,
                        static_cache=cfg.static_cache, prefix_cache_mb=cfg.prefix_cache_mb)
    if cfg.engine == "vllm":
        from atpo_megatron.rollout.vllm_engine import VLLMEngine

        executor = cfg.vllm_executor
        if executor == "auto":
            executor = "external_launcher" if in_job else "mp"
        return VLLMEngine(
            model_path,
            tensor_parallel_size=cfg.tp_size,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            kv_cache_memory_bytes=cfg.kv_cache_memory_bytes,
            enable_sleep=cfg.enable_sleep,
            max_model_len=cfg.max_prompt_tokens + cfg.max_response_tokens,
            dtype=dtype,
            weight_bucket_bytes=cfg.sync_bucket_mb << 20,
            executor=executor,
            device_index=device_index,
        )
    raise ConfigError(f"rollout.engine={cfg.engine!r} is unknown; use 'hf' or 'vllm'")
