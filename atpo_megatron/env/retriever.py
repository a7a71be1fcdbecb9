"""Local retrieval server speaking the Search-R1 API (spec 2.2), with BM25 and dense backends.

    python -m atpo_megatron.env.retriever serve --corpus corpus.jsonl --port 8000   # or: atpo retriever serve
    curl -XPOST 127.0.0.1:8000/retrieve -d '{"queries": ["Varlo Bridge"], "topk": 3, "return_scores": true}'

API (same shapes as Search-R1's ``retrieval_server.py``):
- ``POST /retrieve {"queries": [...], "topk": k, "return_scores": bool}`` returns
  ``{"result": [[{"document": {"id", "contents"}, "score": s}, ...] per query]}``, or with
  ``return_scores`` false ``{"result": [[{"id", "contents"}, ...] per query]}``. ``topk`` missing
  or 0 means the server's default.
- ``GET /health`` returns ``{"status": "ok", "backend": ..., "documents": N}``.

The corpus is FlashRAG / wiki-18 JSONL, one ``{"id", "contents"}`` object per line. BM25 (bm25s) is
the default; its index is built once and cached under ``<cache-dir>/bm25-<key>``, the key hashing
the corpus path, size and mtime. The dense backend embeds with sentence-transformers (e5-base-v2
naming: "query: "/"passage: " prefixes, mean pooling) into a flat inner-product index.
``RetrieverServer`` runs the server in a subprocess on a free loopback port (tests, the trainer).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Annotated, Any, Protocol

import numpy as np
from pydantic import BaseModel, Field, StringConstraints

logger = logging.getLogger(__name__)

DEFAULT_DENSE_MODEL = "intfloat/e5-base-v2"
EmbedFn = Callable[[list[str], bool], np.ndarray]
"""``embed(texts, is_query) -> float32 array [len(texts), dim]``; inner product = relevance."""
Hits = list[tuple[int, float]]
"""One query's hits: (document index, score), best first."""


class CorpusError(ValueError):
    """The corpus file is missing or malformed."""


@dataclass(frozen=True)
class Corpus:
    """Passages of a FlashRAG JSONL corpus, by position."""

    path: Path
    ids: list[str]
    contents: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    def document(self, index: int) -> dict[str, str]:
        return {"id": self.ids[index], "contents": self.contents[index]}

    def cache_key(self, *parts: str) -> str:
        """A short hash of the corpus file's path, size and mtime plus ``parts``."""
        stat = self.path.stat()
        text = "|".join([str(self.path.resolve()), str(stat.st_size), str(stat.st_mtime_ns), *parts])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_corpus(path: str | os.PathLike[str]) -> Corpus:
    """Read a JSONL corpus; errors name the file and line."""
    path = Path(path)
    hint = 'expected FlashRAG/wiki-18 JSONL: one {"id": ..., "contents": "..."} object per line'
    if not path.is_file():
        raise CorpusError(f"retriever corpus {path} does not exist or is not a file; {hint}")
    ids: list[str] = []
    contents: list[str] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CorpusError(f"{path}:{lineno}: invalid JSON ({exc.msg}); {hint}") from None
            if not isinstance(row, dict) or "id" not in row or not isinstance(row.get("contents"), str):
                raise CorpusError(f'{path}:{lineno}: needs an "id" and a string "contents"; {hint}')
            ids.append(str(row["id"]))
            contents.append(row["contents"])
    if not ids:
        raise CorpusError(f"retriever corpus {path} has no passages; {hint}")
    return Corpus(path, ids, contents)


def default_cache_dir() -> Path:
    """``$ATPO_CACHE/retriever`` (default ``~/.cache/atpo_megatron/retriever``)."""
    from atpo_megatron.model_files import cache_dir

    return cache_dir() / "retriever"


