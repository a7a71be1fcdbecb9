"""A run's search endpoint, set up one way for ``atpo train``, ``atpo rollout`` and ``atpo eval``.

    with search_client(cfg) as client:                 # retriever.url, or our BM25 server when "embedded"
        client.search_batch(["founder of Orvane Works"])

``retriever.url=embedded`` starts ``env.retriever.RetrieverServer`` on a free loopback port over
``retriever.corpus`` (empty = the generated task's corpus, written if needed). In a job only rank 0
serves; the trainer passes ``serve=False`` elsewhere and a ``share`` that broadcasts rank 0's URL.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

from atpo_megatron.config import ConfigError
from atpo_megatron.env.data import embedded_task
from atpo_megatron.env.retriever import RetrieverServer
from atpo_megatron.env.search_tool import RetrieverUnavailableError, SearchClient

log = logging.getLogger(__name__)


@contextlib.contextmanager
def search_client(cfg: Any, *, serve: bool = True, share: Callable[[str], str] = lambda url: url,
                  check: bool = False) -> Iterator[SearchClient]:
    """Yield a ``SearchClient`` for ``cfg.retriever``; the embedded server (if this process started it)
    stops on exit.

    ``serve``: start the embedded server here (False on the ranks of a job other than 0).
    ``share``: maps this process's URL (None where it does not serve) to the job's URL.
    ``check``: one search with a short timeout first; a dead endpoint is a one-line ConfigError.
    """
    with contextlib.ExitStack() as stack:
        url = cfg.retriever.url
        if url == "embedded":
            url = None
            if serve:
                corpus = cfg.retriever.corpus or str(embedded_task(cfg).corpus)
                server = stack.enter_context(RetrieverServer(corpus, backend=cfg.retriever.backend,
                                                             topk=cfg.retriever.topk))
                url = server.url
                log.info("embedded retriever (%s over %s) at %s", cfg.retriever.backend, corpus, url)
        url = share(url)
        if check:
            check_retriever(url)
        yield stack.enter_context(SearchClient.from_config(cfg.retriever, url))


def check_retriever(url: str) -> None:
    """Fail fast (one try, short timeout), before any model work, when the search endpoint is down."""
    with SearchClient(url, retries=0, timeout_s=10.0) as probe:
        try:
            error = probe.search_batch(["health check"])[0].error
        except RetrieverUnavailableError as exc:
            error = str(exc.__cause__)
    if error is not None:
        raise ConfigError(
            f"retriever.url: the retriever at {url} does not answer ({error}); start it with "
            f"`atpo retriever serve --corpus CORPUS --port PORT` or set retriever.url=embedded"
        )
