"""Host memory of a checkpoint save: dp_reshardable vs fully_reshardable (CPU, DP ranks on gloo).

    python benchmarks/checkpoint_host_memory.py                          # 246 M parameters, DP 2, both formats
    python benchmarks/checkpoint_host_memory.py --shape small --ranks 1  # 78 M parameters, DP 1

Each format runs as its own torchrun job of ``--ranks`` gloo ranks (TP1 PP1, DP = ranks; bf16
parameters, megatron DDP and the distributed optimizer as the trainer builds them: one gradient
bucket per buffer, since the trainer does not overlap gradient reduction). One optimizer step
gives Adam its state. Then every rank measures how much its peak RSS grows during ``checkpoint.save`` over
its RSS just before (``VmHWM`` reset first). glibc's mmap threshold is pinned
(``MALLOC_MMAP_THRESHOLD_=65536``) so that freed tensors leave the RSS at once: the growth is what
the save holds, not the allocator's cache.

The result per format and rank kind (DP rank 0, the others) is bytes per parameter of the rank's
model shard; ``atpo_megatron.plan.memory.SAVE_HOST_BYTES_PER_PARAM`` holds them and ``atpo plan``
projects them onto a job. On a GPU the training state lives in device memory, so these host figures
come on top of the ranks' processes (and, with ``checkpoint.async_save``, of the device-to-host
copies of every shard, which ``atpo plan`` adds separately). Loading is not measured: on a CPU
``checkpoint.load`` exchanges the loaded tensors with ``all_gather_object`` (megatron's broadcast
exchange needs CUDA), which holds every DP rank's tensors on every rank, a CPU-only cost that says
nothing about a GPU job.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

SHAPES = {
    "default": dict(model_type="llama", vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                    num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False),
    "small": dict(model_type="llama", vocab_size=32000, hidden_size=512, intermediate_size=1408,
                  num_hidden_layers=16, num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False),
}
FORMATS = ("dp_reshardable", "fully_reshardable")


def worker(spec: dict) -> None:
    """One rank: build, one optimizer step, then measure the save."""
    import torch

    from actor_step import Seq
    from atpo_megatron import checkpoint
    from atpo_megatron.actor.model import build_model
    from atpo_megatron.actor.optimizer import build_optimizer, wrap_ddp
    from atpo_megatron.actor.parallel import destroy_distributed, init_distributed
    from atpo_megatron.actor.train_step import train_step
    from atpo_megatron.config import ModelConfig, OptimizerConfig, ParallelConfig

    common.quiet()
    common.setup_cpu_threads()
    init_distributed(1, 1, 1, seed=0)
    rank = torch.distributed.get_rank()
    hf = common.hf_config(SHAPES[spec["shape"]])
    models = wrap_ddp(build_model(hf, ModelConfig(dtype="bfloat16", spec="local"), ParallelConfig()))
    optimizer, scheduler = build_optimizer(models, OptimizerConfig(lr=1e-5, min_lr=1e-5), total_steps=10)
    seqs = [Seq(list(range(1, 9)), list(range(9, 17)), [1] * 8, [1.0 if i % 2 else -1.0] * 8) for i in range(2)]
    for s in seqs:
        s.old_logprobs = [-5.0] * 8
    train_step(models, optimizer, seqs, "atpo", {"clip_low": 0.2, "clip_high": 0.2}, max_tokens=64)
    params = sum(p.numel() for m in models for p in m.parameters())

    def measured(fn) -> tuple[int, float]:
        gc.collect()
        torch.distributed.barrier()
        before = common.rss_bytes()
        common.reset_peak_rss()
        t0 = time.perf_counter()
        fn()
        seconds = time.perf_counter() - t0
        grown = common.peak_rss_bytes() - before
        torch.distributed.barrier()
        return grown, seconds

    ckpt = Path(spec["ckpt"])
    training_rss = common.rss_bytes()
    save_grown, save_s = measured(lambda: checkpoint.save(ckpt, 1, models, optimizer, scheduler,
                                                          optim_sharding=spec["format"]))
    result = {"rank": rank, "params": params, "training_rss_gib": training_rss / 2**30,
              "save_grown_bytes": save_grown, "save_s": save_s}
    (Path(spec["out"]) / f"rank{rank}.json").write_text(json.dumps(result))
    destroy_distributed()


def run_format(shape: str, fmt: str, ranks: int, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="atpo_ckpt_mem_") as tmp:
        spec = {"shape": shape, "format": fmt, "ckpt": f"{tmp}/ckpt", "out": tmp}
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(common.REPO_ROOT), os.environ.get("PYTHONPATH")]))}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
               __file__, "--worker", json.dumps(spec)]
        # Own session, killed as a group afterwards: the checkpoint writer's multiprocessing helpers
        # outlive the ranks and would keep the output pipe open.
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=timeout)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.returncode != 0:
            raise RuntimeError(f"{fmt} failed:\n{output[-6000:]}")
        ranks = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(ranks)]
        size = sum(f.stat().st_size for f in Path(spec["ckpt"]).rglob("*") if f.is_file())
        shutil.rmtree(spec["ckpt"], ignore_errors=True)
    for r in ranks:
        r["save_bytes_per_param"] = r["save_grown_bytes"] / r["params"]
    return {"format": fmt, "checkpoint_bytes": size, "ranks": ranks}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="default")
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--ranks", type=int, default=2, help="data-parallel ranks (default 2)")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--json", default=common.default_json("checkpoint_host_memory"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return {}
    results = [run_format(args.shape, fmt, args.ranks, args.timeout) for fmt in args.formats.split(",")]
    rows = [{"format": r["format"], "rank": x["rank"], "params_m": x["params"] / 1e6,
             "rss_gib": x["training_rss_gib"], "save_gib": x["save_grown_bytes"] / 2**30,
             "save_bpp": x["save_bytes_per_param"], "save_s": x["save_s"]}
            for r in results for x in r["ranks"]]
    print(f"checkpoint host memory, shape {args.shape}, {args.ranks} ranks (DP{args.ranks}), "
          f"bf16 + fp32 Adam, {os.uname().nodename}, "
          f"load {os.getloadavg()[0]:.1f}")
    print(common.format_table(rows, [("format", "format", ""), ("rank", "DP rank", ""), ("params_m", "params (M)", ".1f"),
                                     ("rss_gib", "training RSS GiB", ".2f"), ("save_gib", "save +GiB", ".3f"),
                                     ("save_bpp", "save B/param", ".2f"), ("save_s", "save s", ".1f")]))
    out = {"shape": SHAPES[args.shape], "ranks": args.ranks, "env": common.environment("cpu"),
           "results": results}
    common.write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
