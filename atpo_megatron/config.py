"""The one typed configuration tree: dataclasses, loaded from YAML, overridden as ``key.sub=value``.

Defaults are the paper's (``../shared/spec/atpo.md`` §6) unless a comment says otherwise. Loading is
strict: an unknown key, a value of the wrong type or outside its allowed set, or an impossible
combination raises :class:`ConfigError` naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class UserError(Exception):
    """A problem the user fixes (a config value, a checkpoint folder, an allocation): the CLI prints
    the message alone, without a traceback, and exits with status 2."""


class ConfigError(UserError, ValueError):
    """A configuration value that cannot be used; the message names the key."""


@dataclass
class ModelConfig:
    name_or_path: str = "smollm2-135m-instruct"
    """A bundled model name (see ``model_files.BUNDLED_MODELS``) or a Hugging Face folder."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Parameter/compute dtype of the actor (bf16 keeps fp32 main params in the optimizer)."""
    spec: Literal["auto", "te", "local"] = "auto"
    """Layer spec: Transformer Engine when it imports (auto), or megatron's local layers."""
    attention: Literal["sdpa", "unfused"] = "sdpa"
    """Core attention of the local spec: torch SDPA (flash/mem-efficient kernels) or megatron's own."""
    fp8: Literal["none", "hybrid", "e4m3"] = "none"
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = "delayed"
    fp8_backend: Literal["te", "torch"] = "te"
    """FP8 linear layers: Transformer Engine's (fp8_recipe), or ours over torch._scaled_mm
    (``actor/fp8.py``, local spec, no TE needed; fp8_scaling)."""
    fp8_scaling: Literal["tensorwise", "rowwise"] = "tensorwise"
    """torch backend: one scale per tensor, or one per row/column of each GEMM operand."""
    recompute: Literal["none", "full", "selective"] = "none"
    """Activation recomputation granularity."""


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    vpp: int = 1
    """Virtual pipeline stages per rank (interleaved 1F1B when > 1)."""
    dp: int = 0
    """Data-parallel size; 0 = derived as world_size / (tp * pp)."""

    def validate_world(self, world_size: int) -> int:
        """Return the data-parallel size for ``world_size`` ranks, or raise naming the mismatch."""
        if world_size % (self.tp * self.pp):
            raise ConfigError(
                f"parallel.tp * parallel.pp = {self.tp}*{self.pp} = {self.tp * self.pp} does not divide "
                f"the world size {world_size}; choose tp and pp whose product divides the number of ranks"
            )
        dp = world_size // (self.tp * self.pp)
        if self.dp not in (0, dp):
            raise ConfigError(f"parallel.dp={self.dp} but world size {world_size} / (tp*pp) gives {dp}")
        return dp


@dataclass
class SamplingConfig:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1


