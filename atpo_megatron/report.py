"""`atpo report RUN_DIR [--out DIR]`: a summary table and PNG plots of a run's metrics.

    atpo report runs/atpo                 # table on stdout, plots in runs/atpo/report/
    python -m atpo_megatron.report runs/atpo --out /tmp/plots

Reads ``RUN_DIR/metrics.jsonl`` (written by :class:`atpo_megatron.metrics.MetricsWriter`) or, when it is
missing, the TensorBoard event files under RUN_DIR. Lines that share a step are merged, later ones
winning (a resumed run re-logs its first steps).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from atpo_megatron.metrics import (
    CLIP_TAG,
    EM_TAG,
    EVAL_EM_TAG,
    FORMAT_FAILURE_TAG,
    JSONL_NAME,
    LOSS_TAG,
    NONFINITE_TAG,
    PERF_PREFIX,
    REWARD_TAG,
    TIMING_PREFIX,
    TOOL_CALLS_TAG,
)

Rows = dict[int, dict[str, float]]  # step -> {tag: value}

LEARNING: tuple[tuple[str, str], ...] = (
    ("reward", REWARD_TAG),
    ("train EM", EM_TAG),
    ("format fail", FORMAT_FAILURE_TAG),
    ("tools/leaf", TOOL_CALLS_TAG),
    ("turns/leaf", "rollout/turns_per_leaf"),
    ("equal-reward trees", "rollout/uniform_reward_trees"),
    ("token saving", "rollout/token_saving"),
    ("adv. spread", "credit/turn_spread"),
    ("H_turn", "actor/turn_kl_entropy"),
    ("clip frac", CLIP_TAG),
    ("|log ratio|", "actor/log_ratio_abs_mean"),
    ("eval EM", EVAL_EM_TAG),
)
"""What explains whether a run learns, per step: (label, tag); the report's learning table and plots."""


class ReportError(RuntimeError):
    """The run directory cannot be reported on; the message says why and what to do."""


def _read_jsonl(path: Path) -> Rows:
    rows: Rows = {}
    lines = path.read_text(encoding="utf-8").splitlines()
    bad: list[int] = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            # A run killed mid-write leaves a partial line (glued to the next one after a resume).
            bad.append(lineno)
            continue
        step = int(record.pop("step"))
        record.pop("time", None)
        rows.setdefault(step, {}).update({k: float(v) for k, v in record.items()})
    if bad:
        print(f"atpo report: skipped {len(bad)} malformed line(s) of {path} (line {bad[0]}...)", file=sys.stderr)
    return rows


def _read_events(run_dir: Path) -> Rows:
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    rows: Rows = {}
    for folder in sorted({p.parent for p in run_dir.rglob("events.out.tfevents.*")}):
        acc = EventAccumulator(str(folder), size_guidance={SCALARS: 0})  # 0 = keep every point
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            for event in acc.Scalars(tag):
                rows.setdefault(event.step, {})[tag] = float(event.value)
    return rows


