"""``atpo train``: relaunch under torchrun when asked (``--nproc-per-node``), else train as this rank
(the rank torchrun or srun started, or a single process)."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys

from atpo_megatron.config import load_config


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config (see examples/)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    parser.add_argument("--nproc-per-node", type=int, default=0,
                        help="launch this many ranks with torchrun (default: run in this process, or "
                             "as the rank torchrun/srun started)")


def train_main(args: argparse.Namespace) -> int:
    """Entry of ``atpo train``: relaunch under torchrun if asked, else train as this rank."""
    cfg = load_config(args.config, args.overrides)  # fail fast on a bad config, before any launch
    if args.nproc_per_node and "RANK" not in os.environ:
        return subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                f"--nproc-per-node={args.nproc_per_node}", "-m", "atpo_megatron.cli", "train",
                                args.config, *args.overrides])
    logging.basicConfig(level=logging.INFO if int(os.environ.get("RANK", 0)) == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("megatron", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # imported here, not above: the process that only relaunches under torchrun stays light for the whole job
    from atpo_megatron.actor.parallel import destroy_distributed
    from atpo_megatron.trainer import Trainer

    Trainer(cfg).fit()
    destroy_distributed()
    return 0
