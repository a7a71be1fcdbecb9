"""The retrieval server under load: C concurrent loopback clients, each sending R requests of Q questions.

    python benchmarks/retriever_load.py --json benchmarks/results/retriever_load_cpu.json   # 64 x 20 x 4
    python benchmarks/retriever_load.py --clients 8 --requests 2                              # smoke

The real server (``atpo retriever serve``, BM25, in a subprocess on a free loopback port) over the
generated knowledge-base corpus, or ``--corpus``. Each client is a thread with its own HTTP connection
(as each DP leader's SearchClient is); the questions are the task's first-hop queries. Reported:
per-request latency (p50, p90, p99, max, from sending to the parsed reply), requests and questions
per second over the whole run, and the number of failed requests (any status but 200, or an error).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import default_json, environment, format_table, write_json  # noqa: E402  (puts the repo on sys.path)

from atpo_megatron.env.data import generate_task  # noqa: E402
from atpo_megatron.env.retriever import RetrieverServer  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation between the sorted values."""
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def run(url: str, questions: list[str], clients: int, requests: int, per_request: int, topk: int) -> dict:
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)

    def client(k: int) -> None:
        with httpx.Client(timeout=120) as http:
            http.get(url.rsplit("/", 1)[0] + "/health")  # connect before the clock starts
            start.wait()
            for r in range(requests):
                first = (k * requests + r) * per_request
                queries = [questions[(first + j) % len(questions)] for j in range(per_request)]
                t0 = time.perf_counter()
                try:
                    reply = http.post(url, json={"queries": queries, "topk": topk, "return_scores": True})
                    ok = reply.status_code == 200 and len(reply.json()["result"]) == per_request
                    error = None if ok else f"HTTP {reply.status_code}: {reply.text[:200]}"
                except (httpx.HTTPError, ValueError, KeyError) as exc:
                    error = f"{type(exc).__name__}: {exc}"
                seconds = time.perf_counter() - t0
                with lock:
                    latencies.append(seconds)
                    if error:
                        failures.append(error)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    n = clients * requests
    return {
        "clients": clients, "requests_per_client": requests, "questions_per_request": per_request, "topk": topk,
        "requests": n, "failed": len(failures), "first_failures": failures[:5], "wall_s": wall,
        "requests_per_s": n / wall, "questions_per_s": n * per_request / wall,
        "latency_ms": {name: 1000 * percentile(latencies, q) for name, q in
                       (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0))},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=20, help="requests per client")
    parser.add_argument("--queries", type=int, default=4, help="questions per request")
    parser.add_argument("--topk", type=int, default=3)
    parser.add_argument("--corpus", default="", help="JSONL corpus (default: the generated task's, in a temp folder)")
    parser.add_argument("--json", default=default_json("retriever_load"),
                        help="where to write the results (default $OUT or runs/bench; the committed CPU figures: "
                             "benchmarks/results/retriever_load_cpu.json)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="retriever_load_") as tmp:
        task = generate_task(Path(tmp) / "task", seed=0)
        corpus = Path(args.corpus) if args.corpus else task.corpus
        questions = [json.loads(line)["metadata"]["hops"][0]["query"] for line in task.test.read_text().splitlines()]
        with RetrieverServer(corpus, cache_dir=Path(tmp) / "index", topk=args.topk) as server:
            result = run(server.url, questions, args.clients, args.requests, args.queries, args.topk)
    result["corpus"] = str(corpus) if args.corpus else "generated knowledge-base task (seed 0)"
    result["environment"] = environment("cpu")
    lat = result["latency_ms"]
    print(format_table([{**result, **lat}], [
        ("clients", "clients", "d"), ("requests", "requests", "d"), ("failed", "failed", "d"),
        ("p50", "p50 ms", ".1f"), ("p90", "p90 ms", ".1f"), ("p99", "p99 ms", ".1f"), ("max", "max ms", ".1f"),
        ("requests_per_s", "req/s", ".1f"), ("questions_per_s", "questions/s", ".1f")]))
    write_json(args.json, result)


if __name__ == "__main__":
    main()