def load_metrics(run_dir: str | Path) -> Rows:
    """``{step: {tag: value}}`` sorted by step, from metrics.jsonl or else the TensorBoard event files."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"run directory {run_dir} does not exist; pass the logging.run_dir of a run")
    jsonl = run_dir / JSONL_NAME
    rows = _read_jsonl(jsonl) if jsonl.is_file() else _read_events(run_dir)
    if not rows:
        raise ReportError(
            f"no metrics in {run_dir}: expected {JSONL_NAME} or TensorBoard event files (events.out.tfevents.*) "
            f"written by a training run with logging.run_dir={run_dir}; has it finished a step yet?")
    return dict(sorted(rows.items()))


def series(rows: Rows, tag: str) -> tuple[list[int], list[float]]:
    """Steps and values of one tag, skipping steps that lack it."""
    pts = [(s, r[tag]) for s, r in rows.items() if tag in r]
    return [s for s, _ in pts], [v for _, v in pts]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def learning_summary(rows: Rows) -> list[tuple[str, str]]:
    """Per :data:`LEARNING` tag: the mean of its first k logged steps -> that of its last k (k <= 3, a
    third of the steps), and eval EM as before (its first evaluation, step 0 with
    ``logging.eval_before_train``) -> after (its last)."""
    out = []
    for label, tag in LEARNING:
        steps, values = series(rows, tag)
        if not values:
            continue
        if tag == EVAL_EM_TAG:
            out.append(("eval EM before -> after", f"{values[0]:.3f} (step {steps[0]}) -> {values[-1]:.3f} "
                                                   f"(step {steps[-1]})"))
            continue
        k = max(1, min(3, len(values) // 3))
        out.append((f"{label} ({tag})", f"{_mean(values[:k]):.3f} -> {_mean(values[-k:]):.3f} "
                                        f"(mean of first / last {k} of {len(values)} steps)"))
    return out


def learning_table(rows: Rows, max_rows: int = 30) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the per-step :data:`LEARNING` values present; at most ``max_rows`` steps, evenly spread."""
    tags = [(label, tag) for label, tag in LEARNING if series(rows, tag)[0]]
    steps = [s for s, r in rows.items() if any(tag in r for _, tag in tags)]
    if len(steps) > max_rows:
        steps = [steps[round(i * (len(steps) - 1) / (max_rows - 1))] for i in range(max_rows)]
    body = [[str(s)] + [f"{rows[s][tag]:.3g}" if tag in rows[s] else "" for _, tag in tags] for s in steps]
    return ["step"] + [label for label, _ in tags], body


def summarize(rows: Rows, reward_tag: str = REWARD_TAG, loss_tag: str = LOSS_TAG) -> list[tuple[str, str]]:
    """The report's (name, value) lines; absent metrics read "-"."""
    def fmt(x: float, spec: str = ".4g") -> str:
        return "-" if x is None or math.isnan(x) else format(x, spec)

    steps = list(rows)
    out = [("steps", f"{len(steps)} ({steps[0]}..{steps[-1]})")]
    rs, rv = series(rows, reward_tag)
    if rv:
        best = max(range(len(rv)), key=rv.__getitem__)
        out += [(f"{reward_tag} first", fmt(rv[0])), (f"{reward_tag} last", fmt(rv[-1])),
                (f"{reward_tag} best", f"{fmt(rv[best])} (step {rs[best]})")]
    else:
        out.append((reward_tag, "-"))
    ls, lv = series(rows, loss_tag)
    out.append((f"{loss_tag} final", f"{fmt(lv[-1])} (step {ls[-1]})" if lv else "-"))
    for tag in sorted({t for r in rows.values() for t in r if t.startswith("eval/")}):
        es, ev = series(rows, tag)
        best = max(range(len(ev)), key=ev.__getitem__)
        out.append((tag, f"last {fmt(ev[-1])}, best {fmt(ev[best])} (step {es[best]})"))
    for tag in _timing_tags(rows):
        out.append((f"{tag} mean", fmt(_mean(series(rows, tag)[1]), ".3f")))
    out.append(("tokens/s mean", fmt(_mean(series(rows, f"{PERF_PREFIX}/tokens_per_s")[1]), ",.0f")))
    out.append(("TFLOP/s per device mean", fmt(_mean(series(rows, f"{PERF_PREFIX}/tflops_per_device")[1]), ".1f")))
    mfu = _mean(series(rows, f"{PERF_PREFIX}/mfu")[1])
    out.append(("MFU mean", "-" if math.isnan(mfu) else f"{100 * mfu:.1f} %"))
    skipped = sum(series(rows, NONFINITE_TAG)[1])
    if skipped:
        out.append(("non-finite values skipped", f"{skipped:.0f}"))
    return out


def _timing_tags(rows: Rows) -> list[str]:
    first_seen: dict[str, None] = {}
    for r in rows.values():
        first_seen.update({t: None for t in r if t.startswith(TIMING_PREFIX)})
    return list(first_seen)


def _plot(path: Path, title: str, ylabel: str, lines: list[tuple[str, list[int], list[float]]],
          from_zero: bool = False, faint_first: bool = False) -> Path:
    # Figure without pyplot: no global backend state, always Agg, safe from any thread.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, (label, xs, ys) in enumerate(lines):
        ax.plot(xs, ys, marker="o" if len(xs) <= 30 else None, markersize=3, linewidth=1.4, label=label,
                alpha=0.45 if faint_first and i == 0 else 1.0)
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    if from_zero:
        ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if len(lines) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def _smooth(values: list[float], alpha: float = 0.1) -> list[float]:
    out, acc = [], values[0]
    for v in values:
        acc = alpha * v + (1 - alpha) * acc
        out.append(acc)
    return out