@dataclass
class RolloutConfig:
    engine: Literal["hf", "vllm"] = "hf"
    mode: Literal["tree", "chain"] = "tree"
    """tree = AT²PO's turn-level tree; chain = independent chains (GRPO/GSPO baselines)."""
    chains: int = 16
    """Chains per prompt in chain mode (the paper's baselines use 16)."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    max_turns: int = 8
    """Generation turns per trajectory (tool calls + the final answer turn); a safety bound."""
    tool_call_limit: int = 6
    max_prompt_tokens: int = 2000
    max_response_tokens: int = 6192
    max_turn_tokens: int = 0
    """Per-generate-call token cap; 0 = the remaining response budget (the paper's behaviour)."""
    generation_batch_size: int = 64
    """Contexts per engine.generate call (hf engine); vLLM schedules its own batches."""
    tp_size: int = 1
    """Ranks per rollout engine (vLLM tensor parallelism), independent of the actor's TP x PP: every
    rank of the job builds an engine, and each group of tp_size consecutive ranks samples its own share
    of the prompts (``rollout/placement.py``)."""
    vllm_executor: Literal["auto", "mp", "external_launcher"] = "auto"
    """Where vLLM runs: in this process (external_launcher: device tensors handed over, no copy), or in
    child processes (mp: vLLM's default); auto = external_launcher in `atpo train` (any world size),
    mp in `atpo rollout` / `atpo eval`."""
    gpu_memory_utilization: float = 0.6
    kv_cache_memory_bytes: int = 0
    """vLLM KV cache size in bytes; 0 = size it from gpu_memory_utilization (then the engine must be
    built while that fraction of the device is free)."""
    enable_sleep: bool | Literal["auto"] = "auto"
    """Colocated mode: the engine frees its memory while the actor trains (vLLM sleep mode: CUDA only;
    auto = where the platform has it)."""
    sync_bucket_mb: int = 512
    """Weight sync streams the actor's weights into the engine in buckets of this size."""
    verify_weights_every: int = 0
    """Every N weight syncs, fingerprint every tensor the engine received against the actor's and stop
    the run naming a corrupted one (0 = never; the first sync is checked whenever N > 0)."""
    static_cache: bool = False
    """hf engine on GPU: static KV cache (10x faster decode measured on the H200)."""
    prefix_cache_mb: int = 1024
    """hf engine, dynamic cache: keep the KV of finished contexts (up to this many MiB) and prefill only
    what a later prompt adds to its longest kept prefix; cleared when the weights change. 0 = off."""
    train_on_tool_errors: bool = False
    """Keep the leaves whose last tool call failed (a query the retriever refused) as training rows.
    False drops them before leaf sampling (counted in ``rollout/dropped_tool_error_leaves``): a
    retriever fault is not the policy's doing, and must not become a signal against it."""
    assistant_prefix: str = ""
    """Text put (mask 0, never trained) at the start of every trajectory's first turn, e.g. "<search>"
    to cue a small model to search; empty = none (the paper)."""


@dataclass
class TreeConfig:
    initial_chains: int = 10
    """M: independent chains per prompt before expansion."""
    expansion_iterations: int = 2
    """L: expansion rounds."""
    top_k: int = 6
    """K: nodes expanded per round."""
    alpha: float = 0.05
    """Branch penalty on score(n) = H(n) - alpha * (children(parent) - 1)."""
    expansion_mode: Literal["entropy", "random"] = "entropy"
    leaves_per_tree: int = 22
    """Must equal M + L*K (the reference asserts it)."""


@dataclass
class CreditConfig:
    value_mode: Literal["child_softmax", "child_linear", "child_mean", "leaf_mean"] = "child_softmax"
    adv_mode: Literal["node_value", "diff_parent", "diff_root", "diff_both"] = "node_value"
    normalize_leaves: bool = True


@dataclass
class ClipConfig:
    clip_low: float
    clip_high: float


@dataclass
class GRPOClipConfig(ClipConfig):
    dual_clip: float = 3.0


@dataclass
class LossConfig:
    name: Literal["atpo", "gspo", "grpo"] = "atpo"
    atpo: ClipConfig = field(default_factory=lambda: ClipConfig(3e-3, 4e-3))
    gspo: ClipConfig = field(default_factory=lambda: ClipConfig(3e-4, 4e-4))
    grpo: GRPOClipConfig = field(default_factory=lambda: GRPOClipConfig(0.2, 0.2, 3.0))

    def clip_kwargs(self) -> dict[str, float]:
        """The selected loss's clip arguments, as ``algo.losses`` takes them."""
        return dataclasses.asdict(getattr(self, self.name))


@dataclass
class OptimizerConfig:
    lr: float = 1e-6
    min_lr: float = 1e-6
    lr_warmup_steps: int = 0
    lr_decay_style: Literal["constant", "cosine", "linear"] = "constant"
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    distributed_optimizer: bool = True


@dataclass
class TrainConfig:
    steps: int = 240
    batch_prompts: int = 64
    mini_batch_prompts: int = 8
    ppo_epochs: int = 1
    micro_batch_tokens: int = 16384
    """Token budget of one micro-batch (dynamic batching by tokens)."""
    seed: int = 1234
    max_generated_tokens: int = 0
    """Stop after the step at which the run has generated this many tokens (every rank, from step 1;
    ``rollout/generated_tokens_total``); 0 = no limit. ``steps`` caps the run either way."""
    max_nonfinite_skips: int = 0
    """Mini-batches with a NaN/inf loss or gradient that a run may skip (weights and optimizer state
    untouched, counted in ``actor/nonfinite_skipped``, resumes included) before it stops; 0 = stop at
    the first."""


@dataclass
class SFTConfig:
    """``atpo sft``: a short supervised warm start on demonstrations of the agent format (``sft.py``).

    Not in the paper (its 4-8B models follow the format from the prompt alone); a 135M model needs it
    before RL has any signal."""

    base_model: str = "smollm2-135m-instruct"
    """The model the warm start begins from (a bundled name or a Hugging Face folder)."""
    out_dir: str = "runs/sft"
    """The warm-started Hugging Face folder it writes; point ``model.name_or_path`` at it for ``atpo train``."""
    steps: int = 8
    batch_size: int = 3
    """Demonstrations per optimizer step, drawn from the data sources (hop counts) in turn."""
    lr: float = 1e-4
    warmup_steps: int = 1
    """Linear lr warm-up steps, then constant."""
    seed: int = 0
    """Draws the demonstrations' questions and their order."""


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=lambda: ["embedded"])
    """FlashRAG JSONL/parquet files, or "embedded" for the generated knowledge-base task."""
    eval_files: list[str] = field(default_factory=lambda: ["embedded"])
    embedded_dir: str = "runs/embedded_task"
    embedded_seed: int = 0
    eval_limit: int = 0
    """Evaluate at most this many examples per file (0 = all)."""
    shuffle: bool = True


