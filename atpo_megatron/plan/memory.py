"""The memory model of a job: per GPU in each phase of a step, per node on the host, per checkpoint.

Pure functions of the model shape, the layout and the config; :mod:`atpo_megatron.plan.command`
prints them. Where a number comes from:

* weights, gradients, optimizer: what megatron allocates for our actor (``actor/optimizer.py``):
  parameters in ``model.dtype``, a gradient buffer in fp32 (``grad_reduce_in_fp32``), and Adam's
  fp32 main parameters (bf16 models only), ``exp_avg`` and ``exp_avg_sq``, sharded over DP by the
  distributed optimizer.
* activations: :func:`layer_activation_bytes` counts every tensor autograd keeps for the backward in
  megatron's local spec, term by term; ``tests/unit/test_plan_memory.py`` checks the count against
  saved-tensor hooks on a real build, byte for byte, and the calibration
  (``benchmarks/plan_calibration.py``, table in the README) against measured peaks: CPU runs here
  and the H200 records of ``shared/notes/environment.md``. The Transformer Engine spec fuses the
  norms into its linears and keeps less; it is modelled as the local spec (an upper bound).
* the rollout engine: vLLM's weights at its TP size and a KV cache of ``rollout.kv_cache_memory_bytes``
  or what ``gpu_memory_utilization`` leaves after the weights and :data:`VLLM_NON_KV`.
"""

from __future__ import annotations

from dataclasses import dataclass

from atpo_megatron.actor.model import padded_vocab_size
from atpo_megatron.plan.shapes import GiB, GPU, Layout, ModelShape, largest_param

BYTES = {"float32": 4, "bfloat16": 2}
FP32 = 4
ADAM_STATES = 2  # exp_avg, exp_avg_sq (fp32 each)
RESERVE = 4 * GiB
"""Per-GPU memory outside PyTorch's allocator and the engine: CUDA context, NCCL communicators,
cuBLAS workspaces (not measured here; a few hundred MiB each)."""
VLLM_NON_KV = 2 * GiB
"""vLLM's memory besides weights and KV cache (its profiled forward of max_num_batched_tokens and
CUDA graphs); an assumption, not measured here."""
TOLERANCE = 0.10
"""The memory model's stated accuracy: the calibration cases (README) are within it. A phase whose
peak is under the capacity but not by this margin is "tight"."""
LOGPROB_CHUNK_BYTES = 4 * 2**26
"""One fp32 working chunk of ``actor/logprobs.py`` (2**26 logits)."""
LOGPROB_CHUNKS = 4
"""Chunks alive at once in the log-prob backward (x, log p, p, the gradient)."""

def dtype_bytes(dtype: str) -> int:
    return BYTES[dtype]


# ------------------------------------------------------------------------------------ the actor
@dataclass(frozen=True)
class ActorStates:
    """Bytes one rank keeps for the whole run (the training state)."""

    weights: int
    grads: int
    main_params: int
    adam: int

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.main_params + self.adam


