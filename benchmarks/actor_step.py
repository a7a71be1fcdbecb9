"""Throughput of the Megatron actor's training step and log-prob pass, SDPA vs megatron's unfused attention.

    python benchmarks/actor_step.py                                   # tiny shape, CPU, a few seconds
    python benchmarks/actor_step.py --preset 1.3b --dtype bfloat16    # one GPU
    torchrun --nproc-per-node 8 benchmarks/actor_step.py --preset 8b --dtype bfloat16 --tp 2 --pp 2 --attention sdpa

Each attention spec builds the model (random weights, Llama shape from the flags), recomputes the
old log-probs once (``compute_logprobs``, timed as the "logprobs" row), then runs ``--steps`` timed
``train_step`` calls (ATPO loss, micro-batches through megatron's schedule, Adam or SGD) after
``--warmup`` untimed ones. Every sequence is ``--seq-len`` input tokens (a quarter prompt, then a
response with one masked tool gap), ``--micro-batch`` sequences per micro-batch and
``--micro-batches`` micro-batches per DP rank per step.

Model FLOPs are ``metrics.model_flops_per_token``: 6·N + 6·L·d·seq per token (N = parameters
without the input embedding; causal attention), 1/3 of it for the forward-only pass. MFU divides by
``--peak-tflops`` (default: the GPU's datasheet bf16/fp32 peak, 0 on CPU, so MFU reads 0). Peak
memory is ``torch.cuda.max_memory_allocated`` per spec on GPU, the process's peak RSS on CPU
(cumulative over the specs of one run). Results are printed as a table and written as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import time
import warnings
from pathlib import Path

import torch

PRESETS = {
    # name: layers, hidden, heads, kv heads, ffn, vocab, seq len, micro-batch, micro-batches
    "tiny": dict(layers=2, hidden=64, heads=4, kv_heads=2, ffn=128, vocab=512, seq_len=128, micro_batch=2, micro_batches=2),
    "1.3b": dict(layers=24, hidden=2048, heads=16, kv_heads=16, ffn=5632, vocab=32000, seq_len=4096, micro_batch=2, micro_batches=2),
    "8b": dict(layers=32, hidden=4096, heads=32, kv_heads=8, ffn=14336, vocab=128256, seq_len=4096, micro_batch=1, micro_batches=2),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model and batch shape (default tiny); flags below override it")
    g = p.add_argument_group("model shape (Llama: RMSNorm, SwiGLU, RoPE, GQA, untied embeddings)")
    g.add_argument("--layers", type=int)
    g.add_argument("--hidden", type=int)
    g.add_argument("--heads", type=int)
    g.add_argument("--kv-heads", type=int, help="key/value heads (GQA groups)")
    g.add_argument("--ffn", type=int, help="MLP intermediate size")
    g.add_argument("--vocab", type=int)
    g = p.add_argument_group("batch")
    g.add_argument("--seq-len", type=int, help="input tokens per sequence")
    g.add_argument("--micro-batch", type=int, help="sequences per micro-batch")
    g.add_argument("--micro-batches", type=int, help="micro-batches per DP rank per step (>= pp for a full pipeline)")
    g = p.add_argument_group("parallelism and precision")
    g.add_argument("--tp", type=int, default=1)
    g.add_argument("--pp", type=int, default=1)
    g.add_argument("--vpp", type=int, default=1, help="virtual pipeline stages per rank (interleaved 1F1B)")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: bfloat16 on GPU, float32 on CPU")
    g.add_argument("--recompute", choices=["none", "selective", "full"], default="none")
    g.add_argument("--optimizer", choices=["adam", "sgd"], default="adam",
                   help="adam: the actor's (distributed) Adam; sgd: no optimizer state (fits 8B on one GPU)")
    g = p.add_argument_group("run")
    g.add_argument("--attention", choices=["both", "sdpa", "unfused"], default="both",
                   help="core attention of the local spec; both = run each and print the ratio")
    g.add_argument("--steps", type=int, default=3, help="timed train steps per spec")
    g.add_argument("--warmup", type=int, default=1, help="untimed train steps first")
    g.add_argument("--peak-tflops", type=float, default=None, help="per-device peak for MFU (default: detected; 0 on CPU)")
    g.add_argument("--json", default="runs/bench/actor_step.json", help="where to write the results")
    g.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.dtype is None:
        args.dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    return args


def hf_config(args):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
                       num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                       max_position_embeddings=max(args.seq_len + 1, 2048), tie_word_embeddings=False)


class Seq:
    def __init__(self, prompt_ids, response_ids, loss_mask, advantages):
        self.prompt_ids, self.response_ids = prompt_ids, response_ids
        self.loss_mask, self.advantages, self.old_logprobs = loss_mask, advantages, None


def make_sequences(args, n: int, generator: torch.Generator) -> list[Seq]:
    """n sequences of seq_len input tokens: prompt = a quarter, then a response with a masked tool gap."""
    total = args.seq_len + 1  # input = all but the last token
    P = max(1, total // 4)
    R = total - P
    gap = slice(R // 2, R // 2 + min(16, R // 8))
    seqs = []
    for i in range(n):
        ids = torch.randint(0, args.vocab, (total,), generator=generator).tolist()
        mask = [1] * R
        mask[gap] = [0] * len(mask[gap])
        adv = 1.0 if i % 2 else -1.0
        seqs.append(Seq(ids[:P], ids[P:], mask, [adv * m for m in mask]))
    return seqs


def peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build(args, attention: str):
    from atpo_megatron.actor.model import build_model
    from atpo_megatron.actor.optimizer import build_optimizer, megatron_optimizer_config, wrap_ddp
    from atpo_megatron.config import ModelConfig, OptimizerConfig, ParallelConfig

    model_cfg = ModelConfig(dtype=args.dtype, spec="local", attention=attention, recompute=args.recompute)
    models = build_model(hf_config(args), model_cfg, ParallelConfig(tp=args.tp, pp=args.pp, vpp=args.vpp))
    models = wrap_ddp(models, use_distributed_optimizer=args.optimizer == "adam")
    opt_cfg = OptimizerConfig(lr=1e-6, min_lr=1e-6, distributed_optimizer=args.optimizer == "adam")
    if args.optimizer == "adam":
        optimizer, _ = build_optimizer(models, opt_cfg, total_steps=args.steps + args.warmup)
    else:
        from megatron.core.optimizer import get_megatron_optimizer
        from megatron.core.utils import get_model_config

        mcfg = megatron_optimizer_config(opt_cfg, bf16=args.dtype == "bfloat16")
        mcfg.optimizer, mcfg.sgd_momentum = "sgd", 0.0
        optimizer = get_megatron_optimizer(mcfg, models)
        get_model_config(models[0]).grad_scale_func = optimizer.scale_loss
    return models, optimizer


def run_spec(args, attention: str, dp: int) -> dict:
    from megatron.core import parallel_state as ps

    from atpo_megatron import metrics as M
    from atpo_megatron.actor.train_step import compute_logprobs, train_step

    torch.manual_seed(args.seed)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    models, optimizer = build(args, attention)
    budget = args.micro_batch * args.seq_len
    n_seqs = args.micro_batch * args.micro_batches * dp
    seqs = make_sequences(args, n_seqs, torch.Generator().manual_seed(args.seed))
    hf = hf_config(args)
    tokens = n_seqs * args.seq_len  # input tokens of one step, all DP ranks
    n_dev = torch.distributed.get_world_size()
    peak = args.peak_tflops if args.peak_tflops is not None else M.detect_peak_tflops(args.dtype)
    flops = M.model_flops_per_token(hf, args.seq_len)

    _sync()
    t0 = time.perf_counter()
    old = compute_logprobs(models, seqs, max_tokens=budget, vocab_size=args.vocab)
    _sync()
    t_fwd = time.perf_counter() - t0
    for s, lp in zip(seqs, old):
        s.old_logprobs = lp.tolist()
    step = lambda: train_step(models, optimizer, seqs, "atpo", {"clip_low": 0.2, "clip_high": 0.2},  # noqa: E731
                              max_tokens=budget, vocab_size=args.vocab)
    for _ in range(args.warmup):
        step()
    _sync()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        m = step()
        _sync()
        times.append(time.perf_counter() - t0)
    t_step = sum(times) / len(times)
    train = M.throughput(tokens, t_step, flops, n_dev, peak)
    fwd = M.throughput(tokens, t_fwd, flops / 3.0, n_dev, peak)
    result = {
        "attention": attention,
        "train": {**train, "s_per_step": t_step, "step_times": times, "loss": m["actor/pg_loss"],
                  "grad_norm": m["actor/grad_norm"], "micro_batches": m["actor/micro_batches"]},
        "logprobs": {**fwd, "s": t_fwd},
        "peak_memory_gib": peak_memory_gib(),
        "peak_memory_kind": "cuda max_memory_allocated" if torch.cuda.is_available() else "process peak RSS (cumulative)",
    }
    del models, optimizer
    ps.destroy_model_parallel()
    return result


def table(results: list[dict]) -> str:
    head = f"{'attention':<9} {'pass':<9} {'tokens/s':>11} {'TFLOP/s/dev':>12} {'MFU':>7} {'s/step':>9} {'peak GiB':>9}"
    lines = [head, "-" * len(head)]
    for r in results:
        for name in ("train", "logprobs"):
            x = r[name]
            secs = x.get("s_per_step", x.get("s"))
            lines.append(f"{r['attention']:<9} {name:<9} {x['tokens_per_s']:>11.1f} {x['tflops_per_device']:>12.4f} "
                         f"{100 * x['mfu']:>6.2f}% {secs:>9.4f} {r['peak_memory_gib']:>9.3f}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("megatron").setLevel(logging.ERROR)
    if not torch.cuda.is_available():
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    from atpo_megatron.actor.parallel import destroy_distributed, init_distributed

    specs = ["sdpa", "unfused"] if args.attention == "both" else [args.attention]
    dp = None
    results = []
    for spec in specs:
        dp = init_distributed(tp=args.tp, pp=args.pp, vpp=args.vpp, seed=args.seed)
        results.append(run_spec(args, spec, dp))
    rank = torch.distributed.get_rank()
    destroy_distributed()
    out = {"args": vars(args), "dp": dp, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "results": results}
    if len(results) == 2:
        out["sdpa_over_unfused_train_tokens_per_s"] = results[0]["train"]["tokens_per_s"] / results[1]["train"]["tokens_per_s"]
    if rank == 0:
        shape = (f"{args.layers} layers, hidden {args.hidden}, heads {args.heads}/{args.kv_heads}, ffn {args.ffn}, "
                 f"vocab {args.vocab}; seq {args.seq_len} x micro-batch {args.micro_batch} x {args.micro_batches} "
                 f"micro-batches x dp {dp}; tp {args.tp} pp {args.pp} vpp {args.vpp}; {args.dtype}; {out['device']}")
        print(shape)
        print(table(results))
        if "sdpa_over_unfused_train_tokens_per_s" in out:
            print(f"sdpa / unfused train tokens/s: {out['sdpa_over_unfused_train_tokens_per_s']:.2f}x")
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2))
        print(f"wrote {path}")
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
