"""Build megatron-core GPTModels from a Hugging Face config: Llama (incl. Llama-3 RoPE scaling),
Qwen2 (QKV bias) and Qwen3 (QK-norm), any TP x PP (x VPP) layout.

    init_distributed(tp=2, pp=2)
    models = build_model(hf_config, cfg.model, cfg.parallel)   # one module per virtual stage
    load_hf_weights(models, hf_dir)                            # weights/hf_bridge.py

The layer spec is Transformer Engine's when it imports (``model.spec`` auto/te; needed for FP8),
otherwise megatron's local spec with its core attention replaced by ``attention.SDPAttention``
(``model.attention=sdpa``) or kept (``unfused``). This module is the one place that would change
when we move from the deprecated ``GPTModel`` to ``HybridModel``.

The vocabulary is padded to a multiple of 128 * TP, as Megatron-LM does; the padded rows of the
embedding and output layer are zero, so logits columns >= ``hf_config.vocab_size`` are 0 and must be
masked out of log-probs (``padded_vocab_size`` tells where the padding starts and ends).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.module import Float16Module, MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from atpo_megatron.actor.attention import SDPAttention
from atpo_megatron.actor.fp8 import Fp8Recipe, fp8_layer_spec
from atpo_megatron.config import ConfigError, ModelConfig, ParallelConfig


@dataclasses.dataclass(frozen=True)
class _Family:
    architecture: str
    qkv_bias: bool  # Qwen2: q/k/v projections carry biases, o_proj does not
    qk_norm: bool  # Qwen3: RMSNorm over head_dim on q and k before RoPE


# HF model_type -> family; an exact-key registry (no substring matching on names).
FAMILIES = {
    "llama": _Family("LlamaForCausalLM", qkv_bias=False, qk_norm=False),
    "qwen2": _Family("Qwen2ForCausalLM", qkv_bias=True, qk_norm=False),
    "qwen3": _Family("Qwen3ForCausalLM", qkv_bias=False, qk_norm=True),
}
# Megatron's Llama-3 RoPE scaling hard-codes these (rotary_pos_embedding._apply_scaling).
_LLAMA3_ROPE_CONSTANTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 8192}


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """The vocabulary rounded up to a multiple of 128 * tp (Megatron-LM's
    ``make_vocab_size_divisible_by=128``), so every TP rank holds an equal shard."""
    multiple = 128 * tp
    return -(-vocab_size // multiple) * multiple


def family_of(hf_config) -> _Family:
    """The supported family of ``hf_config`` or a ``ConfigError`` naming what is supported."""
    family = FAMILIES.get(getattr(hf_config, "model_type", None))
    if family is None:
        architectures = getattr(hf_config, "architectures", None) or [hf_config.model_type]
        supported = ", ".join(f"{f.architecture} ({t})" for t, f in FAMILIES.items())
        raise ConfigError(f"unsupported architecture {architectures[0]} (model_type "
                          f"{hf_config.model_type!r}); the Megatron actor supports {supported}")
    return family


def transformer_config_from_hf(hf_config, model_cfg: ModelConfig, parallel: ParallelConfig) -> TransformerConfig:
    """Translate an HF Llama / Qwen2 / Qwen3 config plus our model and parallel settings into
    megatron's ``TransformerConfig``; raise ``ConfigError`` for anything we cannot reproduce."""
    family = family_of(hf_config)
    _check_supported(hf_config, family)
    _check_divisible(hf_config, parallel)
    use_te = use_transformer_engine(model_cfg)
    bf16 = model_cfg.dtype == "bfloat16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    return TransformerConfig(
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        ffn_hidden_size=hf_config.intermediate_size,
        num_attention_heads=hf_config.num_attention_heads,
        num_query_groups=hf_config.num_key_value_heads,
        kv_channels=head_dim(hf_config),
        normalization="RMSNorm",
        layernorm_epsilon=hf_config.rms_norm_eps,
        gated_linear_unit=True,  # SwiGLU: linear_fc1 = [gate | up], silu(gate) * up
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=family.qkv_bias,
        qk_layernorm=family.qk_norm,
        hidden_dropout=0.0,  # as HF Llama/Qwen: no dropout in RL fine-tuning
        attention_dropout=0.0,
        init_method_std=getattr(hf_config, "initializer_range", 0.02),
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp if parallel.vpp > 1 else None,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=bf16,
        # On CPU every rank draws the full weight from the default generator and keeps its shard,
        # so a seed gives the same model for any TP size; on GPU weights are drawn per shard.
        use_cpu_initialization=not torch.cuda.is_available(),
        fp8=None if model_cfg.fp8 == "none" or model_cfg.fp8_backend == "torch" else model_cfg.fp8,
        fp8_recipe=model_cfg.fp8_recipe,
        transformer_impl="transformer_engine" if use_te else "local",
        **_recompute_fields(model_cfg.recompute),
    )


