"""Greedy evaluation (spec §7): EM per data source and the micro-average over all samples.

    atpo eval examples/debug.yaml --data runs/embedded_task/test.jsonl --out report.json
    atpo eval CONFIG model.name_or_path=/path/to/hf_export --data hotpotqa/dev.jsonl bamboogle/test.jsonl

Each question gets one greedy trajectory (temperature 0, M = 1, L = 0) through the same agent loop
as training. Scores: EM of the last ``\\boxed{}`` in ``<answer>`` (``score(training=False)``: no
format requirement) and SQuAD F1 of the same answer. "Avg." is the micro-average over every sample
(the paper's "average accuracy across all evaluation samples"), not the mean of the per-source numbers.
Prompts over ``rollout.max_prompt_tokens`` are dropped, as verl's ``filter_overlong_prompts`` does;
the report counts them.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from atpo_megatron.config import load_config, split_config_args
from atpo_megatron.env.data import load_examples
from atpo_megatron.env.reward import extract_answer, f1_score, normalize_answer, response_text, score
from atpo_megatron.experience import engine_and_search
from atpo_megatron.rollout.agent_loop import split_overlong
from atpo_megatron.rollout.tree_rollout import RolloutPlan, TreeRollout
from atpo_megatron.rollout_groups import RolloutRank, all_gather_checked

if TYPE_CHECKING:
    from atpo_megatron.config import Config
    from atpo_megatron.env.data import QAExample
    from atpo_megatron.rollout.engine import Engine

log = logging.getLogger(__name__)


def summarize(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per-source and micro-averaged EM / F1 (fractions in [0, 1]) of scored samples, with the number of
    distinct (normalised) answers given."""
    by_source: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for s in samples:
        by_source[s["data_source"]].append(s)

    def agg(rows):
        n = len(rows)
        return {
            "n": n,
            "em": sum(r["em"] for r in rows) / n if n else 0.0,
            "f1": sum(r["f1"] for r in rows) / n if n else 0.0,
            "turns": sum(r["turns"] for r in rows) / n if n else 0.0,
            "tool_calls": sum(r["tool_calls"] for r in rows) / n if n else 0.0,
            # a constant answer can score EM by luck; learning gives as many answers as questions need
            "distinct_answers": len({normalize_answer(r["answer"]) for r in rows if r.get("answer") is not None}),
        }

    return {"per_source": {k: agg(v) for k, v in sorted(by_source.items())}, "avg": agg(list(samples))}


