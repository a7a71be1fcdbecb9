"""The retriever fails under a running `atpo train` (the retriever policy of env/search_tool.py).

* killed (SIGKILL) before step 2's rollout and started again on the same port 3 s later: the step
  waits for it and the run goes on, metric for metric equal to the uninterrupted reference run;
* killed for good, on 2 ranks: after ``retriever.outage_wait_s`` every rank stops with one line
  (rank 0 names the URL, rank 1 that rank 0 failed), the checkpoint of step 1 intact;
* slow (it answers after a delay) or answering garbage: a tiny real HTTP server in the test, driven
  through the real SearchClient.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import pytest

from atpo_megatron.env.data import generate_task
from atpo_megatron.env.retriever import RetrieverServer
from atpo_megatron.env.search_tool import RetrieverUnavailableError, SearchClient
from faultkit import (assert_same_steps, fails_in_one_line_per_rank, fault_env, finish_atpo, latest, read_metrics,
                      release, start_atpo, tiny_http_server, wait_held)
from process_tags import kill_tagged, tagged, tagged_pids

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.slow]

ROLLOUT = "atpo_megatron.rollout.tree_rollout:TreeRollout.sample"


@pytest.fixture
def retriever(fault_task, tmp_path):
    """The fault runs' corpus served by a retriever of the test's own (so the test can kill it)."""
    server = RetrieverServer(generate_task(fault_task).corpus, cache_dir=tmp_path / "index")
    server.start()
    yield server
    server.stop()


def test_retriever_killed_and_back_is_waited_for(retriever, reference_run, train_args, tmp_path):
    run_dir, hold = tmp_path / "run", tmp_path / "hold"
    proc = start_atpo(train_args(run_dir, 2, f"retriever.url={retriever.url}", "retriever.retries=1"), tmp_path,
                      env=fault_env({"target": ROLLOUT, "call": 2, "action": "hold", "dir": str(hold)}))
    wait_held(hold, proc)
    retriever.kill()
    release(hold)
    time.sleep(3)
    back = RetrieverServer(retriever.corpus, port=retriever.port, cache_dir=tmp_path / "index")
    back.start()
    try:
        result = finish_atpo(proc, timeout=600)
    finally:
        back.stop()
    assert "does not answer" in result.stderr and "answers again after" in result.stderr
    run, reference = read_metrics(run_dir), read_metrics(reference_run)
    assert sorted(run) == [1, 2]
    assert_same_steps(run, reference, [1, 2])
    assert run[2]["rollout/tool_errors"] == 0 and run[2]["rollout/search_queries"] > 0


def test_retriever_gone_for_good_stops_every_rank(retriever, train_args, tmp_path):
    run_dir, hold = tmp_path / "run", tmp_path / "hold"
    args = [*train_args(run_dir, 3, f"retriever.url={retriever.url}", "retriever.retries=1",
                        "retriever.outage_wait_s=3", "parallel.tp=2"), "--nproc-per-node", "2"]
    proc = start_atpo(args, tmp_path, env=fault_env({"target": ROLLOUT, "call": 2, "action": "hold", "rank": 0,
                                                     "dir": str(hold)}))
    wait_held(hold, proc)
    retriever.kill()
    release(hold)
    result = finish_atpo(proc, timeout=300, check=False)  # no hang: every rank exits by itself
    # Every rank samples (SPMD placement), so rank 1 meets the outage itself, or, when its rollout was
    # done before the kill, learns of rank 0's in the gather: either way its one line says so.
    own = f"atpo train: error: the retriever at {retriever.url} gave no usable answer for 3 s"
    forwarded = "atpo train: error: rank 0 failed, so this rank stops too: RetrieverUnavailableError"
    lines = fails_in_one_line_per_rank(result, ranks=2, same=False)
    assert any(line.startswith(own) and "retriever.outage_wait_s=3 is over" in line for line in lines), lines
    assert all(line.startswith((own, forwarded)) for line in lines), lines
    assert latest(run_dir) == 1 and sorted(read_metrics(run_dir)) == [1]
    # and the TP=2 actor's weights reached the engine intact: its log-probs are the actor's
    assert read_metrics(run_dir)[1]["rollout/logprob_diff_max"] <= 1e-4


SLOW_S = 1.5


def _slow_answer(request: bytes) -> tuple[str, bytes]:
    """A retriever that answers correctly after SLOW_S seconds."""
    time.sleep(SLOW_S)
    queries = json.loads(request)["queries"]
    return "application/json", json.dumps({"result": [[{"document": {"id": "1", "contents": f"about {q}"},
                                                        "score": 1.0}] for q in queries]}).encode()


@pytest.fixture
def slow_server():
    with tiny_http_server(_slow_answer) as url:
        yield url


def test_slow_retriever_within_the_timeout_answers(slow_server):
    with SearchClient(slow_server, timeout_s=5.0, retries=0) as client:
        assert [r.text for r in client.search_batch(["a", "b"])] == ["Page 1: about a", "Page 1: about b"]


def test_retriever_slower_than_the_timeout_is_an_outage(slow_server):
    started = time.monotonic()
    with SearchClient(slow_server, timeout_s=0.5, retries=1, backoff_s=0.1, outage_wait_s=2.0) as client:
        with pytest.raises(RetrieverUnavailableError) as info:
            client.search_batch(["a"])
    elapsed = time.monotonic() - started
    assert isinstance(info.value.__cause__, httpx.ReadTimeout) and "ReadTimeout" in str(info.value)
    assert elapsed >= 2.0  # it waited for the retriever until the deadline (exact figures: test_search_tool.py)


def test_embedded_retriever_stops_when_its_trainer_is_killed(fault_task, tmp_path):
    """A trainer killed with SIGKILL (a node failure, an OOM kill) cannot stop the retriever server it
    started; the server watches its parent (``--parent-pid``) and stops by itself within seconds."""
    corpus = generate_task(fault_task).corpus
    starter = (f"import time\nfrom atpo_megatron.env.retriever import RetrieverServer\n"
               f"RetrieverServer({str(corpus)!r}, cache_dir={str(tmp_path / 'index')!r}).start()\n"
               f"print('up', flush=True)\ntime.sleep(600)\n")
    env, tag = tagged(os.environ)
    trainer = subprocess.Popen([sys.executable, "-c", starter], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert trainer.stdout.readline().strip() == "up"
        [server] = [pid for pid in tagged_pids(tag) if pid != trainer.pid]
        trainer.kill()
        trainer.wait()
        deadline = time.monotonic() + 30
        while server in tagged_pids(tag) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server not in tagged_pids(tag), "the retriever server outlived its killed trainer"
    finally:
        trainer.kill()
        kill_tagged(tag)
