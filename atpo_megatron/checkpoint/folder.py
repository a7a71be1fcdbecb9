"""A checkpoint folder on disk: step folders, the commit record, ``latest``, retention, the resume policy.

Pure file-system logic, except :func:`prepare` and :func:`collective_check`, which make every rank
take rank 0's decision. The layout and the commit protocol are described in ``checkpoint/__init__.py``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
from pathlib import Path
from typing import Any, Iterator, Literal

from atpo_megatron import distributed
from atpo_megatron.config import UserError

log = logging.getLogger("atpo_megatron.checkpoint")

COMPLETE_FILE = "atpo_checkpoint.json"
LATEST_FILE = "latest"
CONFIG_FILE = "config.yaml"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")
OptimSharding = Literal["fully_reshardable", "dp_reshardable"]


class CheckpointError(UserError, RuntimeError):
    """A checkpoint folder that cannot be used as asked; the message says what to do."""



# --------------------------------------------------------------------------------------------
# Folder bookkeeping (pure file-system logic; no torch.distributed, no megatron)
# --------------------------------------------------------------------------------------------


def step_dir(ckpt_dir: str | Path, step: int) -> Path:
    return Path(ckpt_dir) / f"step_{step:06d}"


def _step_dirs(ckpt_dir: Path) -> Iterator[tuple[int, Path]]:
    if not ckpt_dir.is_dir():
        return
    for p in ckpt_dir.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            yield int(m.group(1)), p


def is_complete(path: str | Path) -> bool:
    """A step folder is complete once its commit record exists (written after all shards)."""
    return (Path(path) / COMPLETE_FILE).is_file()


def list_checkpoints(ckpt_dir: str | Path) -> tuple[list[tuple[int, Path]], list[tuple[int, Path]]]:
    """``(complete, partial)`` step folders, each sorted by step."""
    complete, partial = [], []
    for step, p in sorted(_step_dirs(Path(ckpt_dir))):
        (complete if is_complete(p) else partial).append((step, p))
    return complete, partial


def read_latest(ckpt_dir: str | Path) -> int | None:
    """The step in the ``latest`` marker, or None when there is none.

    A leftover ``latest.tmp`` (a crash between write and rename) is ignored on purpose.
    """
    path = Path(ckpt_dir) / LATEST_FILE
    if not path.is_file():
        return None
    text = path.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(
            f"{path} should hold a step number but holds {text[:40]!r}; it was not written by "
            f"atpo_megatron. Delete it to fall back to the newest complete step_* folder."
        )
    return int(text)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``path`` so that readers see the old content or the new one, never a mix."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_latest(ckpt_dir: str | Path, step: int) -> None:
    atomic_write_text(Path(ckpt_dir) / LATEST_FILE, f"{step}\n")


def find_latest(ckpt_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder, or None when there is none.

    The ``latest`` marker decides. Without a marker (an older run, or a deleted marker) the
    newest complete step folder is used. Partial folders are skipped with a warning naming them.
    """
    ckpt_dir = Path(ckpt_dir)
    complete, partial = list_checkpoints(ckpt_dir)
    for step, p in partial:
        log.warning("checkpoint folder %s has no %s: a save that did not finish (crash or kill "
                    "during save); it is ignored and can be deleted", p, COMPLETE_FILE)
    marker = read_latest(ckpt_dir)
    if marker is None:
        if complete:
            log.warning("%s has no %r marker; using the newest complete folder %s",
                        ckpt_dir, LATEST_FILE, complete[-1][1])
            read_record(complete[-1][1])  # a damaged record fails here, before any model work
            return complete[-1][1]
        return None
    target = step_dir(ckpt_dir, marker)
    if not is_complete(target):
        raise CheckpointError(
            f"{ckpt_dir / LATEST_FILE} names step {marker}, but {target} is missing or has no "
            f"{COMPLETE_FILE}: the folder was changed by hand. Restore it, or delete the marker to "
            f"resume from the newest complete folder "
            f"({complete[-1][1] if complete else 'none exists'})."
        )
    read_record(target)
    return target


