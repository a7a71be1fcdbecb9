"""FP8 linear layers without Transformer Engine (``actor/fp8.py``): speed of a linear layer's
forward + backward against bf16, numerical error, host syncs, and a loss curve against bf16.

    python benchmarks/fp8_linear.py                    # CPU: tiny shapes, FP8 emulated (numerics only)
    python benchmarks/fp8_linear.py --preset h200      # one GPU: Llama-3-8B MLP shapes, M = 8192 tokens

Speed. One call = ``y = linear(x, W)``, then ``y.backward(g)``: three GEMMs of M*K*N
multiply-adds each, 6*M*K*N FLOPs. Variants:

* ``bf16``: ``F.linear`` under autograd (cuBLAS), the baseline;
* ``fp8-tensorwise``, ``fp8-rowwise``: ``fp8.fp8_linear`` with an armed weight cache, i.e. the
  steady state of a train step (the weight pair is quantised once per optimizer step, so here
  once for all timed calls);
* ``fp8-tensorwise-nocache``: the weight re-quantised on every call (the cost a step with a single
  micro-batch pays);
* ``fp8-tensorwise-torchcast``: the casts in plain torch instead of the Triton cast+transpose kernel;
* ``fp8-gemm-only``: the three ``torch._scaled_mm`` calls on pre-quantised operands, the ceiling.

Numerics: relative L2 error of y, dx and dW against an fp32 computation, and on CUDA whether one
forward + backward ran under ``torch.cuda.set_sync_debug_mode("error")`` without a host sync.

Loss curve (``--loss-steps``): the same megatron GPTModel (local spec, SDPA) trained twice from the
same weights with AdamW on a learnable synthetic sequence task, once with bf16 (fp32 on CPU) linear
layers and once with ``model.fp8_backend=torch``; both curves, their largest relative gap, and
the tokens/s of each run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from atpo_megatron.actor import fp8  # noqa: E402

PRESETS = {
    # shapes M x K x N; loss-curve model; steps
    "cpu": dict(shapes="64x128x256,64x256x128", loss_model="tiny", loss_steps=12),
    "h200": dict(shapes="8192x4096x14336,8192x14336x4096,8192x4096x6144", loss_model="8b-layers", loss_steps=60),
}
LOSS_MODELS = {
    "tiny": dict(shape=dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
                 seq=64, batch=4, lr=3e-3),
    "small": dict(shape=dict(model_type="llama", vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                             num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False),
                  seq=1024, batch=8, lr=1e-3),
    # two Llama-3-8B layers, 8192 tokens per step: the FP8 GEMMs at the shapes above, inside a model
    "8b-layers": dict(shape=dict(model_type="llama", vocab_size=32768, hidden_size=4096, intermediate_size=14336,
                                 num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=8,
                                 tie_word_embeddings=False),
                      seq=2048, batch=4, lr=3e-4),
}
VARIANTS = ("bf16", "fp8-tensorwise", "fp8-rowwise", "fp8-tensorwise-nocache", "fp8-tensorwise-torchcast", "fp8-gemm-only")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: h200 on GPU, cpu otherwise")
    p.add_argument("--shapes", help="comma list of MxKxN")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--format", choices=["hybrid", "e4m3"], default="hybrid", help="model.fp8")
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--loss-model", choices=sorted(LOSS_MODELS))
    p.add_argument("--loss-steps", type=int, help="0 skips the loss curve")
    p.add_argument("--loss-scaling", choices=["tensorwise", "rowwise"], default="tensorwise")
    common.add_run_args(p, "fp8_linear")
    args = p.parse_args(argv)
    args.preset = args.preset or ("h200" if args.device.startswith("cuda") else "cpu")
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


# ------------------------------------------------------------------------------------------ one layer

def variant_fn(name: str, x, w, g, fmt: str):
    """A zero-argument callable doing one forward + backward of ``name``."""
    if name == "bf16":
        def run():
            y = F.linear(x, w)
            y.backward(g)
        return run
    if name == "fp8-gemm-only":
        r = fp8.Fp8Recipe(format=fmt)
        xq, xtq = fp8.cast_transpose(x.detach(), r.fwd_dtype, False)
        wq, wtq = fp8.cast_transpose(w.detach(), r.fwd_dtype, False)
        gq, gtq = fp8.cast_transpose(g, r.grad_dtype, False)

        def run():
            fp8.scaled_mm(xq, wq, x.dtype, fast_accum=True)
            fp8.scaled_mm(gq, wtq, x.dtype)
            fp8.scaled_mm(gtq, xtq, w.dtype)
        return run
    scaling = "rowwise" if "rowwise" in name else "tensorwise"
    recipe = fp8.Fp8Recipe(format=fmt, scaling=scaling, kernel="torch" if name.endswith("torchcast") else "auto")
    cache = fp8._WeightCache()
    cache.armed = not name.endswith("nocache")

    def run():
        y = fp8.fp8_linear(x, w, None, recipe, cache=cache)
        y.backward(g)
    return run


def errors(name: str, x, w, g, fmt: str) -> dict:
    """Relative errors of y, dx, dW against fp32."""
    if name == "fp8-gemm-only":
        return {}
    xr, wr = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    yr = F.linear(xr, wr)
    yr.backward(g.float())
    xa, wa = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    if name == "bf16":
        y = F.linear(xa, wa)
    else:
        scaling = "rowwise" if "rowwise" in name else "tensorwise"
        y = fp8.fp8_linear(xa, wa, None, fp8.Fp8Recipe(format=fmt, scaling=scaling,
                                                      kernel="torch" if name.endswith("torchcast") else "auto"))
    y.backward(g)
    return {"err_y": fp8.relative_error(y, yr), "err_dx": fp8.relative_error(xa.grad, xr.grad),
            "err_dw": fp8.relative_error(wa.grad, wr.grad)}


def host_sync_free(run, device: str) -> bool | None:
    """True if ``run`` did no host sync under CUDA's sync debug mode; None off CUDA."""
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
        return True
    except RuntimeError as exc:
        print(f"host sync detected: {exc}".splitlines()[0])
        return False
    finally:
        torch.cuda.set_sync_debug_mode("default")