def _publish_dir(build: Callable[[Path], None], target: Path) -> None:
    """Run ``build`` into a fresh folder, then rename it to ``target`` (atomic; first writer wins)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        build(tmp)
        os.rename(tmp, target)
    except OSError:
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class Backend(Protocol):
    name: str

    def search(self, queries: list[str], topk: int) -> list[Hits]:
        """Top-``topk`` hits for each query."""
        ...


class BM25Backend:
    """Okapi BM25 over lower-cased word tokens with English stop words (bm25s, no stemming).

    Documents that share no term with the query are not returned (as with Lucene), so a query may
    get fewer than ``topk`` hits, or none.
    """

    name = "bm25"
    _STOPWORDS = "en"

    def __init__(self, corpus: Corpus, cache_dir: Path | None = None) -> None:
        import bm25s

        self._bm25s = bm25s
        self._num_docs = len(corpus)
        if cache_dir is None:
            self._index = self._build(corpus)
            return
        target = cache_dir / f"bm25-{corpus.cache_key('bm25s', bm25s.__version__, self._STOPWORDS)}"
        if not target.is_dir():
            started = time.perf_counter()
            _publish_dir(lambda d: self._build(corpus).save(str(d), show_progress=False), target)
            seconds = time.perf_counter() - started
            logger.info("built BM25 index of %d passages in %.1fs: %s", len(corpus), seconds, target)
        self._index = bm25s.BM25.load(str(target), show_progress=False)

    def _build(self, corpus: Corpus) -> Any:
        tokens = self._bm25s.tokenize(corpus.contents, stopwords=self._STOPWORDS, show_progress=False)
        index = self._bm25s.BM25()
        index.index(tokens, show_progress=False)
        return index

    def search(self, queries: list[str], topk: int) -> list[Hits]:
        if not queries:
            return []
        tokens = self._bm25s.tokenize(queries, stopwords=self._STOPWORDS, return_ids=False, show_progress=False)
        k = min(topk, self._num_docs)
        docs, scores = self._index.retrieve(tokens, k=k, show_progress=False, n_threads=1)
        return [
            [(int(d), float(s)) for d, s in zip(row_docs, row_scores) if s > 0]
            for row_docs, row_scores in zip(docs, scores)
        ]


class DenseBackend:
    """Flat inner-product search over passage embeddings (exact, like a FAISS ``IndexFlatIP``).

    ``embed`` maps texts to vectors (``sentence_transformer_embedder`` for real models). Passage
    embeddings are cached as ``<cache_dir>/dense-<key>/embeddings.npy`` when ``cache_dir`` is
    given; ``model_name`` is part of the key. A search scores ``chunk_rows`` passages at a time,
    so memory stays at [queries, chunk_rows] floats beyond the embeddings (memory-mapped from the
    cache). For wiki-18 scale (21M passages) a FAISS/GPU index would be much faster.
    """

    name = "dense"

    def __init__(
        self,
        corpus: Corpus,
        embed: EmbedFn,
        *,
        model_name: str,
        cache_dir: Path | None = None,
        batch_size: int = 256,
        chunk_rows: int = 1 << 16,
    ) -> None:
        self._embed = embed
        self._batch_size = batch_size
        self._chunk_rows = chunk_rows
        if cache_dir is None:
            self._embeddings = self._encode_corpus(corpus)
            return
        target = cache_dir / f"dense-{corpus.cache_key('dense', model_name)}"
        if not target.is_dir():
            _publish_dir(lambda d: np.save(d / "embeddings.npy", self._encode_corpus(corpus)), target)
        self._embeddings = np.load(target / "embeddings.npy", mmap_mode="r")

    def _encode_corpus(self, corpus: Corpus) -> np.ndarray:
        chunks = []
        for start in range(0, len(corpus), self._batch_size):
            chunks.append(self._encode(corpus.contents[start : start + self._batch_size], is_query=False))
            if (start // self._batch_size) % 100 == 99:
                logger.info("embedded %d / %d passages", start + self._batch_size, len(corpus))
        return np.concatenate(chunks)

    def _encode(self, texts: list[str], is_query: bool) -> np.ndarray:
        vectors = np.asarray(self._embed(texts, is_query), dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[0] != len(texts):
            raise ValueError(
                f"embedding function returned shape {vectors.shape} for {len(texts)} texts; expected [n, dim]"
            )
        return vectors

    def search(self, queries: list[str], topk: int) -> list[Hits]:
        if not queries:
            return []
        query = self._encode(queries, is_query=True)  # [Q, dim]
        k = min(topk, len(self._embeddings))
        best_ids = np.empty((len(queries), 0), dtype=np.int64)  # [Q, <= k], best first
        best_scores = np.empty((len(queries), 0), dtype=np.float32)
        for start in range(0, len(self._embeddings), self._chunk_rows):
            scores = query @ self._embeddings[start : start + self._chunk_rows].T  # [Q, chunk]
            top = np.argpartition(-scores, min(k, scores.shape[1]) - 1, axis=1)[:, :k]
            best_ids = np.concatenate([best_ids, top + start], axis=1)
            best_scores = np.concatenate([best_scores, np.take_along_axis(scores, top, axis=1)], axis=1)
            keep = np.argsort(-best_scores, axis=1, kind="stable")[:, :k]
            best_ids = np.take_along_axis(best_ids, keep, axis=1)
            best_scores = np.take_along_axis(best_scores, keep, axis=1)
        return [[(int(i), float(s)) for i, s in zip(ids, row)] for ids, row in zip(best_ids, best_scores)]


def sentence_transformer_embedder(
    model_name: str = DEFAULT_DENSE_MODEL,
    *,
    query_prefix: str = "query: ",
    passage_prefix: str = "passage: ",
    max_length: int = 256,
    device: str | None = None,
) -> EmbedFn:
    """An ``EmbedFn`` from a sentence-transformers model: e5-style prefixes, L2-normalised vectors.

    A plain Hugging Face folder gets sentence-transformers' default mean pooling; e5-base-v2 ships
    mean pooling in its own config. Needs the optional package ``sentence-transformers``.
    """
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise ImportError(
            "the dense retriever backend needs sentence-transformers: `pip install sentence-transformers`, "
            "and a local copy (or cache) of the embedding model; or use --backend bm25"
        ) from exc
    model = SentenceTransformer(model_name, device=device)
    model.max_seq_length = max_length

    def embed(texts: list[str], is_query: bool) -> np.ndarray:
        prefix = query_prefix if is_query else passage_prefix
        return model.encode([prefix + t for t in texts], normalize_embeddings=True, convert_to_numpy=True)

    return embed


# Request limits: anything larger is refused with a 4xx naming the limit, before any search work.
MAX_REQUEST_BYTES = 16 << 20
MAX_QUERIES = 8192
MAX_QUERY_CHARS = 8192
MAX_TOPK = 100


class RetrieveRequest(BaseModel):
    """Body of ``POST /retrieve`` (invalid: HTTP 422 with FastAPI's ``detail`` list of what is wrong)."""

    queries: list[Annotated[str, StringConstraints(max_length=MAX_QUERY_CHARS)]] = Field(max_length=MAX_QUERIES)
    topk: int | None = Field(default=None, ge=0, le=MAX_TOPK, description="0 or missing: the server default")
    return_scores: bool = False


def create_app(corpus: Corpus, backend: Backend, default_topk: int = 3,
               max_request_bytes: int = MAX_REQUEST_BYTES) -> Any:
    """The FastAPI app; searches run in a thread pool so concurrent requests overlap.

    A POST without a Content-Length gets HTTP 411, one with a body over ``max_request_bytes`` HTTP
    413, both with ``{"detail": message}``, before the body is read.
    """
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool

    app = FastAPI(title="atpo_megatron retriever")

    @app.middleware("http")
    async def limit_request_size(request, call_next):
        if request.method == "POST":
            length = request.headers.get("content-length", "")
            if not length.isdigit():
                return JSONResponse({"detail": "POST needs a Content-Length header (chunked bodies are refused)"},
                                    status_code=411)
            if int(length) > max_request_bytes:
                return JSONResponse({"detail": f"request body of {int(length)} bytes is larger than this server's "
                                               f"limit of {max_request_bytes} bytes; send fewer queries per request"},
                                    status_code=413)
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "backend": backend.name, "documents": len(corpus)}

    @app.post("/retrieve")
    async def retrieve(request: RetrieveRequest) -> dict[str, Any]:
        hits = await run_in_threadpool(backend.search, request.queries, request.topk or default_topk)
        if request.return_scores:
            result = [[{"document": corpus.document(i), "score": s} for i, s in row] for row in hits]
        else:
            result = [[corpus.document(i) for i, _ in row] for row in hits]
        return {"result": result}

    return app


