"""Metrics: TensorBoard + JSONL writer, stage timers, model FLOPs, throughput/MFU, profiler, step line.

    writer = MetricsWriter(cfg.logging.run_dir, rank=rank, tensorboard=cfg.logging.tensorboard)
    timer, prof = StageTimer(), Profiler(cfg.profile, Path(cfg.logging.run_dir) / "profile", rank)
    for step in range(start, cfg.train.steps):
        prof.step(step)                                  # at the top of the step
        with timer.stage("rollout"): ...
        with timer.stage("actor"): ...
        writer.log(step, {"rollout/reward_mean": r, "actor/loss": loss, **timer.pop()})
    prof.close(); writer.close()
    # then:  tensorboard --logdir RUN_DIR   or   atpo report RUN_DIR

This module knows nothing of the model: FLOPs come from a Hugging Face config (a dict or an object),
and every value it logs is a plain number. Tags are namespaced ``section/name`` ("rollout/...",
"actor/...", "timing/<stage>_s", "perf/..."); the constants below are the ones the report and the
step line read.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from atpo_megatron.config import ConfigError

logger = logging.getLogger(__name__)

REWARD_TAG = "rollout/reward_mean"
EM_TAG = "rollout/em"
FORMAT_FAILURE_TAG = "rollout/format_failure_rate"
TOOL_CALLS_TAG = "rollout/tool_calls_per_leaf"
EVAL_EM_TAG = "eval/em_avg"
LOSS_TAG = "actor/loss"
CLIP_TAG = "actor/pg_clipfrac"
TIMING_PREFIX = "timing/"
PERF_PREFIX = "perf"  # writer.log(step, throughput(...), prefix=PERF_PREFIX) -> "perf/mfu", ...
NONFINITE_TAG = "metrics/nonfinite_skipped"
JSONL_NAME = "metrics.jsonl"
TENSORBOARD_SUBDIR = "tensorboard"


def _join(prefix: str, tag: str) -> str:
    return f"{prefix.rstrip('/')}/{tag}" if prefix else tag


def _to_number(tag: str, value: Any) -> float | int | None:
    """A Python number from a float, int, bool, numpy scalar or one-element tensor; None stays None."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"metric {tag!r} is a tensor of shape {tuple(value.shape)}; log a scalar "
                f"(reduce it first, e.g. .mean() or .float().sum())"
            )
        value = value.item()
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"metric {tag!r} has value {value!r} of type {type(value).__name__}; log a number") from None


def open_run_dir(cfg: Any, config_yaml: str, rank: int) -> Path:
    """``logging.run_dir``, created with the run's ``config.yaml`` by rank 0; one ConfigError when it
    cannot be written."""
    run_dir = Path(cfg.logging.run_dir)
    if rank == 0:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(config_yaml)
        except OSError as exc:
            raise ConfigError(f"logging.run_dir={cfg.logging.run_dir} cannot be written "
                              f"({exc.strerror or exc}); choose a folder this job can write") from exc
    return run_dir


