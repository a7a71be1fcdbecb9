"""Helpers shared by the benchmarks: model shapes, timing, tables, JSON, device facts.

Every benchmark prints a table and writes its results as JSON to ``--json`` (default
``$OUT/<name>.json`` when ``OUT`` is set, else ``runs/bench/<name>.json``).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python benchmarks/x.py` from anywhere
    sys.path.insert(0, str(REPO_ROOT))

# Hugging Face shapes (random weights). "smollm2" is the real bundled model where a benchmark needs
# one (weights, tokenizer); elsewhere its shape.
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "smollm2": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    # Qwen2-0.5B: 494 M parameters, tied embeddings, q/k/v biases
    "0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    # Llama-3-8B
    "8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False, rope_theta=500000.0),
}

# Datasheet HBM bandwidth, bytes/s (the bound a weight copy is measured against).
MEMORY_BANDWIDTH = {
    "H200": 4.8e12, "H100 SXM": 3.35e12, "H100 80GB HBM3": 3.35e12, "H100 NVL": 3.9e12, "H100 PCIe": 2.0e12,
    "A100-SXM4-80GB": 2.039e12, "A100 80GB PCIe": 1.935e12, "A100-SXM4-40GB": 1.555e12, "B200": 8.0e12,
    "L40S": 0.864e12,
}


def hf_config(shape: str | dict, max_positions: int = 4096):
    """A transformers config (LlamaConfig / Qwen2Config) for a name in SHAPES or a dict of fields."""
    from transformers import AutoConfig

    fields = dict(SHAPES[shape]) if isinstance(shape, str) else dict(shape)
    model_type = fields.pop("model_type")
    fields.setdefault("max_position_embeddings", max_positions)
    return AutoConfig.for_model(model_type, **fields)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_json(name: str) -> str:
    return str(Path(os.environ.get("OUT") or "runs/bench") / f"{name}.json")


def add_run_args(parser, name: str) -> None:
    parser.add_argument("--device", default=default_device(), help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=default_json(name), help="where to write the results (default $OUT or runs/bench)")


def setup_cpu_threads() -> None:
    """On CPU, honour OMP_NUM_THREADS (the shared machines have 2 cores)."""
    if "OMP_NUM_THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def quiet() -> None:
    """Silence megatron's and transformers' warnings so the tables stay readable."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("megatron", "transformers", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)


def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_it(fn: Callable[[], Any], device: str | torch.device, repeat: int = 5, warmup: int = 1) -> list[float]:
    """Wall seconds of ``repeat`` calls of ``fn`` after ``warmup`` untimed ones (device synced around each)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def device_name(device: str | torch.device) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def datasheet_bandwidth(device: str | torch.device) -> float:
    """Datasheet memory bandwidth of a known GPU in bytes/s; 0 for CPUs and unknown devices."""
    if torch.device(device).type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name()
    for key in sorted(MEMORY_BANDWIDTH, key=len, reverse=True):  # longest (most specific) match first
        if key in name:
            return MEMORY_BANDWIDTH[key]
    return 0.0


def copy_bandwidth(device: str | torch.device, nbytes: int, repeat: int = 5) -> float:
    """Measured device-to-device copy rate in bytes/s, counting the bytes read plus the bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    t = min(time_it(lambda: dst.copy_(src), device, repeat=repeat, warmup=1))
    del src, dst
    return 2 * nbytes / t


def environment(device: str | torch.device) -> dict[str, Any]:
    return {"device": device_name(device), "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "load_average": os.getloadavg()[0]}


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """``columns``: (key, header, format spec like ',.0f' or '' for str). Missing values print '-'."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        line = []
        for key, _, spec in columns:
            v = r.get(key)
            line.append("-" if v is None else (format(v, spec) if spec else str(v)))
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    out = []
    for k, line in enumerate(cells):
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def rss_bytes() -> int:
    """This process's resident memory now (Linux ``VmRSS``)."""
    return _status_kib("VmRSS") << 10


def reset_peak_rss() -> None:
    """Restart the peak-RSS counter (``VmHWM``) at the current RSS (Linux: write 5 to clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    """This process's peak resident memory since the last :func:`reset_peak_rss` (``VmHWM``)."""
    return _status_kib("VmHWM") << 10


def write_json(path: str | Path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"wrote {path}")
    return path


class ByteTokenizer:
    """A tokenizer for random-weight models: one id per UTF-8 byte (0..255), then EOS and PAD.

    It has what the engine and the agent loop use (encode/decode, a chat template, EOS/PAD ids,
    ``len``), so rollouts run with no tokenizer files (the GPU machine has none). The engine samples
    only ids below ``len(tokenizer)``, whatever the model's vocabulary.
    """

    eos_token_id = 256
    pad_token_id = 257
    eos_token = "<eos>"

    def __len__(self) -> int:
        return 258

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = True,
                            return_dict: bool = False, **_):
        text = "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)
        text += "<assistant>" if add_generation_prompt else ""
        return self.encode(text) if tokenize else text


def random_hf_model(config, device: str | torch.device, dtype: torch.dtype):
    """A randomly initialised transformers causal LM built directly on ``device``."""
    from transformers import AutoModelForCausalLM

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in the target dtype (an 8B model in fp32 would double the memory)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(dtype).eval()
