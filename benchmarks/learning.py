"""Does it learn, and does AT²PO beat its baselines? Five arms x N RL seeds at one generated-token budget.

    python benchmarks/learning.py --parallel 2                      # CPU: 5 arms x 5 seeds (73 min on 2 cores, measured)
    python benchmarks/learning.py --parallel 2 --rl-seeds 5,6,7,8,9 --merge benchmarks/results/learning_cpu.json
                                                                    # 5 more seeds, pooled with the first 5 (70 min)
    python benchmarks/learning.py --rl-seeds 0 --arms atpo-entropy,grpo-chain     # a quick look
    python benchmarks/learning.py --gpu --model /models/Qwen3-4B --nproc-per-node 8   # the paper's setting

Every run is a real ``atpo train`` subprocess (the Megatron actor, the rollout engine, the embedded
BM25 retriever server, the paper's reward) on ``examples/embedded_smollm2.yaml`` (``--gpu``:
``examples/paper_qwen3_4b.yaml``) plus the overrides of :func:`base_overrides` and of its arm, in its
own folder ``<out>/<arm>_s<seed>/``:

    atpo-entropy    trees, entropy-guided expansion, turn-wise credit, ATPO loss   (AT²PO)
    atpo-random     the same trees with random expansion                       (expansion ablation)
    grpo-loss-tree  AT²PO's trees and credit with the GRPO token loss           (loss ablation)
    grpo-chain      independent chains, GRPO outcome advantage, GRPO loss       (baseline)
    gspo-chain      independent chains, GRPO outcome advantage, GSPO loss       (baseline)

The task (``--hops``, default 2,3): the generated knowledge base's 2- and 3-hop questions ("In which
city was the founder of the company that built the Varlo Bridge born?"): two or three searches, each
query built from the previous answer, then the answer: three or four turns, so expansion has turns
to choose between and a tree's branches share a trunk. 3-hop questions alone leave the warm-started
135M model at training EM 0 (every leaf of a tree gets the same reward, so no advantage); the 2-hop
half gives RL a signal to start from. Training and held-out test questions are disjoint.

Fairness. Every arm gets the same warm start, optimiser, learning rate (``--lr``, one value for all
arms, never tuned per arm) and the paper's clip of its loss. At RL seed s every arm sees the same
prompts in the same order (``train.seed = 1234 + s``) and the same leaves per prompt (a chain arm
draws M + L*K chains). Every run stops after the step at which it has generated ``--token-budget``
tokens (``train.max_generated_tokens``; tool results are not generated): the paper's claim is that
a tree gets more leaves, hence more steps, out of the same tokens.

Warm start (CPU). SmolLM2-135M-Instruct never follows the tag format on its own, so every RL
advantage would be 0. ``atpo sft`` (the same command and config as the README's main job) warm-starts
it once on format demonstrations of 1-, 2- and 3-hop training questions; all runs start from it.
After it the model answers most 1-hop questions but usually stops after two searches on 3-hop ones
(measured in the JSON's ``eval_before``): RL has something to learn. ``--gpu`` starts from the
model itself (the paper's Qwen3 needs no warm start).

Measured. Per run: generated tokens and the trees' saving against chains with the same leaves;
the mean reward, training EM (sampled leaves, no format check) and format failures over the first
and the last k steps; greedy EM on the held-out questions before (shared: the warm start) and after,
with the number of distinct answers (a constant answer can score EM by luck). Per arm: mean and 95 %
confidence interval (Student t) over seeds. AT²PO against each baseline: the per-seed difference,
its mean and paired 95 % interval, the number of seeds it wins, and how many seeds the interval would
need to exclude 0 if the differences kept their measured mean and SD (a planning figure). Outputs:
``--json``, a Markdown copy, and a PNG of the curves (mean and 95 % band per arm, against generated tokens).

More seeds. Seeds differ more than arms do at a few steps, so separating the arms takes seeds, and
seeds take time: ``--merge REPORT`` pools an earlier report's runs (other seeds) with this
invocation's, after checking that both ran the same overrides from the same warm start (its held-out
evaluation must match exactly) and that no arm and seed is counted twice, before any run starts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"cpu": REPO_ROOT / "examples" / "embedded_smollm2.yaml", "gpu": REPO_ROOT / "examples" / "paper_qwen3_4b.yaml"}

ARMS: dict[str, dict[str, Any]] = {
    "atpo-entropy": {"rollout.mode": "tree", "tree.expansion_mode": "entropy", "loss.name": "atpo"},
    "atpo-random": {"rollout.mode": "tree", "tree.expansion_mode": "random", "loss.name": "atpo"},
    "grpo-loss-tree": {"rollout.mode": "tree", "tree.expansion_mode": "entropy", "loss.name": "grpo"},
    "grpo-chain": {"rollout.mode": "chain", "loss.name": "grpo"},
    "gspo-chain": {"rollout.mode": "chain", "loss.name": "gspo"},
}
REFERENCE = "atpo-entropy"
CLAIMS = {  # the paper's ordering (Tables 1-2), as "AT²PO beats <arm>"
    "atpo-random": "entropy-guided expansion beats random expansion (Table 2)",
    "grpo-loss-tree": "the ATPO loss beats the GRPO loss on the same trees (Table 2)",
    "grpo-chain": "AT²PO beats GRPO on chains (Table 1)",
    "gspo-chain": "AT²PO beats GSPO on chains (Table 1)",
}

# CPU budget: a tree run generates ~700 tokens per step and one step takes 45-60 s on one thread (zero-advantage
# leaves are not run by the update); 4,000 tokens = 6-7 tree steps, 25 runs in 73 min with --parallel 2.
PRESETS = {
    "cpu": dict(model="warm-start", tree="2,2,2", batch_prompts=3, mini_batch_prompts=1, lr=3e-5, token_budget=4000,
                steps=30, eval_limit=24, max_response_tokens=512, rl_seeds="0,1,2,3,4", nproc_per_node=0),
    "gpu": dict(model=None, tree="10,2,6", batch_prompts=32, mini_batch_prompts=8, lr=1e-6, token_budget=4_000_000,
                steps=240, eval_limit=200, max_response_tokens=6192, rl_seeds="0,1,2,3,4", nproc_per_node=8),
}
T_975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045,
         2.042]
"""Two-sided 95 % Student t quantiles for 1..30 degrees of freedom (beyond: :func:`t_975`'s expansion)."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="the paper's setting: M,L,K = 10,2,6, bf16, vLLM, lr 1e-6")
    p.add_argument("--model", default=None,
                   help="warm-start (CPU default: `atpo sft` of SmolLM2-135M-Instruct), a bundled name or an HF "
                        "folder (required with --gpu, e.g. a Qwen3-4B folder)")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma list of {', '.join(ARMS)}")
    p.add_argument("--rl-seeds", default=None, help="comma list; every arm runs once per seed (preset: 0..4; '' "
                                                    "with --merge: run nothing, pool the reports)")
    p.add_argument("--token-budget", type=int, default=None, help="generated tokens per run (all ranks)")
    p.add_argument("--steps", type=int, default=None, help="at most this many steps per run")
    p.add_argument("--batch-prompts", type=int, default=None, help="prompts per step")
    p.add_argument("--mini-batch-prompts", type=int, default=None, help="prompts per optimizer step")
    p.add_argument("--tree", default=None, metavar="M,L,K", help="M chains, L rounds of K branches; chain arms "
                                                                 "draw M+L*K chains")
    p.add_argument("--lr", type=float, default=None, help="one constant learning rate for every arm")
    p.add_argument("--hops", default="2,3", help="hop counts of the generated task to train and evaluate on")
    p.add_argument("--eval-limit", type=int, default=None, help="held-out questions in the greedy evaluations")
    p.add_argument("--max-response-tokens", type=int, default=None)
    p.add_argument("--engine", default=None, choices=("hf", "vllm"), help="rollout engine (CPU hf, GPU vllm)")
    p.add_argument("--nproc-per-node", type=int, default=None, help="ranks per run (GPU preset: 8)")
    p.add_argument("--task-seed", type=int, default=0, help="seed of the generated task")
    p.add_argument("--last-k", type=int, default=3, help="compare the means of the first and last k steps")
    p.add_argument("--out", default="runs/learning", help="task, warm start and one folder per run")
    p.add_argument("--json", default=None, help="results (default benchmarks/results/learning_<cpu|gpu>.json)")
    p.add_argument("--png", default=None, help="curves (default: next to --json)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of every subprocess (OMP_NUM_THREADS; on a shared CPU 1 is the robust choice: "
                        "2 threads ran several times slower whenever another job held a core)")
    p.add_argument("--parallel", type=int, default=1, help="runs at once")
    p.add_argument("--reuse", action="store_true", help="keep the runs whose folder holds a finished summary")
    p.add_argument("--merge", action="append", default=[], metavar="JSON",
                   help="add the runs of an earlier report (other RL seeds, same settings and warm start: checked) "
                        "to this one, so a benchmark grows by seeds over several invocations; repeatable")
    args = p.parse_args(argv)
    kind = "gpu" if args.gpu else "cpu"
    for key, value in PRESETS[kind].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.model is None:
        p.error("--gpu needs --model (a Hugging Face folder, e.g. Qwen3-4B)")
    args.engine = args.engine or ("vllm" if args.gpu else "hf")
    args.m, args.l, args.k = (int(x) for x in args.tree.split(","))
    args.seed_list = [int(x) for x in args.rl_seeds.split(",") if x.strip()]
    if not args.seed_list and not args.merge:
        p.error("--rl-seeds '' runs nothing: give --merge reports to pool")
    args.hop_list = sorted({int(h) for h in args.hops.split(",")})
    args.arm_list = args.arms.split(",")
    if not set(args.hop_list) <= {1, 2, 3}:
        p.error(f"--hops {args.hops}: choose among 1, 2, 3")
    unknown = [a for a in args.arm_list if a not in ARMS]
    if unknown:
        p.error(f"unknown arm(s) {unknown}; choose among {', '.join(ARMS)}")
    args.json = args.json or str(REPO_ROOT / "benchmarks" / "results" / f"learning_{kind}.json")
    args.png = args.png or str(Path(args.json).with_suffix(".png"))
    args.out = Path(args.out).resolve()
    args.config = str(CONFIGS[kind])
    return args


# ------------------------------------------------------------------------------------------ set-up

def prepare_task(args) -> dict[str, str]:
    """The generated task and its train / held-out test questions of the chosen hop counts."""
    sys.path.insert(0, str(REPO_ROOT))
    from atpo_megatron.env.data import generate_task

    files = generate_task(args.out / "task", seed=args.task_seed)
    sources = {f"gen-{h}hop" for h in args.hop_list}
    tag = "".join(map(str, args.hop_list))
    paths = {"dir": str(args.out / "task"), "corpus": str(files.corpus)}
    for split in ("train", "test"):
        rows = [json.loads(line) for line in getattr(files, split).read_text().splitlines() if line.strip()]
        path = args.out / "task" / f"{split}_hops{tag}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["data_source"] in sources))
        paths[split] = str(path)
    return paths


def atpo(args, command: list[str], log: Path) -> subprocess.Popen:
    """Start ``python -m atpo_megatron.cli COMMAND`` (this checkout) with its output in ``log``."""
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p))
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "atpo_megatron.cli", *command], stdout=f,
                                stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env)


