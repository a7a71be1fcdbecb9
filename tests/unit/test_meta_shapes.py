"""70B-class actors built exactly, rank by rank, on the meta device (no memory), in one process.

For every rank of Llama-3-70B at TP4xPP4 and TP4xPP8, Qwen2.5-72B at TP8xPP4 and Qwen3-32B at
TP4xPP4, this process poses as that rank of a fake process group of the whole world (torch's
``fake`` backend: collectives are no-ops), initialises megatron's groups, and builds the actor with
``actor.model.build_model`` under ``torch.device("meta")``. Checked:

* the parameters on each rank equal ``plan.shapes.stage_params`` (the plan's formula);
* the HF bridge maps every megatron parameter of every rank onto the model's HF index, each TP
  rank reading slices that make up exactly the parameter's shape, and the slices the TP ranks of
  the one pipeline stage that owns an HF tensor read are either the whole tensor on every TP rank
  (replicated: norms) or disjoint boxes that tile it exactly; no HF tensor is left over and no
  name outside the index is asked for.

The HF configs are the published ``config.json`` values, written here; the HF index (names and
shapes) is derived from them by building the transformers model on the meta device. Layouts: Llama
from NeMo-RL's 70B recipes (anchors.md #5: TP4 PP4 bf16, TP4 PP8 FP8), Qwen3-32B from NeMo-RL's
GRPO performance run (TP4 PP4); no Megatron layout for Qwen2.5-72B is in the anchors, so TP8 x PP4
(one KV head per TP rank, the edge of the QKV split).
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict

import pytest
import torch
import torch.distributed as dist
import transformers

from atpo_megatron.model_files import PUBLISHED_CONFIGS
from atpo_megatron.plan.shapes import ModelShape, stage_params

LLAMA3_70B = {  # meta-llama/Meta-Llama-3-70B-Instruct config.json
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "hidden_act": "silu", "hidden_size": 8192,
    "initializer_range": 0.02, "intermediate_size": 28672, "max_position_embeddings": 8192, "model_type": "llama",
    "num_attention_heads": 64, "num_hidden_layers": 80, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0, "tie_word_embeddings": False, "vocab_size": 128256,
}
QWEN25_72B = {  # Qwen/Qwen2.5-72B-Instruct config.json
    "architectures": ["Qwen2ForCausalLM"], "hidden_act": "silu", "hidden_size": 8192, "initializer_range": 0.02,
    "intermediate_size": 29568, "max_position_embeddings": 32768, "max_window_layers": 80, "model_type": "qwen2",
    "num_attention_heads": 64, "num_hidden_layers": 80, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": False, "use_sliding_window": False,
    "vocab_size": 152064,
}
QWEN3_32B = {  # Qwen/Qwen3-32B config.json
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 5120, "initializer_range": 0.02, "intermediate_size": 25600, "max_position_embeddings": 40960,
    "max_window_layers": 64, "model_type": "qwen3", "num_attention_heads": 64, "num_hidden_layers": 64,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_theta": 1000000, "tie_word_embeddings": False,
    "use_sliding_window": False, "vocab_size": 151936,
}
CASES = {
    "llama3-70b-tp4pp4": (LLAMA3_70B, 4, 4),
    "llama3-70b-tp4pp8": (LLAMA3_70B, 4, 8),
    "qwen2.5-72b-tp8pp4": (QWEN25_72B, 8, 4),
    "qwen3-32b-tp4pp4": (QWEN3_32B, 4, 4),
}
PARAMS_B = {"llama": 70.55, "qwen2": 72.71, "qwen3": 32.76}  # published sizes, billions


def _hf_config(values: dict):
    values = {k: v for k, v in values.items() if k != "architectures"}
    return transformers.CONFIG_MAPPING[values.pop("model_type")](**values)


def hf_index(hf_config) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor the model's safetensors hold (from transformers on meta)."""
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    index = {name: tuple(p.shape) for name, p in model.named_parameters()}
    if hf_config.tie_word_embeddings:
        index.pop("lm_head.weight", None)
    return index


@contextlib.contextmanager
def as_rank(rank: int, world: int, tp: int, pp: int):
    """This process as ``rank`` of ``world`` on torch's fake backend, with megatron's groups."""
    from megatron.core import parallel_state as ps
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                     create_gloo_process_groups=False)
        yield ps
    finally:
        ps.destroy_model_parallel()
        dist.destroy_process_group()