class MetricsWriter:
    """Scalars per step to TensorBoard (``run_dir/tensorboard``) and to ``run_dir/metrics.jsonl``.

    Only rank 0 writes; on other ranks, or with ``enabled=False``, every method is a no-op.
    ``tensorboard=False`` keeps the JSONL file (which ``atpo report`` reads) but skips the event files.
    Each :meth:`log` call appends one JSONL line ``{"step", "time", tag: value, ...}`` and is flushed at
    once, so a crash loses nothing; readers merge lines that share a step (later values win, which also
    covers a resumed run re-logging its first steps).

    Non-finite values (NaN, ±inf) are not written: they are counted, warned about once per tag, and
    the count for the call is logged as ``metrics/nonfinite_skipped``; a training run never dies here.
    """

    def __init__(self, run_dir: str | Path, enabled: bool = True, rank: int = 0, *,
                 tensorboard: bool = True, flush_secs: int = 30):
        self.run_dir = Path(run_dir)
        self.active = enabled and rank == 0
        self.nonfinite_total = 0
        self._warned: set[str] = set()
        self._tb = None
        self._jsonl = None
        if not self.active:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / JSONL_NAME, "a", encoding="utf-8")
        if tensorboard:
            # Imported here: torch.utils.tensorboard costs ~1.5 s to import, and only rank 0 needs it.
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.run_dir / TENSORBOARD_SUBDIR), flush_secs=flush_secs)

    def log(self, step: int, metrics: Mapping[str, Any], prefix: str = "") -> None:
        """Write ``metrics`` (tag -> float | int | bool | 1-element tensor | None) at ``step``.

        ``prefix`` namespaces every tag: ``log(s, {"loss": x}, prefix="actor")`` writes "actor/loss".
        None values are skipped silently (nothing measured); non-finite ones are counted (see class).
        """
        if not self.active:
            return
        row: dict[str, float | int] = {}
        skipped = []
        for key, value in metrics.items():
            tag = _join(prefix, key)
            if tag in ("step", "time"):
                raise ValueError(f"metric tag {tag!r} is reserved for the JSONL row; namespace it, e.g. 'train/{tag}'")
            number = _to_number(tag, value)
            if number is None:
                continue
            if not math.isfinite(number):
                skipped.append(tag)
                continue
            row[tag] = number
        if skipped:
            self.nonfinite_total += len(skipped)
            row[NONFINITE_TAG] = len(skipped)
            new = [t for t in skipped if t not in self._warned]
            if new:
                self._warned.update(new)
                logger.warning("step %d: skipped non-finite metric(s) %s (counted in %s; warned once per tag)",
                               step, ", ".join(new), NONFINITE_TAG)
        if self._tb is not None:
            for tag, number in row.items():
                self._tb.add_scalar(tag, number, global_step=step)
        self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), **row}) + "\n")
        self._jsonl.flush()

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()
        if self._jsonl is not None:
            self._jsonl.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        self.active = False

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class StageTimer:
    """Wall seconds per named stage, accumulated until :meth:`pop`.

    ``with timer.stage("rollout"): ...`` adds the block's duration to "rollout"; entering a stage
    several times in one step sums. Stages may nest: a different name inside another is timed on its
    own (the outer one includes it); the same name inside itself counts only once, at the outermost
    level. When CUDA is initialised the timer synchronises at both ends, so queued kernels are charged
    to the stage that launched them. ``clock`` is injectable for tests.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter, cuda_sync: bool = True):
        self._clock = clock
        self._cuda_sync = cuda_sync
        self._totals: dict[str, float] = {}
        self._active: set[str] = set()

    def _sync(self) -> None:
        # is_initialized() avoids creating a CUDA context on a process that never used the GPU.
        if self._cuda_sync and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if name in self._active:  # re-entered: the outer block already times this
            yield
            return
        self._sync()
        self._active.add(name)
        start = self._clock()
        try:
            yield
        finally:
            self._sync()
            self._totals[name] = self._totals.get(name, 0.0) + (self._clock() - start)
            self._active.discard(name)

    def pop(self) -> dict[str, float]:
        """``{"timing/<stage>_s": seconds}`` for the stages finished since the last pop, then reset."""
        out = {f"{TIMING_PREFIX}{name}_s": secs for name, secs in self._totals.items()}
        self._totals = {}
        return out


# ---------------------------------------------------------------------------------------------------
# Model FLOPs, throughput and MFU


def _cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    value = cfg.get(key, default) if isinstance(cfg, Mapping) else getattr(cfg, key, default)
    return default if value is None else value


def _shape(cfg: Any, seq_len: int | None) -> dict[str, int]:
    missing = [k for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                           "vocab_size") if _cfg_get(cfg, k) is None]
    if missing:
        raise ValueError(f"model config lacks {missing}; pass a Hugging Face config (Llama-style) or a dict with them")
    h, heads = int(_cfg_get(cfg, "hidden_size")), int(_cfg_get(cfg, "num_attention_heads"))
    s = {
        "h": h,
        "L": int(_cfg_get(cfg, "num_hidden_layers")),
        "ffn": int(_cfg_get(cfg, "intermediate_size")),
        "nh": heads,
        "nkv": int(_cfg_get(cfg, "num_key_value_heads", heads)),
        "hd": int(_cfg_get(cfg, "head_dim", h // heads)),
        "V": int(_cfg_get(cfg, "vocab_size")),
        "seq": int(seq_len if seq_len is not None else _cfg_get(cfg, "seq_len", 0)),
    }
    return s


def count_params(cfg: Any) -> dict[str, int]:
    """Parameter count of a Llama-style decoder (GQA attention, SwiGLU MLP, RMSNorm, no biases).

    Returns ``total`` (as stored: a tied output layer is not counted twice), ``embedding`` (the input
    embedding) and ``matmul`` = every parameter except the input embedding, with the output layer
    counted even when tied, because its matmul runs either way. ``matmul`` is the N of the FLOPs count.
    """
    s = _shape(cfg, None)
    h, hd = s["h"], s["hd"]
    attn = h * s["nh"] * hd + 2 * h * s["nkv"] * hd + s["nh"] * hd * h  # q, k, v, o
    mlp = 3 * h * s["ffn"]  # gate, up, down
    per_layer = attn + mlp + 2 * h  # + input and post-attention RMSNorm weights
    body = s["L"] * per_layer + h  # + final norm
    embedding = output = s["V"] * h
    tied = bool(_cfg_get(cfg, "tie_word_embeddings", False))
    return {"total": body + embedding + (0 if tied else output), "embedding": embedding, "matmul": body + output}


def model_flops_per_token(cfg: Any, seq_len: int | None = None) -> float:
    """Training (forward + backward) FLOPs per token of a Llama-style decoder at sequence length seq.

        6·N + 6·L·(n_heads·head_dim)·seq

    N = parameters except the input embedding, output layer included (even when tied), see
    :func:`count_params`. 6·N is the dense part, 2 FLOPs per multiply-add in the forward and 4 in the
    backward (Kaplan et al. 2020; PaLM, Chowdhery et al. 2022, appendix B). The attention scores
    (QKᵀ and AV) add 2·2·seq·d per layer in the forward for full attention; PaLM's 12·L·H·Q·T is that
    times 3. A causal mask halves it on average over positions (Megatron-LM's num_floating_point_operations
    does the same), hence 6·L·d·seq. This is the count environment.md uses for its H200 numbers.
    With GQA, K/V are smaller but the scores still cost n_heads·head_dim per position.
    seq_len comes from the argument, else from a ``seq_len`` entry of ``cfg``; for packed sequences of
    different lengths pass :func:`effective_seq_len`. Biases are ignored (< 0.01 %).
    """
    s = _shape(cfg, seq_len)
    if s["seq"] <= 0:
        raise ValueError("model_flops_per_token needs seq_len (argument or a 'seq_len' entry in the config)")
    return 6.0 * count_params(cfg)["matmul"] + 6.0 * s["L"] * s["nh"] * s["hd"] * s["seq"]


def forward_flops_per_token(cfg: Any, seq_len: int | None = None) -> float:
    """Forward-only FLOPs per token (log-prob and inference passes): one third of the training count."""
    return model_flops_per_token(cfg, seq_len) / 3.0


def effective_seq_len(lengths: list[int]) -> float:
    """The seq to use in the attention term for sequences of these lengths: Σ len² / Σ len.

    Causal attention costs ∝ position, so a token of a length-S sequence pays S/2 on average; weighting
    each sequence by its token count gives Σ S·(S/2) / Σ S, i.e. this value (halved inside the formula).
    """
    total = sum(lengths)
    return sum(n * n for n in lengths) / total if total else 0.0


def update_throughput(lengths: list[int], seconds: float, cfg: Any, hf_config: Any, n_devices: int) -> dict[str, float]:
    """``perf/*`` of a step's update stage: tokens/s, model TFLOP/s per device and MFU (0 on CPU), for
    sequences of ``lengths`` tokens trained ``train.ppo_epochs`` times in ``seconds``."""
    if seconds <= 0:
        return {}
    tokens = sum(lengths) * cfg.train.ppo_epochs
    peak = cfg.logging.peak_tflops or detect_peak_tflops(cfg.model.dtype)
    flops = model_flops_per_token(hf_config, seq_len=effective_seq_len(lengths))
    return {f"{PERF_PREFIX}/{k}": v for k, v in throughput(tokens, seconds, flops, n_devices, peak).items()}


def throughput(tokens: int | float, seconds: float, flops_per_token: float, n_devices: int,
               peak_tflops: float) -> dict[str, float]:
    """``tokens_per_s`` (all devices), ``tflops_per_device`` (model FLOPs), ``mfu`` (0 when peak unknown)."""
    if seconds <= 0 or n_devices <= 0:
        return {"tokens_per_s": 0.0, "tflops_per_device": 0.0, "mfu": 0.0}
    tokens_per_s = tokens / seconds
    tflops = tokens_per_s * flops_per_token / n_devices / 1e12
    return {"tokens_per_s": tokens_per_s, "tflops_per_device": tflops,
            "mfu": tflops / peak_tflops if peak_tflops > 0 else 0.0}


# Dense (no sparsity) peak TFLOP/s per GPU from NVIDIA's datasheets. "float32" is the non-tensor-core
# rate, which is what fp32 matmuls get with torch's default (TF32 off). Measured on our H200 with
# torch (environment.md): bf16 GEMM 8192³ 792 TFLOP/s, FP8 e4m3 _scaled_mm 1,444: MFU against the
# datasheet is ~0.8x of MFU against what a GEMM reaches; set logging.peak_tflops=792 to use the latter.
_SXM_HOPPER = {"float32": 67.0, "tf32": 495.0, "bfloat16": 989.0, "float16": 989.0, "fp8": 1979.0}
_NVL_HOPPER = {"float32": 60.0, "tf32": 418.0, "bfloat16": 835.0, "float16": 835.0, "fp8": 1671.0}
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100": _SXM_HOPPER,  # "NVIDIA H100 80GB HBM3" is the SXM part
    "H100 PCIe": {"float32": 51.0, "tf32": 378.0, "bfloat16": 756.0, "float16": 756.0, "fp8": 1513.0},
    "H100 NVL": _NVL_HOPPER,
    "H200": _SXM_HOPPER,
    "H200 NVL": _NVL_HOPPER,
    "GH200": _SXM_HOPPER,
    "H800": _SXM_HOPPER,
    "A100": {"float32": 19.5, "tf32": 156.0, "bfloat16": 312.0, "float16": 312.0},
    "B200": {"tf32": 1100.0, "bfloat16": 2250.0, "float16": 2250.0, "fp8": 4500.0},
}
_DTYPE_ALIASES = {
    "bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "half": "float16", "float16": "float16",
    "fp32": "float32", "float": "float32", "float32": "float32", "tf32": "tf32",
    "fp8": "fp8", "e4m3": "fp8", "hybrid": "fp8", "float8_e4m3fn": "fp8",
}


def _device_key(device_name: str) -> str | None:
    # Longest table key found as whole words wins, so "NVIDIA H100 PCIe" -> "H100 PCIe" whatever the
    # table order, and "GH200" never matches "H200".
    hits = [k for k in PEAK_TFLOPS if re.search(rf"(?<![A-Za-z0-9]){re.escape(k)}(?![A-Za-z0-9])", device_name)]
    return max(hits, key=len) if hits else None


def detect_peak_tflops(dtype: str | torch.dtype, device_name: str | None = None) -> float:
    """Datasheet peak TFLOP/s of this GPU (``torch.cuda.get_device_name()``) for ``dtype``; 0.0 if unknown.

    ``dtype``: "bfloat16"/"bf16", "float16", "float32", "tf32", "fp8" (also the config's "e4m3"/"hybrid")
    or a torch dtype. 0.0 on a CPU-only machine, for an unknown GPU (warned, with the fix) or a dtype
    the GPU lacks; MFU is then reported as 0.
    """
    name = str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else str(dtype).lower()
    key = _DTYPE_ALIASES.get(name)
    if key is None:
        raise ValueError(f"unknown dtype {dtype!r} for peak TFLOP/s; use one of {sorted(_DTYPE_ALIASES)}")
    if device_name is None:
        if not torch.cuda.is_available():
            return 0.0
        device_name = torch.cuda.get_device_name()
    device = _device_key(device_name)
    if device is None:
        logger.warning("peak TFLOP/s of %r is not known: MFU will read 0; set logging.peak_tflops", device_name)
        return 0.0
    return PEAK_TFLOPS[device].get(key, 0.0)


# ---------------------------------------------------------------------------------------------------
# Profiler


class Profiler:
    """torch.profiler over the inclusive training-step range ``cfg.steps = [first, last]``.

    Call :meth:`step` once per training step, at its top, with the step number, and :meth:`close` after
    the loop. Step ``first - 1`` (when the loop passes it) is the warm-up step, ``first..last`` are
    recorded, and the trace is written when step ``last + 1`` begins (or at close) to
    ``out_dir/rank<r>_steps<first>-<last>.<ms>.pt.trace.json`` plus a ``.txt`` table of the top ops;
    the path is logged. The JSON opens in TensorBoard's profiler plugin (``--logdir`` the run dir) and
    at https://ui.perfetto.dev. Every rank writes its own trace. Disabled: every method is a no-op.
    ProfilerStep#k in the trace counts from the first profiled step (k=0 is step first-1 or first).
    """

    def __init__(self, cfg: Any, out_dir: str | Path, rank: int = 0):
        self.enabled = bool(cfg.enabled)
        self.out_dir = Path(out_dir)
        self.rank = rank
        self.trace_path: Path | None = None
        self._prof: torch.profiler.profile | None = None
        self._done = False
        if not self.enabled:
            return
        steps = list(cfg.steps)
        if len(steps) != 2 or steps[0] > steps[1] or steps[0] < 0:
            raise ValueError(f"profile.steps={steps} must be [first, last] with 0 <= first <= last")
        self.first, self.last = int(steps[0]), int(steps[1])

    def _schedule(self, start: int) -> Callable[[int], torch.profiler.ProfilerAction]:
        A = torch.profiler.ProfilerAction

        def fn(i: int) -> torch.profiler.ProfilerAction:  # i counts profiler steps from `start`
            step = start + i
            if step == self.first - 1:
                return A.WARMUP
            if self.first <= step < self.last:
                return A.RECORD
            return A.RECORD_AND_SAVE if step == self.last else A.NONE

        return fn

    def _on_ready(self, prof: torch.profiler.profile) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        stem = f"rank{self.rank}_steps{self.first}-{self.last}.{int(time.time() * 1000)}"
        path = self.out_dir / f"{stem}.pt.trace.json"
        prof.export_chrome_trace(str(path))
        cuda = any(a == torch.profiler.ProfilerActivity.CUDA for a in prof.activities)
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        (self.out_dir / f"{stem}.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=40))
        self.trace_path = path
        logger.info("profiler: steps [%d, %d] of rank %d traced to %s (TensorBoard profiler plugin or "
                    "ui.perfetto.dev)", self.first, self.last, self.rank, path)

    def step(self, step: int) -> None:
        if not self.enabled or self._done:
            return
        if self._prof is None:
            if not (self.first - 1 <= step <= self.last):
                return
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._prof = torch.profiler.profile(activities=activities, schedule=self._schedule(step),
                                                on_trace_ready=self._on_ready, record_shapes=True)
            self._prof.start()
            return
        self._prof.step()
        if step > self.last:
            self.close()

    def close(self) -> None:
        """Stop; writes the trace if the range was still being recorded (loop ended inside it)."""
        if self._prof is not None:
            self._prof.stop()  # a no-op transition if the trace was already saved
            self._prof = None
            self._done = True

    def __enter__(self) -> Profiler:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------
# One-line step summary for a progress bar


class StepLog:
    """Formats a step's key metrics into one short line for a tqdm/rich progress bar.

    ``StepLog()(metrics)`` -> "reward 0.412 | EM 0.44 | format fail 0.06 | tools/leaf 1.9 | loss -0.0123
    | clip 0.031 | rollout 12.3s actor 4.5s". ``fields`` are (label, tag, format); absent tags are left
    out; every ``timing/<stage>_s`` follows.
    """

    FIELDS: tuple[tuple[str, str, str], ...] = (
        ("reward", REWARD_TAG, "{:.3f}"),
        ("EM", EM_TAG, "{:.2f}"),
        ("format fail", FORMAT_FAILURE_TAG, "{:.2f}"),
        ("tools/leaf", TOOL_CALLS_TAG, "{:.1f}"),
        ("loss", LOSS_TAG, "{:.4g}"),
        ("clip", CLIP_TAG, "{:.3f}"),
        ("eval EM", EVAL_EM_TAG, "{:.3f}"),
    )

    def __init__(self, fields: tuple[tuple[str, str, str], ...] | None = None, timing: bool = True):
        self.fields = self.FIELDS if fields is None else tuple(fields)
        self.timing = timing

    def format(self, metrics: Mapping[str, Any], step: int | None = None) -> str:
        parts = [] if step is None else [f"step {step}"]
        for label, tag, fmt in self.fields:
            value = _to_number(tag, metrics.get(tag))
            if value is not None:
                parts.append(f"{label} {fmt.format(value)}")
        if self.timing:
            times = [f"{tag[len(TIMING_PREFIX):-2]} {_to_number(tag, v):.3g}s" for tag, v in metrics.items()
                     if tag.startswith(TIMING_PREFIX) and tag.endswith("_s") and v is not None]
            if times:
                parts.append(" ".join(times))
        return " | ".join(parts)

    __call__ = format