def finish(proc: subprocess.Popen, log: Path, what: str) -> None:
    if proc.wait() != 0:
        raise SystemExit(f"{what} failed (exit {proc.returncode}); last lines of {log}:\n{log.read_text()[-3000:]}")


def common_overrides(args, task: dict[str, str]) -> list[str]:
    """What the warm start, the before-evaluation and every run share."""
    return [f"data.embedded_dir={task['dir']}", f"data.embedded_seed={args.task_seed}", "retriever.url=embedded",
            f"retriever.corpus={task['corpus']}", f"rollout.max_response_tokens={args.max_response_tokens}",
            f"rollout.engine={args.engine}"]


def warm_start(args, task: dict[str, str]) -> str:
    """``atpo sft`` with the main job's config (reused when ``<out>/warm_start`` holds the same spec)."""
    out = args.out / "warm_start"
    log = args.out / "warm_start.log"
    print(f"warm start: atpo sft {Path(args.config).name} -> {out}", flush=True)
    finish(atpo(args, ["sft", args.config, *common_overrides(args, task), f"sft.out_dir={out}"], log), log, "atpo sft")
    return str(out)


def evaluate_before(args, task: dict[str, str], model: str) -> dict[str, Any]:
    """Greedy EM of the starting model on the held-out questions (identical for every arm and seed)."""
    path, log = args.out / "eval_before.json", args.out / "eval_before.log"
    if not (args.reuse and path.is_file()):
        finish(atpo(args, ["eval", args.config, *common_overrides(args, task), f"model.name_or_path={model}",
                           "--data", task["test"], "--limit", str(args.eval_limit), "--out", str(path),
                           "--no-progress"], log), log, "atpo eval")
    report = json.loads(path.read_text())
    return {"em": report["avg"]["em"], "distinct_answers": report["avg"]["distinct_answers"],
            "n": report["avg"]["n"], "tool_calls": report["avg"]["tool_calls"],
            "golden_distinct": len({s["golden_answers"][0] for s in report["samples"]})}


