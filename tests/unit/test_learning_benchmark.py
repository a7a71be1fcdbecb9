"""benchmarks/learning.py: the statistics behind its table (95 % intervals, paired comparisons, seeds to resolve)
and the pooling of reports that ran other seeds."""

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


def test_t_quantiles_beyond_the_table():
    # exact 97.5 % quantiles (R: qt(0.975, df)) for 31, 60, 120 degrees of freedom
    assert learning.t_975(30) == 2.042 and learning.t_975(31) == pytest.approx(2.0395, abs=1e-4)
    assert learning.t_975(60) == pytest.approx(2.0003, abs=1e-4)
    assert learning.t_975(120) == pytest.approx(1.9799, abs=1e-4)


def test_seeds_to_resolve():
    # [0.2, 0.2, 0.1]: mean 1/6, sd 0.0577; n = 2: 12.706 * 0.0577 / 1.414 = 0.52 > 1/6; n = 3: 4.303 * 0.0577 /
    # 1.732 = 0.143 < 1/6
    assert learning.seeds_to_resolve([0.2, 0.2, 0.1]) == 3
    # [0.3, -0.1]: mean 0.1, sd 0.283: n = 33 gives t(32) 2.0369 * 0.283 / 5.745 = 0.1003, n = 34 gives 0.0986
    assert learning.seeds_to_resolve([0.3, -0.1]) == 34
    assert learning.seeds_to_resolve([0.1, -0.1]) is None  # a zero mean never resolves
    assert learning.seeds_to_resolve([0.3, -0.1], most=20) is None
    assert learning.seeds_to_resolve([0.5]) is None


def _report(folder, runs, lr="3e-05", em=0.0):
    base = [f"data.embedded_dir={folder}/task", f"model.name_or_path={folder}/warm_start", f"optimizer.lr={lr}"]
    return {"base_overrides": base, "eval_before": {"em": em, "n": 24}, "runs": runs, "command": "c",
            "total_wall_s": 1.0, "parallel": 2, "threads": 1}


def test_reports_of_other_seeds_pool_when_settings_and_warm_start_agree():
    here = _report("/tmp/x/runs/learning", [_run("grpo-chain", 5, 0.5), _run("atpo-entropy", 5, 0.7)])
    old = _report("runs/learning", [_run("atpo-entropy", 0, 0.4), _run("grpo-chain", 0, 0.3)])
    runs = learning.pooled(here, [("old.json", old)])
    assert [(r["arm"], r["seed"]) for r in runs] == [("atpo-entropy", 0), ("grpo-chain", 0), ("atpo-entropy", 5),
                                                     ("grpo-chain", 5)]
    assert [c["diffs"] for c in learning.paired(runs, "eval_em", {"em": 0.0})] == [pytest.approx([0.1, 0.2])]
    with pytest.raises(ValueError, match=r"other settings: optimizer.lr=1e-05, optimizer.lr=3e-05"):
        learning.pooled(here, [("old.json", _report("runs/learning", old["runs"], lr="1e-05"))])
    with pytest.raises(ValueError, match="another warm start"):
        learning.pooled(here, [("old.json", _report("runs/learning", old["runs"], em=0.25))])
    with pytest.raises(ValueError, match="grpo-chain seed 5"):
        learning.pooled(here, [("old.json", _report("runs/learning", [_run("grpo-chain", 5, 0.1)]))])
    with pytest.raises(ValueError, match="atpo-entropy seed 0"):  # checked before a planned run is started
        learning.pooled(_report("runs/learning", []), [("old.json", old)], planned={("atpo-entropy", 0)})
    assert [i["rl_seeds"] for i in learning.invocations_of(old)] == [[0]]


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


def test_an_invocation_that_runs_nothing_must_pool_reports(tmp_path):
    with pytest.raises(SystemExit):
        learning.parse_args(["--rl-seeds", "", "--out", str(tmp_path)])
    args = learning.parse_args(["--rl-seeds", "", "--merge", "a.json", "--merge", "b.json", "--out", str(tmp_path)])
    assert args.seed_list == [] and args.merge == ["a.json", "b.json"]
