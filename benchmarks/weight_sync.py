"""Weight sync speed: every weight from the Megatron actor's layout into the rollout engine, against
the memory-bandwidth bound of the device.

    python benchmarks/weight_sync.py                          # tiny random model, CPU, seconds
    python benchmarks/weight_sync.py --model smollm2          # the real SmolLM2 weights, CPU
    python benchmarks/weight_sync.py --model 8b               # an 8B-shaped model, one GPU (colocated)

One process holds both sides, as in colocated training: the megatron ``GPTModel`` (TP = PP = 1,
bf16 on GPU / fp32 on CPU) and an ``HFEngine`` over a transformers model of the same shape.
``weights.sync.sync_weights(export_hf_weights(models), engine)`` is timed end to end
(``--repeat`` times after a warm-up), then its two halves: the export alone (megatron -> HF names
and layout; at TP = PP = 1 the q/k/v split and the gate/up split are copies) and the engine's
``load_weights`` alone from already exported tensors. After the sync every engine tensor is
compared with the exported one (a sync that skipped or mangled a tensor fails loudly).

The bound. A sync must read every weight once and write it once, 2 * N bytes of memory traffic for
N bytes of weights, so it cannot beat ``2 N / B`` seconds at bandwidth B. Reported: weights GB/s
(N / t), the traffic rate 2 N / t as a fraction of the datasheet bandwidth (GPUs; 0 = unknown) and
of the measured copy rate (``dst.copy_(src)`` of the same size on this device), and N / t over the
datasheet bandwidth, the issue's literal figure (at most 0.5 for any copy).

Transports into vLLM (``--vllm``; needs an HF folder: ``--model smollm2``, or a shape that is saved
to a temporary folder first): the same export streamed into a real ``VLLMEngine`` in each executor
mode this machine can run, timed the same way and reported as weights GB/s beside the copy rate:
``vllm-mp`` (child processes: byte transport on CPU, CUDA IPC on GPU) and ``vllm-inprocess``
(``external_launcher``: device tensors handed over), both through vLLM's layer-wise reload.
``--ipc`` (GPU only, no vLLM needed): the CUDA IPC transport alone, our packed buffer shared with a
child process that maps it and clones every tensor out, as a vLLM worker does.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help=f"a random-weight shape ({', '.join(common.SHAPES)}); "
                                                   "smollm2 loads the real bundled weights")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--bucket-mb", type=int, default=512, help="sync bucket size (rollout.sync_bucket_mb)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--vllm", default="", help="comma list of vllm-mp, vllm-inprocess: sync into real vLLM engines too")
    p.add_argument("--ipc", action="store_true", help="GPU: time the CUDA IPC transport alone (no vLLM needed)")
    common.add_run_args(p, "weight_sync")
    args = p.parse_args(argv)
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    return args


def build(args):
    """(megatron models, engine) of the same shape; real SmolLM2 weights on both sides for smollm2."""
    from atpo_megatron.actor.model import build_model
    from atpo_megatron.config import ModelConfig, ParallelConfig
    from atpo_megatron.rollout.hf_engine import HFEngine
    from atpo_megatron.weights.hf_bridge import load_hf_weights

    dtype = getattr(torch, args.dtype)
    if args.model == "smollm2":
        from transformers import AutoConfig

        from atpo_megatron.model_files import resolve_model

        path = resolve_model("smollm2")
        config = AutoConfig.from_pretrained(path)
        engine = HFEngine(path, device=args.device, dtype=dtype)
    else:
        config = common.hf_config(args.model)
        engine = HFEngine(common.random_hf_model(config, args.device, dtype), common.ByteTokenizer(),
                          device=args.device, dtype=dtype, eos_token_ids=[])
        path = None
    models = build_model(config, ModelConfig(dtype=args.dtype, spec="local"), ParallelConfig())
    if path is not None:
        load_hf_weights(models, path)
    return models, engine


def bytes_of(tensors) -> int:
    return sum(t.numel() * t.element_size() for _, t in tensors)


def main(argv=None) -> dict:
    args = parse_args(argv)
    common.quiet()
    common.setup_cpu_threads()
    from atpo_megatron.actor.parallel import destroy_distributed, init_distributed
    from atpo_megatron.weights.hf_bridge import export_hf_weights
    from atpo_megatron.weights.sync import sync_weights

    init_distributed(1, 1, seed=args.seed)
    models, engine = build(args)
    for m in models:
        m.to(args.device)
    bucket = args.bucket_mb << 20
    dev = args.device

    stats = []
    full = common.time_it(lambda: stats.append(sync_weights(export_hf_weights(models), engine)), dev,
                          repeat=args.repeat, warmup=args.warmup)
    exported: list = []

    def export_all():
        exported[:] = list(export_hf_weights(models))

    export = common.time_it(export_all, dev, repeat=args.repeat, warmup=args.warmup)
    load = common.time_it(lambda: engine.load_weights(exported), dev, repeat=args.repeat, warmup=args.warmup)

    # every engine tensor must equal what the exporter produced
    params = dict(engine.model.named_parameters())
    tied = getattr(engine.model.config, "tie_word_embeddings", False)
    worst = 0.0
    for name, t in exported:
        p = params.get(name) if not (tied and name == "lm_head.weight") else engine.model.get_input_embeddings().weight
        if p is None:
            raise SystemExit(f"the engine has no parameter {name}: the sync is broken")
        worst = max(worst, (p.float() - t.float()).abs().max().item())
    nbytes = bytes_of(exported)
    t_sync = min(full)
    datasheet = common.datasheet_bandwidth(dev)
    copy_bw = common.copy_bandwidth(dev, min(nbytes, 2 << 30), repeat=args.repeat)  # size-independent past ~1 GB
    gbps = nbytes / t_sync / 1e9
    result = {
        "model": args.model, "dtype": args.dtype, "tensors": len(exported), "gb": nbytes / 1e9, "buckets": stats[-1].buckets,
        "sync_s": t_sync, "sync_times": full, "export_s": min(export), "load_s": min(load),
        "weights_gb_per_s": gbps, "datasheet_gb_per_s": datasheet / 1e9, "copy_gb_per_s": copy_bw / 1e9,
        "traffic_fraction_of_datasheet": 2 * gbps * 1e9 / datasheet if datasheet else None,
        "traffic_fraction_of_copy": 2 * gbps * 1e9 / copy_bw,
        "weights_fraction_of_datasheet": gbps * 1e9 / datasheet if datasheet else None,
        "bound_s": 2 * nbytes / (datasheet or copy_bw), "max_abs_diff_after_sync": worst,
    }
    out = {"args": vars(args), "env": common.environment(dev), "result": result, "transports": []}
    if args.ipc:
        out["transports"].append(ipc_transport(exported, bucket, copy_bw, args))
    # in-process last: closing it tears torch.distributed down with vLLM's own groups
    for mode in sorted(filter(None, args.vllm.split(",")), key=lambda m: m == "vllm-inprocess"):
        out["transports"].append(vllm_transport(models, mode, bucket, copy_bw, args))
    print(f"weight sync megatron -> engine: {args.model}, {args.dtype}, {result['tensors']} tensors, "
          f"{result['gb']:.3f} GB, bucket {args.bucket_mb} MB, {out['env']['device']}")
    print(common.format_table([result], [
        ("sync_s", "sync s", ".4f"), ("export_s", "export s", ".4f"), ("load_s", "load s", ".4f"),
        ("weights_gb_per_s", "weights GB/s", ",.2f"), ("copy_gb_per_s", "copy GB/s", ",.1f"),
        ("datasheet_gb_per_s", "datasheet GB/s", ",.0f"), ("traffic_fraction_of_copy", "2N/t / copy", ".2f"),
        ("traffic_fraction_of_datasheet", "2N/t / datasheet", ".2f"),
        ("weights_fraction_of_datasheet", "N/t / datasheet", ".2f"), ("bound_s", "bound s", ".4f")]))
    print(f"max |engine - exported| after sync: {worst:g}")
    if out["transports"]:
        print(common.format_table(out["transports"], [
            ("transport", "transport", ""), ("seconds", "sync s", ".3f"), ("weights_gb_per_s", "weights GB/s", ",.2f"),
            ("fraction_of_copy", "2N/t / copy", ".3f"), ("buckets", "buckets", "d"), ("start_s", "engine start s", ".1f")]))
    common.write_json(args.json, out)
    destroy_distributed()
    return out


def hf_folder(models, args) -> Path:
    """The model as an HF folder vLLM can open (SmolLM2's own; a random shape saved from the actor)."""
    from atpo_megatron.model_files import resolve_model

    if args.model == "smollm2":
        return Path(resolve_model("smollm2"))
    import tempfile

    from transformers import AutoTokenizer

    from atpo_megatron.weights.hf_bridge import save_hf_checkpoint

    folder = Path(tempfile.mkdtemp(prefix="atpo_bench_sync_"))
    save_hf_checkpoint(models, folder, common.hf_config(args.model), None)
    AutoTokenizer.from_pretrained(resolve_model("smollm2")).save_pretrained(folder)  # vLLM needs one
    return folder


def vllm_transport(models, mode: str, bucket: int, copy_bw: float, args) -> dict:
    """Export -> a real VLLMEngine, timed like the hf engine above."""
    import os

    from atpo_megatron.rollout.vllm_engine import VLLMEngine
    from atpo_megatron.weights.hf_bridge import export_hf_weights
    from atpo_megatron.weights.sync import sync_weights

    executor = {"vllm-mp": "mp", "vllm-inprocess": "external_launcher"}[mode]
    if executor == "external_launcher":  # vLLM reads torchrun's variables; we are a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    t0 = time.perf_counter()
    engine = VLLMEngine(hf_folder(models, args), enable_sleep=False, max_model_len=1024, dtype=getattr(torch, args.dtype),
                        weight_bucket_bytes=bucket, executor=executor,
                        kv_cache_memory_bytes=0 if args.device.startswith("cuda") else 256 << 20)
    start = time.perf_counter() - t0
    stats = []
    times = common.time_it(lambda: stats.append(sync_weights(export_hf_weights(models), engine)), args.device,
                           repeat=args.repeat, warmup=args.warmup)
    engine.close()
    gbps = stats[-1].bytes / min(times) / 1e9
    return {"transport": f"{mode} ({engine.transport})", "seconds": min(times), "times": times,
            "weights_gb_per_s": gbps, "fraction_of_copy": 2 * gbps * 1e9 / copy_bw, "buckets": stats[-1].buckets,
            "start_s": start}


def ipc_transport(exported, bucket: int, copy_bw: float, args) -> dict:
    """Our CUDA IPC transport between two processes, without vLLM: producer here, consumer spawned."""
    import torch.multiprocessing as mp

    from atpo_megatron.rollout.vllm_weights import encode

    if not args.device.startswith("cuda"):
        raise SystemExit("--ipc needs a GPU")
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_ipc_consumer, args=(child, torch.cuda.current_device()))
    proc.start()

    def send_all():
        for payload, _ in encode(iter(exported), "cuda_ipc", bucket, verify=False):
            parent.send(payload)
            parent.recv()  # the consumer cloned it: the buffer may be refilled
    times = common.time_it(send_all, args.device, repeat=args.repeat, warmup=args.warmup)
    parent.send(None)
    proc.join()
    gbps = bytes_of(exported) / min(times) / 1e9
    return {"transport": "cuda_ipc (raw)", "seconds": min(times), "times": times, "weights_gb_per_s": gbps,
            "fraction_of_copy": 2 * gbps * 1e9 / copy_bw}


class _Rebuilt:
    """The consumer's mapping of the producer's buffer, made once (what vLLM's PackedBufferImporter does)."""

    def __init__(self):
        self.key, self.tensor = None, None

    def rebuild(self, args):
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        if tuple(args) != self.key:
            self.key, self.tensor = tuple(args), rebuild_cuda_tensor(*args)
        return self.tensor


def _ipc_consumer(conn, device_index: int) -> None:
    from atpo_megatron.rollout.vllm_weights import decode

    torch.cuda.set_device(device_index)
    importer = _Rebuilt()
    while (payload := conn.recv()) is not None:
        decode(payload, torch.device("cuda", device_index), importer)
        torch.cuda.synchronize()
        conn.send(True)


if __name__ == "__main__":
    main()