def base_overrides(args, task: dict[str, str], model: str) -> list[str]:
    """The config every run shares, on top of the preset's example config."""
    m, l_, k = args.m, args.l, args.k
    return [*common_overrides(args, task), f"model.name_or_path={model}",
            f"tree.initial_chains={m}", f"tree.expansion_iterations={l_}", f"tree.top_k={k}",
            f"tree.leaves_per_tree={m + l_ * k}", f"rollout.chains={m + l_ * k}",
            f"train.steps={args.steps}", f"train.batch_prompts={args.batch_prompts}",
            f"train.mini_batch_prompts={args.mini_batch_prompts}",
            f"train.max_generated_tokens={args.token_budget}",
            f"optimizer.lr={args.lr}", f"optimizer.min_lr={args.lr}", "optimizer.lr_decay_style=constant",
            f"data.train_files=[{task['train']}]", f"data.eval_files=[{task['test']}]",
            f"data.eval_limit={args.eval_limit}", "logging.eval_before_train=false",
            f"logging.eval_every={args.steps}", "logging.tensorboard=false", "logging.save_tree_pictures=false",
            "checkpoint.save_every=0", "checkpoint.resume=never"]


# ------------------------------------------------------------------------------------------- runs

def run_dir(args, arm: str, seed: int) -> Path:
    return args.out / f"{arm}_s{seed}"


