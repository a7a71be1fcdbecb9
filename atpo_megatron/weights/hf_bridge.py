"""Hugging Face <-> Megatron weights for Llama / Qwen2 / Qwen3, in any TP x PP (x VPP) layout.

    load_hf_weights(models, hf_dir)                   # each rank reads only its own shards
    for hf_name, tensor in export_hf_weights(models):  # every rank: full HF tensors, one at a time
        ...
    save_hf_checkpoint(models, out_dir, hf_config, tokenizer_dir)   # rank 0 writes

The conversion itself is pure and per parameter: ``hf_to_megatron`` builds one rank's shard of one
megatron parameter from HF tensors (through a ``Reader``), ``megatron_to_hf`` turns the TP shards of
one megatron parameter back into HF tensors. Names there use *global* layer numbers. The
distributed parts (which rank owns what, gathering, broadcasting) are separate below.

Megatron layouts (``megatron/core/transformer/attention.py``, ``mlp.py``):
- ``linear_qkv`` rows are grouped per KV group: [q heads of the group, k, v] for each group, and
  TP rank r holds groups [r * g, (r + 1) * g) with g = kv_heads / tp.
- ``linear_fc1`` on each TP rank is [gate shard | up shard].
- ``linear_proj`` and ``linear_fc2`` are split on their input dimension.
- the embedding and output layer are split on the (padded) vocabulary; padded rows are zero.
- local and TE specs name the pre-attention / pre-MLP norms differently (``input_layernorm`` vs
  ``linear_qkv.layer_norm_weight``, ``pre_mlp_layernorm`` vs ``linear_fc1.layer_norm_weight``).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from safetensors import safe_open
from safetensors.torch import save_file

from atpo_megatron.actor.model import head_dim, padded_vocab_size, unwrap
from atpo_megatron.config import ConfigError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
                   "generation_config.json")


@dataclass(frozen=True)
class Layout:
    """The shape facts the conversion needs."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    padded_vocab_size: int
    tp: int
    tied: bool

    @classmethod
    def from_hf(cls, hf_config, tp: int) -> Layout:
        return cls(hf_config.num_attention_heads, hf_config.num_key_value_heads, head_dim(hf_config),
                   hf_config.vocab_size, padded_vocab_size(hf_config.vocab_size, tp), tp,
                   bool(getattr(hf_config, "tie_word_embeddings", False)))


class _Rule(NamedTuple):
    hf_names: tuple[str, ...]  # per-layer names are relative to "model.layers.{i}."
    kind: str  # replicated | row | qkv | fc1 | vocab


_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_LAYER_RULES = {
    "input_layernorm.weight": _Rule(("input_layernorm.weight",), "replicated"),  # local spec
    "self_attention.linear_qkv.layer_norm_weight": _Rule(("input_layernorm.weight",), "replicated"),  # TE
    "self_attention.linear_qkv.weight": _Rule(tuple(f"{p}.weight" for p in _QKV), "qkv"),
    "self_attention.linear_qkv.bias": _Rule(tuple(f"{p}.bias" for p in _QKV), "qkv"),  # Qwen2
    "self_attention.q_layernorm.weight": _Rule(("self_attn.q_norm.weight",), "replicated"),  # Qwen3
    "self_attention.k_layernorm.weight": _Rule(("self_attn.k_norm.weight",), "replicated"),
    "self_attention.linear_proj.weight": _Rule(("self_attn.o_proj.weight",), "row"),
    "pre_mlp_layernorm.weight": _Rule(("post_attention_layernorm.weight",), "replicated"),  # local spec
    "mlp.linear_fc1.layer_norm_weight": _Rule(("post_attention_layernorm.weight",), "replicated"),  # TE
    "mlp.linear_fc1.weight": _Rule(("mlp.gate_proj.weight", "mlp.up_proj.weight"), "fc1"),
    "mlp.linear_fc2.weight": _Rule(("mlp.down_proj.weight",), "row"),
}
_LAYER_NAME = re.compile(r"decoder\.layers\.(\d+)\.(.+)")


