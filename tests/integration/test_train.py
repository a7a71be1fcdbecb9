"""`atpo train` end to end: two real steps at TP=2 on gloo, logs read back, bad input fails fast."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from atpo_cli import run_atpo
from atpo_megatron.env.retriever import free_port

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.integration
@pytest.mark.dist
@pytest.mark.slow
def test_two_steps_tp2_write_readable_logs(tmp_path, tiny_llama_dir, tiny_run):
    run_dir = tmp_path / "run"
    run_atpo(["train", str(REPO / "examples/embedded_smollm2.yaml"), "--nproc-per-node", "2",
              f"model.name_or_path={tiny_llama_dir}", "parallel.tp=2", "train.steps=2",
              "profile.enabled=true", "profile.steps=[2,2]",
              f"logging.run_dir={run_dir}", f"data.embedded_dir={tmp_path / 'task'}", *tiny_run], tmp_path)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    scalars = {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    for tag in ("actor/loss", "rollout/reward_mean", "actor/grad_norm", "timing/rollout_s", "timing/update_s",
                "timing/weight_sync_s", "perf/tokens_per_s", "rollout/leaves", "weight_sync/gb"):
        assert len(scalars[tag]) == 2 and all(math.isfinite(v) for v in scalars[tag]), tag
    assert scalars["rollout/leaves"] == [6.0, 6.0]  # 2 prompts x (M + L*K = 2 + 1*1) leaves
    # Right after each weight sync the engine samples with the actor's exact weights (fp32, CPU).
    assert max(scalars["rollout/logprob_diff_max"]) <= 1e-4
    assert "eval/em_avg" in scalars and len(scalars["eval/em_avg"]) == 1  # eval_every=2 -> after step 2
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "trees" / "step_000001.html").is_file()
    traces = sorted((run_dir / "profile").glob("rank0_steps2-2.*.pt.trace.json"))
    assert len(traces) == 1 and json.loads(traces[0].read_text())["traceEvents"]


@pytest.mark.integration
def test_bad_config_fails_before_any_launch(tmp_path):
    proc = run_atpo(["train", str(REPO / "examples/embedded_smollm2.yaml"), "--nproc-per-node", "2",
                    "tree.expansion_mode=greedy"], tmp_path, check=False, timeout=60)
    assert proc.returncode == 2
    assert "tree.expansion_mode='greedy' is not allowed; choose one of 'entropy', 'random'" in proc.stderr


@pytest.mark.integration
@pytest.mark.slow
def test_dead_retriever_fails_fast_with_the_url(tmp_path, tiny_llama_dir, tiny_run):
    url = f"http://127.0.0.1:{free_port()}/retrieve"  # nothing listens there
    proc = run_atpo(["train", str(REPO / "examples/embedded_smollm2.yaml"), f"model.name_or_path={tiny_llama_dir}",
                    f"retriever.url={url}", f"logging.run_dir={tmp_path / 'run'}",
                    f"data.embedded_dir={tmp_path / 'task'}", *tiny_run], tmp_path, check=False, timeout=180)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"the retriever at {url} does not answer" in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.integration
def test_unwritable_run_dir_is_one_clear_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    proc = run_atpo(["train", str(REPO / "examples/embedded_smollm2.yaml"), f"logging.run_dir={blocker / 'run'}"],
                    tmp_path, check=False, timeout=180)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert (f"atpo train: configuration error: logging.run_dir={blocker / 'run'} cannot be written "
            f"(Not a directory)") in proc.stderr
    assert "Traceback" not in proc.stderr