def write_plots(rows: Rows, out_dir: Path, reward_tag: str = REWARD_TAG, loss_tag: str = LOSS_TAG) -> list[Path]:
    """reward.png, loss.png, stage_times.png (and eval.png when eval/* exists); skips a plot with no data."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, tag in (("reward", reward_tag), ("loss", loss_tag)):
        xs, ys = series(rows, tag)
        if xs:
            lines = [(tag, xs, ys)]
            if len(xs) >= 20:  # an EMA makes the trend readable through RL's noisy per-step reward
                lines.append((f"{tag} (EMA 0.1)", xs, _smooth(ys)))
            written.append(_plot(out_dir / f"{name}.png", tag, name, lines, faint_first=len(lines) > 1))
    timing = [(t[len(TIMING_PREFIX):].removesuffix("_s"), *series(rows, t)) for t in _timing_tags(rows)]
    if timing:
        written.append(_plot(out_dir / "stage_times.png", "stage wall time per step", "seconds", timing,
                             from_zero=True))
    evals = [(t, *series(rows, t)) for t in sorted({t for r in rows.values() for t in r if t.startswith("eval/")})]
    if evals:
        written.append(_plot(out_dir / "eval.png", "evaluation", "score", evals))
    panels = [(label, tag, *series(rows, tag)) for label, tag in LEARNING]
    panels = [p for p in panels if p[2]]
    if panels:
        written.append(_grid(out_dir / "learning.png", panels))
    return written


def _grid(path: Path, panels: list[tuple[str, str, list[int], list[float]]]) -> Path:
    """One small plot per (label, tag, steps, values), four to a row."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(4, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(3.6 * cols, 2.8 * nrows), dpi=100)
    FigureCanvasAgg(fig)
    for i, (label, tag, xs, ys) in enumerate(panels):
        ax = fig.add_subplot(nrows, cols, i + 1)
        ax.plot(xs, ys, marker="o" if len(xs) <= 30 else None, markersize=3, linewidth=1.4)
        ax.set_title(f"{label}\n{tag}", fontsize=8)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def add_report_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run's logging.run_dir (holds metrics.jsonl)")
    parser.add_argument("--out", metavar="DIR", default=None, help="where the PNG plots go (default RUN_DIR/report)")
    parser.add_argument("--reward-tag", default=REWARD_TAG, help=f"reward metric to summarise (default {REWARD_TAG})")
    parser.add_argument("--loss-tag", default=LOSS_TAG, help=f"loss metric to summarise (default {LOSS_TAG})")
    return parser


def report_main(args: argparse.Namespace) -> int:
    """Print the summary table and write the plots; returns the exit code (1 with a message on error)."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 160)  # a CI log is no 80-column terminal
    try:
        rows = load_metrics(args.run_dir)
    except ReportError as e:
        print(f"atpo report: {e}", file=sys.stderr)
        return 1
    table = Table(title=f"run {args.run_dir}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in summarize(rows, args.reward_tag, args.loss_tag):
        table.add_row(name, value)
    console.print(table)
    learned = learning_summary(rows)
    if learned:
        header, body = learning_table(rows)
        steps = Table(title="per step (why it is or is not learning)")
        for h in header:
            steps.add_column(h, justify="right")
        for r in body:
            steps.add_row(*r)
        console.print(steps)
        summary = Table(title="learning: start -> end")
        summary.add_column("metric")
        summary.add_column("value", justify="right")
        for name, value in learned:
            summary.add_row(name, value)
        console.print(summary)
    out_dir = Path(args.out) if args.out else Path(args.run_dir) / "report"
    for path in write_plots(rows, out_dir, args.reward_tag, args.loss_tag):
        console.print(f"wrote {path}", highlight=False, soft_wrap=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = add_report_arguments(argparse.ArgumentParser(prog="atpo report", description=__doc__.splitlines()[0]))
    return report_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
