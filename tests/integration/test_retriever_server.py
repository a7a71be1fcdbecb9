"""The retriever: BM25/dense backends in-process, and the real server in a subprocess on loopback."""

import json
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from atpo_megatron.env.data import generate_task
from atpo_megatron.env.retriever import (
    BM25Backend,
    CorpusError,
    DenseBackend,
    RetrieverServer,
    create_app,
    load_corpus,
    sentence_transformer_embedder,
)
from atpo_megatron.env.search_tool import SearchClient

pytestmark = pytest.mark.integration

PASSAGES = [
    '"Varlo Bridge"\nThe Varlo Bridge was built by Orvane Industries in 1901.',
    '"Orvane Industries"\nOrvane Industries was founded by Kel Mar.',
    '"Tesh"\nTesh is a city on the Brun River.',
    '"Kel Mar"\nKel Mar was born in Tesh.',
]


@pytest.fixture
def small_corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"id": f"d{i}", "contents": c}) + "\n" for i, c in enumerate(PASSAGES)))
    return path


def test_corpus_errors_name_file_and_line(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        load_corpus(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "contents": "ok"}\n{"id": 2, "text": "no contents"}\n')
    with pytest.raises(CorpusError, match=f"{bad}:2"):
        load_corpus(bad)
    bad.write_text('{"id": 1, "contents": "ok"}\n\n{oops\n')
    with pytest.raises(CorpusError, match=f"{bad}:3: invalid JSON"):
        load_corpus(bad)


def test_bm25_ranks_and_caches(small_corpus, tmp_path):
    corpus = load_corpus(small_corpus)
    cache = tmp_path / "cache"
    bm25 = BM25Backend(corpus, cache_dir=cache)
    [index_dir] = cache.iterdir()
    assert index_dir.name.startswith("bm25-")
    hits = bm25.search(["Who built the Varlo Bridge", "Kel Mar born", "zzzz unknown", "the of a"], topk=10)
    assert hits[0][0][0] == 0 and len(hits[0]) == 1  # only documents sharing a term come back
    assert [i for i, _ in hits[1]] == [3, 1]
    assert hits[1][0][1] > hits[1][1][1] > 0
    assert hits[2] == [] and hits[3] == []
    again = BM25Backend(corpus, cache_dir=cache)  # loaded from the cache, same answers
    assert again.search(["Kel Mar born"], topk=10) == [hits[1]]
    assert list(cache.iterdir()) == [index_dir]


def _bag_of_words(dim=64):
    """A deterministic embedding: hashed word counts, L2-normalised; records what it embeds."""
    calls = []

    def embed(texts, is_query):
        calls.append((len(texts), is_query))
        out = np.zeros((len(texts), dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in text.lower().replace('"', " ").replace(".", " ").split():
                out[row, zlib.crc32(word.encode()) % dim] += 1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)

    return embed, calls


def test_dense_backend_flat_inner_product(small_corpus, tmp_path):
    corpus = load_corpus(small_corpus)
    embed, calls = _bag_of_words()
    dense = DenseBackend(corpus, embed, model_name="bow", cache_dir=tmp_path, batch_size=3)
    assert calls == [(3, False), (1, False)]  # passages embedded in batches
    hits = dense.search(["Orvane Industries founded by Kel Mar", "Tesh city Brun River"], topk=2)
    assert [i for i, _ in hits[0]] == [1, 3] and [i for i, _ in hits[1]][0] == 2
    passages = embed(corpus.contents, False)
    query = embed(["Orvane Industries founded by Kel Mar"], True)[0]
    assert hits[0][0][1] == pytest.approx(float(passages[1] @ query), abs=1e-6)  # the score is the inner product
    assert len(dense.search(["x"], topk=100)[0]) == len(PASSAGES)  # topk capped at the corpus size
    calls.clear()
    cached = DenseBackend(corpus, embed, model_name="bow", cache_dir=tmp_path)
    assert calls == []  # passage embeddings come from the cache
    assert cached.search(["Tesh city Brun River"], topk=2) == [hits[1]]
    chunked = DenseBackend(corpus, embed, model_name="bow", chunk_rows=1)  # one passage at a time
    queries = ["Orvane Industries founded by Kel Mar", "Tesh city Brun River"]  # no ties in their top 2
    for got, expected in zip(chunked.search(queries, topk=2), dense.search(queries, topk=2)):
        assert [i for i, _ in got] == [i for i, _ in expected]
        assert [s for _, s in got] == pytest.approx([s for _, s in expected], abs=1e-6)


def test_dense_backend_rejects_bad_embeddings(small_corpus):
    with pytest.raises(ValueError, match="expected \\[n, dim\\]"):
        DenseBackend(load_corpus(small_corpus), lambda texts, q: np.zeros(len(texts)), model_name="bad")


def test_dense_without_sentence_transformers_says_what_to_install():
    try:
        import sentence_transformers  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install sentence-transformers"):
            sentence_transformer_embedder()
    else:
        pytest.skip("sentence-transformers is installed")


def test_app_with_dense_backend_in_process(small_corpus):
    corpus = load_corpus(small_corpus)
    embed, _ = _bag_of_words()
    app = create_app(corpus, DenseBackend(corpus, embed, model_name="bow"), default_topk=1)
    with TestClient(app) as client:
        assert client.get("/health").json() == {"status": "ok", "backend": "dense", "documents": 4}
        body = client.post("/retrieve", json={"queries": ["Kel Mar born Tesh"], "return_scores": False}).json()
        assert body == {"result": [[{"id": "d3", "contents": PASSAGES[3]}]]}  # default topk 1


# ------------------------------------------------------------------ the real server, in a subprocess


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return generate_task(tmp_path_factory.mktemp("task"), seed=0)


@pytest.fixture(scope="module")
def server(task, tmp_path_factory):
    with RetrieverServer(task.corpus, cache_dir=tmp_path_factory.mktemp("cache"), startup_timeout_s=60) as running:
        yield running


def test_health(server):
    body = httpx.get(f"{server.base_url}/health").json()
    assert body["status"] == "ok" and body["backend"] == "bm25" and body["documents"] > 300
    assert server.url == f"http://127.0.0.1:{server.port}/retrieve"


def test_retrieve_batched_with_scores(server, task):
    test_rows = [json.loads(line) for line in task.test.read_text().splitlines()]
    hops = [row["metadata"]["hops"][0] for row in test_rows[:20]]
    body = httpx.post(server.url, json={"queries": [h["query"] for h in hops], "topk": 3, "return_scores": True}).json()
    assert len(body["result"]) == 20
    for hop, hits in zip(hops, body["result"]):
        assert 1 <= len(hits) <= 3
        assert set(hits[0]) == {"document", "score"} and set(hits[0]["document"]) == {"id", "contents"}
        scores = [h["score"] for h in hits]
        assert scores == sorted(scores, reverse=True)
        assert hop["passage_id"] in [h["document"]["id"] for h in hits]


def test_retrieve_topk_and_without_scores(server):
    query = {"queries": ["bridge built by", "zzzz"], "return_scores": False}
    one = httpx.post(server.url, json={**query, "topk": 1}).json()["result"]
    five = httpx.post(server.url, json={**query, "topk": 5}).json()["result"]
    default = httpx.post(server.url, json=query).json()["result"]  # no topk: the server's default, 3
    assert [len(r) for r in one] == [1, 0] and [len(r) for r in five] == [5, 0] and len(default[0]) == 3
    assert set(one[0][0]) == {"id", "contents"}  # bare documents, as Search-R1 returns them
    assert one[0][0] == five[0][0]


def test_concurrent_requests(server, task):
    test_rows = [json.loads(line) for line in task.test.read_text().splitlines()]
    batches = [[row["metadata"]["hops"][0]["query"] for row in test_rows[i::8][:6]] for i in range(8)]

    def ask(queries):
        reply = httpx.post(server.url, json={"queries": queries, "topk": 3, "return_scores": True}, timeout=30)
        return reply.status_code, [[h["document"]["id"] for h in hits] for hits in reply.json()["result"]]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, batches * 2))
    assert all(status == 200 for status, _ in answers)
    assert answers[:8] == answers[8:]  # the same questions get the same answers under load


