"""``atpo plan``: will a job fit its allocation, and how long will a step take? Computed, not run.

    atpo plan examples/llama3_70b.yaml --nodes 8 --gpus-per-node 8 --gpu h100
    atpo plan CONFIG --nodes 2 --gpus-per-node 8 --gpu h200 model.recompute=full --fs-gbps 5

:func:`make_plan` assembles the memory model (:mod:`.memory`) and the time model (:mod:`.timing`)
for a config on an allocation; :func:`render` prints it; ``atpo submit`` runs both before it
submits and refuses a job that does not fit (``--force`` submits anyway), and the plan goes into
the job's log.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from atpo_megatron.config import Config, ConfigError, load_config, split_config_args
from atpo_megatron.plan import memory as M
from atpo_megatron.plan import timing as T
from atpo_megatron.plan.shapes import GPU, GPUS, GiB, Layout, ModelShape, stage_params

RECOMPUTE = ("none", "selective", "full")
GB = 1e9


@dataclass(frozen=True)
class StagePlan:
    stage: int
    params: int
    states: M.ActorStates
    activations: dict[str, int]
    """Bytes of this stage's activations at its peak, per recompute setting."""
    phases: tuple[M.Phase, ...]


@dataclass
class Plan:
    cfg: Config
    source: str
    gpu: GPU
    layout: Layout
    shape: ModelShape
    hf_params: int
    mb: M.MicroBatchShape
    sequences: int
    seq_tokens: tuple[int, int]
    """(prompt, response) tokens per sequence the time model assumes."""
    stages: list[StagePlan]
    engine: M.EngineMemory | None
    sync_buffers: int
    host: dict[str, int]
    checkpoint: tuple[int, int]
    fs_gbps: float
    terms: list[T.Term]
    rates: dict[str, T.Rate]
    peak: tuple[int, str, int] = (0, "", 0)
    """(bytes, phase, stage) of the largest phase."""
    verdict: str = ""
    suggestions: list[str] = field(default_factory=list)
    host_memory: int = 0

    @property
    def usable(self) -> int:
        return self.gpu.memory - M.RESERVE


def _sequences_per_step(cfg: Config) -> tuple[int, int]:
    """(sequences per step, per mini-batch): every leaf of every tree (or every chain) is a sequence."""
    per_prompt = cfg.tree.leaves_per_tree if cfg.rollout.mode == "tree" else cfg.rollout.chains
    return cfg.train.batch_prompts * per_prompt, cfg.train.mini_batch_prompts * per_prompt