def start_run(args, base: list[str], arm: str, seed: int) -> dict[str, Any] | None:
    folder = run_dir(args, arm, seed)
    if args.reuse and (folder / "summary.json").is_file():
        print(f"[{arm} seed {seed}] reusing {folder}", flush=True)
        return None
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    overrides = base + [f"{k}={v}" for k, v in ARMS[arm].items()] + [f"train.seed={1234 + seed}",
                                                                      f"logging.run_dir={folder}"]
    command = ["train", args.config, *overrides]
    if args.nproc_per_node:
        command += ["--nproc-per-node", str(args.nproc_per_node)]
    print(f"[{arm} seed {seed}] atpo {' '.join(command)}", flush=True)
    return {"arm": arm, "seed": seed, "proc": atpo(args, command, folder / "log.txt"), "t0": time.time()}


def finish_run(args, job: dict[str, Any]) -> None:
    """Summarise a finished run; a failed one (an OOM kill on a shared machine) is reported and left
    without a summary, so the others go on and ``--reuse`` runs only it again."""
    folder = run_dir(args, job["arm"], job["seed"])
    try:
        finish(job["proc"], folder / "log.txt", f"[{job['arm']} seed {job['seed']}] atpo train")
    except SystemExit as exc:
        print(exc, flush=True)
        return
    summary = summarize_run(job["arm"], job["seed"], folder, args.last_k)
    summary["wall_s"] = time.time() - job["t0"]
    (folder / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"[{job['arm']} seed {job['seed']}] {summary['steps']} steps, {summary['generated_tokens']:.0f} tokens "
          f"(saving {100 * summary['token_saving']:.0f} %), reward {summary['reward_first']:+.3f} -> "
          f"{summary['reward_last']:+.3f}, eval EM {summary['eval_em']:.3f} "
          f"({summary['distinct_answers']} distinct), {summary['wall_s']:.0f}s", flush=True)