def actor_states(params: int, dtype: str, dp: int, distributed_optimizer: bool) -> ActorStates:
    """Weights in ``dtype``, the fp32 gradient buffer, Adam's fp32 states (main parameters only for
    bf16 models: fp32 parameters are their own main copy), sharded over DP when distributed."""
    shard = dp if distributed_optimizer else 1
    main = FP32 * params // shard if dtype != "float32" else 0
    return ActorStates(weights=dtype_bytes(dtype) * params, grads=FP32 * params, main_params=main,
                       adam=ADAM_STATES * FP32 * params // shard)


def _rms_norm(rows: int, width: int, e: int, keeps_output: bool) -> int:
    """torch's RMSNorm on a bf16/fp32 input keeps an fp32 copy of it, the fp32 normalised tensor and
    1/rms per row; its output (in the activation dtype) is kept by the linear that reads it."""
    return 8 * rows * width + 4 * rows + (e * rows * width if keeps_output else 0)


def layer_activation_bytes(s: ModelShape, tokens: int, seq: int, tp: int, e: int, attention: str,
                           recompute: str) -> int:
    """Bytes one transformer layer keeps for its backward, for a micro-batch of ``tokens`` tokens in
    rows of ``seq`` (megatron's local spec, no sequence parallelism; ``e`` = activation bytes).

    ``recompute="full"`` keeps only the layer's input (the backward recomputes the rest, one layer
    at a time: :func:`stage_activation_bytes` adds that transient). ``selective`` recomputes the core
    attention: no softmax statistics or score matrices are kept. Exact for bf16 models (what the
    tests check); in fp32 Qwen3's k-norm reads the fused QKV output without a copy, a difference
    of under a percent of a layer.
    """
    if recompute == "full":
        return e * tokens * s.hidden
    q, kv = s.heads * s.head_dim // tp, s.kv_heads * s.head_dim // tp
    n = 2 * _rms_norm(tokens, s.hidden, e, keeps_output=True)  # pre-attention and pre-MLP norms
    n += 4 * seq * s.head_dim * e  # RoPE: cos and sin, for q and for k
    if s.qk_norm:  # Qwen3: RMSNorm over head_dim of every q and k head
        n += _rms_norm(tokens * (s.heads + s.kv_heads) // tp, s.head_dim, e, keeps_output=False)
    n += e * tokens * q  # the attention output, input of linear_proj
    if attention == "unfused" and recompute == "none":
        # q, and k and v expanded to every head; the fp32 softmax and (below fp32) the probabilities
        # cast back, per score; a bool causal mask
        scores = tokens * seq * s.heads // tp
        n += 3 * e * tokens * q + FP32 * scores + (e * scores if e < FP32 else 0) + seq * seq
    else:
        # q and k after RoPE, and the fused QKV output (kept alive by the v view into it)
        n += e * tokens * (q + kv) + e * tokens * (q + 2 * kv)
        if recompute == "none":
            n += 4 * tokens * s.heads // tp  # SDPA's log-sum-exp
    n += 5 * e * tokens * s.ffn // tp  # fc1 output [gate | up], silu(gate), its product, fc2 input
    return n


def in_flight_layers(layers: int, pp: int, vpp: int, stage: int, micro_batches: int) -> float:
    """Layer activations (in units of one layer for one micro-batch) that pipeline stage ``stage``
    holds at its peak: 1F1B keeps ``pp - stage`` micro-batches of its ``layers/pp`` layers in flight;
    the interleaved schedule keeps its warm-up count + 1 model chunks of ``layers/(pp*vpp)`` layers."""
    if vpp == 1:
        return min(pp - stage, micro_batches) * layers / pp
    warmup = (pp - stage - 1) * 2 + (vpp - 1) * pp
    chunks = min(warmup + 1, micro_batches * vpp)
    return chunks * layers / (pp * vpp)


def logits_bytes(s: ModelShape, tokens: int, tp: int, e: int) -> int:
    """The last stage's output: the logits ``actor/logprobs.py`` keeps, their gradient, and its
    fp32 working chunks."""
    local = tokens * padded_vocab_size(s.vocab, tp) // tp
    return 2 * e * local + LOGPROB_CHUNKS * min(LOGPROB_CHUNK_BYTES, FP32 * local)


@dataclass(frozen=True)
class MicroBatchShape:
    tokens: int
    """Padded tokens of one micro-batch (rows * seq)."""
    seq: int
    """Longest row (prompt + response - 1 at the limits)."""
    count: int
    """Micro-batches per DP rank in one optimizer step."""


def micro_batch_shape(seq: int, budget: int, sequences_per_dp: int) -> MicroBatchShape:
    """Worst case of ``batching.pack_micro_batches``: every sequence at its maximum length, as many
    rows as fit the token budget (at least one)."""
    rows = max(1, budget // seq)
    return MicroBatchShape(tokens=rows * seq, seq=seq, count=max(1, -(-sequences_per_dp // rows)))


def stage_activation_bytes(s: ModelShape, layout: Layout, stage: int, mb: MicroBatchShape, e: int,
                           attention: str, recompute: str) -> int:
    """Activation memory of pipeline stage ``stage`` at its peak in the training step."""
    per_layer = layer_activation_bytes(s, mb.tokens, mb.seq, layout.tp, e, attention, recompute)
    n = int(in_flight_layers(s.layers, layout.pp, layout.vpp, stage, mb.count) * per_layer)
    if stage == 0:
        n += 8 * mb.tokens * min(layout.pp, mb.count)  # token ids
    # the last stage's output, alive with every layer's activations when the backward starts
    head = (_rms_norm(mb.tokens, s.hidden, e, keeps_output=True) + logits_bytes(s, mb.tokens, layout.tp, e)
            if stage == layout.pp - 1 else 0)
    if recompute == "full":
        # the layer being recomputed comes after the output's backward has freed the logits; RoPE's
        # frequencies are one tensor shared by the layers' checkpoints
        recomputed = layer_activation_bytes(s, mb.tokens, mb.seq, layout.tp, e, attention, "none")
        return n + max(head, recomputed) + FP32 * mb.seq * s.head_dim
    return n + head


# ------------------------------------------------------------------------------- rollout engine
@dataclass(frozen=True)
class EngineMemory:
    weights: int
    kv_cache: int
    other: int
    kv_bytes_per_token: int
    """KV cache bytes one token costs on one GPU of the engine."""

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.other

    @property
    def kv_tokens(self) -> int:
        """Tokens the engine's KV cache holds (every GPU of the engine holds its share of each)."""
        return max(self.kv_cache, 0) // self.kv_bytes_per_token


def engine_memory(s: ModelShape, hf_params: int, rollout_tp: int, e: int, gpu: GPU,
                  gpu_memory_utilization: float, kv_cache_memory_bytes: int) -> EngineMemory:
    """One GPU's share of a vLLM engine with tensor parallelism ``rollout_tp``: the weights split
    ``rollout_tp`` ways, KV heads split as far as they go (replicated beyond), and a KV cache of
    ``kv_cache_memory_bytes`` per GPU, or else ``gpu_memory_utilization`` of the GPU minus the weights
    and :data:`VLLM_NON_KV` (vLLM's own budget rule)."""
    weights = e * hf_params // rollout_tp
    kv_heads = max(s.kv_heads // rollout_tp, 1)
    per_token = 2 * s.layers * kv_heads * s.head_dim * e
    if kv_cache_memory_bytes:
        kv = kv_cache_memory_bytes
    else:
        kv = int(gpu_memory_utilization * gpu.memory) - weights - VLLM_NON_KV
    return EngineMemory(weights=weights, kv_cache=kv, other=VLLM_NON_KV, kv_bytes_per_token=per_token)


# ------------------------------------------------------------------------------------- phases
@dataclass(frozen=True)
class Phase:
    name: str
    parts: tuple[tuple[str, int], ...]

    @property
    def total(self) -> int:
        return sum(v for _, v in self.parts)


def verdict(peak: int, capacity: int) -> str:
    """``fits`` with the model's tolerance to spare, ``tight`` within it, else ``does not fit``."""
    usable = capacity - RESERVE
    if peak * (1 + TOLERANCE) <= usable:
        return "fits"
    return "tight" if peak <= usable else "does not fit"


# ---------------------------------------------------------------------------------- checkpoints
def checkpoint_bytes(s: ModelShape, tp: int, dtype: str) -> tuple[int, int]:
    """(weights only, weights + optimizer) bytes of one checkpoint: every parameter once (the
    vocabulary padded to the saving TP, as stored), plus the optimizer's fp32 param, exp_avg and
    exp_avg_sq."""
    padding = (padded_vocab_size(s.vocab, tp) - s.vocab) * s.hidden * (1 if s.tied else 2)
    params = s.hf_params() + padding
    weights = dtype_bytes(dtype) * params
    return weights, weights + (1 + ADAM_STATES) * FP32 * params


def save_host_bytes_per_param(optim_sharding: str, dp_rank0: bool, dp: int, e: int) -> float:
    """Host memory one rank's checkpoint save holds beyond its training state, per parameter of the
    rank's model shard. Measured on CPU (``benchmarks/checkpoint_host_memory.py``, 78 M parameters,
    bf16, ``benchmarks/results/checkpoint_host_memory_cpu_dp{1,2}.json``):

    * fully_reshardable: DP rank 0 gathers its DP group's fp32 param, exp_avg and exp_avg_sq over
      the whole shard (12 B/param), holds as much again in receive buffers and the writer's copies,
      and keeps its own local shard (12/dp); the other ranks their local shard (12/dp). Measured:
      36.0 B/param at DP 1; 30.0 (DP rank 0) and 6.0 (DP rank 1) at DP 2.
    * dp_reshardable: no gather; each rank copies its share of the DP-replicated weights for writing
      (e/dp). Measured: 2.05 at DP 1; 1.05 and 1.04 at DP 2.
    """
    if optim_sharding == "fully_reshardable":
        return (2 * (1 + ADAM_STATES) * FP32 if dp_rank0 else 0) + (1 + ADAM_STATES) * FP32 / dp
    return e / dp


def save_host_bytes(layout: Layout, params: int, optim_sharding: str, e: int) -> int:
    """Host memory one node needs to save a checkpoint beyond its ranks' training state (the node
    with the most DP-rank-0 processes)."""
    rank0 = layout.dp_rank0_per_node()
    per_param = (rank0 * save_host_bytes_per_param(optim_sharding, True, layout.dp, e)
                 + (layout.gpus_per_node - rank0) * save_host_bytes_per_param(optim_sharding, False, layout.dp, e))
    return int(per_param * params)


def d2h_staging_bytes(states: ActorStates, gpus_per_node: int) -> int:
    """megatron's async save copies every rank's shards (weights and its optimizer shard) to host
    memory before writing: one node's total."""
    return gpus_per_node * (states.weights + states.main_params + states.adam)


def largest_param_bytes(s: ModelShape, e: int) -> int:
    return e * largest_param(s)
