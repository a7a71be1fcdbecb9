"""Does it learn? AT²PO versus the GRPO-chain baseline at the same generated-token budget.

    python benchmarks/learning.py --parallel 2          # CPU: 4 arms, RL seed 0, ~17 min measured here
    python benchmarks/learning.py --parallel 2 --rl-seeds 0,1        # and a second seed (~15 min more)
    python benchmarks/learning.py --arms atpo-entropy,grpo-chain --token-budget 24000
    python benchmarks/learning.py --model smollm2-135m-instruct --assistant-prefix '<think>' --gpu  # untested

Every arm is a real ``atpo train`` run (``trainer.Trainer``: Megatron actor, HF rollout engine, the
embedded BM25 retriever, the paper's reward) in its own subprocess and run directory
(``<out>/<arm>_s<seed>/``: metrics.jsonl, config.yaml, log.txt, eval_samples_*.json). The arms
differ only in the config keys listed in ``ARMS``:

    atpo-entropy    tree rollout, entropy-guided expansion, turn-wise credit, ATPO loss   (AT²PO)
    atpo-random     the same with random expansion                        (expansion ablation)
    grpo-loss-tree  AT²PO's trees and credit, but the GRPO token loss      (loss ablation)
    grpo-chain      independent chains, GRPO outcome advantage, GRPO loss  (the paper's baseline)
    atpo-chain      independent chains, GRPO outcome advantage, ATPO loss  (optional)

Fairness: at a given RL seed every arm sees the same prompts in the same order (``train.seed``),
the same number of leaves per prompt (a chain arm draws ``tree.leaves_per_tree`` chains), the same
optimiser and learning rate. Each arm stops after the first step at which its *cumulative generated
tokens* (``rollout/generated_tokens``: tokens sampled by the engine and kept; tool results and
inserted text excluded) reach ``--token-budget``. The budget, not the step count, is held equal,
because the paper's claim is that a tree gets more leaves out of the same tokens (it shares
prefixes). Curves are plotted against generated tokens, and ``--steps`` caps every arm's steps. The
stop and the greedy evaluations before the first and after the last step come from a small
``Trainer`` subclass in the subprocess (see :func:`worker`). It stops through the preemption
handler's ``should_stop`` and keeps the evaluation samples.

The model. ``--model tiny`` (the CPU default) is a small Llama (hidden 64, 2 layers, SmolLM2's
tokenizer, random initialisation). It is first *warm-started* here by supervised fine-tuning on
synthetic demonstrations of the task's format, one per training question: ``<think>``,
``<search> query </search>`` with the hop's reference query, the real BM25 result, and
``<answer> \\boxed{golden} </answer>``. Without it nothing can learn: a random model never emits the
format, and SmolLM2-135M almost never does (its reward is -1 everywhere, so every advantage is 0).
The warm-start is short (150 steps, about 2 min here). After it, at temperature 1, about 70 % of the
leaves break the format and almost none is right. The reward therefore varies inside a prompt's
group, and RL has a signal. The warm-start is cached in ``<out>/init_<hash>`` and shared by all
arms.

``--model smollm2-135m-instruct`` (or an HF folder) trains that model directly. ``--assistant-prefix
TEXT`` then inserts TEXT (loss mask 0) at the start of every trajectory and every greedy evaluation.
The trainer has no config key for it yet, so the subprocess passes it to ``TreeRollout``.

Output: a table with one row per arm and seed: steps, generated tokens (and the tree's saving against
chains with the same leaves), the mean reward of the first and of the last k steps, the per-step
reward std, format failures, training EM, greedy eval EM before and after (with the number of
distinct answers), and s/step and wall seconds. A second table gives the mean over seeds. Both go to
``--json`` (default ``benchmarks/results/learning_cpu.json`` on CPU) and to a Markdown copy next to
it, and a PNG (``--png``) shows the reward curves side by side.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python benchmarks/learning.py` from anywhere
    sys.path.insert(0, str(REPO_ROOT))

# Config keys of each arm, applied on top of the base config (see _base_overrides).
ARMS: dict[str, dict[str, Any]] = {
    "atpo-entropy": {"rollout.mode": "tree", "tree.expansion_mode": "entropy", "loss.name": "atpo"},
    "atpo-random": {"rollout.mode": "tree", "tree.expansion_mode": "random", "loss.name": "atpo"},
    "grpo-loss-tree": {"rollout.mode": "tree", "tree.expansion_mode": "entropy", "loss.name": "grpo"},
    "grpo-chain": {"rollout.mode": "chain", "loss.name": "grpo"},
    "atpo-chain": {"rollout.mode": "chain", "loss.name": "atpo"},
}
DEFAULT_ARMS = "atpo-entropy,grpo-chain,atpo-random,grpo-loss-tree"

# The tiny model of --model tiny (random initialisation, SmolLM2's tokenizer).
TINY = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)
TOPK = 2
"""Passages per search (SFT demonstrations and RL): two keep the contexts short on a CPU."""

# Presets: CPU (this machine: 2 shared cores) and one GPU.
PRESETS = {
    "cpu": dict(token_budget=12000, steps=30, batch_prompts=8, chains=2, expansions=1, top_k=2,
                lr=1e-3, eval_limit=24, sft_steps=150, sft_batch=8, sft_lr=3e-3),
    "gpu": dict(token_budget=400000, steps=200, batch_prompts=16, chains=4, expansions=2, top_k=2,
                lr=1e-5, eval_limit=100, sft_steps=600, sft_batch=32, sft_lr=2e-3),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny",
                   help="tiny (a small Llama warm-started here, the CPU default), smollm2-135m-instruct, or an "
                        "HF folder")
    p.add_argument("--arms", default=DEFAULT_ARMS, help=f"comma list of {', '.join(ARMS)}")
    p.add_argument("--gpu", action="store_true", help="the one-GPU preset (bigger batches and budget, bf16)")
    p.add_argument("--token-budget", type=int, default=None, help="generated tokens per arm (preset default)")
    p.add_argument("--steps", type=int, default=None, help="at most this many steps per arm (preset default)")
    p.add_argument("--batch-prompts", type=int, default=None, help="prompts per step")
    p.add_argument("--tree", default=None, metavar="M,L,K",
                   help="tree shape: M chains, L expansion rounds of K branches; chains arms draw M+L*K "
                        "chains (preset default)")
    p.add_argument("--lr", type=float, default=None, help="RL learning rate (constant)")
    p.add_argument("--hops", default="1,2", help="question hop counts of the generated task to train and "
                                                 "evaluate on (1, 2, 3)")
    p.add_argument("--eval-limit", type=int, default=None, help="greedy eval questions per hop count")
    p.add_argument("--assistant-prefix", default="", help="text inserted (mask 0) at the start of every trajectory")
    p.add_argument("--sft-steps", type=int, default=None, help="--model tiny: warm-start steps")
    p.add_argument("--sft-lr", type=float, default=None)
    p.add_argument("--sft-batch", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="seed of the generated task and of the warm-start")
    p.add_argument("--rl-seeds", default="0",
                   help="comma list: every arm runs once per seed (train.seed = 1234 + s: prompt order, sampling, "
                        "expansion draws); the table shows each run and the mean over seeds")
    p.add_argument("--out", default="runs/learning", help="run directories (one per arm), task and warm-start")
    p.add_argument("--json", default=None, help="results JSON (default benchmarks/results/learning_<cpu|gpu>.json)")
    p.add_argument("--png", default=None, help="reward curves (default: next to --json)")
    p.add_argument("--last-k", type=int, default=3,
                   help="compare the mean reward of the first k and the last k steps (3: the windows do not "
                        "overlap for the 7-11 steps a CPU arm runs)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")),
                   help="torch threads of the warm-start and of every arm. On the shared, "
                        "oversubscribed 2-core machine 1 was faster than 2")
    p.add_argument("--parallel", type=int, default=1,
                   help="arms run at once, each with --threads threads (wall times then overlap; steps and "
                        "tokens are unaffected)")
    p.add_argument("--reuse", action="store_true", help="do not rerun an arm whose run directory finished")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one arm, JSON spec
    args = p.parse_args(argv)
    preset = PRESETS["gpu" if args.gpu else "cpu"]
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.tree:
        args.chains, args.expansions, args.top_k = (int(x) for x in args.tree.split(","))
    args.tree = f"{args.chains},{args.expansions},{args.top_k}"
    args.rl_seed_list = [int(x) for x in args.rl_seeds.split(",")]
    args.hop_list = sorted({int(h) for h in args.hops.split(",")})
    if not set(args.hop_list) <= {1, 2, 3}:
        p.error(f"--hops {args.hops}: choose among 1, 2, 3")
    unknown = [a for a in args.arms.split(",") if a not in ARMS]
    if unknown:
        p.error(f"unknown arm(s) {unknown}; choose among {', '.join(ARMS)}")
    kind = "gpu" if args.gpu else "cpu"
    args.json = args.json or str(REPO_ROOT / "benchmarks" / "results" / f"learning_{kind}.json")
    args.png = args.png or str(Path(args.json).with_suffix(".png"))
    return args


# ---------------------------------------------------------------------------------------------- task

def prepare_task(args) -> dict[str, str]:
    """The generated task (seed ``--seed``) and its train/test questions of the chosen hop counts."""
    from atpo_megatron.env.data import generate_task

    out = Path(args.out) / "task"
    files = generate_task(out, seed=args.seed)
    sources = {f"gen-{h}hop" for h in args.hop_list}
    tag = "".join(str(h) for h in args.hop_list)
    paths = {"corpus": str(files.corpus)}
    for split in ("train", "test"):
        rows = [json.loads(line) for line in getattr(files, split).read_text().splitlines() if line.strip()]
        rows = [r for r in rows if r["data_source"] in sources]
        if split == "test" and args.eval_limit:  # equal shares per hop count
            rows = [r for s in sorted(sources) for r in [x for x in rows if x["data_source"] == s][:args.eval_limit]]
        path = out / f"{split}_hops{tag}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths[split] = str(path)
    return paths


# ---------------------------------------------------------------------------------------- warm start

def demonstration(tok, search, row: dict, max_prompt_tokens: int) -> tuple[list[int], list[int]]:
    """(ids, loss mask) of one synthetic trajectory, built as the agent loop builds contexts."""
    from atpo_megatron.env.prompts import format_tool_result
    from atpo_megatron.rollout.agent_loop import encode_prompt

    def enc(text: str) -> list[int]:
        return list(tok.encode(text, add_special_tokens=False))

    ids = encode_prompt(tok, row["question"], max_prompt_tokens)
    mask = [0] * len(ids)
    hops = row["metadata"]["hops"]
    results = search.search_batch([h["query"] for h in hops])
    for k, (hop, res) in enumerate(zip(hops, results)):
        turn = enc(("" if k == 0 else " ") + f"<think> search </think> <search> {hop['query']} </search>")
        obs = enc(format_tool_result(res.text))
        ids += turn + obs
        mask += [1] * len(turn) + [0] * len(obs)
    answer = row["golden_answers"][0]
    final = enc(f" <think> found </think> <answer> \\boxed{{{answer}}} </answer>") + [tok.eos_token_id]
    return ids + final, mask + [1] * len(final)


def warm_start(args, task: dict[str, str]) -> tuple[Path, dict[str, Any]]:
    """A tiny Llama, supervised on demonstrations of the format; cached by its parameters."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from atpo_megatron.hub import resolve_model

    spec = dict(TINY, sft_steps=args.sft_steps, sft_batch=args.sft_batch, sft_lr=args.sft_lr, hops=args.hop_list,
                seed=args.seed, topk=TOPK, version=1)
    key = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    out = Path(args.out) / f"init_{key}"
    if (out / "warm_start.json").is_file():
        return out, json.loads((out / "warm_start.json").read_text())

    t0 = time.perf_counter()
    smol = resolve_model("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(smol)
    search = _LocalSearch(task["corpus"], topk=TOPK)
    rows = [json.loads(line) for line in Path(task["train"]).read_text().splitlines()]
    demos = [demonstration(tok, search, r, 2048) for r in rows]
    config = LlamaConfig(vocab_size=len(tok), max_position_embeddings=2048, rms_norm_eps=1e-5,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, **TINY)
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config).float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.sft_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    losses = []
    for step in range(args.sft_steps):
        pick = torch.randint(len(demos), (args.sft_batch,), generator=gen).tolist()
        loss = _sft_loss(model, [demos[i] for i in pick], tok.pad_token_id)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for g in opt.param_groups:  # linear warm-up over the first 10% of the steps
            g["lr"] = args.sft_lr * min(1.0, (step + 1) / max(1, args.sft_steps // 10))
        opt.step()
        losses.append(loss.item())
        if step % 20 == 0 or step + 1 == args.sft_steps:
            print(f"  warm-start step {step + 1}/{args.sft_steps}: loss {loss.item():.3f}", flush=True)
    model.eval()
    held_out = [json.loads(line) for line in Path(task["test"]).read_text().splitlines()][:16]
    with torch.no_grad():
        test_loss = _sft_loss(model, [demonstration(tok, search, r, 2048) for r in held_out], tok.pad_token_id).item()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    info = {"spec": spec, "demonstrations": len(demos), "loss_first": losses[0],
            "loss_last": sum(losses[-10:]) / len(losses[-10:]),
            "held_out_loss": test_loss,
            "params": sum(p.numel() for p in model.parameters()), "seconds": time.perf_counter() - t0,
            "demo_tokens_mean": sum(len(d[0]) for d in demos) / len(demos)}
    (out / "warm_start.json").write_text(json.dumps(info, indent=1) + "\n")
    return out, info


def _sft_loss(model, demos, pad_id: int):
    """Mean NLL over the loss-mask tokens; logits only at those positions (the vocabulary is 49k)."""
    import torch

    n = max(len(ids) for ids, _ in demos)
    ids = torch.full((len(demos), n), pad_id, dtype=torch.long)
    attn = torch.zeros((len(demos), n), dtype=torch.long)
    target = torch.zeros((len(demos), n), dtype=torch.bool)
    for i, (d, m) in enumerate(demos):
        ids[i, :len(d)] = torch.tensor(d)
        attn[i, :len(d)] = 1
        target[i, :len(m)] = torch.tensor(m, dtype=torch.bool)
    hidden = model.model(input_ids=ids, attention_mask=attn).last_hidden_state  # [B, T, H]
    predict = torch.zeros_like(target)
    predict[:, :-1] = target[:, 1:]  # position t predicts token t+1
    logits = model.lm_head(hidden[predict])
    return torch.nn.functional.cross_entropy(logits.float(), ids[:, 1:][target[:, 1:]])


class _LocalSearch:
    """BM25 over the corpus in this process, formatted as the retriever server + SearchClient do."""

    def __init__(self, corpus_path: str, topk: int = 3, max_chars: int = 1000):
        from atpo_megatron.env.retriever import BM25Backend, load_corpus

        self.corpus = load_corpus(corpus_path)
        self.backend, self.topk, self.max_chars = BM25Backend(self.corpus), topk, max_chars

    def search_batch(self, queries):
        from atpo_megatron.env.search_tool import SearchResult, clean_query, format_passages

        hits = self.backend.search([clean_query(q) for q in queries], self.topk)
        return [SearchResult(True, format_passages([self.corpus.document(d) for d, _ in row], self.max_chars))
                for row in hits]


# -------------------------------------------------------------------------------------------- arms

def base_overrides(args, task: dict[str, str], model: str) -> dict[str, Any]:
    """The config shared by every arm (on top of ``examples/embedded_smollm2.yaml``)."""
    m, l_, k = args.chains, args.expansions, args.top_k
    o: dict[str, Any] = {
        "model.name_or_path": model,
        "model.dtype": "bfloat16" if args.gpu else "float32",
        "rollout.max_turns": 3,
        "rollout.tool_call_limit": 2,
        "rollout.max_response_tokens": 448,
        "rollout.max_turn_tokens": 48,
        "rollout.chains": m + l_ * k,
        "rollout.sampling.temperature": 1.0,
        "rollout.assistant_prefix": args.assistant_prefix,
        "tree.initial_chains": m,
        "tree.expansion_iterations": l_,
        "tree.top_k": k,
        "tree.leaves_per_tree": m + l_ * k,
        "train.steps": args.steps,
        "train.batch_prompts": args.batch_prompts,
        "train.mini_batch_prompts": max(1, args.batch_prompts // 2),
        "train.micro_batch_tokens": 16384 if args.gpu else 4096,
        "train.seed": 1234,
        "optimizer.lr": args.lr,
        "optimizer.min_lr": args.lr,
        "optimizer.lr_decay_style": "constant",
        "optimizer.weight_decay": 0.0,
        "data.train_files": [task["train"]],
        "data.eval_files": [task["test"]],
        "data.eval_limit": 0,
        "data.embedded_dir": str(Path(args.out) / "task"),
        "data.embedded_seed": args.seed,
        "retriever.url": "embedded",
        "retriever.corpus": task["corpus"],
        "retriever.topk": TOPK,
        "logging.eval_every": 0,
        "logging.save_tree_pictures": False,
        "logging.tensorboard": False,
        "checkpoint.save_every": 0,
        "checkpoint.resume": "never",
    }
    if args.gpu:
        o.update({"rollout.static_cache": True, "rollout.generation_batch_size": 256})
    return o


def run_arm(args, name: str, rl_seed: int, overrides: dict[str, Any]) -> dict[str, Any]:
    """Start one arm in a subprocess (or reuse its finished run); :func:`finish_arm` waits for it."""
    run_dir = Path(args.out) / f"{name}_s{rl_seed}"
    done = run_dir / "arm.json"
    if args.reuse and done.is_file():
        print(f"[{name} seed {rl_seed}] reusing {done}")
        summary = summarize_arm(name, run_dir, args.last_k)
        summary.update(rl_seed=rl_seed, wall_s=json.loads(done.read_text())["wall_s"])
        return summary
    overrides = {**overrides, "train.seed": 1234 + rl_seed}
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    spec = {"name": name, "overrides": {**overrides, "logging.run_dir": str(run_dir)},
            "token_budget": args.token_budget}
    (run_dir / "spec.json").write_text(json.dumps(spec, indent=1) + "\n")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(run_dir / "spec.json")]
    print(f"[{name}] {' '.join(cmd)}", flush=True)
    logf = open(run_dir / "log.txt", "w")
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env)
    return {"name": name, "rl_seed": rl_seed, "proc": proc, "log": logf, "t0": time.perf_counter(),
            "run_dir": run_dir}


def finish_arm(args, job: dict[str, Any]) -> dict[str, Any]:
    """Wait for an arm launched by :func:`run_arm`; its summary (also ``<run_dir>/arm.json``)."""
    if "proc" not in job:  # reused
        return job
    name, run_dir = job["name"], job["run_dir"]
    rc = job["proc"].wait()
    job["log"].close()
    wall = time.perf_counter() - job["t0"]
    done = run_dir / "arm.json"
    if rc != 0:
        tail = (run_dir / "log.txt").read_text()[-3000:]
        raise SystemExit(f"[{name}] the arm failed (exit {rc}); last lines of {run_dir / 'log.txt'}:\n{tail}")
    summary = summarize_arm(name, run_dir, args.last_k)
    summary.update(rl_seed=job["rl_seed"], wall_s=wall)
    done.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def worker(spec_path: str) -> int:
    """Inside the arm's subprocess: the real Trainer, stopped at the token budget, evaluated before and after."""
    import logging

    from atpo_megatron.actor.parallel import destroy_distributed
    from atpo_megatron.config import load_config
    from atpo_megatron.trainer import Trainer

    spec = json.loads(Path(spec_path).read_text())
    overrides = [f"{k}={json.dumps(v)}" for k, v in spec["overrides"].items()]
    cfg = load_config(REPO_ROOT / "examples" / "embedded_smollm2.yaml", overrides)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("megatron", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    budget = spec["token_budget"]

    class BudgetStop:
        """Stands in for the preemption handler: "stop" once the token budget is spent."""

        def __init__(self, inner):
            self.inner, self.hit = inner, False

        def should_stop(self) -> bool:
            return self.hit or self.inner.should_stop()

        def __getattr__(self, name):
            return getattr(self.inner, name)

    class BudgetTrainer(Trainer):
        def evaluate(self):
            """The trainer's greedy evaluation; also keeps its samples (answers) in eval_samples_<n>.json."""
            import atpo_megatron.evaluate as ev

            original_evaluate, captured = ev.evaluate, []

            def keep(*a, **kw):
                report = original_evaluate(*a, **kw)
                captured.extend(report["samples"])
                return report

            ev.evaluate = keep
            try:
                out = super().evaluate()
            finally:
                ev.evaluate = original_evaluate
            self.evals = getattr(self, "evals", 0) + 1
            if self.rank == 0:
                answers: dict[str, int] = {}
                for smp in captured:
                    answers[str(smp["answer"])] = answers.get(str(smp["answer"]), 0) + 1
                (self.run_dir / f"eval_samples_{self.evals}.json").write_text(json.dumps(
                    {"metrics": out, "distinct_answers": len(answers),
                     "most_common_answers": sorted(answers.items(), key=lambda kv: -kv[1])[:5],
                     "samples": captured}, indent=1) + "\n")
            return out

        def fit(self):
            self.tokens = 0.0
            self.preemption = BudgetStop(self.preemption)
            t0 = time.perf_counter()
            start = self.evaluate()
            (self.run_dir / "eval_start.json").write_text(
                json.dumps({**start, "eval_s": time.perf_counter() - t0}, indent=1) + "\n")
            return super().fit()

        def train_one_step(self, step):
            metrics = super().train_one_step(step)
            self.tokens += metrics.get("rollout/generated_tokens", 0.0) * self.dp_size
            metrics["bench/generated_tokens_cum"] = self.tokens
            if self.tokens >= budget or step + 1 == self.cfg.train.steps:
                self.preemption.hit = self.tokens >= budget
                with self.timer.stage("eval"):
                    metrics.update(self.evaluate())
            return metrics

    trainer = BudgetTrainer(cfg)
    trainer.fit()
    destroy_distributed()
    return 0


# -------------------------------------------------------------------------------------- reporting

def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def summarize_arm(name: str, run_dir: Path, last_k: int) -> dict[str, Any]:
    rows = read_jsonl(run_dir / "metrics.jsonl")
    if not rows:
        raise SystemExit(f"[{name}] {run_dir / 'metrics.jsonl'} is empty: the arm logged no step")
    start = json.loads((run_dir / "eval_start.json").read_text()) if (run_dir / "eval_start.json").is_file() else {}
    end = next((r for r in reversed(rows) if "eval/em_avg" in r), {})

    def col(key):
        return [r.get(key, float("nan")) for r in rows]

    rewards = col("rollout/reward_mean")
    k = min(last_k, len(rewards))
    return {
        "arm": name,
        "overrides": ARMS[name],
        "steps": len(rows),
        "generated_tokens": rows[-1].get("bench/generated_tokens_cum", float("nan")),
        "chain_equivalent_tokens": sum(col("rollout/chain_tokens")),
        "tree_token_saving": 1.0 - sum(col("rollout/generated_tokens")) / max(sum(col("rollout/chain_tokens")), 1.0),
        "curve": {
            "step": [r["step"] for r in rows],
            "generated_tokens": col("bench/generated_tokens_cum"),
            "reward_mean": rewards,
            "format_failure_rate": col("rollout/format_failure_rate"),
            "em": col("rollout/em"),
            "uniform_reward_trees": col("rollout/uniform_reward_trees"),
            "pg_loss": col("actor/pg_loss"),
        },
        "reward_first": rewards[0],
        "reward_last": rewards[-1],
        "reward_first_k_mean": sum(rewards[:k]) / k,
        "reward_last_k_mean": sum(rewards[-k:]) / k,
        "reward_step_std": _std(rewards),
        "last_k": k,
        "format_failure_first_k": sum(col("rollout/format_failure_rate")[:k]) / k,
        "format_failure_last_k": sum(col("rollout/format_failure_rate")[-k:]) / k,
        "train_em_first_k": sum(col("rollout/em")[:k]) / k,
        "train_em_last_k": sum(col("rollout/em")[-k:]) / k,
        "uniform_reward_trees_mean": sum(col("rollout/uniform_reward_trees")) / len(rows),
        "eval_em_start": start.get("eval/em_avg", float("nan")),
        "eval_em_end": end.get("eval/em_avg", float("nan")),
        "eval_em_start_per_source": {k2: v for k2, v in start.items() if k2.startswith("eval/em_gen")},
        "eval_em_end_per_source": {k2: v for k2, v in end.items() if k2.startswith("eval/em_gen")},
        "eval_end_answers": eval_answers(run_dir),
        "step_s_mean": sum(sum(v for kk, v in r.items() if kk.startswith("timing/") and kk.endswith("_s")
                               and kk != "timing/eval_s") for r in rows) / len(rows),
    }


def _std(xs: list[float]) -> float:
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else float("nan")


def eval_answers(run_dir: Path) -> dict[str, Any]:
    """Distinct greedy answers of the last evaluation (a constant answer can score EM by luck)."""
    files = sorted(run_dir.glob("eval_samples_*.json"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    if not files:
        return {}
    last = json.loads(files[-1].read_text())
    return {"distinct_answers": last["distinct_answers"], "most_common_answers": last["most_common_answers"]}


def table(results: list[dict[str, Any]]) -> str:
    k = results[0]["last_k"] if results else 0
    head = (f"| arm | RL seed | steps | generated tokens (saving vs chains) | "
            f"reward, mean of first {k} → last {k} steps | "
            "per-step reward std | "
            f"format failures, first {k} → last {k} | training EM, first {k} → last {k} | "
            "greedy eval EM, before → after (distinct answers after) | s/step | wall s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        distinct = r.get("eval_end_answers", {}).get("distinct_answers", "?")
        lines.append(
            f"| {r['arm']} | {r['rl_seed']} | {r['steps']} | {r['generated_tokens']:.0f} "
            f"({100 * r.get('tree_token_saving', 0.0):.1f}%) | "
            f"{r['reward_first_k_mean']:+.3f} → {r['reward_last_k_mean']:+.3f} | {r['reward_step_std']:.3f} | "
            f"{r['format_failure_first_k']:.2f} → {r['format_failure_last_k']:.2f} | "
            f"{r['train_em_first_k']:.3f} → {r['train_em_last_k']:.3f} | "
            f"{r['eval_em_start']:.3f} → {r['eval_em_end']:.3f} ({distinct}) | {r['step_s_mean']:.1f} | "
            f"{r['wall_s']:.0f} |")
    return "\n".join(lines)


def means(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per arm, the mean over its RL seeds of the table's numbers."""
    keys = ("steps", "generated_tokens", "reward_first_k_mean", "reward_last_k_mean", "format_failure_first_k",
            "format_failure_last_k", "train_em_first_k", "train_em_last_k", "eval_em_start", "eval_em_end")
    out = []
    for arm in dict.fromkeys(r["arm"] for r in results):
        rows = [r for r in results if r["arm"] == arm]
        m = {k: sum(r[k] for r in rows) / len(rows) for k in keys}
        m["reward_gain_per_seed"] = [r["reward_last_k_mean"] - r["reward_first_k_mean"] for r in rows]
        out.append({"arm": arm, "seeds": [r["rl_seed"] for r in rows], **m})
    return out


def mean_table(rows: list[dict[str, Any]], k: int) -> str:
    head = (f"| arm | seeds | steps | generated tokens | reward, first {k} → last {k} | gain per seed | "
            f"format failures, first {k} → last {k} | greedy eval EM, before → after |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for m in rows:
        gains = ", ".join(f"{g:+.3f}" for g in m["reward_gain_per_seed"])
        lines.append(
            f"| {m['arm']} | {len(m['seeds'])} | {m['steps']:.1f} | {m['generated_tokens']:.0f} | "
            f"{m['reward_first_k_mean']:+.3f} → {m['reward_last_k_mean']:+.3f} | {gains} | "
            f"{m['format_failure_first_k']:.2f} → {m['format_failure_last_k']:.2f} | "
            f"{m['eval_em_start']:.3f} → {m['eval_em_end']:.3f} |")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    colors = {arm: f"C{i}" for i, arm in enumerate(dict.fromkeys(r["arm"] for r in results))}
    seeds = list(dict.fromkeys(r["rl_seed"] for r in results))
    styles = ["-", "--", ":", "-."]
    for r in results:
        c = r["curve"]
        x = [t / 1000 for t in c["generated_tokens"]]
        style = dict(color=colors[r["arm"]], ls=styles[seeds.index(r["rl_seed"]) % len(styles)], marker="o", ms=3,
                     label=f"{r['arm']} (seed {r['rl_seed']})" if len(seeds) > 1 else r["arm"])
        axes[0].plot(x, c["reward_mean"], **style)
        axes[1].plot(x, c["format_failure_rate"], **style)
        axes[2].plot(x, c["em"], **style)
    for ax, what in zip(axes, ("mean leaf reward (-1 format fail, 0 wrong, 1 EM)", "format failure rate",
                               "training EM (no format check)")):
        ax.set_xlabel("generated tokens (thousands)")
        ax.set_title(what, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args.worker)
    t0 = time.perf_counter()
    import torch

    torch.set_num_threads(args.threads)
    task = prepare_task(args)
    warm = None
    if args.model == "tiny":
        print(f"warm-start: tiny Llama {TINY}, {args.sft_steps} SFT steps on {task['train']}", flush=True)
        model_dir, warm = warm_start(args, task)
        model = str(model_dir)
        print(f"warm-start done: loss {warm['loss_first']:.2f} -> {warm['loss_last']:.2f}, {warm['seconds']:.0f}s")
    else:
        model = args.model
    base = base_overrides(args, task, model)
    runs = [(name, seed) for seed in args.rl_seed_list for name in args.arms.split(",")]
    results, running = [], []
    for i, (name, seed) in enumerate(runs):
        running.append(run_arm(args, name, seed, {**base, **ARMS[name]}))
        if len(running) < max(1, args.parallel) and i + 1 < len(runs):
            continue
        for job in running:
            results.append(finish_arm(args, job))
            r = results[-1]
            print(f"[{r['arm']} seed {r['rl_seed']}] {r['steps']} steps, {r['generated_tokens']:.0f} generated "
                  f"tokens, reward "
                  f"{r['reward_first_k_mean']:+.3f} -> {r['reward_last_k_mean']:+.3f} (mean of first/last "
                  f"{r['last_k']}), eval EM {r['eval_em_start']:.3f} -> {r['eval_em_end']:.3f}, {r['wall_s']:.0f}s",
                  flush=True)
        running = []
    report = {
        "benchmark": "learning",
        "command": "python benchmarks/learning.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "model": args.model, "warm_start": warm, "task": task, "hops": args.hop_list,
        "tree": args.tree, "batch_prompts": args.batch_prompts, "token_budget": args.token_budget,
        "max_steps": args.steps, "lr": args.lr, "assistant_prefix": args.assistant_prefix,
        "base_overrides": base, "device": "cuda" if args.gpu else f"cpu ({args.threads} threads)",
        "torch": torch.__version__, "total_wall_s": time.perf_counter() - t0, "rl_seeds": args.rl_seed_list,
        "means": means(results), "runs": results,
    }
    k = results[0]["last_k"] if results else args.last_k
    md = table(results) + "\n\nMean over RL seeds:\n\n" + mean_table(report["means"], k)
    print()
    print(md)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    Path(args.json).with_suffix(".md").write_text(
        f"# {Path(args.json).stem}\n\n`{report['command']}` — model {args.model}, tree M,L,K = {args.tree}, "
        f"{args.batch_prompts} prompts/step, budget {args.token_budget} generated tokens, lr {args.lr}, "
        f"hops {args.hops}, total wall {report['total_wall_s']:.0f}s\n\n{md}\n")
    plot(results, args.png, f"{args.model}: reward vs generated tokens (tree {args.tree}, "
                            f"{args.batch_prompts} prompts/step, budget {args.token_budget})")
    print(f"wrote {args.json}, {Path(args.json).with_suffix('.md')}, {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