@pytest.mark.parametrize(
    "body, field",
    [
        ({"queries": "not a list"}, "queries"),
        ({"topk": 3}, "queries"),
        ({"queries": ["q"], "topk": -1}, "topk"),
        ({"queries": [1, {"a": 2}]}, "queries"),
    ],
)
def test_malformed_requests_get_422_with_a_message(server, body, field):
    reply = httpx.post(server.url, json=body)
    assert reply.status_code == 422
    details = reply.json()["detail"]
    assert any(field in detail["loc"] and detail["msg"] for detail in details)


@pytest.mark.faults
@pytest.mark.parametrize(
    "content, status, message",
    [
        (b"{not json", 422, "JSON decode error"),
        (json.dumps({"queries": ["q"] * 8193}).encode(), 422, "at most 8192 items"),
        (json.dumps({"queries": ["x" * 8193]}).encode(), 422, "at most 8192 characters"),
        (json.dumps({"queries": ["q"], "topk": 101}).encode(), 422, "less than or equal to 100"),
        (b'{"queries": ["' + b"q" * (16 << 20) + b'"]}', 413, "larger than this server's limit of 16777216 bytes"),
    ],
    ids=["not_json", "too_many_queries", "query_too_long", "topk_too_large", "body_over_16_mib"],
)
def test_oversized_and_malformed_requests_get_a_4xx_with_a_message(server, content, status, message):
    reply = httpx.post(server.url, content=content, headers={"Content-Type": "application/json"}, timeout=30)
    assert reply.status_code == status and message in reply.text
    assert httpx.get(f"{server.base_url}/health").status_code == 200  # and the server is still up