def summarize_run(arm: str, seed: int, folder: Path, last_k: int) -> dict[str, Any]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["step"] > 0]

    def col(key):
        return [r.get(key, math.nan) for r in rows]

    k = max(1, min(last_k, len(rows) // 2))
    first, last = (lambda xs: sum(xs[:k]) / k), (lambda xs: sum(xs[-k:]) / k)
    curves = {name: col(tag) for name, tag in CURVES.items()}
    return {
        "arm": arm, "seed": seed, "steps": len(rows), "k": k,
        "generated_tokens": rows[-1]["rollout/generated_tokens_total"],
        "token_saving": saving(rows),
        "token_saving_last": saving(rows[-k:]),
        "reward_first": first(curves["reward"]), "reward_last": last(curves["reward"]),
        "em_first": first(curves["training EM"]), "em_last": last(curves["training EM"]),
        "format_first": first(curves["format failures"]), "format_last": last(curves["format failures"]),
        "tools_first": first(curves["tool calls / leaf"]), "tools_last": last(curves["tool calls / leaf"]),
        "equal_reward_trees": sum(col("rollout/uniform_reward_trees")) / len(rows),
        "turn_spread": sum(col("credit/turn_spread")) / len(rows),
        "eval_em": rows[-1].get("eval/em_avg", math.nan),
        "distinct_answers": int(rows[-1].get("eval/distinct_answers", 0)),
        "eval_tool_calls": rows[-1].get("eval/tool_calls_avg", math.nan),
        "step_s": sum(sum(v for t, v in r.items() if t.startswith("timing/") and t != "timing/eval_s")
                      for r in rows) / len(rows),
        "curves": {"tokens": col("rollout/generated_tokens_total"), **curves},
    }


def saving(rows: list[dict[str, Any]]) -> float:
    """1 - generated / chain tokens over ``rows``: what the trees saved against chains with the same leaves."""
    chain = sum(r.get("rollout/chain_tokens", 0.0) for r in rows)
    return 1.0 - sum(r.get("rollout/generated_tokens", 0.0) for r in rows) / chain if chain else 0.0


CURVES = {"reward": "rollout/reward_mean", "training EM": "rollout/em", "format failures": "rollout/format_failure_rate",
          "tool calls / leaf": "rollout/tool_calls_per_leaf"}


# ------------------------------------------------------------------------------------- statistics

def t_975(dof: int) -> float:
    """The 97.5 % Student t quantile: the table up to 30 degrees of freedom, then the Cornish-Fisher expansion
    around z = 1.95996 (within 1e-4 of the exact value from 30 on)."""
    if dof <= len(T_975):
        return T_975[dof - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * dof) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * dof ** 2)


def mean_sd(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (nan for one value)."""
    n = len(xs)
    mean = sum(xs) / n
    return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else math.nan


def mean_ci(xs: list[float]) -> tuple[float, float]:
    """Mean and half-width of the two-sided 95 % Student t interval (nan for one value)."""
    mean, sd = mean_sd(xs)
    return mean, t_975(len(xs) - 1) * sd / math.sqrt(len(xs)) if len(xs) > 1 else math.nan


def seeds_to_resolve(diffs: list[float], most: int = 100) -> int | None:
    """Seeds the paired 95 % interval needs to exclude 0 if the differences kept the mean and SD measured
    here: the smallest n with t(n-1) sd / sqrt(n) < |mean| (None: more than ``most``, or a zero mean).
    A planning figure for the next invocation, not a result: half of such reruns would still not resolve."""
    if len(diffs) < 2:
        return None
    mean, sd = mean_sd(diffs)
    return next((n for n in range(2, most + 1) if t_975(n - 1) * sd / math.sqrt(n) < abs(mean)), None)


ARM_FIELDS = ("eval_em", "eval_gain", "reward_gain", "reward_last", "em_last", "format_last", "tools_last",
              "token_saving", "token_saving_last", "steps", "distinct_answers")


def per_arm(runs: list[dict[str, Any]], before: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for arm in dict.fromkeys(r["arm"] for r in runs):
        mine = [r for r in runs if r["arm"] == arm]
        row = {"arm": arm, "seeds": [r["seed"] for r in mine]}
        for f in ARM_FIELDS:
            row[f] = mean_ci([value(r, f, before) for r in mine])
        out.append(row)
    return out


def value(run: dict[str, Any], field: str, before: dict[str, Any]) -> float:
    if field == "eval_gain":
        return run["eval_em"] - before["em"]
    if field == "reward_gain":
        return run["reward_last"] - run["reward_first"]
    return run[field]


def paired(runs: list[dict[str, Any]], field: str, before: dict[str, Any]) -> list[dict[str, Any]]:
    """AT²PO minus each baseline, seed by seed (same prompts, same warm start): mean, 95 % CI, wins."""
    ref = {r["seed"]: value(r, field, before) for r in runs if r["arm"] == REFERENCE}
    out = []
    for arm in dict.fromkeys(r["arm"] for r in runs):
        if arm == REFERENCE:
            continue
        diffs = [ref[r["seed"]] - value(r, field, before) for r in runs if r["arm"] == arm and r["seed"] in ref]
        if not diffs:
            continue
        mean, ci = mean_ci(diffs)
        verdict = ("holds" if mean - ci > 0 else "reversed" if mean + ci < 0 else "not resolved") \
            if not math.isnan(ci) else "one seed"
        out.append({"baseline": arm, "field": field, "claim": CLAIMS[arm], "diffs": diffs, "mean": mean, "ci": ci,
                    "wins": sum(d > 0 for d in diffs), "ties": sum(d == 0 for d in diffs), "verdict": verdict,
                    "seeds_to_resolve": seeds_to_resolve(diffs)})
    return out


def shown(text: str) -> str:
    """``text`` with this checkout's root removed from its paths (reports name no machine's folders)."""
    return text.replace(str(REPO_ROOT) + os.sep, "")


def pooling_key(report: dict[str, Any]) -> dict[str, Any]:
    """What two reports must share for their runs to be pooled: every run's overrides (with the benchmark's
    folder written as <out>) and the warm start's held-out evaluation (the same warm start scores the same)."""
    task_dir = next(o.split("=", 1)[1] for o in report["base_overrides"] if o.startswith("data.embedded_dir="))
    folder = str(Path(task_dir).parent)
    return {"overrides": [o.replace(folder, "<out>") for o in report["base_overrides"]],
            "eval_before": report["eval_before"]}


