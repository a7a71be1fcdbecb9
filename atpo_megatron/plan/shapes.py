"""What a job is made of, as numbers: the model's shape, the parameters each pipeline stage holds,
the GPUs we know, and where each global rank sits in megatron's process grid.

Everything here is arithmetic on an HF config and a layout; ``tests/unit/test_meta_shapes.py`` builds
the real megatron model on the meta device, rank by rank, and checks :func:`stage_params` against it.
"""

from __future__ import annotations

from dataclasses import dataclass

from atpo_megatron.actor.model import family_of, head_dim, padded_vocab_size

GiB = 1 << 30


@dataclass(frozen=True)
class ModelShape:
    """A Llama / Qwen2 / Qwen3 decoder's shape, from its Hugging Face config."""

    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool
    qk_norm: bool

    @classmethod
    def from_hf(cls, hf_config) -> ModelShape:
        family = family_of(hf_config)
        return cls(
            layers=hf_config.num_hidden_layers, hidden=hf_config.hidden_size, ffn=hf_config.intermediate_size,
            heads=hf_config.num_attention_heads, kv_heads=hf_config.num_key_value_heads,
            head_dim=head_dim(hf_config), vocab=hf_config.vocab_size,
            tied=bool(getattr(hf_config, "tie_word_embeddings", False)),
            qkv_bias=family.qkv_bias, qk_norm=family.qk_norm,
        )

    def hf_params(self) -> int:
        """Parameters of the Hugging Face model (real vocabulary, a tied output counted once)."""
        return self.layers * layer_params(self, 1) + self.hidden + self.vocab * self.hidden * (1 if self.tied else 2)


def layer_params(s: ModelShape, tp: int) -> int:
    """Parameters of one transformer layer on one TP rank (megatron's local or TE spec)."""
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    qkv = (q + 2 * kv) // tp * s.hidden + ((q + 2 * kv) // tp if s.qkv_bias else 0)
    proj = s.hidden * q // tp
    mlp = 3 * s.ffn // tp * s.hidden  # fc1 = [gate | up], fc2
    norms = 2 * s.hidden + (2 * s.head_dim if s.qk_norm else 0)  # replicated over TP
    return qkv + proj + mlp + norms


def stage_params(s: ModelShape, tp: int, pp: int, stage: int) -> int:
    """Parameters held by one rank of pipeline stage ``stage`` (any VPP: a rank's chunks hold L/pp
    layers in all; the embedding sits on stage 0, the final norm and the output layer on stage
    pp-1). The vocabulary is padded to a multiple of 128*tp. A tied output layer is the embedding
    itself at PP=1 and a second copy on the last stage at PP>1."""
    vocab_rows = padded_vocab_size(s.vocab, tp) // tp * s.hidden
    n = s.layers // pp * layer_params(s, tp)
    if stage == 0:
        n += vocab_rows
    if stage == pp - 1:
        n += s.hidden + (vocab_rows if not s.tied or pp > 1 else 0)
    return n


def largest_param(s: ModelShape) -> int:
    """Elements of the largest full (TP-gathered) tensor the weight export materialises at once."""
    return max(padded_vocab_size(s.vocab, 1) * s.hidden, 2 * s.ffn * s.hidden,
               (s.heads + 2 * s.kv_heads) * s.head_dim * s.hidden)


@dataclass(frozen=True)
class GPU:
    name: str
    memory: int
    """Bytes, as ``torch.cuda.get_device_properties().total_memory`` reports them (rounded)."""
    bf16_tflops: float
    """Dense datasheet peak (``metrics.PEAK_TFLOPS``)."""
    hbm_tb_s: float
    """Memory bandwidth, datasheet."""


GPUS = {
    "h100": GPU("H100 SXM 80GB", int(79.1 * GiB), 989.0, 3.35),
    "h200": GPU("H200 SXM 141GB", int(139.8 * GiB), 989.0, 4.8),
    "a100": GPU("A100 SXM 80GB", int(79.1 * GiB), 312.0, 2.04),
    "b200": GPU("B200 180GB", int(178.4 * GiB), 2250.0, 8.0),
}


@dataclass(frozen=True)
class Layout:
    """The actor's parallel layout on an allocation of ``nodes * gpus_per_node`` ranks."""

    nodes: int
    gpus_per_node: int
    tp: int
    pp: int
    vpp: int = 1

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.pp)

    def coordinates(self, rank: int) -> tuple[int, int, int]:
        """(tp_rank, dp_rank, pp_rank) of a global rank in megatron's default order (tp-cp-ep-dp-pp:
        TP fastest, then DP, then PP; CP = EP = 1)."""
        return rank % self.tp, rank // self.tp % self.dp, rank // (self.tp * self.dp)

    def dp_rank0_per_node(self) -> int:
        """The most data-parallel-rank-0 processes on one node (the ones that gather optimizer
        state for a fully_reshardable checkpoint)."""
        counts = [0] * self.nodes
        for rank in range(self.world):
            if self.coordinates(rank)[1] == 0:
                counts[rank // self.gpus_per_node] += 1
        return max(counts)
