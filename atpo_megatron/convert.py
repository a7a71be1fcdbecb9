"""``atpo convert``: Megatron checkpoints <-> Hugging Face folders.

    atpo convert --to-hf runs/x/checkpoints OUT_DIR              # latest complete checkpoint -> HF
    atpo convert --to-hf runs/x/checkpoints/step_000100 OUT_DIR  # a given step
    atpo convert --from-hf MODEL CKPT_DIR parallel.tp=2 parallel.pp=2 --nproc-per-node 4

``--to-hf`` writes sharded safetensors, ``config.json`` and the tokenizer, which transformers loads
directly. It reads the checkpoint's own ``config.yaml`` for the model, so it runs in any layout
(one process is enough: dist_checkpointing reshards on load). ``--from-hf`` writes a weights-only
step-0 checkpoint in the requested TP/PP layout; ``atpo train ... checkpoint.dir=CKPT_DIR`` then
starts from it with a fresh optimizer.
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
    parser.add_argument("source", help="checkpoint folder / step folder (--to-hf), or model (--from-hf)")
    parser.add_argument("target", help="output folder")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="--from-hf: config overrides for the layout (parallel.tp=2 parallel.pp=2 ...)")
    parser.add_argument("--nproc-per-node", type=int, default=0, help="launch this many ranks with torchrun")


def convert_main(args: argparse.Namespace) -> int:
    if args.nproc_per_node and "RANK" not in os.environ:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={args.nproc_per_node}", "-m", "atpo_megatron.cli", "convert",
               "--to-hf" if args.to_hf else "--from-hf", args.source, args.target, *args.overrides]
        return subprocess.call(cmd)
    if args.to_hf:
        to_hf(Path(args.source), Path(args.target))
    else:
        from_hf(args.source, Path(args.target), load_config(None, [f"model.name_or_path={args.source}", *args.overrides]))
    return 0


def _setup(cfg: Config):
    """Process groups, the model in ``cfg``'s layout, and its HF config."""
    from transformers import AutoConfig

    from atpo_megatron.actor.model import build_model
    from atpo_megatron.actor.parallel import init_distributed
    from atpo_megatron.hub import resolve_model

    init_distributed(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.vpp, seed=cfg.train.seed)
    model_dir = resolve_model(cfg.model.name_or_path)
    hf_config = AutoConfig.from_pretrained(model_dir)
    return build_model(hf_config, cfg.model, cfg.parallel), hf_config, model_dir


def to_hf(source: Path, target: Path) -> None:
    """Export a checkpoint's weights as a Hugging Face folder."""
    from atpo_megatron import checkpoint
    from atpo_megatron.actor.parallel import destroy_distributed
    from atpo_megatron.weights.hf_bridge import save_hf_checkpoint

    step_dir = source if checkpoint.is_complete(source) else checkpoint.find_latest(source)
    if step_dir is None:
        raise ConfigError(f"{source} holds no complete checkpoint (a step folder with its completion marker)")
    config_file = step_dir / checkpoint.CONFIG_FILE
    if not config_file.is_file():
        raise ConfigError(f"{step_dir} has no {checkpoint.CONFIG_FILE}; cannot tell which model it holds")
    cfg = load_config(config_file, ["parallel.tp=1", "parallel.pp=1", "parallel.vpp=1", "parallel.dp=0"])
    models, hf_config, model_dir = _setup(cfg)
    checkpoint.load(step_dir.parent, models, path=step_dir)
    save_hf_checkpoint(models, target, hf_config, model_dir)
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