def pooled(report: dict[str, Any], earlier: list[tuple[str, dict[str, Any]]],
           planned: set[tuple[str, int]] = frozenset()) -> list[dict[str, Any]]:
    """``report``'s runs and those of the ``earlier`` (path, report) pairs, sorted by seed then arm; ValueError
    (one line) when a report's settings or warm start differ, or an arm and seed would be counted twice."""
    mine = pooling_key(report)
    runs = list(report["runs"])
    taken = {(r["arm"], r["seed"]) for r in runs} | set(planned)
    for path, other in earlier:
        theirs = pooling_key(other)
        if theirs["overrides"] != mine["overrides"]:
            differ = sorted(set(theirs["overrides"]) ^ set(mine["overrides"]))
            raise ValueError(f"{path} has other settings: {', '.join(differ)}")
        if theirs["eval_before"] != mine["eval_before"]:
            raise ValueError(f"{path} started from another warm start: held-out evaluation {theirs['eval_before']} "
                             f"here {mine['eval_before']}")
        twice = [f"{r['arm']} seed {r['seed']}" for r in other["runs"] if (r["arm"], r["seed"]) in taken]
        if twice:
            raise ValueError(f"{path} holds runs this report has too: {', '.join(twice)}")
        taken |= {(r["arm"], r["seed"]) for r in other["runs"]}
        runs += other["runs"]
    order = {arm: i for i, arm in enumerate(ARMS)}
    return sorted(runs, key=lambda r: (r["seed"], order[r["arm"]]))