def hf_names_of(name: str, layout: Layout) -> tuple[tuple[str, ...], str]:
    """The HF tensor names behind the megatron parameter ``name`` (global layer number) and how it
    is laid out (its kind)."""
    if name == "embedding.word_embeddings.weight":
        return ("model.embed_tokens.weight",), "vocab"
    if name == "output_layer.weight":
        return ("model.embed_tokens.weight" if layout.tied else "lm_head.weight",), "vocab"
    if name == "decoder.final_layernorm.weight":
        return ("model.norm.weight",), "replicated"
    match = _LAYER_NAME.fullmatch(name)
    rule = _LAYER_RULES.get(match.group(2)) if match else None
    if rule is None:
        raise ValueError(f"Unknown parameter name: {name} (no Hugging Face counterpart is defined)")
    return tuple(f"model.layers.{match.group(1)}.{n}" for n in rule.hf_names), rule.kind


# ------------------------------------------------------------------------------ pure conversion
class Reader(Protocol):
    """Read access to HF tensors by name, sliced without loading the rest."""

    def shape(self, name: str) -> tuple[int, ...]: ...

    def read(self, name: str, index: tuple[slice, ...] = ()) -> torch.Tensor: ...


def _shard(size: int, tp: int, rank: int) -> slice:
    return slice(rank * size // tp, (rank + 1) * size // tp)


def hf_to_megatron(name: str, reader: Reader, layout: Layout, tp_rank: int) -> torch.Tensor:
    """Build TP rank ``tp_rank``'s shard of the megatron parameter ``name`` from HF tensors."""
    hf, kind = hf_names_of(name, layout)
    tp = layout.tp
    if kind == "replicated":
        return reader.read(hf[0])
    if kind == "row":  # split on the input dimension
        return reader.read(hf[0], (slice(None), _shard(reader.shape(hf[0])[1], tp, tp_rank)))
    if kind == "fc1":  # [gate shard | up shard]
        rows = _shard(reader.shape(hf[0])[0], tp, tp_rank)
        return torch.cat([reader.read(n, (rows,)) for n in hf])
    if kind == "qkv":
        return _qkv_shard(hf, reader, layout, tp_rank)
    return _vocab_shard(hf[0], reader, layout, tp_rank)


def _qkv_shard(hf: tuple[str, ...], reader: Reader, layout: Layout, tp_rank: int) -> torch.Tensor:
    """Interleave this rank's KV groups: [q_group (q_per_group * d), k (d), v (d)] per group."""
    groups, d = layout.num_kv_heads // layout.tp, layout.head_dim
    q_per_group = layout.num_heads // layout.num_kv_heads
    q_rows = slice(tp_rank * groups * q_per_group * d, (tp_rank + 1) * groups * q_per_group * d)
    kv_rows = slice(tp_rank * groups * d, (tp_rank + 1) * groups * d)
    q, k, v = reader.read(hf[0], (q_rows,)), reader.read(hf[1], (kv_rows,)), reader.read(hf[2], (kv_rows,))
    tail = q.shape[1:]  # (hidden,) for weights, () for biases
    grouped = torch.cat([q.reshape(groups, -1, *tail), k.reshape(groups, d, *tail),
                         v.reshape(groups, d, *tail)], dim=1)
    return grouped.reshape(-1, *tail)


def _vocab_shard(hf_name: str, reader: Reader, layout: Layout, tp_rank: int) -> torch.Tensor:
    """Rows [r * Vp / tp, (r + 1) * Vp / tp) of the vocabulary padded to Vp with zero rows."""
    rows, hidden = reader.shape(hf_name)
    if rows != layout.vocab_size:
        raise ConfigError(f"{hf_name} has {rows} rows but the model config's vocab_size is "
                          f"{layout.vocab_size}; the weights do not belong to this config")
    mine = _shard(layout.padded_vocab_size, layout.tp, tp_rank)
    real = reader.read(hf_name, (slice(min(mine.start, rows), min(mine.stop, rows)),))  # may be empty
    return torch.cat([real, real.new_zeros(mine.stop - mine.start - real.shape[0], hidden)])


def megatron_to_hf(name: str, shards: list[torch.Tensor], layout: Layout) -> list[tuple[str, torch.Tensor]]:
    """HF tensors from the TP shards (rank order) of one megatron parameter; one shard for
    parameters that TP does not split. A tied model's output layer gives nothing (HF keeps
    only ``model.embed_tokens.weight``)."""
    hf, kind = hf_names_of(name, layout)
    if kind == "replicated":
        tensors = [shards[0]]
    elif kind == "row":
        tensors = [torch.cat(shards, dim=1)]
    elif kind == "fc1":
        gates, ups = zip(*(s.chunk(2) for s in shards))
        tensors = [torch.cat(gates), torch.cat(ups)]
    elif kind == "qkv":
        full = torch.cat(shards)
        d, tail = layout.head_dim, full.shape[1:]
        q_rows = layout.num_heads // layout.num_kv_heads * d
        grouped = full.reshape(layout.num_kv_heads, q_rows + 2 * d, *tail)
        tensors = [t.reshape(-1, *tail) for t in grouped.split([q_rows, d, d], dim=1)]
    elif name == "output_layer.weight" and layout.tied:
        return []
    else:
        tensors = [torch.cat(shards)[: layout.vocab_size]]
    return [(n, t.contiguous()) for n, t in zip(hf, tensors)]


# ------------------------------------------------------------------------------------- import
class SafetensorsReader:
    """``Reader`` over the safetensors files of an HF folder; reads slices with ``get_slice``."""

    def __init__(self, hf_dir: str | Path):
        hf_dir = Path(hf_dir)
        index = hf_dir / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = sorted(p.name for p in hf_dir.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors weights in {hf_dir}; convert the checkpoint to "
                                    f"safetensors first (transformers save_pretrained)")
        self._handles = [safe_open(hf_dir / f, framework="pt") for f in files]
        self._where = {key: h for h in self._handles for key in h.keys()}
        self._dir = hf_dir

    def _slice(self, name: str):
        if name not in self._where:
            raise KeyError(f"{name} is missing from the safetensors files in {self._dir}")
        return self._where[name].get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def read(self, name: str, index: tuple[slice, ...] = ()) -> torch.Tensor:
        return self._slice(name)[index] if index else self._slice(name)[:]


def named_global_parameters(models: Iterable[torch.nn.Module]) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """This rank's parameters under megatron names with *global* layer numbers."""
    for model in models:
        gpt = unwrap(model)
        for name, param in gpt.named_parameters():
            match = _LAYER_NAME.fullmatch(name)
            if match:
                layer = gpt.decoder.layers[int(match.group(1))].layer_number - 1
                name = f"decoder.layers.{layer}.{match.group(2)}"
            yield name, param


@torch.no_grad()
def load_hf_weights(models: list[torch.nn.Module], hf_dir: str | Path) -> None:
    """Copy HF safetensors weights into this rank's shards of ``models`` (from ``build_model``).

    Streams tensor by tensor: each rank reads only the slices it keeps, never the whole model.
    No communication; every rank of the job calls it.
    """
    layout = _layout(models)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    reader = SafetensorsReader(hf_dir)
    for name, param in named_global_parameters(models):
        shard = hf_to_megatron(name, reader, layout, tp_rank)
        if shard.shape != param.shape:
            raise ConfigError(f"{name}: the weights in {hf_dir} give shape {tuple(shard.shape)} on TP rank "
                              f"{tp_rank}, the model has {tuple(param.shape)}; do config and weights match?")
        param.copy_(shard)


# ------------------------------------------------------------------------------------- export
def _export_order(name: str) -> tuple[int, str]:
    """Embedding first, then layer by layer, then the final norm and output layer."""
    match = _LAYER_NAME.fullmatch(name)
    if match:
        return int(match.group(1)), name
    return (-1 if name.startswith("embedding.") else 1 << 30), name


@torch.no_grad()
def export_hf_weights(models: list[torch.nn.Module]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, full tensor)`` for the whole model, on EVERY rank, in the same order.

    Collective: all ranks must iterate it to the end together. For each megatron parameter, the
    owning pipeline stage all-gathers its TP shards, then broadcasts them over the pipeline group
    (per TP rank, per DP replica), and every rank converts them to HF layout. Only one parameter's
    tensors are alive at a time, so a consumer that streams (weight sync, a sharded writer) never
    holds more than one layer. Tensors come in the parameters' dtype, on their device, and must be
    treated as read-only (at TP = PP = 1 some are views of the live parameters).
    """
    layout = _layout(models)
    local = dict(named_global_parameters(models))
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    pp_rank, pp = parallel_state.get_pipeline_model_parallel_rank(), dist.get_world_size(pp_group)
    owners = _owners(local, layout, pp_group, pp_rank)
    device = next(iter(local.values())).device
    for name in sorted(owners, key=_export_order):
        if layout.tied and name == "output_layer.weight":
            continue  # the last stage's copy of the embedding
        owner, sharded, shape, dtype = owners[name]
        shards = None
        if owner == pp_rank:
            shards = _gather_tp(local[name]) if sharded and layout.tp > 1 else [local[name].detach()]
        if pp > 1:
            buffer = torch.stack(shards) if owner == pp_rank else torch.empty(
                (layout.tp if sharded else 1, *shape), dtype=dtype, device=device)
            dist.broadcast(buffer, group_src=owner, group=pp_group)
            shards = list(buffer)
        yield from megatron_to_hf(name, shards, layout)


def _layout(models: list[torch.nn.Module]) -> Layout:
    return Layout.from_hf(unwrap(models[0]).hf_config, parallel_state.get_tensor_model_parallel_world_size())


def _owners(local: dict[str, torch.nn.Parameter], layout: Layout, pp_group, pp_rank: int) -> dict[str, tuple]:
    """name -> (owning pipeline rank, TP-split?, local shape, dtype), agreed by the pipeline group."""
    mine = [(name, pp_rank, hf_names_of(name, layout)[1] != "replicated", tuple(p.shape), p.dtype)
            for name, p in local.items()]
    stages: list = [None] * dist.get_world_size(pp_group)
    dist.all_gather_object(stages, mine, group=pp_group)
    return {name: rest for stage in stages for name, *rest in stage}


def _gather_tp(param: torch.Tensor) -> list[torch.Tensor]:
    """All TP shards of ``param`` in TP-rank order."""
    group = parallel_state.get_tensor_model_parallel_group()
    shards = [torch.empty_like(param) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shards, param.detach().contiguous(), group=group)
    return shards


# --------------------------------------------------------------------------------------- save
def save_hf_checkpoint(models: list[torch.nn.Module], out_dir: str | Path, hf_config,
                       tokenizer_dir: str | Path | None, max_shard_bytes: int = 4 << 30) -> None:
    """Write an HF folder (safetensors shards + index, config.json, tokenizer files) from rank 0.

    Collective (every rank calls it). Rank 0 holds at most one shard of ``max_shard_bytes`` in
    memory. The weights are saved in the parameters' dtype, which ``config.json`` records.
    """
    out_dir = Path(out_dir)
    writer = _ShardWriter(out_dir, max_shard_bytes) if dist.get_rank() == 0 else None
    dtype = None
    for name, tensor in export_hf_weights(models):
        dtype = tensor.dtype
        if writer:
            writer.add(name, tensor.cpu())
    if writer:
        writer.close()
        config = copy.deepcopy(hf_config)
        config.dtype = dtype
        config.save_pretrained(out_dir)
        for file in TOKENIZER_FILES if tokenizer_dir else ():
            if (Path(tokenizer_dir) / file).is_file():
                shutil.copy2(Path(tokenizer_dir) / file, out_dir / file)
    dist.barrier()


class _ShardWriter:
    """HF-style sharded safetensors: ``model.safetensors``, or ``model-0000i-of-0000n.safetensors``
    plus ``model.safetensors.index.json`` when the weights exceed one shard."""

    def __init__(self, out_dir: Path, max_shard_bytes: int):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.out_dir, self.max_bytes = out_dir, max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[list[str]] = []  # tensor names per written shard
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[name] = tensor
        self.pending_bytes += size
        self.total += size

    def _flush(self) -> None:
        save_file(self.pending, self.out_dir / f"shard-{len(self.files)}.tmp", metadata={"format": "pt"})
        self.files.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        self._flush()
        n = len(self.files)
        if n == 1:
            (self.out_dir / "shard-0.tmp").rename(self.out_dir / "model.safetensors")
            return
        weight_map = {}
        for i, names in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.out_dir / f"shard-{i}.tmp").rename(self.out_dir / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
