"""Core attention through ``torch.nn.functional.scaled_dot_product_attention`` for the local spec.

megatron's local ``DotProductAttention`` materialises the [b, heads, s, s] score matrix; SDPA picks a
flash / memory-efficient kernel instead (measured on an H200: 2.6x faster steps, 3.8x less memory
for a 1.4 B model at sequence 4096). ``actor.model.layer_spec`` puts this class into the spec's
``self_attention.submodules.core_attention`` slot; nothing is monkey-patched.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide


class SDPAttention(MegatronModule):
    """Causal self-attention on this TP rank's heads; the core-attention interface of megatron
    0.19.2 (``CoreAttentionBuilder`` / ``CoreAttentionInterface`` in ``transformer/attention.py``).

    Shapes: query [s, b, heads_local, d], key and value [s, b, kv_heads_local, d] (grouped-query
    heads are expanded by SDPA itself, ``enable_gqa``); output [s, b, heads_local * d].
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: ProcessGroupCollection | None = None,
    ):
        super().__init__(config=config)
        if attn_mask_type != AttnMaskType.causal or attention_type != "self":
            raise ValueError(
                f"SDPAttention supports causal self-attention only, got {attn_mask_type} / "
                f"{attention_type}; use model.attention=unfused for other masks"
            )
        if config.context_parallel_size != 1 or config.window_size is not None:
            raise ValueError("SDPAttention supports neither context parallelism nor sliding windows; "
                             "use the Transformer Engine spec (model.spec=te)")
        if config.softmax_type != "vanilla" or config.apply_query_key_layer_scaling:
            raise ValueError(f"SDPAttention needs softmax_type='vanilla' and no query-key layer "
                             f"scaling, got {config.softmax_type!r}")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp = pg_collection.tp.size()
        self.heads_per_partition = divide(config.num_attention_heads, tp)
        self.hidden_size_per_partition = self.heads_per_partition * config.kv_channels
        self.softmax_scale = 1.0 / math.sqrt(config.kv_channels) if softmax_scale is None else softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        """Attend causally. ``attention_mask`` (megatron's bool [b, 1, s, s], True = masked), when
        given, replaces the causal mask (e.g. block-causal masks for packed rows)."""
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("SDPAttention takes neither attention_bias nor packed_seq_params; "
                             "use the Transformer Engine spec (model.spec=te) for THD packing")
        s, b = query.shape[:2]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, heads, s, d]
        dropout_p = self.dropout_p if self.training else 0.0
        if dropout_p > 0.0:  # per-TP-rank dropout stream, as megatron's own core attention
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = self._attend(q, k, v, attention_mask, dropout_p)
        else:
            out = self._attend(q, k, v, attention_mask, dropout_p)
        return out.permute(2, 0, 1, 3).reshape(s, b, self.hidden_size_per_partition)

    def _attend(self, q, k, v, attention_mask, dropout_p: float) -> torch.Tensor:
        """SDPA with the causal flag (no mask tensor) unless an explicit mask is given."""
        mask = None if attention_mask is None else ~attention_mask  # SDPA: True = attend
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=mask is None,
            scale=self.softmax_scale, enable_gqa=True,
        )
