"""benchmarks/learning.py: the statistics behind its table (95 % intervals, paired comparisons)."""

import importlib.util
import math
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("learning", Path(__file__).resolve().parents[2] / "benchmarks/learning.py")
learning = importlib.util.module_from_spec(spec)
spec.loader.exec_module(learning)


def test_mean_ci_is_the_student_t_interval():
    mean, half = learning.mean_ci([0.1, 0.3, 0.2, 0.4, 0.5])
    sd = math.sqrt(sum((x - 0.3) ** 2 for x in [0.1, 0.3, 0.2, 0.4, 0.5]) / 4)  # 0.158
    assert mean == pytest.approx(0.3) and half == pytest.approx(2.776 * sd / math.sqrt(5))
    assert math.isnan(learning.mean_ci([0.7])[1])


def _run(arm, seed, eval_em):
    fields = dict.fromkeys(learning.ARM_FIELDS, 0.0)
    return {**fields, "arm": arm, "seed": seed, "eval_em": eval_em, "reward_first": 0.0}


def test_paired_comparison_and_verdicts():
    runs = [_run("atpo-entropy", s, e) for s, e in enumerate([0.5, 0.6, 0.4])]
    runs += [_run("grpo-chain", s, e) for s, e in enumerate([0.3, 0.4, 0.3])]  # AT²PO always ahead
    runs += [_run("atpo-random", s, e) for s, e in enumerate([0.6, 0.5, 0.5])]  # mixed
    out = {c["baseline"]: c for c in learning.paired(runs, "eval_em", {"em": 0.0})}
    assert out["grpo-chain"]["diffs"] == pytest.approx([0.2, 0.2, 0.1])
    assert out["grpo-chain"]["wins"] == 3 and out["grpo-chain"]["verdict"] == "holds"
    assert out["atpo-random"]["diffs"] == pytest.approx([-0.1, 0.1, -0.1])
    assert out["atpo-random"]["wins"] == 1 and out["atpo-random"]["verdict"] == "not resolved"
    gains = learning.per_arm(runs, {"em": 0.35})
    assert [a["arm"] for a in gains] == ["atpo-entropy", "grpo-chain", "atpo-random"]
    assert gains[0]["eval_gain"][0] == pytest.approx(0.5 - 0.35)


@pytest.mark.parametrize("preset", [[], ["--gpu", "--model", "/models/Qwen3-4B"]])
def test_every_arm_is_a_valid_atpo_train_config(preset, tmp_path):
    from atpo_megatron.config import load_config

    args = learning.parse_args([*preset, "--out", str(tmp_path)])
    task = {"dir": str(tmp_path / "task"), "corpus": "corpus.jsonl", "train": "train.jsonl", "test": "test.jsonl"}
    base = learning.base_overrides(args, task, args.model)
    for arm, keys in learning.ARMS.items():
        cfg = load_config(args.config, base + [f"{k}={v}" for k, v in keys.items()])
        assert cfg.train.max_generated_tokens == args.token_budget and cfg.optimizer.lr == args.lr
        assert cfg.rollout.mode == keys["rollout.mode"] and cfg.loss.name == keys["loss.name"]
        assert cfg.tree.leaves_per_tree == cfg.rollout.chains  # chains arms: as many leaves as a tree
    m, l_, k = (cfg.tree.initial_chains, cfg.tree.expansion_iterations, cfg.tree.top_k)
    if preset:  # the paper's setting (spec §6)
        assert (m, l_, k) == (10, 2, 6) and cfg.model.dtype == "bfloat16" and cfg.rollout.engine == "vllm"
        assert cfg.optimizer.lr == 1e-6 and cfg.retriever.topk == 3 and cfg.rollout.max_response_tokens == 6192
    else:
        assert (m, l_, k) == (2, 2, 2) and cfg.model.name_or_path == "warm-start"
