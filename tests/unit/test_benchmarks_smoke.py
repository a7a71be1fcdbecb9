"""Every benchmark's CPU smoke mode runs (tiny shapes, seconds) and writes a JSON whose numbers make
sense. No timing assertions. The runs start together in one fixture (each is mostly start-up)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow

RUNS = {
    "actor_step": ["--attention", "sdpa", "--steps", "1", "--warmup", "0"],
    "rollout": ["--batch", "2", "--prompt-len", "8", "--new-tokens", "8", "--tree", "2,1,2", "--turns", "3",
                "--turn-tokens", "24"],
    "weight_sync": ["--repeat", "1", "--warmup", "0"],
    "loss": ["--sequences", "4", "--tokens", "256", "--repeat", "1", "--warmup", "0"],
    "fp8_linear": ["--shapes", "32x64x48", "--repeat", "1", "--warmup", "0", "--loss-steps", "6"],
    "retriever_load": ["--clients", "4", "--requests", "2", "--queries", "2"],
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    env.pop("OUT", None)
    procs = {name: subprocess.Popen([sys.executable, str(REPO / "benchmarks" / f"{name}.py"), *args,
                                     "--json", str(out / f"{name}.json")],
                                    cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name, args in RUNS.items()}
    done = {}
    for name, proc in procs.items():
        try:
            log, _ = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            proc.kill()
            log, _ = proc.communicate()
        path = out / f"{name}.json"
        done[name] = (proc.returncode, log, json.loads(path.read_text()) if path.is_file() else None)
    return done


def get(results, name):
    rc, log, data = results[name]
    assert rc == 0 and data is not None, f"benchmarks/{name}.py failed (rc {rc}):\n{log[-4000:]}"
    return data, log


def test_actor_step(results):
    data, _ = get(results, "actor_step")
    assert data["results"][0]["train"]["tokens_per_s"] > 0


def test_rollout(results):
    data, log = get(results, "rollout")
    assert [e["engine"] for e in data["engines"]] == ["hf", "hf-static"]
    for e in data["engines"]:
        assert e["generated_tokens"] == 2 * 8 and e["logprobs_ok"]  # EOS ignored: full length
    tvc = data["tree_vs_chain"]
    assert tvc["tree"]["leaves"] == tvc["chain"]["leaves"] == 2 + 1 * 2
    assert tvc["chain"]["generated_tokens"] == 4 * 3 * 24  # scripted: leaves x turns x turn tokens
    assert tvc["tree"]["chain_equivalent_tokens"] == tvc["chain"]["generated_tokens"]
    assert tvc["tree"]["generated_tokens"] <= tvc["chain"]["generated_tokens"]
    assert "fewer tokens than the chain run" in log


def test_weight_sync(results):
    data, _ = get(results, "weight_sync")
    r = data["result"]
    assert r["tensors"] == 2 * 9 + 3  # per layer: q k v o gate up down + 2 norms; embed, norm, lm_head
    assert r["max_abs_diff_after_sync"] == 0.0
    assert r["gb"] > 0 and r["weights_gb_per_s"] > 0


def test_loss(results):
    data, _ = get(results, "loss")
    names = [r["loss"] for r in data["results"]]
    assert names == ["plain", "grpo", "gspo", "atpo"]
    assert all(r["us_per_token"] > 0 for r in data["results"])
    assert data["tokens"] == 4 * 256 and 0 < data["masked_tokens"] < data["tokens"]


def test_fp8_linear(results):
    data, _ = get(results, "fp8_linear")
    rows = {r["variant"]: r for r in data["layers"]}
    assert set(rows) == {"bf16", "fp8-tensorwise", "fp8-rowwise", "fp8-tensorwise-nocache",
                         "fp8-tensorwise-torchcast", "fp8-gemm-only"}
    for name in ("fp8-tensorwise", "fp8-rowwise"):
        assert rows[name]["err_y"] < 0.05 and rows[name]["err_dx"] < 0.08 and rows[name]["err_dw"] < 0.08
    lc = data["loss_curve"]
    assert len(lc["baseline"]) == len(lc["fp8"]) == 6
    assert lc["baseline_final"] < lc["first_loss"] and lc["fp8_final"] < lc["first_loss"]  # both learn
    assert lc["max_relative_gap"] < 0.02  # and stay on the fp32 curve


def test_retriever_load(results):
    data, log = get(results, "retriever_load")
    assert (data["clients"], data["requests"], data["questions_per_request"]) == (4, 8, 2)
    assert data["failed"] == 0 and data["first_failures"] == []
    lat = data["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert "p99 ms" in log
