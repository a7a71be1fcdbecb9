"""The ``atpo`` command: dispatch only.

Each subcommand lives in its own module, which adds its arguments and runs it. Only the module of
the subcommand being run is imported, so ``atpo --help`` stays instant and ``atpo retriever`` never
imports megatron.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    module: str
    add_arguments: str
    run: str
    help: str


COMMANDS: dict[str, Command] = {
    "config": Command("atpo_megatron.cli", "add_config_arguments", "config_main",
                      "print the resolved configuration tree (YAML + overrides, validated)"),
    "train": Command("atpo_megatron.launch.train_command", "add_train_arguments", "train_main",
                     "train with AT²PO (or the GRPO/GSPO baselines) on a Megatron actor"),
    "sft": Command("atpo_megatron.sft", "add_sft_arguments", "sft_main",
                   "supervised warm start of a small model on demonstrations of the agent format (before train)"),
    "rollout": Command("atpo_megatron.experience", "add_rollout_arguments", "rollout_main",
                       "sample one batch of turn trees and write them as JSON and an HTML picture"),
    "eval": Command("atpo_megatron.evaluate", "add_eval_arguments", "eval_main",
                    "greedy evaluation: EM per data source and the micro-average (the paper's Avg.)"),
    "plan": Command("atpo_megatron.plan.command", "add_plan_arguments", "plan_main",
                    "predict per-GPU memory, host memory, checkpoint size and step time of a job on an allocation"),
    "submit": Command("atpo_megatron.launch.slurm", "add_submit_arguments", "submit_main",
                      "plan a job, render its sbatch script and submit it to SLURM (sbatch or nemo-run; --dry-run prints it)"),
    "convert": Command("atpo_megatron.convert", "add_convert_arguments", "convert_main",
                       "convert a checkpoint to a Hugging Face folder (--to-hf) or back (--from-hf), or rewrite its "
                       "optimizer format (--optim-sharding)"),
    "retriever": Command("atpo_megatron.cli", "add_retriever_command", "retriever_command",
                         "serve a Search-R1-compatible /retrieve endpoint (BM25 or dense) over a corpus"),
    "report": Command("atpo_megatron.report", "add_report_arguments", "report_main",
                      "summarise a run directory: a table and PNG plots of reward, loss and stage times"),
}


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = sub.add_parser("show", help="print the resolved configuration", description="Print the "
                          "configuration after loading CONFIG and applying key.sub=value overrides.")
    show.add_argument("config", nargs="?", help="YAML config file (omit for the defaults)")
    show.add_argument("overrides", nargs="*", metavar="key.sub=value", help="overrides, e.g. tree.top_k=4")


def config_main(args: argparse.Namespace) -> int:
    from atpo_megatron.config import dump_config, load_config, split_config_args

    print(dump_config(load_config(*split_config_args(args.config, args.overrides))), end="")
    return 0


def add_retriever_command(parser: argparse.ArgumentParser) -> None:
    from atpo_megatron.env.retriever import add_retriever_arguments

    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    add_retriever_arguments(sub.add_parser(
        "serve", help="serve POST /retrieve and GET /health",
        description="Serve the Search-R1 retrieval API (POST /retrieve, GET /health) over a FlashRAG JSONL corpus."))


def retriever_command(args: argparse.Namespace) -> int:
    from atpo_megatron.env.retriever import retriever_main

    return retriever_main(args)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; only ``command``'s module is imported to add its arguments."""
    parser = argparse.ArgumentParser(
        prog="atpo",
        description="AT²PO on megatron-core: turn-level tree rollouts, turn-wise credit and the ATPO loss.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        sub = subparsers.add_parser(name, help=cmd.help, description=cmd.help[0].upper() + cmd.help[1:] + ".")
        if name == command:
            getattr(importlib.import_module(cmd.module), cmd.add_arguments)(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from atpo_megatron.config import ConfigError, UserError

    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args, unknown = parser.parse_known_args(argv)
    # argparse stops filling a trailing `key=value` list at the first option (`CONFIG --flag 1 a.b=2`)
    if unknown and hasattr(args, "overrides") and all("=" in u and not u.startswith("-") for u in unknown):
        args.overrides = [*args.overrides, *unknown]
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    cmd = COMMANDS[args.command]
    try:
        return int(getattr(importlib.import_module(cmd.module), cmd.run)(args) or 0)
    except UserError as exc:  # a config value, a checkpoint folder, an allocation: the message says what to do
        kind = "configuration error" if isinstance(exc, ConfigError) else "error"
        print(f"atpo {args.command}: {kind}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
