"""The search client: formatting, batching, retries, the outage policy and refused queries (a fake server,
no network; a fake clock for the waits)."""

import json
import time

import httpx
import pytest

from atpo_megatron.env.retriever import free_port
from atpo_megatron.env.search_tool import (
    EMPTY_QUERY_ERROR,
    MAX_BACKOFF_S,
    NO_RESULTS,
    RetrieverUnavailableError,
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
    with _client(server, retries=2) as client, pytest.raises(RetrieverUnavailableError) as info:
        client.search_batch(["q"])
    assert len(server.requests) == 3
    message = str(info.value)
    assert URL in message and "3 attempts" in message and "500" in message and "retriever.outage_wait_s=0" in message


def test_a_refused_query_fails_alone():
    """Issue 13 defect 3: one refused query (HTTP 4xx) failed the whole batch. The batch is re-sent query by
    query, without retries (a 4xx is the same every time), so only the refused query fails."""
    def refuse_long(payload):
        if any(len(q) > 10 for q in payload["queries"]):
            return httpx.Response(413, json={"detail": "query longer than 10 characters"})
        return _echo(payload)

    server = FakeServer(refuse_long)
    with _client(server, retries=4) as client:
        results = client.search_batch(["short", "much too long a query", "fine"])
    assert [r["queries"] for r in server.requests] == [["short", "much too long a query", "fine"], ["short"],
                                                       ["much too long a query"], ["fine"]]
    assert results[0] == SearchResult(ok=True, text="Page 1: about short") and results[2].ok
    assert not results[1].ok and "HTTP 413" in results[1].error and "longer than 10 characters" in results[1].error


@pytest.mark.parametrize(
    "body",
    [
        {"result": [[_doc("only one list")]]},  # two queries asked
        {"results": []},
        [1, 2],
        {"result": [["not a dict"], []]},
    ],
)
def test_malformed_replies_are_an_outage(body):
    server = FakeServer(httpx.Response(200, json=body))
    with _client(server, retries=1) as client, pytest.raises(RetrieverUnavailableError, match="malformed reply"):
        client.search_batch(["a", "b"])
    assert len(server.requests) == 2


class FakeClock:
    """time.monotonic and time.sleep for the client: sleeping advances the clock."""

    def __init__(self, monkeypatch):
        self.now, self.sleeps = 1000.0, []
        monkeypatch.setattr(time, "monotonic", lambda: self.now)
        monkeypatch.setattr(time, "sleep", self.sleep)

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.now += seconds


def test_backoff_doubles(monkeypatch):
    clock = FakeClock(monkeypatch)
    server = FakeServer(httpx.Response(503))
    with _client(server, retries=3, backoff_s=0.5) as client, pytest.raises(RetrieverUnavailableError):
        client.search("q")
    assert clock.sleeps == [0.5, 1.0, 2.0]


def test_outage_is_waited_for_until_the_deadline(monkeypatch, caplog):
    """After the retries the client keeps trying (back-off capped at MAX_BACKOFF_S, never past the deadline)
    until retriever.outage_wait_s after the first failure, then stops the run with a message."""
    clock = FakeClock(monkeypatch)
    server = FakeServer(httpx.ConnectError("refused"))
    with _client(server, retries=2, backoff_s=0.5, outage_wait_s=30) as client:
        with caplog.at_level("WARNING"), pytest.raises(RetrieverUnavailableError) as info:
            client.search("q")
    assert MAX_BACKOFF_S == 10.0
    assert clock.sleeps == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 4.5]  # 30 s in all
    assert len(server.requests) == 8
    assert "gave no usable answer for 30 s (8 attempts; the last: ConnectError: refused)" in str(info.value)
    assert "waiting for it up to 30 s after the first failure (retriever.outage_wait_s)" in caplog.text


def test_a_retriever_back_within_the_deadline_answers_the_same_search(monkeypatch, caplog):
    clock = FakeClock(monkeypatch)
    server = FakeServer(*[httpx.ConnectError("refused")] * 5, _echo)
    with _client(server, retries=1, backoff_s=0.5, outage_wait_s=60) as client, caplog.at_level("WARNING"):
        assert client.search_batch(["a", "b"]) == [SearchResult(True, "Page 1: about a"),
                                                   SearchResult(True, "Page 1: about b")]
    assert clock.sleeps == [0.5, 1.0, 2.0, 4.0, 8.0] and len(server.requests) == 6
    assert "answers again after 15.5 s" in caplog.text


def test_dead_port_is_an_outage_naming_the_url():
    url = f"http://127.0.0.1:{free_port()}/retrieve"  # nothing listens there
    with SearchClient(url, timeout_s=1.0, retries=2, backoff_s=0.01) as client:
        with pytest.raises(RetrieverUnavailableError) as info:  # connection refused at once, 3 attempts
            client.search_batch(["q"])
    assert url in str(info.value) and "3 attempts" in str(info.value)


def test_rejects_bad_settings():
    with pytest.raises(ValueError, match="topk >= 1"):
        SearchClient(URL, topk=0)