def apply_retention(ckpt_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete complete checkpoints older than the newest ``keep_last`` (0 keeps all).

    Never touches partial folders, folders newer than the marker, or the marker's own folder.
    Returns the deleted folders.
    """
    if keep_last <= 0:
        return []
    ckpt_dir = Path(ckpt_dir)
    latest = read_latest(ckpt_dir)
    if latest is None:
        return []
    complete, _ = list_checkpoints(ckpt_dir)
    eligible = [(s, p) for s, p in complete if s <= latest]
    doomed = [p for s, p in eligible[:-keep_last] if s != latest]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
        log.info("retention (keep_last=%d): deleted %s", keep_last, p)
    return doomed


def check_writable(ckpt_dir: str | Path) -> None:
    """Create ``ckpt_dir`` and prove a file can be written, fsynced and deleted there."""
    ckpt_dir = Path(ckpt_dir)
    probe = ckpt_dir / f".write_probe.{socket.gethostname()}.{os.getpid()}"
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as exc:
        raise CheckpointError(
            f"checkpoint folder {ckpt_dir} is not writable ({exc.strerror or exc}); set "
            f"checkpoint.dir (or logging.run_dir) to a folder this job can write, on a file system "
            f"every node shares"
        ) from exc


def resolve_resume(ckpt_dir: str | Path, policy: str) -> Path | None:
    """Apply ``CheckpointConfig.resume`` and return the folder to resume from (or None).

    * ``auto``: the newest complete checkpoint if there is one, else start fresh.
    * ``never``: start fresh, and refuse a folder that is not empty (never overwrite a run).
    * ``required``: the newest complete checkpoint; error when there is none.
    """
    ckpt_dir = Path(ckpt_dir)
    if policy == "never":
        if ckpt_dir.is_dir() and any(not p.name.startswith(".write_probe.") for p in ckpt_dir.iterdir()):
            found = sorted(p.name for p in ckpt_dir.iterdir())[:5]
            raise CheckpointError(
                f"checkpoint.resume=never but {ckpt_dir} is not empty ({', '.join(found)}"
                f"{', ...' if len(found) == 5 else ''}): it holds an earlier run's checkpoints, "
                f"which this run would overwrite. Set checkpoint.dir to an empty folder, delete "
                f"this one, or set checkpoint.resume=auto to continue that run."
            )
        return None
    if policy == "auto":
        return find_latest(ckpt_dir)
    if policy == "required":
        found = find_latest(ckpt_dir)
        if found is None:
            _, partial = list_checkpoints(ckpt_dir)
            extra = f" (only partial saves: {', '.join(str(p) for _, p in partial)})" if partial else ""
            raise CheckpointError(
                f"checkpoint.resume=required but {ckpt_dir} holds no complete checkpoint{extra}; "
                f"point checkpoint.dir at the run to resume, or set checkpoint.resume=auto"
            )
        return found
    raise CheckpointError(f"checkpoint.resume={policy!r}; choose one of 'auto', 'never', 'required'")


def checkpoint_dir(cfg: Any) -> Path:
    """``checkpoint.dir``, or ``<logging.run_dir>/checkpoints`` when it is empty."""
    return Path(cfg.checkpoint.dir or Path(cfg.logging.run_dir) / "checkpoints")


# --------------------------------------------------------------------------------------------
# One decision for every rank
# --------------------------------------------------------------------------------------------


def collective_check(fn, *args) -> Any:
    """Run ``fn`` on rank 0 and give every rank its result, or raise on every rank if it failed
    (a rank-0-only exception would leave the other ranks waiting in the next collective)."""
    result, error, original = None, None, None
    if distributed.rank() == 0:
        try:
            result = fn(*args)
        except CheckpointError as exc:
            error = str(exc)
        except Exception as exc:  # any other failure too: the other ranks wait in the broadcast below
            error, original = f"{fn.__name__} failed on rank 0: {type(exc).__name__}: {exc}", exc
    result, error = distributed.broadcast_object((result, error))
    if error is not None:
        raise CheckpointError(error) from original
    return result


def prepare(ckpt_dir: str | Path, resume: str = "auto") -> Path | None:
    """Start-of-run checks, before any training: the folder is writable from every rank and the
    resume policy allows this start. Returns the checkpoint folder to load, or None."""
    ckpt_dir = Path(ckpt_dir)
    error = None
    try:
        check_writable(ckpt_dir)  # every rank: each writes its own shards there
    except CheckpointError as exc:
        error = str(exc)
    if not distributed.all_true(error is None):
        raise CheckpointError(error or f"checkpoint folder {ckpt_dir} is not writable from every "
                                       f"rank (see the error on the failing rank)")
    return collective_check(resolve_resume, ckpt_dir, resume)



def read_record(path: str | Path) -> dict[str, Any]:
    """The commit record of the checkpoint folder ``path``; CheckpointError when missing or damaged."""
    path = Path(path)
    record = path / COMPLETE_FILE
    try:
        data = json.loads(record.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path} is not a complete checkpoint (no {COMPLETE_FILE}); "
                              f"a save that did not finish cannot be loaded") from exc
    except ValueError as exc:  # not JSON, or not UTF-8
        raise CheckpointError(f"{record} is damaged ({exc}): it is written last and atomically, so "
                              f"something changed it after the save; {_fallback_hint(path)}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{record} is damaged (it holds {str(data)[:40]!r}, not a record); "
                              f"{_fallback_hint(path)}")
    return data


def _fallback_hint(path: Path) -> str:
    """How to resume from the complete checkpoint before ``path`` instead (one line)."""
    ckpt_dir = path.parent
    older = [(s, p) for s, p in list_checkpoints(ckpt_dir)[0] if p != path and p.name < path.name]
    if not older:
        return f"restore it from a backup (no earlier checkpoint in {ckpt_dir})"
    step = older[-1][0]
    return (f"restore it from a backup, or resume from the previous checkpoint {older[-1][1]}: "
            f"`echo {step} > {ckpt_dir / LATEST_FILE}` (the steps after {step} are then trained again)")


def prepare_step_dir(ckpt_dir: str | Path, step: int) -> bool:
    """Rank 0, before a save: make ``step_<step>`` an empty folder. False = nothing to do (that
    step is the committed latest). A folder left by a crash (partial), or a complete one that never
    became ``latest`` (a crash between its two commit writes, i.e. another timeline), is replaced."""
    ckpt_dir, target = Path(ckpt_dir), step_dir(ckpt_dir, step)
    if read_latest(ckpt_dir) == step and is_complete(target):
        return False
    if target.exists():
        what = "complete but never committed as latest" if is_complete(target) else "partial"
        log.warning("replacing the %s checkpoint folder %s left by an earlier run", what, target)
        shutil.rmtree(target)
    target.mkdir(parents=True)
    return True