@dataclass
class RetrieverConfig:
    url: str = "embedded"
    """A Search-R1 /retrieve URL, or "embedded" to start our server on a free loopback port."""
    backend: Literal["bm25", "dense"] = "bm25"
    corpus: str = ""
    """Corpus JSONL for the embedded server; empty = the generated task's corpus."""
    topk: int = 3
    timeout_s: float = 120.0
    """Per request (connect and read)."""
    retries: int = 4
    """Quick retries of a failed request (no answer, HTTP 5xx, a malformed reply), back-off 0.5 s doubling."""
    outage_wait_s: float = 900.0
    """When the retries fail, the step waits for the retriever (retrying, back-off up to 10 s) until this
    many seconds after the first failure, then the run stops with an error naming the URL (its last
    checkpoint intact); 0 = stop right after the retries. A query the retriever refuses (HTTP 4xx) is
    not an outage: only that tool call fails (see rollout.train_on_tool_errors)."""
    max_passage_chars: int = 1000


@dataclass
class CheckpointConfig:
    dir: str = ""
    """Checkpoint folder; empty = <logging.run_dir>/checkpoints."""
    save_every: int = 50
    """Save every N steps and after the last; 0 = never (only a preemption stop saves)."""
    keep_last: int = 3
    async_save: bool = False
    optim_sharding: Literal["dp_reshardable", "fully_reshardable"] = "dp_reshardable"
    """How the distributed optimizer's state is stored. dp_reshardable: every rank writes its own
    buckets (no gather; a resume may change DP, not TP/PP). fully_reshardable: each DP group's state
    is gathered on its DP rank 0 in model layout (any TP/PP/DP on resume; host memory on DP rank 0
    grows with the model: `atpo plan` shows both; measured in benchmarks/results/checkpoint_host_memory_cpu.md).
    `atpo convert --optim-sharding` turns one into the other."""
    resume: Literal["auto", "never", "required"] = "auto"
    load_hf_init: bool = True
    """Start from the model's Hugging Face weights when there is no checkpoint."""


@dataclass
class LoggingConfig:
    run_dir: str = "runs/atpo"
    tensorboard: bool = True
    log_every: int = 1
    eval_every: int = 20
    eval_before_train: bool = False
    """Evaluate the initial weights too, logged as step 0 (EM before -> after in ``atpo report``)."""
    save_tree_pictures: bool = True
    peak_tflops: float = 0.0
    """Peak device TFLOP/s for MFU; 0 = detect (known GPUs) or report MFU as 0 on CPU."""


