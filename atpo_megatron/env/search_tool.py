"""Client for a Search-R1 style ``/retrieve`` server (spec 2.2), batched, with retries.

    client = SearchClient("http://127.0.0.1:8000/retrieve")
    [r] = client.search_batch(["founder of Orvane Industries"])
    r.ok, r.text   # True, "Page 1: ...\\nPage 2: ..."

A failed call (after retries) gives ``SearchResult(ok=False, error=...)``; the rollout then makes
the calling node a leaf, as the paper's code does.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx

logger = logging.getLogger(__name__)

NO_RESULTS = "No search results found."
EMPTY_QUERY_ERROR = "empty query: the <search> block had no text (besides quotes/whitespace)"


@dataclass(frozen=True)
class SearchResult:
    """One query's outcome. ``text`` is the formatted passage block when ``ok``, else ""."""

    ok: bool
    text: str
    error: str | None = None


class _ClientError(Exception):
    """A response that retrying cannot fix (HTTP 4xx)."""


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
    """Batched search over HTTP: one POST for many queries, retried with exponential back-off.

    Args:
        url: the server's ``/retrieve`` endpoint.
        topk: passages requested per query.
        timeout_s: per-request timeout (connect and read).
        retries: extra attempts after a failed one (transport errors, HTTP 5xx, malformed
            replies); HTTP 4xx fails at once.
        backoff_s: wait before the first retry; doubles for each further retry.
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
    ) -> None:
        if topk < 1 or retries < 0 or timeout_s <= 0 or backoff_s < 0 or max_chars < 1:
            raise ValueError(
                f"SearchClient needs topk >= 1, retries >= 0, timeout_s > 0, backoff_s >= 0 and "
                f"max_chars >= 1; got topk={topk}, retries={retries}, timeout_s={timeout_s}, "
                f"backoff_s={backoff_s}, max_chars={max_chars}"
            )
        self.url = url
        self.topk = topk
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_chars = max_chars
        self._http = httpx.Client(timeout=httpx.Timeout(timeout_s), transport=transport)

    def search(self, query: str) -> SearchResult:
        """Search one query (see ``search_batch``)."""
        return self.search_batch([query])[0]

    def search_batch(self, queries: list[str]) -> list[SearchResult]:
        """One result per query, in order.

        Empty queries (after ``clean_query``) make no request and give
        ``SearchResult(ok=False, text="", error=EMPTY_QUERY_ERROR)``. The other queries go out in
        a single POST; if it still fails after the retries, each of them gets ``ok=False`` and the
        last error.
        """
        cleaned = [clean_query(q) for q in queries]
        todo = [i for i, q in enumerate(cleaned) if q]
        results = [SearchResult(ok=False, text="", error=EMPTY_QUERY_ERROR) for _ in queries]
        if not todo:
            return results
        try:
            groups = self._post_with_retries([cleaned[i] for i in todo])
        except Exception as exc:  # every failure mode ends the same way: ok=False for the batch
            error = f"search request to {self.url} failed after {self.retries + 1} attempt(s): {exc}"
            logger.warning(error)
            for i in todo:
                results[i] = SearchResult(ok=False, text="", error=error)
            return results
        for i, group in zip(todo, groups):
            results[i] = SearchResult(ok=True, text=format_passages(group, self.max_chars))
        return results

    def _post_with_retries(self, queries: list[str]) -> list[list[dict[str, Any]]]:
        payload = {"queries": queries, "topk": self.topk, "return_scores": True}
        attempt = 0
        while True:
            try:
                return self._post(payload)
            except (httpx.HTTPError, ValueError) as exc:  # _ClientError is neither: no retry
                if attempt == self.retries:
                    raise
                delay = self.backoff_s * 2**attempt
                logger.info("search attempt %d failed (%s); retrying in %.2fs", attempt + 1, exc, delay)
                time.sleep(delay)
                attempt += 1

    def _post(self, payload: dict[str, Any]) -> list[list[dict[str, Any]]]:
        response = self._http.post(self.url, json=payload)
        if 400 <= response.status_code < 500:
            raise _ClientError(f"HTTP {response.status_code}: {response.text[:500]}")
        response.raise_for_status()
        body = response.json()
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
