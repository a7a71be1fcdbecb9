"""``atpo convert``: Megatron checkpoints <-> Hugging Face folders.

    atpo convert --to-hf runs/x/checkpoints OUT_DIR              # latest complete checkpoint -> HF
    atpo convert --to-hf runs/x/checkpoints/step_000100 OUT_DIR  # a given step
    atpo convert --from-hf MODEL CKPT_DIR parallel.tp=2 parallel.pp=2 --nproc-per-node 4
    atpo convert --optim-sharding fully_reshardable runs/x/checkpoints NEW_DIR --nproc-per-node 8

``--to-hf`` writes sharded safetensors, ``config.json`` and the tokenizer, which transformers loads
directly. It reads the checkpoint's own ``config.yaml`` for the model, so it runs in any layout
(one process is enough: dist_checkpointing reshards on load). ``--from-hf`` writes a weights-only
step-0 checkpoint in the requested TP/PP layout; ``atpo train ... checkpoint.dir=CKPT_DIR`` then
starts from it with a fresh optimizer. ``--optim-sharding FORMAT`` rewrites a training checkpoint
(weights, optimizer, scheduler, RNG, step and extra) with the optimizer in another format, e.g. a
``dp_reshardable`` one as ``fully_reshardable`` before a resume with another TP or PP; it must run
with the layout and the number of ranks that saved the checkpoint (its record says which).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from atpo_megatron.config import Config, ConfigError, load_config


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--to-hf", action="store_true", help="SOURCE is a checkpoint (folder or step folder)")
    mode.add_argument("--from-hf", action="store_true", help="SOURCE is a model (HF folder or bundled name)")
    mode.add_argument("--optim-sharding", choices=["fully_reshardable", "dp_reshardable"],
                      help="SOURCE is a training checkpoint: rewrite it with the optimizer in this format "
                           "(run with the ranks and layout that saved it)")
    parser.add_argument("source", help="checkpoint folder / step folder (--to-hf, --optim-sharding), or model (--from-hf)")
    parser.add_argument("target", help="output folder")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="--from-hf: config overrides for the layout (parallel.tp=2 parallel.pp=2 ...)")
    parser.add_argument("--nproc-per-node", type=int, default=0, help="launch this many ranks with torchrun")


def convert_main(args: argparse.Namespace) -> int:
    if args.nproc_per_node and "RANK" not in os.environ:
        mode = ["--to-hf"] if args.to_hf else ["--from-hf"] if args.from_hf else ["--optim-sharding", args.optim_sharding]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={args.nproc_per_node}", "-m", "atpo_megatron.cli", "convert",
               *mode, args.source, args.target, *args.overrides]
        return subprocess.call(cmd)
    if args.to_hf:
        to_hf(Path(args.source), Path(args.target))
    elif args.optim_sharding:
        reshard_optimizer(Path(args.source), Path(args.target), args.optim_sharding)
    else:
        from_hf(args.source, Path(args.target), load_config(None, [f"model.name_or_path={args.source}", *args.overrides]))
    return 0


def _setup(cfg: Config):
    """Process groups, the model in ``cfg``'s layout, and its HF config."""
    from transformers import AutoConfig

    from atpo_megatron.actor.model import build_model
    from atpo_megatron.actor.parallel import init_distributed
    from atpo_megatron.model_files import resolve_model

    init_distributed(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.vpp, seed=cfg.train.seed)
    model_dir = resolve_model(cfg.model.name_or_path)
    hf_config = AutoConfig.from_pretrained(model_dir)
    return build_model(hf_config, cfg.model, cfg.parallel), hf_config, model_dir


def _step_dir(source: Path) -> Path:
    """``source`` when it is a complete step folder, else the newest complete one in it."""
    from atpo_megatron import checkpoint

    step_dir = source if checkpoint.is_complete(source) else checkpoint.find_latest(source)
    if step_dir is None:
        raise ConfigError(f"{source} holds no complete checkpoint (a step folder with its completion marker)")
    return step_dir


def _saved_config(step_dir: Path, layout: list[str]) -> Config:
    """The config a checkpoint was saved with, its layout replaced by ``layout`` overrides."""
    from atpo_megatron import checkpoint

    config_file = step_dir / checkpoint.CONFIG_FILE
    if not config_file.is_file():
        raise ConfigError(f"{step_dir} has no {checkpoint.CONFIG_FILE}; cannot tell which model it holds")
    return load_config(config_file, layout)


def to_hf(source: Path, target: Path) -> None:
    """Export a checkpoint's weights as a Hugging Face folder."""
    from atpo_megatron import checkpoint
    from atpo_megatron.actor.parallel import destroy_distributed
    from atpo_megatron.weights.hf_bridge import save_hf_checkpoint

    step_dir = _step_dir(source)
    cfg = _saved_config(step_dir, ["parallel.tp=1", "parallel.pp=1", "parallel.vpp=1", "parallel.dp=0"])
    models, hf_config, model_dir = _setup(cfg)
    checkpoint.load(step_dir.parent, models, path=step_dir)
    save_hf_checkpoint(models, target, hf_config, model_dir)
    destroy_distributed()


def reshard_optimizer(source: Path, target: Path, optim_sharding: str) -> None:
    """Load a training checkpoint in the layout that saved it and save it again into ``target``
    with the optimizer as ``optim_sharding``; collective, on exactly the saving layout's ranks."""
    import torch.distributed as dist

    from atpo_megatron import checkpoint
    from atpo_megatron.actor.optimizer import build_optimizer, wrap_ddp
    from atpo_megatron.actor.parallel import destroy_distributed

    step_dir = _step_dir(source)
    layout = checkpoint.read_record(step_dir)["layout"]
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world != layout["world"]:
        raise ConfigError(f"{step_dir} was saved by {layout['world']} ranks (tp={layout['tp']} pp={layout['pp']} "
                          f"dp={layout['dp']}); run the conversion with that many (--nproc-per-node, or "
                          f"torchrun/srun over several nodes), not {world}")
    cfg = _saved_config(step_dir, [f"parallel.tp={layout['tp']}", f"parallel.pp={layout['pp']}",
                                   f"parallel.vpp={layout['vpp']}", "parallel.dp=0"])
    models, _, _ = _setup(cfg)
    models = wrap_ddp(models, use_distributed_optimizer=cfg.optimizer.distributed_optimizer)
    updates = cfg.train.batch_prompts // cfg.train.mini_batch_prompts * cfg.train.ppo_epochs
    optimizer, scheduler = build_optimizer(models, cfg.optimizer, total_steps=cfg.train.steps * updates)
    resumed = checkpoint.load(step_dir.parent, models, optimizer, scheduler, path=step_dir)
    checkpoint.save(target, resumed.step, models, optimizer, scheduler, extra=resumed.extra,
                    config=resumed.config_yaml, optim_sharding=optim_sharding)
    dist.barrier()
    destroy_distributed()


def from_hf(model: str, target: Path, cfg: Config) -> None:
    """Write a weights-only step-0 checkpoint of ``model`` in ``cfg``'s TP/PP layout."""
    from atpo_megatron import checkpoint
    from atpo_megatron.actor.parallel import destroy_distributed
    from atpo_megatron.weights.hf_bridge import load_hf_weights

    models, _, model_dir = _setup(cfg)
    load_hf_weights(models, model_dir)
    checkpoint.save(target, 0, models, config=cfg)
    destroy_distributed()