def bench_shape(args, M: int, K: int, N: int) -> list[dict]:
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    x = torch.randn(M, K, device=args.device, dtype=dtype, generator=gen).requires_grad_()
    w = (torch.randn(N, K, device=args.device, dtype=dtype, generator=gen) * K ** -0.5).requires_grad_()
    g = torch.randn(M, N, device=args.device, dtype=dtype, generator=gen)
    rows, base = [], None
    for name in args.variants.split(","):
        run = variant_fn(name, x, w, g, args.format)
        times = common.time_it(run, args.device, repeat=args.repeat, warmup=args.warmup)
        t = min(times)
        row = {"shape": f"{M}x{K}x{N}", "variant": name, "ms": 1e3 * t, "tflops": 6 * M * K * N / t / 1e12,
               "times": times, **errors(name, x, w, g, args.format)}
        if name != "bf16" and name != "fp8-gemm-only":
            row["no_host_sync"] = host_sync_free(run, args.device)
        x.grad = w.grad = None
        if name == "bf16":
            base = t
        row["speedup_vs_bf16"] = base / t if base else None
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------ loss curve

def synthetic_batch(vocab: int, batch: int, seq: int, perm: torch.Tensor, gen: torch.Generator):
    """Sequences that follow a fixed permutation with prob 0.8 (else a random token): learnable."""
    ids = torch.empty(batch, seq + 1, dtype=torch.long)
    ids[:, 0] = torch.randint(0, vocab, (batch,), generator=gen)
    noise = torch.randint(0, vocab, (batch, seq), generator=gen)
    keep = torch.rand(batch, seq, generator=gen) < 0.8
    for t in range(seq):
        ids[:, t + 1] = torch.where(keep[:, t], perm[ids[:, t]], noise[:, t])
    return ids[:, :-1], ids[:, 1:]