def head_dim(hf_config) -> int:
    """Per-head width: ``head_dim`` when the config sets it (Qwen3), else hidden / heads."""
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


def _recompute_fields(recompute: str) -> dict:
    """``model.recompute`` as TransformerConfig fields (full: every layer, one at a time)."""
    if recompute == "full":
        return {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    if recompute == "selective":
        return {"recompute_granularity": "selective"}  # megatron's default module list: core_attn
    return {}


def _rope(hf_config) -> dict:
    """RoPE settings as one dict with ``rope_theta`` and ``rope_type`` (transformers >= 5 keeps them
    in ``rope_parameters``; older configs in ``rope_theta`` + ``rope_scaling``)."""
    params = getattr(hf_config, "rope_parameters", None)
    if not params:
        params = dict(getattr(hf_config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    params = dict(params)
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def _check_supported(hf_config, family: _Family) -> None:
    """Reject HF options that the megatron model built here would silently ignore."""
    name = f"{family.architecture} ({hf_config.model_type})"
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise ConfigError(f"{name}: hidden_act={hf_config.hidden_act!r} is not supported (only silu / SwiGLU)")
    if getattr(hf_config, "mlp_bias", False):
        raise ConfigError(f"{name}: mlp_bias=True is not supported")
    if not family.qkv_bias and getattr(hf_config, "attention_bias", False):
        raise ConfigError(f"{name}: attention_bias=True (biases on q/k/v/o) is not supported")
    if getattr(hf_config, "use_sliding_window", False):
        raise ConfigError(f"{name}: use_sliding_window=True is not supported; the actor attends fully")
    rope = _rope(hf_config)
    if rope["rope_type"] not in ("default", "llama3"):
        raise ConfigError(f"{name}: rope_type={rope['rope_type']!r} is not supported (default, llama3)")
    if rope["rope_type"] == "llama3":
        for key, value in _LLAMA3_ROPE_CONSTANTS.items():
            if float(rope[key]) != value:
                raise ConfigError(f"{name}: llama3 rope {key}={rope[key]} differs from the {value} "
                                  f"that megatron-core hard-codes; this model cannot be reproduced")


def _check_divisible(hf_config, parallel: ParallelConfig) -> None:
    """Heads, KV heads and the MLP width split over TP; layers split evenly over PP x VPP."""
    tp, stages = parallel.tp, parallel.pp * parallel.vpp
    for field in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        if getattr(hf_config, field) % tp:
            raise ConfigError(f"parallel.tp={tp} does not divide the model's {field}="
                              f"{getattr(hf_config, field)}; choose a tensor-parallel size that divides it")
    if parallel.vpp > 1 and parallel.pp < 2:
        raise ConfigError("parallel.vpp > 1 (interleaved pipeline) needs parallel.pp >= 2")
    if hf_config.num_hidden_layers % stages:
        raise ConfigError(f"parallel.pp * parallel.vpp = {parallel.pp}*{parallel.vpp} = {stages} does not "
                          f"divide num_hidden_layers={hf_config.num_hidden_layers}; choose sizes that do")


@functools.cache
def transformer_engine_import_error() -> str | None:
    """Why ``transformer_engine.pytorch`` does not import here (None when it does). On a machine
    without CUDA, TE raises RuntimeError rather than ImportError."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except (ImportError, RuntimeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def use_transformer_engine(model_cfg: ModelConfig) -> bool:
    """Resolve ``model.spec`` (auto: TE when it imports) and check that FP8 has TE."""
    error = transformer_engine_import_error()
    if model_cfg.fp8 != "none" and model_cfg.fp8_backend == "torch":  # actor/fp8.py swaps local layers
        if model_cfg.spec == "te":
            raise ConfigError("model.fp8_backend=torch puts FP8 layers into megatron's local spec; set "
                              "model.spec=local (or auto), or model.fp8_backend=te for Transformer Engine's FP8")
        return False
    if model_cfg.spec == "te" and error:
        raise ConfigError(f"model.spec=te but Transformer Engine does not import ({error}); install "
                          f"transformer-engine[pytorch] on a CUDA machine, or set model.spec=local")
    use_te = model_cfg.spec == "te" or (model_cfg.spec == "auto" and error is None)
    if model_cfg.fp8 != "none" and not use_te:
        why = "model.spec=local" if model_cfg.spec == "local" else f"Transformer Engine does not import ({error})"
        raise ConfigError(f"model.fp8={model_cfg.fp8} needs Transformer Engine layers, but {why}; "
                          f"set model.fp8=none, model.fp8_backend=torch, or model.spec=auto/te on a machine with TE")
    return use_te


def layer_spec(model_cfg: ModelConfig, qk_layernorm: bool) -> ModuleSpec:
    """The transformer-layer spec: TE's, or megatron's local one with the chosen core attention."""
    if use_transformer_engine(model_cfg):
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    spec = get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization="RMSNorm")
    if model_cfg.fp8 != "none":  # use_transformer_engine let it through: the torch FP8 backend
        spec = fp8_layer_spec(spec, Fp8Recipe.from_model_config(model_cfg))
    if model_cfg.attention == "unfused":
        return spec
    attention = spec.submodules.self_attention
    attention = dataclasses.replace(
        attention, submodules=dataclasses.replace(attention.submodules, core_attention=SDPAttention))
    return dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, self_attention=attention))


def build_model(hf_config, model_cfg: ModelConfig, parallel: ParallelConfig) -> list[MegatronModule]:
    """One ``GPTModel`` per virtual pipeline stage of this rank (``Float16Module``-wrapped in bf16,
    as Megatron-LM does). Call ``actor.parallel.init_distributed`` with the same layout first.

    Tied embeddings (``tie_word_embeddings``) use megatron's shared embedding/output weight, also
    across pipeline stages. Weights are randomly initialised; load real ones with
    ``weights.hf_bridge.load_hf_weights``. Each GPTModel keeps the HF config as ``.hf_config``; its
    ``.vocab_size`` is megatron's padded one, ``.hf_config.vocab_size`` the real one.
    """
    _check_layout_matches(parallel)
    config = transformer_config_from_hf(hf_config, model_cfg, parallel)
    spec = layer_spec(model_cfg, qk_layernorm=config.qk_layernorm)
    rope = _rope(hf_config)
    models: list[MegatronModule] = []
    for stage in range(parallel.vpp):
        vp_stage = stage if parallel.vpp > 1 else None
        model = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=padded_vocab_size(hf_config.vocab_size, parallel.tp),
            max_sequence_length=hf_config.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            parallel_output=True,  # logits stay vocab-sharded over TP: log-probs are vocab-parallel
            share_embeddings_and_output_weights=bool(getattr(hf_config, "tie_word_embeddings", False)),
            position_embedding_type="rope",
            rotary_base=rope["rope_theta"],
            rope_scaling=rope["rope_type"] == "llama3",
            rope_scaling_factor=float(rope.get("factor", 8.0)),
            vp_stage=vp_stage,
        )
        model.hf_config = hf_config  # what weights/hf_bridge needs to name and trim exported tensors
        models.append(Float16Module(config, model) if config.bf16 else model)
    return models


def unwrap(model: torch.nn.Module) -> GPTModel:
    """The ``GPTModel`` inside ``Float16Module`` / DDP wrappers."""
    while not isinstance(model, GPTModel):
        model = model.module
    return model


def _check_layout_matches(parallel: ParallelConfig) -> None:
    """The megatron groups must exist and have the layout we are asked to build."""
    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError("megatron's process groups are not initialised: call "
                           "atpo_megatron.actor.parallel.init_distributed(tp, pp, vpp) first")
    actual = (parallel_state.get_tensor_model_parallel_world_size(),
              parallel_state.get_pipeline_model_parallel_world_size(),
              parallel_state.get_virtual_pipeline_model_parallel_world_size() or 1)
    if actual != (parallel.tp, parallel.pp, parallel.vpp):
        raise ConfigError(f"parallel tp/pp/vpp={parallel.tp}/{parallel.pp}/{parallel.vpp} but the "
                          f"process groups were initialised with {actual[0]}/{actual[1]}/{actual[2]}")