def make_plan(cfg: Config, hf_config, *, nodes: int, gpus_per_node: int, gpu: str = "h100", fs_gbps: float = 10.0,
              prompt_tokens: int | None = None, response_tokens: int | None = None, host_memory_gib: float = 0.0,
              source: str = "") -> Plan:
    """The plan of ``cfg`` (model ``hf_config``) on ``nodes`` x ``gpus_per_node`` GPUs of kind ``gpu``.

    Memory is sized at the limits (every sequence ``rollout.max_prompt_tokens +
    max_response_tokens`` long); the time model uses ``prompt_tokens`` / ``response_tokens`` per
    sequence when given (default: the same limits, an upper bound). ``host_memory_gib`` > 0 adds a
    host-memory check per node.
    """
    if gpu not in GPUS:
        raise ConfigError(f"--gpu {gpu!r} is not known; choose one of {', '.join(GPUS)}")
    if nodes < 1 or gpus_per_node < 1:
        raise ConfigError(f"--nodes {nodes} --gpus-per-node {gpus_per_node}: the plan sizes GPU jobs, both must be >= 1")
    g, p, r = GPUS[gpu], cfg.parallel, cfg.rollout
    layout = Layout(nodes, gpus_per_node, p.tp, p.pp, p.vpp)
    p.validate_world(layout.world)
    shape = ModelShape.from_hf(hf_config)
    e = M.dtype_bytes(cfg.model.dtype)
    seqs, mini = _sequences_per_step(cfg)
    seq = r.max_prompt_tokens + r.max_response_tokens - 1
    mb = M.micro_batch_shape(seq, cfg.train.micro_batch_tokens, -(-mini // layout.dp))
    hf_params = shape.hf_params()

    engine = None
    if r.engine == "vllm":
        engine = M.engine_memory(shape, hf_params, r.tp_size, e, g, r.gpu_memory_utilization, r.kv_cache_memory_bytes)
    elif r.engine == "hf":  # transformers: a full copy per engine; its KV cache grows with the batch
        engine = M.EngineMemory(weights=e * hf_params, kv_cache=0, other=0, kv_bytes_per_token=1)
    sync_buffers = (r.sync_bucket_mb << 20) + 2 * M.largest_param_bytes(shape, e)
    sleeping = bool(r.enable_sleep)

    stages = []
    for stage in sorted({0, layout.pp - 1}):
        params = stage_params(shape, layout.tp, layout.pp, stage)
        states = M.actor_states(params, cfg.model.dtype, layout.dp, cfg.optimizer.distributed_optimizer)
        acts = {rc: M.stage_activation_bytes(shape, layout, stage, mb, e, cfg.model.attention, rc) for rc in RECOMPUTE}
        resident = ("state", states.total)
        train = [resident, ("activations", acts[cfg.model.recompute])]
        phases = []
        if engine is not None:
            if not sleeping:
                train.append(("engine (awake)", engine.total))
            phases = [M.Phase("rollout", (resident, ("engine", engine.total))),
                      M.Phase("weight sync", (resident, ("engine weights", engine.weights), ("sync buffers", sync_buffers))
                              + ((("KV cache (awake)", engine.kv_cache + engine.other),) if not sleeping else ()))]
        stages.append(StagePlan(stage, params, states, acts, (M.Phase("train", tuple(train)), *phases)))

    checkpoint = M.checkpoint_bytes(shape, layout.tp, cfg.model.dtype)
    biggest = max(stages, key=lambda s: s.params)
    host = {f"checkpoint save ({fmt})": M.save_host_bytes(layout, biggest.params, fmt, e)
            for fmt in ("dp_reshardable", "fully_reshardable")}
    if cfg.checkpoint.async_save:
        host["async save: every rank's shards copied to host"] = M.d2h_staging_bytes(biggest.states, gpus_per_node)
    if engine is not None and r.engine == "vllm" and sleeping:
        host["vLLM sleep level 1: engine weights offloaded"] = gpus_per_node * engine.weights

    prompt = prompt_tokens if prompt_tokens is not None else r.max_prompt_tokens
    response = response_tokens if response_tokens is not None else r.max_response_tokens
    terms, rates = _step_terms(cfg, hf_config, layout, g, hf_params, seqs, mini, prompt, response, checkpoint, fs_gbps)

    plan = Plan(cfg=cfg, source=source, gpu=g, layout=layout, shape=shape, hf_params=hf_params, mb=mb,
                sequences=seqs, seq_tokens=(prompt, response), stages=stages, engine=engine,
                sync_buffers=sync_buffers, host=host, checkpoint=checkpoint, fs_gbps=fs_gbps, terms=terms,
                rates=rates, host_memory=int(host_memory_gib * GiB))
    peak = max(((ph.total, ph.name, st.stage) for st in stages for ph in st.phases), key=lambda x: x[0])
    plan.peak = peak
    plan.verdict = M.verdict(peak[0], g.memory)
    if engine is not None and r.engine == "vllm" and engine.kv_tokens < seq + 1:
        plan.verdict = "does not fit"
    if plan.host_memory and host_needed(plan) > plan.host_memory:
        plan.verdict = "does not fit"
    return plan


def host_needed(plan: Plan) -> int:
    """Host memory one node needs beyond the ranks' own processes: the configured save format, the
    async copies and vLLM's offloaded weights."""
    fmt = plan.cfg.checkpoint.optim_sharding
    return sum(v for k, v in plan.host.items() if "checkpoint save" not in k or fmt in k)


def _step_terms(cfg, hf_config, layout, gpu, hf_params, seqs, mini, prompt, response, checkpoint, fs_gbps):
    from atpo_megatron.metrics import effective_seq_len, forward_flops_per_token, model_flops_per_token

    world = layout.world
    rates = {"train": T.training_rate(gpu), "generation": T.generation_rate(gpu, hf_params), "sync": T.sync_rate()}
    tokens = seqs * (prompt + response - 1)
    seq_eff = effective_seq_len([prompt + response - 1])
    per_dp = -(-mini // layout.dp)
    m_train = M.micro_batch_shape(prompt + response - 1, cfg.train.micro_batch_tokens, per_dp).count
    m_fwd = M.micro_batch_shape(prompt + response - 1, 2 * cfg.train.micro_batch_tokens, -(-seqs // layout.dp)).count
    bubble_t, bubble_f = (T.pipeline_bubble(layout.pp, layout.vpp, m) for m in (m_train, m_fwd))
    generated = seqs * response
    fwd = forward_flops_per_token(hf_config, seq_eff) * tokens
    # full recompute runs every layer's forward twice: 4 passes' worth of the 3 a step counts
    recompute = 4 / 3 if cfg.model.recompute == "full" else 1.0
    train = model_flops_per_token(hf_config, seq_eff) * tokens * cfg.train.ppo_epochs * recompute
    weights_gb = 2 * hf_params / GB
    ckpt_gb = checkpoint[1] / GB
    save_s = ckpt_gb / fs_gbps
    every = max(cfg.checkpoint.save_every, 1)
    terms = [
        T.Term("generation", generated / (rates["generation"].value * world),
               f"{seqs} sequences x {response} generated tokens at {rates['generation'].value:,.0f} tok/s/GPU x {world}"),
        T.Term("old log-probs", T.compute_seconds(fwd, world, rates["train"], bubble_f),
               f"{tokens / 1e6:,.1f} M tokens forward, {rates['train'].value:,.0f} TFLOP/s/GPU, bubble {100 * bubble_f:.0f} %"),
        T.Term("training", T.compute_seconds(train, world, rates["train"], bubble_t),
               f"{cfg.train.ppo_epochs} epoch(s) fwd+bwd{' + recomputed fwd' if recompute > 1 else ''}, "
               f"{m_train} micro-batches/mini-batch, bubble {100 * bubble_t:.0f} %"),
        T.Term("weight sync", weights_gb / rates["sync"].value,
               f"{weights_gb:,.1f} GB of bf16 weights at {rates['sync'].value:,.1f} GB/s"),
        T.Term("checkpoint", 0.0 if cfg.checkpoint.async_save or not cfg.checkpoint.save_every else save_s / every,
               f"{ckpt_gb:,.0f} GB every {every} steps at {fs_gbps:g} GB/s = {save_s:,.0f} s"
               + (" (async: written while training goes on)" if cfg.checkpoint.async_save else ", amortised")),
    ]
    return terms, rates


def suggestions(plan: Plan, replan) -> list[str]:
    """The first of a few config changes that makes the plan fit, checked by planning it again with
    ``replan(extra_overrides)``: full recompute, then a smaller micro-batch too, each with the vLLM
    KV cache capped to what is left next to the training state when the engine is vLLM."""
    cfg = plan.cfg
    trials = [["model.recompute=full"]] if cfg.model.recompute != "full" else []
    trials.append(["model.recompute=full", f"train.micro_batch_tokens={max(cfg.train.micro_batch_tokens // 2, 1)}"])
    if plan.engine is not None and cfg.rollout.engine == "vllm":
        state = max(st.states.total for st in plan.stages)
        kv = int(plan.usable / (1 + M.TOLERANCE) - state - plan.engine.weights - plan.engine.other) // GiB * GiB
        if kv > 0:
            trials = [t + [f"rollout.kv_cache_memory_bytes={kv}"] for t in [[]] + trials]
    for changes in trials:
        try:
            again = replan(changes)
        except ConfigError:
            continue
        if again.verdict == "fits":
            return [" ".join(changes) + f"  -> peak {again.peak[0] / GiB:.1f} GiB ({again.peak[1]})"]
    return []


# ---------------------------------------------------------------------------------- printing
def render(plan: Plan) -> str:
    """The plan as text: what is being planned, the per-GPU memory breakdown by pipeline stage and
    phase, host memory per node, checkpoints, the step-time terms with their sources, the verdict."""
    cfg, lay, s = plan.cfg, plan.layout, plan.shape
    r = cfg.rollout
    stages = plan.stages
    head = "".join(f"{'stage ' + str(st.stage):>12}" for st in stages)
    lines = [
        f"atpo plan: {plan.source or 'config'} on {lay.nodes} nodes x {lay.gpus_per_node} {plan.gpu.name} "
        f"({plan.gpu.memory / GiB:.1f} GiB each, {M.RESERVE / GiB:.0f} GiB reserved) = {lay.world} GPUs",
        f"model    {cfg.model.name_or_path}: {s.layers} layers, hidden {s.hidden}, heads {s.heads}/{s.kv_heads}, "
        f"ffn {s.ffn}, vocab {s.vocab}: {plan.hf_params / 1e9:.2f} B parameters",
        f"actor    TP{lay.tp} x PP{lay.pp} x DP{lay.dp} (vpp {lay.vpp}), {cfg.model.dtype}, "
        f"{'distributed' if cfg.optimizer.distributed_optimizer else 'replicated'} Adam, local spec + "
        f"{cfg.model.attention}{' (TE modelled as the local spec)' if cfg.model.spec != 'local' else ''}, "
        f"recompute {cfg.model.recompute}",
        f"batch    {cfg.train.mini_batch_prompts} prompts x {plan.sequences // cfg.train.batch_prompts} sequences per "
        f"mini-batch, up to {plan.mb.seq} tokens each: {plan.mb.count} micro-batches of {plan.mb.tokens} tokens per DP rank",
        f"rollout  {r.engine} TP{r.tp_size}: {lay.world // r.tp_size} engines, KV cache "
        + (f"{r.kv_cache_memory_bytes / GiB:.1f} GiB/GPU (kv_cache_memory_bytes)" if r.kv_cache_memory_bytes
           else f"from gpu_memory_utilization={r.gpu_memory_utilization}")
        + (", sleeps while the actor trains" if r.enable_sleep else ", stays awake"),
        "",
        f"{'Per-GPU memory, GiB':<44}{head}",
        f"  {'parameters on the rank (billions)':<42}" + "".join(f"{st.params / 1e9:12.3f}" for st in stages),
    ]

    def row(label: str, values) -> None:
        lines.append(f"  {label:<42}" + "".join(f"{v / GiB:12.2f}" for v in values))

    row(f"actor weights ({cfg.model.dtype})", [st.states.weights for st in stages])
    row("gradient buffer (fp32)", [st.states.grads for st in stages])
    row(f"fp32 main params, sharded over DP {lay.dp}", [st.states.main_params for st in stages])
    row(f"Adam exp_avg + exp_avg_sq, over DP {lay.dp}", [st.states.adam for st in stages])
    row("= training state", [st.states.total for st in stages])
    per_layer = {rc: M.layer_activation_bytes(s, plan.mb.tokens, plan.mb.seq, lay.tp, M.dtype_bytes(cfg.model.dtype),
                                              cfg.model.attention, rc) for rc in RECOMPUTE}
    lines.append(f"  activations: one layer, one micro-batch: " + ", ".join(
        f"{rc} {per_layer[rc] / GiB:.2f}" for rc in RECOMPUTE) + " GiB")
    lines.append("  in flight (layer x micro-batch): " + ", ".join(
        f"stage {st.stage}: {M.in_flight_layers(s.layers, lay.pp, lay.vpp, st.stage, plan.mb.count):g}" for st in stages)
        + "; the last stage adds its logits and log-prob chunks")
    for rc in RECOMPUTE:
        row(f"activations, recompute {rc}{' (configured)' if rc == cfg.model.recompute else ''}",
            [st.activations[rc] for st in stages])
    if plan.engine is not None:
        e = plan.engine
        lines.append(f"  {'rollout engine share (every GPU)':<42}{e.weights / GiB:12.2f} weights (TP{r.tp_size}), "
                     f"{e.kv_cache / GiB:.2f} KV cache = {e.kv_tokens:,} tokens per engine, "
                     f"{e.other / GiB:.2f} other (assumed)")
    lines.append(f"  {'weight-sync buffers':<42}{plan.sync_buffers / GiB:12.2f} (bucket {r.sync_bucket_mb} MiB + "
                 f"2 x the largest full tensor)")
    lines += ["", f"{f'Phases per GPU, GiB (usable {plan.usable / GiB:.1f})':<57}" + head]
    for name in [ph.name for ph in stages[0].phases]:
        values = [next(ph for ph in st.phases if ph.name == name) for st in stages]
        parts = " + ".join(label for label, _ in values[0].parts)
        lines.append(f"  {name:<12} {parts:<41} " + "".join(f"{ph.total / GiB:12.2f}" for ph in values)
                     + "  " + M.verdict(max(ph.total for ph in values), plan.gpu.memory))

    lines += ["", f"Host memory per node (GiB; {lay.gpus_per_node} ranks, up to {lay.dp_rank0_per_node()} of them "
                  f"DP rank 0 of a {max(st.params for st in stages) / 1e9:.2f} B-parameter shard)"]
    for label, v in plan.host.items():
        mark = " (configured)" if cfg.checkpoint.optim_sharding in label else ""
        lines.append(f"  {label + mark:<66}{v / GiB:10.2f}")
    lines.append(f"  {'= needed with checkpoint.optim_sharding=' + cfg.checkpoint.optim_sharding:<66}"
                 f"{host_needed(plan) / GiB:10.2f}" + (f" of {plan.host_memory / GiB:.0f}" if plan.host_memory else ""))

    w, full = plan.checkpoint
    lines += ["", f"Checkpoint (whole job): weights {w / GB:,.1f} GB, with the optimizer {full / GB:,.1f} GB; "
                  f"written at {plan.fs_gbps:g} GB/s in {w / GB / plan.fs_gbps:,.0f} s / {full / GB / plan.fs_gbps:,.0f} s"]

    prompt, response = plan.seq_tokens
    lines += ["", f"Step time estimate ({plan.sequences} sequences of {prompt} prompt + {response} response tokens"
                  f"{', the limits: an upper bound' if (prompt, response) == (r.max_prompt_tokens, r.max_response_tokens) else ''})"]
    for t in plan.terms:
        lines.append(f"  {t.name:<14}{t.seconds:10,.1f} s   {t.how}")
    lines.append(f"  {'total':<14}{sum(t.seconds for t in plan.terms):10,.1f} s")
    lines.append("  rates: " + "; ".join(f"{k}: {v.value:,.1f} {v.unit} from {v.source}" for k, v in plan.rates.items()))

    lines += ["", f"verdict: {verdict_line(plan)}"]
    if plan.engine is not None and r.engine == "vllm" and plan.engine.kv_tokens < plan.mb.seq + 1:
        lines.append(f"  the KV cache holds {max(plan.engine.kv_tokens, 0):,} tokens, fewer than one sequence "
                     f"({plan.mb.seq + 1}): vLLM refuses to start")
    for sug in plan.suggestions:
        lines.append(f"  would fit with: {sug}")
    return "\n".join(lines) + "\n"


def verdict_line(plan: Plan) -> str:
    """The verdict and the binding numbers, one line."""
    peak, phase, stage = plan.peak
    line = (f"{plan.verdict.upper()}: peak {peak / GiB:.1f} GiB per GPU in the {phase} phase (stage {stage}) of "
            f"{plan.usable / GiB:.1f} usable on {plan.gpu.name}; model tolerance {100 * M.TOLERANCE:.0f} %")
    if plan.host_memory and host_needed(plan) > plan.host_memory:
        line += f"; host memory per node {host_needed(plan) / GiB:.0f} of {plan.host_memory / GiB:.0f} GiB"
    return line


# --------------------------------------------------------------------------------------- CLI
def add_plan_options(parser: argparse.ArgumentParser) -> None:
    """The allocation and assumption options shared by ``atpo plan`` and ``atpo submit``."""
    parser.add_argument("--gpu", choices=sorted(GPUS), default="h100", help="GPU kind (default h100)")
    parser.add_argument("--fs-gbps", type=float, default=10.0,
                        help="checkpoint file-system write bandwidth per job, GB/s (default 10)")
    parser.add_argument("--host-memory-gib", type=float, default=0.0,
                        help="host memory per node; when given, a node that needs more does not fit")


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config of the run")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, required=True)
    add_plan_options(parser)
    parser.add_argument("--prompt-tokens", type=int, help="mean prompt tokens per sequence for the time "
                        "model (default rollout.max_prompt_tokens)")
    parser.add_argument("--response-tokens", type=int, help="mean generated tokens per sequence for the "
                        "time model (default rollout.max_response_tokens)")


def plan_for(config: str, overrides, *, nodes: int, gpus_per_node: int, **kwargs) -> Plan:
    """Load ``config`` with ``overrides`` and plan it (the model's shape from model_files.model_config)."""
    from atpo_megatron.model_files import model_config

    cfg = load_config(config, list(overrides))
    try:
        hf_config = model_config(cfg.model.name_or_path)
    except FileNotFoundError as exc:
        raise ConfigError(f"model.name_or_path: {exc}; for a published model not listed in "
                          f"atpo_megatron.model_files.PUBLISHED_CONFIGS, put its config.json in a folder of that name") from exc

    def replan(extra: list[str]) -> Plan:
        return make_plan(load_config(config, [*overrides, *extra]), hf_config, nodes=nodes,
                         gpus_per_node=gpus_per_node, source=str(config), **kwargs)

    plan = replan([])
    if plan.verdict != "fits":
        plan.suggestions = suggestions(plan, replan)
    return plan


def plan_main(args: argparse.Namespace) -> int:
    config, overrides = split_config_args(args.config, args.overrides)
    plan = plan_for(config, overrides, nodes=args.nodes, gpus_per_node=args.gpus_per_node, gpu=args.gpu,
                    fs_gbps=args.fs_gbps, host_memory_gib=args.host_memory_gib,
                    prompt_tokens=args.prompt_tokens, response_tokens=args.response_tokens)
    print(render(plan), end="")
    return 0 if plan.verdict != "does not fit" else 1