def loss_curve(args) -> dict:
    from atpo_megatron.actor.model import build_model
    from atpo_megatron.actor.parallel import destroy_distributed, init_distributed
    from atpo_megatron.config import ModelConfig, ParallelConfig

    spec = LOSS_MODELS[args.loss_model]
    hf = common.hf_config(spec["shape"], max_positions=spec["seq"])
    dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    init_distributed(1, 1, seed=args.seed)
    base_cfg = ModelConfig(dtype=dtype, spec="local")
    fp8_cfg = ModelConfig(dtype=dtype, spec="local", fp8=args.format, fp8_backend="torch", fp8_scaling=args.loss_scaling)
    curves, speed, state = {}, {}, None
    for label, cfg in (("baseline", base_cfg), ("fp8", fp8_cfg)):
        torch.manual_seed(args.seed)
        models = build_model(hf, cfg, ParallelConfig())
        model = models[0].to(args.device)
        if state is None:
            state = {k: v.clone() if torch.is_tensor(v) else v for k, v in model.state_dict().items()}
        else:
            model.load_state_dict(state)
        opt = torch.optim.AdamW(model.parameters(), lr=spec["lr"], weight_decay=0.0)
        fp8.attach_optimizer(opt, models)
        gen = torch.Generator().manual_seed(args.seed)
        perm = torch.randperm(hf.vocab_size, generator=gen)
        pos = torch.arange(spec["seq"], device=args.device)[None].expand(spec["batch"], -1)
        losses, t_total = [], 0.0
        for _ in range(args.loss_steps):
            ids, labels = synthetic_batch(hf.vocab_size, spec["batch"], spec["seq"], perm, gen)
            common.sync(args.device)
            t0 = time.perf_counter()
            loss = model(ids.to(args.device), pos, None, labels=labels.to(args.device)).float().mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            common.sync(args.device)
            t_total += time.perf_counter() - t0
            losses.append(loss.item())
        curves[label] = losses
        speed[label] = spec["batch"] * spec["seq"] * args.loss_steps / t_total
        del models, model, opt
    destroy_distributed()
    base, low = curves["baseline"], curves["fp8"]
    gaps = [abs(a - b) / b for a, b in zip(low, base)]
    tail = max(1, len(base) // 5)
    return {"model": args.loss_model, "steps": args.loss_steps, "dtype": dtype, "scaling": args.loss_scaling,
            "baseline": base, "fp8": low, "max_relative_gap": max(gaps),
            "final_relative_gap": sum(gaps[-tail:]) / tail, "first_loss": base[0],
            "baseline_final": sum(base[-tail:]) / tail, "fp8_final": sum(low[-tail:]) / tail,
            "tokens_per_s": speed, "step_speedup": speed["fp8"] / speed["baseline"]}


# ------------------------------------------------------------------------------------------ main

def main(argv=None) -> dict:
    args = parse_args(argv)
    common.quiet()
    common.setup_cpu_threads()
    rows = []
    for shape in args.shapes.split(","):
        M, K, N = (int(v) for v in shape.lower().split("x"))
        rows += bench_shape(args, M, K, N)
    out = {"args": vars(args), "env": common.environment(args.device), "layers": rows,
           "triton_fallback": list(fp8._TRITON_BROKEN)}
    print(f"FP8 linear forward+backward ({args.format}), {out['env']['device']}"
          + ("" if args.device.startswith("cuda") else "  [CPU: FP8 GEMMs emulated, times are not FP8 speed]"))
    print(common.format_table(rows, [
        ("shape", "M x K x N", ""), ("variant", "variant", ""), ("ms", "ms", ".3f"), ("tflops", "TFLOP/s", ",.1f"),
        ("speedup_vs_bf16", "x bf16", ".2f"), ("err_y", "err y", ".4f"), ("err_dx", "err dx", ".4f"),
        ("err_dw", "err dW", ".4f"), ("no_host_sync", "no sync", "")]))
    if out["triton_fallback"]:
        print(f"Triton cast+transpose fell back to torch: {out['triton_fallback'][0]}")
    if args.loss_steps:
        lc = out["loss_curve"] = loss_curve(args)
        print(f"\nloss curve, {lc['model']} model, {lc['steps']} AdamW steps, {lc['dtype']} vs FP8 ({lc['scaling']}):")
        every = max(1, lc["steps"] // 8)
        shown = sorted(set(range(0, lc["steps"], every)) | {lc["steps"] - 1})
        print(common.format_table(
            [{"step": i, "baseline": lc["baseline"][i], "fp8": lc["fp8"][i]} for i in shown],
            [("step", "step", "d"), ("baseline", "baseline loss", ".4f"), ("fp8", "fp8 loss", ".4f")]))
        print(f"largest relative gap {100 * lc['max_relative_gap']:.2f}%, over the last fifth "
              f"{100 * lc['final_relative_gap']:.2f}%; loss {lc['first_loss']:.3f} -> {lc['baseline_final']:.3f} "
              f"(baseline) / {lc['fp8_final']:.3f} (fp8); step tokens/s fp8/baseline {lc['step_speedup']:.2f}x")
    common.write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