class IndexReader:
    """A ``hf_bridge.Reader`` over an HF index: shapes from the index; reads return meta tensors of
    the slice's shape and record which elements were read."""

    def __init__(self, index: dict[str, tuple[int, ...]]):
        self.index = index
        self.reads: list[tuple[str, tuple[tuple[int, int], ...]]] = []

    def shape(self, name: str) -> tuple[int, ...]:
        return self.index[name]

    def read(self, name: str, index: tuple[slice, ...] = ()) -> torch.Tensor:
        shape = self.index[name]  # KeyError = the bridge asked for a tensor the model does not have
        full = tuple(index) + (slice(None),) * (len(shape) - len(index))
        box = tuple(sl.indices(n)[:2] for sl, n in zip(full, shape))
        assert all(sl.step in (None, 1) for sl in full), (name, full)
        self.reads.append((name, box))
        return torch.empty(shape, device="meta")[full]


def _volume(box) -> int:
    return math.prod(max(b - a, 0) for a, b in box)


def _overlap(a, b) -> bool:
    return all(max(x0, y0) < min(x1, y1) for (x0, x1), (y0, y1) in zip(a, b))


def check_tiling(name: str, shape: tuple[int, ...], boxes: list, tp: int) -> None:
    """The boxes the TP ranks of one stage read from one HF tensor: whole on each rank, or a tiling."""
    whole = tuple((0, n) for n in shape)
    boxes = [b for b in boxes if _volume(b)]  # the vocabulary's padding rows read nothing
    if all(b == whole for b in boxes):
        assert len(boxes) == tp, (name, len(boxes))
        return
    assert sum(map(_volume, boxes)) == math.prod(shape), (name, boxes)
    for i, a in enumerate(boxes):
        assert not any(_overlap(a, b) for b in boxes[i + 1:]), (name, a)


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_rank_matches_the_formula_and_the_hf_index(case):
    from atpo_megatron.actor.model import build_model
    from atpo_megatron.config import ModelConfig, ParallelConfig
    from atpo_megatron.weights.hf_bridge import Layout, hf_to_megatron, named_global_parameters

    values, tp, pp = CASES[case]
    hf = _hf_config(values)
    index = hf_index(hf)
    shape = ModelShape.from_hf(hf)
    assert shape.hf_params() == sum(math.prod(s) for s in index.values())
    assert round(shape.hf_params() / 1e9, 2) == PARAMS_B[values["model_type"]]
    layout = Layout.from_hf(hf, tp)
    reads: dict[str, dict[int, list]] = defaultdict(lambda: defaultdict(list))  # name -> stage -> boxes
    world = tp * pp
    for rank in range(world):
        with as_rank(rank, world, tp, pp) as ps, torch.device("meta"):
            tp_rank, stage = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
            models = build_model(hf, ModelConfig(dtype="bfloat16", spec="local"), ParallelConfig(tp=tp, pp=pp))
            params = dict(named_global_parameters(models))
            assert sum(p.numel() for p in params.values()) == stage_params(shape, tp, pp, stage), (rank, stage)
            for name, param in params.items():
                reader = IndexReader(index)
                shard = hf_to_megatron(name, reader, layout, tp_rank)
                assert shard.shape == param.shape, (rank, name, shard.shape, param.shape)
                # the padded vocabulary rows are zeros, the rest is what was read
                assert sum(map(_volume, (b for _, b in reader.reads))) <= param.numel()
                for hf_name, box in reader.reads:
                    reads[hf_name][stage].append(box)
    assert set(reads) == set(index), (sorted(set(index) - set(reads))[:5], sorted(set(reads) - set(index))[:5])
    for name, by_stage in reads.items():
        assert len(by_stage) == 1, (name, sorted(by_stage))  # one pipeline stage owns each HF tensor
        (boxes,) = by_stage.values()
        check_tiling(name, index[name], boxes, tp)


def test_published_configs_in_hub_are_the_ones_tested_here():
    """``atpo plan`` sizes 70B jobs from model_files.PUBLISHED_CONFIGS: its shape fields equal these."""
    tested = {"meta-llama/Meta-Llama-3-70B-Instruct": LLAMA3_70B, "Qwen/Qwen2.5-72B-Instruct": QWEN25_72B,
              "Qwen/Qwen3-32B": QWEN3_32B}
    assert set(PUBLISHED_CONFIGS) == set(tested)
    for key, values in PUBLISHED_CONFIGS.items():
        for field, value in values.items():
            assert tested[key][field] == value, (key, field)
