"""Client for a Search-R1 style ``/retrieve`` server (spec 2.2), batched, with an outage policy.

    client = SearchClient("http://127.0.0.1:8000/retrieve")
    [r] = client.search_batch(["founder of Orvane Industries"])
    r.ok, r.text   # True, "Page 1: ...\\nPage 2: ..."

Failures, and what they become:

* no answer, HTTP 5xx or a malformed reply (the retriever is down, restarting, overloaded, or not a
  retriever): the request is retried ``retries`` times with a doubling back-off, then, as an outage,
  until ``outage_wait_s`` seconds after the first failure (back-off at most ``MAX_BACKOFF_S``); then
  :class:`RetrieverUnavailableError`, which stops the run (its checkpoints are intact). A search is
  never failed because the retriever was away, so an outage never becomes training signal.
* HTTP 4xx (the retriever refuses a request): not retried; a refused batch is re-sent query by
  query, so only the refused queries get ``SearchResult(ok=False, error=...)``. The rollout makes
  such a node a ``tool_error`` leaf, as the paper's code does, and drops it from training unless
  ``rollout.train_on_tool_errors`` (``rollout/tree_rollout.py``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx

from atpo_megatron.config import UserError

logger = logging.getLogger(__name__)

NO_RESULTS = "No search results found."
EMPTY_QUERY_ERROR = "empty query: the <search> block had no text (besides quotes/whitespace)"
MAX_BACKOFF_S = 10.0
"""Longest wait between two attempts while waiting out an outage."""


@dataclass(frozen=True)
class SearchResult:
    """One query's outcome. ``text`` is the formatted passage block when ``ok``, else ""."""

    ok: bool
    text: str
    error: str | None = None


class _ClientError(Exception):
    """A response that retrying cannot fix (HTTP 4xx)."""


class RetrieverUnavailableError(UserError, RuntimeError):
    """The retriever gave no usable answer for longer than the outage deadline (``retriever.outage_wait_s``)."""


def clean_query(query: str) -> str:
    """Drop double quotes and surrounding whitespace (as the paper's search tool does)."""
    return query.replace('"', "").strip()


def format_passages(documents: list[dict[str, Any]], max_chars: int = 1000) -> str:
    """``"Page i: <passage>"`` lines over the de-duplicated ``contents``, each cut to ``max_chars``.

    ``documents`` are Search-R1 result items, either ``{"document": {...}, "score": s}`` or the
    bare document ``{"id", "contents"}``. No passages gives ``NO_RESULTS``.
    """
    passages: list[str] = []
    for item in documents:
        document = item.get("document", item)
        contents = str(document.get("contents", "")).strip()
        if contents and contents not in passages:
            passages.append(contents)
    if not passages:
        return NO_RESULTS
    return "\n".join(f"Page {i}: {p[:max_chars]}" for i, p in enumerate(passages, 1))