@dataclass
class ProfileConfig:
    enabled: bool = False
    steps: list[int] = field(default_factory=lambda: [2, 3])
    """First and last step (inclusive) to trace."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    tree: TreeConfig = field(default_factory=TreeConfig)
    credit: CreditConfig = field(default_factory=CreditConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    retriever: RetrieverConfig = field(default_factory=RetrieverConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)

    def validate(self) -> "Config":
        """Check cross-field constraints; return self."""
        _check_non_negative(self)
        t, r = self.tree, self.rollout
        if t.leaves_per_tree != t.initial_chains + t.expansion_iterations * t.top_k:
            raise ConfigError(
                f"tree.leaves_per_tree={t.leaves_per_tree} must equal tree.initial_chains + "
                f"tree.expansion_iterations * tree.top_k = {t.initial_chains} + "
                f"{t.expansion_iterations}*{t.top_k} = {t.initial_chains + t.expansion_iterations * t.top_k}"
            )
        max_expandable = 1 + t.initial_chains * r.tool_call_limit
        if t.top_k > max_expandable:
            raise ConfigError(
                f"tree.top_k={t.top_k} exceeds the {max_expandable} non-leaf nodes a tree can have "
                f"(root + tree.initial_chains * rollout.tool_call_limit); lower tree.top_k"
            )
        if t.initial_chains < 1:
            raise ConfigError("tree.initial_chains must be >= 1")
        if self.train.mini_batch_prompts < 1 or self.train.batch_prompts % self.train.mini_batch_prompts:
            raise ConfigError(
                f"train.batch_prompts={self.train.batch_prompts} must be a positive multiple of "
                f"train.mini_batch_prompts={self.train.mini_batch_prompts}"
            )
        if self.parallel.tp < 1 or self.parallel.pp < 1 or self.parallel.vpp < 1:
            raise ConfigError("parallel.tp, parallel.pp and parallel.vpp must be >= 1")
        if self.parallel.vpp > 1 and self.parallel.pp < 2:
            raise ConfigError("parallel.vpp > 1 (interleaved pipeline) needs parallel.pp >= 2")
        if not 0.0 < r.sampling.top_p <= 1.0:
            raise ConfigError(f"rollout.sampling.top_p={r.sampling.top_p} must be in (0, 1]")
        if self.profile.enabled and (len(self.profile.steps) != 2 or self.profile.steps[0] > self.profile.steps[1]):
            raise ConfigError(f"profile.steps={self.profile.steps} must be [first, last] with first <= last")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_non_negative(node: Any, prefix: str = "") -> None:
    """Reject negative numbers anywhere except fields where -1 means "off" (top_k)."""
    for f in dataclasses.fields(node):
        value, key = getattr(node, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _check_non_negative(value, key + ".")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            if key == "rollout.sampling.top_k" and value == -1:
                continue
            raise ConfigError(f"{key}={value} must not be negative")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a (resolved) type annotation, converting ints to floats."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r} is not allowed; choose one of {', '.join(map(repr, args))}")
        return value
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}={value!r} does not match {annotation}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if annotation is type(None):
        if value is not None:
            raise ConfigError(f"{key} must be null")
        return None
    if annotation is float and not isinstance(value, bool):
        if isinstance(value, int):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-6" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    if annotation in (int, float, str, bool):
        if not isinstance(value, annotation) or (annotation is int and isinstance(value, bool)):
            raise ConfigError(f"{key}={value!r} must be of type {annotation.__name__}")
        return value
    raise ConfigError(f"{key}: unsupported annotation {annotation}")


REMOVED_KEYS = {
    "train.kl_coef": "atpo_megatron trains without a KL term, as the paper's AT²PO runs do (KL coefficient "
                     "0, no reference model); a value here was accepted and ignored before. Delete the key",
    "train.deterministic": "it was never read (CPU runs are bit-reproducible without it: the seeds, the data "
                           "order and the checkpointed RNG states fix every draw). Delete the key",
}
"""Keys that configs written for earlier versions (or for verl) may still hold, and why they are gone."""


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Instantiate dataclass ``cls`` from a nested dict, strictly."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    for name in unknown:
        if prefix + name in REMOVED_KEYS:
            raise ConfigError(f"{prefix}{name} was removed: {REMOVED_KEYS[prefix + name]}")
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]}; allowed keys here: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        hint, key = hints[name], prefix + name
        if dataclasses.is_dataclass(hint):
            base = dataclasses.asdict(_default_of(cls, name))
            kwargs[name] = _build(hint, _merge(base, value, key), key + ".")
        else:
            kwargs[name] = _coerce(value, hint, key)
    return cls(**kwargs)


def _default_of(cls: type, name: str) -> Any:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _merge(base: dict[str, Any], update: Any, key: str) -> dict[str, Any]:
    if not isinstance(update, dict):
        raise ConfigError(f"{key} must be a mapping, got {update!r}")
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v, f"{key}.{k}") if isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into its key path and YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from exc
    return key.strip().split("."), value


def split_config_args(config: str | None, overrides: list[str]) -> tuple[str | None, list[str]]:
    """A command's optional CONFIG positional may really be the first ``key=value`` override."""
    if config is not None and "=" in config and not Path(config).is_file():
        return None, [config, *overrides]
    return config, list(overrides)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load YAML (optional), apply ``key.sub=value`` overrides, validate, and return the tree."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {k} is not a section")
        node[keys[-1]] = value
    return _build(Config, data).validate()


def dump_config(cfg: Config) -> str:
    """The resolved tree as YAML (what ``atpo config show`` prints and every run saves)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
