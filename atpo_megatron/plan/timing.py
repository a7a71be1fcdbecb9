"""The step-time model: each stage of an AT²PO step from a component rate, every rate with its source.

A rate is a figure measured on a GPU by ``benchmarks/`` (a JSON file in ``benchmarks/results/`` whose
device is not the CPU; the file is named) when one exists, else a published anchor
(``shared/anchors.md``, ``anchors-refresh-2026-12.md``; the source is named), scaled to the GPU and
model at hand by the stated rule. No GPU figure is on file yet, so today every rate is an anchor or
the H200 record of ``shared/notes/environment.md``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from atpo_megatron.plan.shapes import GPU, GPUS

RESULTS_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "results"

# The H200 record (environment.md, measured 2026-11-28): megatron-core GPTModel, local spec + SDPA,
# Llama-3-8B shape, bf16, seq 4096: 463.4 model TFLOP/s on one H200 (no TP/PP communication).
RECORD_TRAIN_TFLOPS = 463.4
RECORD_TRAIN_SOURCE = "H200 record, Llama-3-8B shape, SDPA, one GPU (shared/notes/environment.md)"
# NeMo-RL v0.3, Llama-3.1-70B, 8x8 H100, colocated vLLM: 2048 samples x 398 tokens in 84 s
# = 152 generated tokens/s/GPU (anchors-refresh-2026-12.md N13, from anchors.md #1 and NeMo-RL #959).
ANCHOR_GEN_TOKENS_PER_GPU = 152.0
ANCHOR_GEN_PARAMS = 70.6e9
ANCHOR_GEN_GPU = GPUS["h100"]
ANCHOR_GEN_SOURCE = "NeMo-RL v0.3 Llama-3.1-70B on 64 H100, 152 tok/s/GPU (anchors-refresh N13)"
# NeMo-RL v0.3 colocated refit of Llama-3.1-70B (141 GB of bf16 weights): 14 s (anchors.md #1).
ANCHOR_SYNC_GB_PER_S = 141.1 / 14.0
ANCHOR_SYNC_SOURCE = "NeMo-RL v0.3 70B colocated refit 14 s = 10.1 GB/s (anchors.md #1)"


@dataclass(frozen=True)
class Rate:
    value: float
    unit: str
    source: str


def _gpu_results(pattern: str) -> list[tuple[Path, dict]]:
    """Benchmark JSONs in ``benchmarks/results`` measured on a GPU."""
    found = []
    for path in sorted(RESULTS_DIR.glob(pattern)) if RESULTS_DIR.is_dir() else []:
        data = json.loads(path.read_text())
        device = data.get("device") or data.get("env", {}).get("device", "cpu")
        if not str(device).lower().startswith("cpu"):  # benchmarks write "cpu (x86_64, 1 threads)"
            found.append((path, data))
    return found


def _relative(path: Path) -> str:
    return str(path.relative_to(RESULTS_DIR.parents[1]))


def training_rate(gpu: GPU) -> Rate:
    """Achieved model TFLOP/s per GPU of the actor's train step, scaled by datasheet peak."""
    best = None
    for path, data in _gpu_results("actor_step*.json"):
        for r in data.get("results", []):
            tflops = r["train"]["tflops_per_device"]
            if best is None or tflops > best[0]:
                best = (tflops, f"{_relative(path)} ({data['device']})", data["device"])
    if best is not None:
        peak = next((g.bf16_tflops for k, g in GPUS.items() if k in best[2].lower()), gpu.bf16_tflops)
        return Rate(best[0] * gpu.bf16_tflops / peak, "TFLOP/s/GPU", best[1])
    return Rate(RECORD_TRAIN_TFLOPS * gpu.bf16_tflops / GPUS["h200"].bf16_tflops, "TFLOP/s/GPU", RECORD_TRAIN_SOURCE)


def generation_rate(gpu: GPU, params: int) -> Rate:
    """Generated tokens/s per GPU of colocated vLLM, from the 70B anchor. Decoding is bound by reading
    the weights, so it is scaled by (anchor parameters / parameters) x (HBM bandwidth / the anchor's).
    (``benchmarks/rollout.py`` measures single-GPU engines of small models, not a colocated vLLM job.)"""
    scale = ANCHOR_GEN_PARAMS / params * gpu.hbm_tb_s / ANCHOR_GEN_GPU.hbm_tb_s
    return Rate(ANCHOR_GEN_TOKENS_PER_GPU * scale, "tokens/s/GPU", ANCHOR_GEN_SOURCE)


def sync_rate() -> Rate:
    """Weights moved per second from the actor into the colocated engines (GB/s of bf16 weights)."""
    for path, data in _gpu_results("weight_sync*.json"):
        return Rate(data["result"]["weights_gb_per_s"], "GB/s", _relative(path))
    return Rate(ANCHOR_SYNC_GB_PER_S, "GB/s", ANCHOR_SYNC_SOURCE)


def pipeline_bubble(pp: int, vpp: int, micro_batches: int) -> float:
    """Idle fraction of a 1F1B (interleaved: vpp chunks) pipeline schedule: (pp-1)/(vpp*m + pp-1)."""
    return (pp - 1) / (vpp * micro_batches + pp - 1)


@dataclass(frozen=True)
class Term:
    name: str
    seconds: float
    how: str


def compute_seconds(flops: float, gpus: int, rate: Rate, bubble: float) -> float:
    """FLOPs over all GPUs at ``rate`` TFLOP/s each, stretched by the pipeline bubble."""
    return flops / (gpus * rate.value * 1e12) / (1.0 - bubble)
