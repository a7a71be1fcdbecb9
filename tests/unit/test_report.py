"""report.py: `atpo report RUN_DIR` reads metrics.jsonl (or event files), prints a table, writes PNGs."""

import argparse

import pytest

from atpo_megatron.metrics import MetricsWriter
from atpo_megatron.report import (
    add_report_arguments,
    learning_summary,
    learning_table,
    load_metrics,
    main,
    report_main,
    summarize,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REWARDS = [0.1, 0.4, 0.3, 0.5, 0.45]


def _write_run(run_dir, tensorboard=True):
    with MetricsWriter(run_dir, tensorboard=tensorboard) as w:
        for step, reward in enumerate(REWARDS):
            w.log(step, {"rollout/reward_mean": reward, "actor/loss": 1.0 - 0.25 * step})
            w.log(step, {"rollout_s": 2.0 + step, "actor_s": 1.0}, prefix="timing")
            w.log(step, {"tokens_per_s": 1000.0 * (step + 1), "tflops_per_device": 10.0, "mfu": 0.25},
                  prefix="perf")
        w.log(4, {"eval/em": 0.375})
    return run_dir


def test_load_metrics_merges_lines_of_a_step(tmp_path):
    rows = load_metrics(_write_run(tmp_path / "run", tensorboard=False))
    assert list(rows) == [0, 1, 2, 3, 4]
    assert rows[3] == {"rollout/reward_mean": 0.5, "actor/loss": 0.25, "timing/rollout_s": 5.0,
                       "timing/actor_s": 1.0, "perf/tokens_per_s": 4000.0, "perf/tflops_per_device": 10.0,
                       "perf/mfu": 0.25}
    assert rows[4]["eval/em"] == 0.375


def test_summary_values(tmp_path):
    table = dict(summarize(load_metrics(_write_run(tmp_path / "run", tensorboard=False))))
    assert table["steps"] == "5 (0..4)"
    assert table["rollout/reward_mean first"] == "0.1"
    assert table["rollout/reward_mean last"] == "0.45"
    assert table["rollout/reward_mean best"] == "0.5 (step 3)"
    assert table["actor/loss final"] == "0 (step 4)"
    assert table["timing/rollout_s mean"] == "4.000" and table["timing/actor_s mean"] == "1.000"
    assert table["tokens/s mean"] == "3,000" and table["MFU mean"] == "25.0 %"
    assert table["eval/em"] == "last 0.375, best 0.375 (step 4)"


def test_report_prints_table_and_writes_pngs(tmp_path, capsys):
    run = _write_run(tmp_path / "run")
    assert main([str(run), "--out", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out
    for text in ("rollout/reward_mean best", "0.5 (step 3)", "timing/rollout_s mean", "MFU mean", "25.0 %"):
        assert text in out
    pngs = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert pngs == ["eval.png", "learning.png", "loss.png", "reward.png", "stage_times.png"]
    for name in pngs:
        data = (tmp_path / "plots" / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000


def test_learning_summary_and_table(tmp_path, capsys):
    with MetricsWriter(tmp_path / "run", tensorboard=False) as w:
        w.log(0, {"eval/em_avg": 0.25})  # logging.eval_before_train
        for step, (em, fmt) in enumerate([(0.1, 0.5), (0.2, 0.4), (0.3, 0.3), (0.5, 0.2), (0.6, 0.1), (0.7, 0.0)], 1):
            w.log(step, {"rollout/reward_mean": em - fmt, "rollout/em": em, "rollout/format_failure_rate": fmt,
                         "credit/turn_spread": 0.5})
        w.log(6, {"eval/em_avg": 0.75})
    rows = load_metrics(tmp_path / "run")
    table = dict(learning_summary(rows))
    # 6 steps: k = 2, means of steps 1-2 and 5-6
    assert table["train EM (rollout/em)"] == "0.150 -> 0.650 (mean of first / last 2 of 6 steps)"
    assert table["format fail (rollout/format_failure_rate)"].startswith("0.450 -> 0.050")
    assert table["reward (rollout/reward_mean)"].startswith("-0.300 -> 0.600")
    assert table["eval EM before -> after"] == "0.250 (step 0) -> 0.750 (step 6)"
    assert "tools/leaf (rollout/tool_calls_per_leaf)" not in table  # never logged
    header, body = learning_table(rows, max_rows=4)
    assert header == ["step", "reward", "train EM", "format fail", "adv. spread", "eval EM"]
    assert [r[0] for r in body] == ["0", "2", "4", "6"]  # evenly spread over steps 0..6
    assert body[0] == ["0", "", "", "", "", "0.25"] and body[-1] == ["6", "0.7", "0.7", "0", "0.5", "0.75"]
    assert main([str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "eval EM before -> after" in out and "0.250 (step 0) -> 0.750 (step 6)" in out


def test_report_falls_back_to_event_files(tmp_path, capsys):
    run = _write_run(tmp_path / "run")
    (run / "metrics.jsonl").unlink()
    rows = load_metrics(run)
    assert [r["rollout/reward_mean"] for r in rows.values() if "rollout/reward_mean" in r] == pytest.approx(REWARDS)
    args = add_report_arguments(argparse.ArgumentParser()).parse_args([str(run)])
    assert report_main(args) == 0
    assert "0.5 (step 3)" in capsys.readouterr().out
    assert (run / "report" / "reward.png").read_bytes()[:8] == PNG_MAGIC


def test_report_tolerates_a_partial_line(tmp_path, capsys):
    run = _write_run(tmp_path / "run", tensorboard=False)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "rollout/rew')  # killed mid-write
    assert list(load_metrics(run)) == [0, 1, 2, 3, 4]
    assert "malformed" in capsys.readouterr().err


def test_report_errors_clearly(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 1
    err = capsys.readouterr().err
    assert "no metrics in" in err and "metrics.jsonl" in err and "logging.run_dir" in err


def test_report_without_a_reward_still_works(tmp_path, capsys):
    with MetricsWriter(tmp_path / "run", tensorboard=False) as w:
        w.log(0, {"actor/loss": 2.0})
    assert main([str(tmp_path / "run")]) == 0
    assert sorted(p.name for p in (tmp_path / "run" / "report").iterdir()) == ["loss.png"]