def invocations_of(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The benchmark invocations whose runs ``report`` holds (one, or those it pooled)."""
    if "invocations" in report:
        return report["invocations"]
    return [{"command": report["command"], "rl_seeds": sorted({r["seed"] for r in report["runs"]}),
             "total_wall_s": report["total_wall_s"], "parallel": report["parallel"], "threads": report["threads"]}]


# -------------------------------------------------------------------------------------- reporting

def fmt(pair: tuple[float, float], spec: str = ".3f") -> str:
    mean, ci = pair
    return f"{mean:{spec}}" if math.isnan(ci) else f"{mean:{spec}} ± {ci:{spec}}"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table."""
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [header, ["---"] * len(header), *rows])


def arm_table(arms: list[dict[str, Any]], before: dict[str, Any]) -> str:
    header = ["arm", "seeds", f"greedy eval EM (before: {before['em']:.3f})", "eval EM gain",
              f"distinct answers (of {before['golden_distinct']} golden)", "reward gain, first → last k steps",
              "reward, last k", "training EM, last k", "format failures, last k", "tool calls / leaf, last k",
              "token saving (whole run)", "token saving, last k", "steps"]
    return md_table(header, [[a["arm"], str(len(a["seeds"])), fmt(a["eval_em"]), fmt(a["eval_gain"], "+.3f"),
                              fmt(a["distinct_answers"], ".1f"), fmt(a["reward_gain"], "+.3f"),
                              fmt(a["reward_last"], "+.3f"), fmt(a["em_last"]), fmt(a["format_last"], ".2f"),
                              fmt(a["tools_last"], ".2f"), fmt(a["token_saving"], ".2f"),
                              fmt(a["token_saving_last"], ".2f"), fmt(a["steps"], ".1f")]
                             for a in arms])


def paired_table(comparisons: list[dict[str, Any]]) -> str:
    header = ["AT²PO vs", "paper's claim", "metric", "AT²PO − baseline per seed", "mean ± 95 % CI", "seeds won",
              "verdict", "seeds to resolve at this mean and SD"]
    return md_table(header, [[c["baseline"], c["claim"], c["field"], ", ".join(f"{d:+.3f}" for d in c["diffs"]),
                              fmt((c["mean"], c["ci"]), "+.3f"), f"{c['wins']}/{len(c['diffs'])}", c["verdict"],
                              "> 100" if c["seeds_to_resolve"] is None else str(c["seeds_to_resolve"])]
                             for c in comparisons])


def run_table(runs: list[dict[str, Any]]) -> str:
    header = ["arm", "seed", "steps", "generated tokens (saving)", "reward, first → last k",
              "training EM, first → last k", "format failures", "tool calls / leaf", "greedy eval EM (distinct)",
              "s/step", "wall s"]
    return md_table(header, [[r["arm"], str(r["seed"]), str(r["steps"]),
                              f"{r['generated_tokens']:.0f} ({100 * r['token_saving']:.0f} %)",
                              f"{r['reward_first']:+.3f} → {r['reward_last']:+.3f}",
                              f"{r['em_first']:.3f} → {r['em_last']:.3f}",
                              f"{r['format_first']:.2f} → {r['format_last']:.2f}",
                              f"{r['tools_first']:.2f} → {r['tools_last']:.2f}",
                              f"{r['eval_em']:.3f} ({r['distinct_answers']})", f"{r['step_s']:.0f}",
                              f"{r['wall_s']:.0f}"] for r in runs])