@pytest.mark.faults
def test_chunked_body_without_length_is_refused(server):
    reply = httpx.post(server.url, content=iter([b'{"queries": ', b'["q"]}']), timeout=30)  # a generator: chunked
    assert reply.status_code == 411 and "Content-Length" in reply.json()["detail"]


@pytest.mark.faults
def test_64_concurrent_clients_are_all_answered(server, task):
    """64 loopback clients at once, 3 requests of 4 questions each (192 requests in all): every request is
    answered, with the answers it gets alone. Speed is measured by benchmarks/retriever_load.py."""
    test_rows = [json.loads(line) for line in task.test.read_text().splitlines()]
    questions = [row["metadata"]["hops"][0]["query"] for row in test_rows]
    requests = [[questions[(4 * i + j) % len(questions)] for j in range(4)] for i in range(64 * 3)]

    def ask(http, queries):
        reply = http.post(server.url, json={"queries": queries, "topk": 3, "return_scores": True})
        return reply.status_code, [[h["document"]["id"] for h in hits] for hits in reply.json()["result"]]

    with httpx.Client(timeout=60) as http:
        alone = [ask(http, q) for q in requests[:64]]  # one at a time (the first request of each client)

    def client(k):
        with httpx.Client(timeout=60) as http:
            return [ask(http, requests[k + 64 * r]) for r in range(3)]

    with ThreadPoolExecutor(64) as pool:
        together = list(pool.map(client, range(64)))
    assert all(status == 200 for answers in together for status, _ in answers)
    assert [answers[0] for answers in together] == alone
    assert all(len(ids) == 4 for answers in together for _, ids in answers)


def test_search_client_against_the_server(server):
    with SearchClient(server.url, topk=3, timeout_s=10, retries=1, backoff_s=0.05, max_chars=40) as client:
        found, empty, nothing = client.search_batch(["Varlo bridge built", " ", "qqqq zzzz"])
    assert found.ok and found.text.startswith("Page 1: ")
    assert all(len(line) <= len("Page 3: ") + 40 for line in found.text.splitlines())
    assert not empty.ok and empty.error
    assert nothing.ok and nothing.text == "No search results found."


def test_missing_corpus_fails_at_start(tmp_path):
    with pytest.raises(RuntimeError) as info:
        with RetrieverServer(tmp_path / "missing.jsonl", cache_dir=tmp_path, startup_timeout_s=30):
            pass
    assert "missing.jsonl does not exist" in str(info.value) and "exited with code 2" in str(info.value)


def test_malformed_corpus_fails_at_start_naming_the_line(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"id": "0", "contents": "fine"}\nnot json\n')
    with pytest.raises(RuntimeError, match=f"{corpus}:2: invalid JSON"):
        with RetrieverServer(corpus, cache_dir=tmp_path, startup_timeout_s=30):
            pass
