"""The search client: formatting, batching, retries and failure modes (a fake server, no network)."""

import json
import time

import httpx
import pytest

from atpo_megatron.env.retriever import free_port
from atpo_megatron.env.search_tool import (
    EMPTY_QUERY_ERROR,
    NO_RESULTS,
    SearchClient,
    SearchResult,
    clean_query,
    format_passages,
)

URL = "http://retriever.test/retrieve"


def _doc(contents, score=1.0, doc_id="0"):
    return {"document": {"id": doc_id, "contents": contents}, "score": score}


def test_format_passages_dedup_truncate_and_number():
    docs = [_doc("  alpha  "), _doc("beta"), _doc("alpha"), _doc("x" * 1500), _doc("")]
    assert format_passages(docs, max_chars=1000) == "Page 1: alpha\nPage 2: beta\nPage 3: " + "x" * 1000
    assert format_passages([{"id": "1", "contents": "bare document"}]) == "Page 1: bare document"  # return_scores=false
    assert format_passages([]) == NO_RESULTS == "No search results found."
    assert format_passages([_doc("   ")]) == NO_RESULTS


def test_clean_query():
    assert clean_query('  "Varlo Bridge" builder ') == "Varlo Bridge builder"


class FakeServer:
    """An httpx transport answering /retrieve from a script of responses."""

    def __init__(self, *responses):
        self.responses = list(responses)
        self.requests = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(json.loads(request.content))
        response = self.responses.pop(0) if len(self.responses) > 1 else self.responses[0]
        if isinstance(response, Exception):
            raise response
        if callable(response):
            return response(self.requests[-1])
        return response


def _echo(payload):
    """One passage per query, naming it, plus a duplicate."""
    result = [[_doc(f"about {q}"), _doc(f"about {q}")] for q in payload["queries"]]
    return httpx.Response(200, json={"result": result})


def _client(server, **kwargs):
    kwargs.setdefault("backoff_s", 0.0)
    return SearchClient(URL, transport=httpx.MockTransport(server), **kwargs)


def test_one_post_for_a_batch_and_empty_queries_skipped():
    server = FakeServer(_echo)
    with _client(server, topk=2) as client:
        results = client.search_batch(["q1", "  ", 'q"2"', ""])
    assert server.requests == [{"queries": ["q1", "q2"], "topk": 2, "return_scores": True}]
    assert results == [
        SearchResult(ok=True, text="Page 1: about q1"),
        SearchResult(ok=False, text="", error=EMPTY_QUERY_ERROR),
        SearchResult(ok=True, text="Page 1: about q2"),
        SearchResult(ok=False, text="", error=EMPTY_QUERY_ERROR),
    ]


def test_only_empty_queries_make_no_request():
    server = FakeServer(_echo)
    with _client(server) as client:
        assert client.search_batch(['""', " "]) == [SearchResult(False, "", EMPTY_QUERY_ERROR)] * 2
        assert client.search_batch([]) == []
    assert server.requests == []


def test_no_results():
    server = FakeServer(httpx.Response(200, json={"result": [[]]}))
    with _client(server) as client:
        assert client.search("zzz") == SearchResult(ok=True, text=NO_RESULTS)


def test_retries_transient_failures_then_succeeds():
    server = FakeServer(httpx.Response(503), httpx.ConnectError("refused"), httpx.ReadTimeout("slow"), _echo)
    with _client(server, retries=3) as client:
        assert client.search("q") == SearchResult(ok=True, text="Page 1: about q")
    assert len(server.requests) == 4


def test_gives_up_after_retries_with_the_last_error():
    server = FakeServer(httpx.Response(500, text="boom"))
    with _client(server, retries=2) as client:
        [result] = client.search_batch(["q"])
    assert len(server.requests) == 3
    assert not result.ok and result.text == ""
    assert "after 3 attempt(s)" in result.error and "500" in result.error


def test_client_errors_are_not_retried():
    server = FakeServer(httpx.Response(422, json={"detail": "bad topk"}))
    with _client(server, retries=4) as client:
        results = client.search_batch(["a", "b"])
    assert len(server.requests) == 1
    assert all(not r.ok and "HTTP 422" in r.error and "bad topk" in r.error for r in results)


@pytest.mark.parametrize(
    "body",
    [
        {"result": [[_doc("only one list")]]},  # two queries asked
        {"results": []},
        [1, 2],
        {"result": [["not a dict"], []]},
    ],
)
def test_malformed_replies_fail_cleanly(body):
    server = FakeServer(httpx.Response(200, json=body))
    with _client(server, retries=1) as client:
        results = client.search_batch(["a", "b"])
    assert len(server.requests) == 2
    assert all(not r.ok and "malformed reply" in r.error for r in results)


def test_backoff_doubles(monkeypatch):
    sleeps = []
    monkeypatch.setattr(time, "sleep", sleeps.append)
    server = FakeServer(httpx.Response(503))
    with _client(server, retries=3, backoff_s=0.5) as client:
        assert not client.search("q").ok
    assert sleeps == [0.5, 1.0, 2.0]


def test_dead_port_gives_ok_false():
    url = f"http://127.0.0.1:{free_port()}/retrieve"  # nothing listens there
    with SearchClient(url, timeout_s=1.0, retries=2, backoff_s=0.01) as client:
        [result] = client.search_batch(["q"])  # connection refused at once, 3 attempts
    assert not result.ok and url in result.error and "after 3 attempt(s)" in result.error


def test_rejects_bad_settings():
    with pytest.raises(ValueError, match="topk >= 1"):
        SearchClient(URL, topk=0)