def build_backend(
    corpus: Corpus, backend: str, *, cache_dir: Path | None, model: str = DEFAULT_DENSE_MODEL
) -> Backend:
    """Construct the named backend ("bm25" or "dense")."""
    if backend == "bm25":
        return BM25Backend(corpus, cache_dir=cache_dir)
    if backend == "dense":
        return DenseBackend(corpus, sentence_transformer_embedder(model), model_name=model, cache_dir=cache_dir)
    raise ValueError(f"unknown retriever backend {backend!r}; choose 'bm25' or 'dense'")


def serve(
    corpus: str | os.PathLike[str],
    host: str = "127.0.0.1",
    port: int = 8000,
    backend: str = "bm25",
    *,
    topk: int = 3,
    cache_dir: str | os.PathLike[str] | None = None,
    model: str = DEFAULT_DENSE_MODEL,
    log_level: str = "warning",
) -> None:
    """Load the corpus, build or load the index, then serve until interrupted (blocking).

    ``cache_dir`` None means ``default_cache_dir()``.
    """
    import uvicorn

    started = time.perf_counter()
    documents = load_corpus(corpus)
    engine = build_backend(documents, backend, cache_dir=Path(cache_dir or default_cache_dir()), model=model)
    logger.info("%s retriever over %d passages ready in %.1fs", backend, len(documents), time.perf_counter() - started)
    uvicorn.run(create_app(documents, engine, default_topk=topk), host=host, port=port, log_level=log_level)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class RetrieverServer:
    """Run ``serve`` in a subprocess on a free loopback port; ``.url`` is its ``/retrieve`` URL.

        with RetrieverServer("corpus.jsonl") as server:
            client = SearchClient(server.url)

    Start-up failures (bad corpus, timeout) raise ``RuntimeError`` with the server's log tail.
    """

    def __init__(
        self,
        corpus: str | os.PathLike[str],
        *,
        backend: str = "bm25",
        host: str = "127.0.0.1",
        port: int | None = None,
        topk: int = 3,
        cache_dir: str | os.PathLike[str] | None = None,
        startup_timeout_s: float = 120.0,
    ) -> None:
        self.corpus = Path(corpus)
        self.backend = backend
        self.host = host
        self.port = port or free_port(host)
        self.topk = topk
        self.cache_dir = cache_dir
        self.startup_timeout_s = startup_timeout_s
        self._process: subprocess.Popen[bytes] | None = None
        self._log_path: Path | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """The ``/retrieve`` endpoint."""
        return f"{self.base_url}/retrieve"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "atpo_megatron.env.retriever", "serve", "--corpus", str(self.corpus),
               "--host", self.host, "--port", str(self.port), "--backend", self.backend, "--topk", str(self.topk),
               "--parent-pid", str(os.getpid())]
        if self.cache_dir is not None:
            cmd += ["--cache-dir", str(self.cache_dir)]
        return cmd

    def start(self) -> None:
        """Launch the server and wait until ``/health`` answers."""
        import httpx

        package_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        fd, log_name = tempfile.mkstemp(prefix="atpo-retriever-", suffix=".log")
        self._log_path = Path(log_name)
        with os.fdopen(fd, "wb") as log:
            self._process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            code = self._process.poll()
            if code is not None:
                self._fail(f"the retriever server exited with code {code} during start-up")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self._fail(f"no answer from {self.base_url}/health within {self.startup_timeout_s}s")
            time.sleep(0.1)

    def _fail(self, reason: str) -> None:
        tail = self.log_tail()
        self.stop()
        raise RuntimeError(f"{reason}; command: {' '.join(self.command())}\n--- server log ---\n{tail}")

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the server's combined stdout/stderr."""
        if self._log_path is None or not self._log_path.exists():
            return ""
        return self._log_path.read_text(errors="replace")[-chars:]

    def kill(self) -> None:
        """SIGKILL the server, as a crash would (its log is kept; :meth:`stop` still cleans up)."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Terminate the server (kill it if it does not exit within ``timeout_s``)."""
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None
        if self._log_path is not None:
            self._log_path.unlink(missing_ok=True)
            self._log_path = None

    def __enter__(self) -> RetrieverServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def add_retriever_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``serve`` options: ``--corpus C [--host H] [--port P] [--backend bm25|dense] ...``."""
    parser.add_argument("--corpus", required=True, help='FlashRAG/wiki-18 JSONL, one {"id", "contents"} per line')
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--backend", choices=("bm25", "dense"), default="bm25")
    parser.add_argument("--topk", type=int, default=3, help="passages per query when a request gives no topk")
    parser.add_argument("--cache-dir", default=None, help="index cache folder (default: $ATPO_CACHE/retriever)")
    parser.add_argument("--model", default=DEFAULT_DENSE_MODEL, help="sentence-transformers model (dense backend)")
    parser.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))
    parser.add_argument("--parent-pid", type=int, default=0,
                        help="stop when the process with this pid ends, even if it was killed (RetrieverServer "
                             "passes its own, so a trainer killed with SIGKILL leaves no server behind)")


def _stop_with_parent(parent_pid: int, poll_s: float = 1.0) -> None:
    """A daemon thread: SIGTERM this server (a clean uvicorn shutdown) once ``parent_pid`` is no longer its parent."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        logger.warning("the process that started this retriever (pid %d) ended; stopping", parent_pid)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="stop-with-parent", daemon=True).start()


def retriever_main(args: argparse.Namespace) -> int:
    """Run ``serve`` from parsed ``add_retriever_arguments`` options; returns the exit code."""
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s: %(message)s")
    if args.parent_pid:
        _stop_with_parent(args.parent_pid)
    try:
        serve(args.corpus, args.host, args.port, args.backend, topk=args.topk,
              cache_dir=args.cache_dir, model=args.model, log_level=args.log_level)
    except (CorpusError, ImportError, ValueError) as exc:
        print(f"atpo retriever: error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m atpo_megatron.env.retriever serve ...``."""
    parser = argparse.ArgumentParser(prog="python -m atpo_megatron.env.retriever", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    add_retriever_arguments(commands.add_parser("serve", help="serve /retrieve and /health"))
    return retriever_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