class SearchClient:
    """Batched search over HTTP: one POST for many queries, with the outage policy of the module docstring.

    Args:
        url: the server's ``/retrieve`` endpoint.
        topk: passages requested per query.
        timeout_s: per-request timeout (connect and read).
        retries: quick extra attempts after a failed one (no answer, HTTP 5xx, malformed reply).
        backoff_s: wait before the first retry; doubles for each further attempt (at most MAX_BACKOFF_S).
        outage_wait_s: after the retries, keep trying until this many seconds after the first
            failure, then raise RetrieverUnavailableError (0: raise right after the retries).
        max_chars: each passage is cut to this many characters.
        transport: an httpx transport to use instead of the network (tests).
    """

    def __init__(
        self,
        url: str,
        topk: int = 3,
        timeout_s: float = 120.0,
        retries: int = 4,
        backoff_s: float = 0.5,
        max_chars: int = 1000,
        transport: httpx.BaseTransport | None = None,
        outage_wait_s: float = 0.0,
    ) -> None:
        if topk < 1 or retries < 0 or timeout_s <= 0 or backoff_s < 0 or max_chars < 1 or outage_wait_s < 0:
            raise ValueError(
                f"SearchClient needs topk >= 1, retries >= 0, timeout_s > 0, backoff_s >= 0, "
                f"outage_wait_s >= 0 and max_chars >= 1; got topk={topk}, retries={retries}, "
                f"timeout_s={timeout_s}, backoff_s={backoff_s}, outage_wait_s={outage_wait_s}, max_chars={max_chars}"
            )
        self.url = url
        self.topk = topk
        self.retries = retries
        self.backoff_s = backoff_s
        self.outage_wait_s = outage_wait_s
        self.max_chars = max_chars
        self._http = httpx.Client(timeout=httpx.Timeout(timeout_s), transport=transport)

    @classmethod
    def from_config(cls, retriever: Any, url: str) -> SearchClient:
        """A client for ``url`` with the settings of a ``RetrieverConfig``."""
        return cls(url, topk=retriever.topk, timeout_s=retriever.timeout_s, retries=retriever.retries,
                   max_chars=retriever.max_passage_chars, outage_wait_s=retriever.outage_wait_s)

    def search(self, query: str) -> SearchResult:
        """Search one query (see ``search_batch``)."""
        return self.search_batch([query])[0]

    def search_batch(self, queries: list[str]) -> list[SearchResult]:
        """One result per query, in order.

        Empty queries (after ``clean_query``) make no request and give
        ``SearchResult(ok=False, text="", error=EMPTY_QUERY_ERROR)``. The other queries go out in
        a single POST; a query the retriever refuses (HTTP 4xx) gets ``ok=False`` and the server's
        message. Raises RetrieverUnavailableError when the outage deadline passes.
        """
        cleaned = [clean_query(q) for q in queries]
        todo = [i for i, q in enumerate(cleaned) if q]
        results = [SearchResult(ok=False, text="", error=EMPTY_QUERY_ERROR) for _ in queries]
        if not todo:
            return results
        try:
            groups: list = self._post_until_answered([cleaned[i] for i in todo])
        except _ClientError as exc:  # which of them does the retriever refuse?
            groups = [exc] if len(todo) == 1 else [self._alone(cleaned[i]) for i in todo]
        for i, group in zip(todo, groups):
            if isinstance(group, _ClientError):
                error = f"the retriever at {self.url} refused the query: {group}"
                logger.warning(error)
                results[i] = SearchResult(ok=False, text="", error=error)
            else:
                results[i] = SearchResult(ok=True, text=format_passages(group, self.max_chars))
        return results

    def _alone(self, query: str) -> list[dict[str, Any]] | _ClientError:
        try:
            return self._post_until_answered([query])[0]
        except _ClientError as exc:
            return exc

    def _post_until_answered(self, queries: list[str]) -> list[list[dict[str, Any]]]:
        """The reply to one POST, retried and then waited for (module docstring); _ClientError passes."""
        payload = {"queries": queries, "topk": self.topk, "return_scores": True}
        attempt, first_failure = 0, None
        while True:
            try:
                groups = self._post(payload)
            except (httpx.HTTPError, ValueError) as exc:  # _ClientError is neither: no retry
                now = time.monotonic()
                first_failure = now if first_failure is None else first_failure
                waited, deadline = now - first_failure, first_failure + self.outage_wait_s
                if attempt >= self.retries and now >= deadline:
                    raise RetrieverUnavailableError(
                        f"the retriever at {self.url} gave no usable answer for {waited:.0f} s ({attempt + 1} "
                        f"attempts; the last: {type(exc).__name__}: {exc}); retriever.outage_wait_s="
                        f"{self.outage_wait_s:g} is over, so the run stops here with its checkpoints intact. "
                        f"Bring the retriever back and run the same command again to resume") from exc
                delay = min(self.backoff_s * 2**attempt, MAX_BACKOFF_S)
                if attempt >= self.retries:
                    delay = min(delay, deadline - now)
                if attempt == self.retries:
                    logger.warning("the retriever at %s does not answer (%s: %s) after %d attempts; waiting "
                                   "for it up to %g s after the first failure (retriever.outage_wait_s)",
                                   self.url, type(exc).__name__, exc, attempt + 1, self.outage_wait_s)
                else:
                    logger.info("search attempt %d failed (%s); retrying in %.2fs", attempt + 1, exc, delay)
                time.sleep(delay)
                attempt += 1
                continue
            if attempt > self.retries:
                logger.warning("the retriever at %s answers again after %.1f s", self.url,
                               time.monotonic() - first_failure)
            return groups

    def _post(self, payload: dict[str, Any]) -> list[list[dict[str, Any]]]:
        response = self._http.post(self.url, json=payload)
        if 400 <= response.status_code < 500:
            raise _ClientError(f"HTTP {response.status_code}: {response.text[:500]}")
        response.raise_for_status()
        try:
            body = response.json()
        except ValueError:
            raise ValueError(f"malformed reply: not JSON: {response.text[:200]!r}") from None
        groups = body.get("result") if isinstance(body, dict) else None
        well_formed = (
            isinstance(groups, list)
            and len(groups) == len(payload["queries"])
            and all(isinstance(g, list) and all(isinstance(d, dict) for d in g) for g in groups)
        )
        if not well_formed:
            raise ValueError(
                f"malformed reply: expected {{'result': [...]}} with {len(payload['queries'])} lists "
                f"of documents, got {str(body)[:200]}"
            )
        return groups

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self._http.close()

    def __enter__(self) -> SearchClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