def evaluate(
    engine: "Engine",
    search_client: Any,
    examples: Sequence["QAExample"],
    cfg: "Config",
    *,
    batch_size: int = 64,
    progress: bool = True,
) -> dict[str, Any]:
    """Greedy trajectories for ``examples``, scored; returns the report dict (see :func:`summarize`).

    ``report["samples"]`` holds one entry per evaluated example (id, source, em, f1, predicted
    answer, turns, tool calls, finish reason).
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"evaluate(batch_size={batch_size}) must be >= 1")
    tok = engine.tokenizer
    kept, dropped = split_overlong(list(examples), tok, cfg.rollout.max_prompt_tokens)
    runner = TreeRollout(engine, search_client, cfg.rollout, RolloutPlan.greedy(), greedy=True)
    samples: list[dict[str, Any]] = []
    bar = tqdm(total=len(kept), desc="eval", unit="q", disable=not progress)
    for start in range(0, len(kept), batch_size):
        chunk = kept[start : start + batch_size]
        trees = runner.build_trees(chunk, seed=0)
        for ex, tree in zip(chunk, trees):
            [leaf] = tree.leaves()
            text = response_text(tree, leaf, tok)
            answer = extract_answer(text)
            samples.append({
                "id": ex.id,
                "data_source": ex.data_source,
                "em": score(text, ex.golden_answers, training=False),
                "f1": f1_score(answer, ex.golden_answers) if answer is not None else 0.0,
                "answer": answer,
                "golden_answers": list(ex.golden_answers),
                "turns": len(tree.path(leaf)) - 1,
                "tool_calls": tree.nodes[leaf].tool_calls,
                "finish_reason": tree.nodes[leaf].finish_reason,
                "response_tokens": len(tree.response(leaf)[0]),
            })
        bar.update(len(chunk))
        done = summarize(samples)["avg"]
        bar.set_postfix(em=f"{done['em']:.3f}")
    bar.close()
    report = summarize(samples)
    report["skipped_overlong"] = len(dropped)
    report["loop"] = runner.loop.stats.as_dict()
    report["samples"] = samples
    return report


def evaluate_in_job(engine: "Engine", search_client: Any, ranks: RolloutRank, examples: Sequence["QAExample"],
                    cfg: "Config") -> dict[str, float]:
    """The trainer's greedy evaluation: ``examples`` split over the job's rollout engines, the samples of
    every engine gathered; ``eval/*`` metrics (EM per source and micro-average, F1, turns, tool calls,
    distinct answers). Collective; a failure on one rank stops every rank."""
    samples, error = [], None
    try:
        engine.wake()
        mine = ranks.my_eval_examples(list(examples))
        if mine:
            samples = evaluate(engine, search_client, mine, cfg, progress=False)["samples"]
        engine.sleep()
    except Exception as exc:
        error = exc
    if not ranks.reports:
        samples = []
    report = summarize([s for part in all_gather_checked(samples, error) for s in part])
    out = {"eval/em_avg": report["avg"]["em"], "eval/f1_avg": report["avg"]["f1"],
           "eval/turns_avg": report["avg"]["turns"], "eval/tool_calls_avg": report["avg"]["tool_calls"],
           "eval/distinct_answers": report["avg"]["distinct_answers"]}
    out.update({f"eval/em_{src}": r["em"] for src, r in report["per_source"].items()})
    return out


def format_report(report: dict[str, Any]) -> str:
    """The per-source table in percent, "Avg." (micro) last."""
    lines = [f"{'source':24s} {'n':>6s} {'EM%':>7s} {'F1%':>7s} {'turns':>6s}"]
    rows = list(report["per_source"].items()) + [("Avg.", report["avg"])]
    for name, r in rows:
        lines.append(f"{name:24s} {r['n']:6d} {100 * r['em']:7.2f} {100 * r['f1']:7.2f} {r['turns']:6.2f}")
    if report.get("skipped_overlong"):
        lines.append(f"({report['skipped_overlong']} examples skipped: prompt over rollout.max_prompt_tokens)")
    return "\n".join(lines)


def add_eval_arguments(parser) -> None:
    """``atpo eval [CONFIG] [key.sub=value ...] [--data FILE ...] [--out report.json] [--batch-size N]``."""
    parser.add_argument("config", nargs="?", help="YAML config file (omit for the defaults)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="overrides, e.g. model.name_or_path=/path/to/hf_folder")
    parser.add_argument("--data", nargs="+", default=None, metavar="FILE",
                        help='FlashRAG JSONL/parquet files, or "embedded" (default: data.eval_files)')
    parser.add_argument("--out", default=None, help="write the JSON report here")
    parser.add_argument("--limit", type=int, default=None, help="examples per file (default data.eval_limit; 0 = all)")
    parser.add_argument("--batch-size", type=int, default=64, help="questions per generation batch")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def eval_main(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per search request otherwise
    cfg = load_config(*split_config_args(args.config, args.overrides))
    limit = cfg.data.eval_limit if args.limit is None else args.limit
    examples = load_examples(cfg, args.data or cfg.data.eval_files, "test", limit)
    with engine_and_search(cfg) as (engine, client):
        report = evaluate(engine, client, examples, cfg, batch_size=args.batch_size, progress=not args.no_progress)
    report["model"] = cfg.model.name_or_path
    report["data"] = list(args.data or cfg.data.eval_files)
    print(format_report(report))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {out}")
    return 0