def plot(runs: list[dict[str, Any]], path: str, title: str, budget: int) -> None:
    """Per arm, the mean over seeds and its 95 % band of every curve, against generated tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grid = np.linspace(0, budget, 25)
    fig, axes = plt.subplots(1, len(CURVES), figsize=(4.6 * len(CURVES), 4.2))
    for i, arm in enumerate(dict.fromkeys(r["arm"] for r in runs)):
        mine = [r for r in runs if r["arm"] == arm]
        for ax, name in zip(axes, CURVES):
            ys = np.array([np.interp(grid, r["curves"]["tokens"], r["curves"][name]) for r in mine])
            mean = ys.mean(0)
            ax.plot(grid / 1000, mean, color=f"C{i}", label=f"{arm} ({len(mine)} seeds)")
            if len(mine) > 1:
                half = t_975(len(mine) - 1) * ys.std(0, ddof=1) / np.sqrt(len(mine))
                ax.fill_between(grid / 1000, mean - half, mean + half, color=f"C{i}", alpha=0.15)
    for ax, name in zip(axes, CURVES):
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("generated tokens (thousands)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    task = prepare_task(args)
    model = warm_start(args, task) if args.model == "warm-start" else args.model
    before = evaluate_before(args, task, model)
    print(f"before RL: greedy EM {before['em']:.3f} on {before['n']} held-out questions, {before['distinct_answers']} "
          f"distinct answers, {before['tool_calls']:.2f} tool calls per question", flush=True)
    base = [shown(o) for o in base_overrides(args, task, model)]
    earlier = [(path, json.loads(Path(path).read_text())) for path in args.merge]
    try:  # before the runs: a report that cannot be pooled must not cost an hour first
        pooled({"base_overrides": base, "eval_before": before, "runs": []}, earlier,
               {(a, s) for a in args.arm_list for s in args.seed_list})
    except ValueError as exc:
        raise SystemExit(f"--merge: {exc}") from None
    queue = [(arm, seed) for seed in args.seed_list for arm in args.arm_list]
    running: list[dict[str, Any]] = []
    while queue or running:
        while queue and len(running) < max(1, args.parallel):
            job = start_run(args, base, *queue.pop(0))
            if job is not None:
                running.append(job)
        if running:
            done = next((j for j in running if j["proc"].poll() is not None), None)
            if done is None:
                time.sleep(2)
                continue
            running.remove(done)
            finish_run(args, done)
    summaries = [run_dir(args, a, s) / "summary.json" for s in args.seed_list for a in args.arm_list]
    missing = [str(p.parent) for p in summaries if not p.is_file()]
    if missing:
        print(f"{len(missing)} run(s) failed: {', '.join(missing)}; the results are written only when every run "
              "has finished: run the same command again with --reuse to run just those", flush=True)
        return 1
    report = {
        "benchmark": "learning", "command": "python benchmarks/learning.py " + " ".join(sys.argv[1:] if argv is None
                                                                                      else argv),
        "preset": "gpu" if args.gpu else "cpu", "model": shown(model), "tree": args.tree, "hops": args.hop_list,
        "batch_prompts": args.batch_prompts, "token_budget": args.token_budget, "lr": args.lr,
        "eval_limit": args.eval_limit, "threads": args.threads, "parallel": args.parallel,
        "base_overrides": base, "eval_before": before, "total_wall_s": time.time() - t0,
        "load_average_at_end": os.getloadavg(), "runs": [json.loads(p.read_text()) for p in summaries],
    }
    runs = pooled(report, earlier)
    invocations = [inv for _, other in earlier for inv in invocations_of(other)]
    invocations += invocations_of(report) if args.seed_list else []
    arms = per_arm(runs, before)
    comparisons = paired(runs, "eval_em", before) + paired(runs, "reward_gain", before)
    report.update(rl_seeds=sorted({r["seed"] for r in runs}), invocations=invocations, arms=arms, paired=comparisons,
                  runs=runs)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    walls = ", ".join(f"`{i['command']}` (seeds {','.join(map(str, i['rl_seeds']))}): {i['total_wall_s']:.0f}s"
                      for i in invocations)
    md = (f"# {Path(args.json).stem}\n\n{args.model} from {report['model']}, tree M,L,K = {args.tree} "
          f"(chains: {args.m + args.l * args.k} per prompt), {args.batch_prompts} prompts/step, lr {args.lr}, budget "
          f"{args.token_budget} generated tokens per run, {len(report['rl_seeds'])} RL seeds, {args.hops}-hop "
          f"questions, {before['n']} held-out. Wall per invocation: {walls}.\n\nPer arm, mean ± 95 % CI over seeds:"
          f"\n\n{arm_table(arms, before)}\n\nAT²PO against each baseline, paired by seed:\n\n"
          f"{paired_table(comparisons)}\n\nEvery run:\n\n{run_table(runs)}\n")
    Path(args.json).with_suffix(".md").write_text(md)
    plot(runs, args.png, f"{Path(args.json).stem}: mean and 95 % band over seeds (tree {args.tree}, "
                         f"{args.batch_prompts} prompts/step, lr {args.lr})", args.token_budget)
    print("\n" + md)
    print(f"wrote {args.json}, {Path(args.json).with_suffix('.md')}, {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
