"""Checkpoints that survive preemption: save, find, resume, retain.

    ckpt_dir = checkpoint.checkpoint_dir(cfg)                  # checkpoint.dir or <run_dir>/checkpoints
    start = checkpoint.prepare(ckpt_dir, cfg.checkpoint.resume)   # every rank, before training
    resumed = checkpoint.load(ckpt_dir, models, optimizer, scheduler) if start else None
    step, extra = resumed if resumed else (0, {})
    ...
    checkpoint.save(ckpt_dir, step, models, optimizer, scheduler, extra={...}, config=cfg,
                    keep_last=cfg.checkpoint.keep_last, async_save=cfg.checkpoint.async_save)
    checkpoint.finalize_async_saves()                          # every step (collective); no-op when sync
    checkpoint.finalize_async_saves(blocking=True)             # before exit

One checkpoint is one folder written by megatron's ``dist_checkpointing`` (torch_dist format):
the model (the inner module's sharded state dict, not the DDP wrapper's), the distributed
optimizer, the LR scheduler, the RNG states of every rank (and of every TP x PP position, so they
survive a change of DP), the step, the config and the trainer's ``extra`` dict (rollout state, data
iterator position, ...). The optimizer's format is ``checkpoint.optim_sharding``:
``dp_reshardable`` (the default: every rank writes its own gradient buckets; a resume may change DP
but not TP or PP, nor the bucket layout, which only overlapped gradient reduction ties to DP) or
``fully_reshardable`` (model layout, gathered on each DP group's rank 0: any TP/PP/DP on resume, at
a host-memory cost that grows with the model, see ``atpo plan``). A resume the format cannot do
stops with the command that converts the checkpoint (``atpo convert --optim-sharding``). The
folder layout:

    <ckpt_dir>/step_000120/          megatron's *.distcp, .metadata, metadata.json, and ours:
        config.yaml                  the resolved config of the run that saved it
        atpo_checkpoint.json         model shape, parallel layout, step; written LAST = "complete"
    <ckpt_dir>/latest                "120": the newest complete checkpoint (atomic, written after it)

The commit protocol makes a crash at any point harmless: every rank writes its shards, a collective
proves that every rank finished, rank 0 writes ``atpo_checkpoint.json`` and then replaces
``latest`` atomically (write ``latest.tmp``, fsync, ``os.replace``, fsync the folder). Until that
rename, ``latest`` still names the previous complete checkpoint; a step folder without
``atpo_checkpoint.json`` is a partial save and is never loaded (a warning names it). Retention
deletes only complete checkpoints older than the newest ``keep_last``, and only after the marker.

Async save: on CUDA, ``async_save=True`` hands the write to megatron's async caller (a forked
writer process) and commits in :func:`finalize_async_saves`. On CPU megatron's async caller cannot
run (it synchronizes CUDA streams and allocates its barrier tensor on the current CUDA device), so
the save falls back to the synchronous path with a one-time warning; the files are identical.

Everything here is collective: call each function on every rank, in the same order.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import random
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import numpy as np
import torch

from atpo_megatron import distributed
from atpo_megatron.config import UserError

log = logging.getLogger(__name__)

COMPLETE_FILE = "atpo_checkpoint.json"
LATEST_FILE = "latest"
CONFIG_FILE = "config.yaml"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")
# Model-shape fields compared on load; a mismatch means the checkpoint is of another model.
SHAPE_KEYS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
              "num_query_groups", "kv_channels", "vocab_size")

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


def _collective_check(fn, *args) -> Any:
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
    return _collective_check(resolve_resume, ckpt_dir, resume)


# --------------------------------------------------------------------------------------------
# What goes into a checkpoint
# --------------------------------------------------------------------------------------------


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The inner GPTModel: the DDP wrapper adds a ``module.`` prefix to its sharded state dict
    that its own load_state_dict does not strip, so state dicts are built from the inner module."""
    from megatron.core.utils import unwrap_model

    return unwrap_model(model)


def model_metadata(models: Sequence[torch.nn.Module]) -> dict[str, Any]:
    """The shape of the model (what must match for a checkpoint to load)."""
    if not models:
        return {}
    inner = _unwrap(models[0])
    c = inner.config
    return {
        "num_layers": c.num_layers,
        "hidden_size": c.hidden_size,
        "ffn_hidden_size": c.ffn_hidden_size,
        "num_attention_heads": c.num_attention_heads,
        "num_query_groups": c.num_query_groups or c.num_attention_heads,
        "kv_channels": c.kv_channels,
        "vocab_size": getattr(inner, "vocab_size", None),  # padded (see _same_vocab_up_to_padding)
        "tp": c.tensor_model_parallel_size,
        "params_dtype": str(c.params_dtype).replace("torch.", ""),
    }


def parallel_layout(models: Sequence[torch.nn.Module]) -> dict[str, int]:
    from megatron.core import parallel_state as ps

    layout = {"world": distributed.world_size(), "tp": 1, "pp": 1, "dp": distributed.world_size(), "cp": 1, "ep": 1,
              "vpp": max(len(models), 1)}
    if ps.model_parallel_is_initialized():
        layout.update(tp=ps.get_tensor_model_parallel_world_size(),
                      pp=ps.get_pipeline_model_parallel_world_size(),
                      dp=ps.get_data_parallel_world_size(),
                      cp=ps.get_context_parallel_world_size(),
                      ep=ps.get_expert_model_parallel_world_size())
    return layout


def _shape_mismatch(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The shape fields that differ, as "name: checkpoint X vs model Y" strings."""
    out = []
    for k in SHAPE_KEYS:
        a, b = saved.get(k), current.get(k)
        if a is None or b is None or a == b:
            continue
        if k == "vocab_size" and _same_vocab_up_to_padding(a, b, saved, current):
            continue
        out.append(f"{k}: checkpoint {a} vs model {b}")
    return out


def _same_vocab_up_to_padding(a: int, b: int, saved: dict, current: dict) -> bool:
    # build_model pads the vocabulary to a multiple of 128 * tp, so a TP change may change the
    # padded size; megatron marks the embedding and output-layer tensors allow_shape_mismatch
    # (extra rows load as zeros). Padded sizes of one vocabulary differ by < 128 * the larger tp.
    tp = max(saved.get("tp", 1), current.get("tp", 1))
    return abs(a - b) < 128 * tp


def _rng_tracker():
    from megatron.core import tensor_parallel

    try:
        tracker = tensor_parallel.get_cuda_rng_tracker()
    except Exception:  # TE tracker variants may refuse without CUDA
        return None
    return tracker if tracker.is_initialized() else None


def rng_state() -> dict[str, Any]:
    """Every RNG this rank uses: python, numpy, torch CPU, CUDA, megatron's model-parallel tracker."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    tracker = _rng_tracker()
    if tracker is not None:
        state["tracker"] = {k: v.clone() for k, v in tracker.get_states().items()}
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "tracker" in state:
        from megatron.core import tensor_parallel

        tensor_parallel.get_cuda_rng_tracker().set_states(dict(state["tracker"]))


def _model_keys(n: int) -> list[str]:
    # Megatron-LM's convention: "model" for one chunk, "model0", "model1", ... for virtual stages.
    return ["model"] if n == 1 else [f"model{i}" for i in range(n)]


def _sharded_metadata(optim_sharding: str) -> dict[str, Any]:
    """What ``optimizer.sharded_state_dict`` needs as ``metadata``: megatron-core 0.19.2's default
    ``fully_sharded_model_space`` raises (shared/notes/megatron-cpu.md, "Optimizer sharding type")."""
    return {
        "distrib_optim_sharding_type": optim_sharding,
        # Gather the optimizer shards over the gloo DP group onto DP rank 0 (the other path
        # all-gathers full optimizer state on every DP rank, and calls .cuda() on CPU).
        "distrib_optim_fully_reshardable_mem_efficient": True,
        "singleton_local_shards": False,
        "chained_optim_avoid_prefix": True,
    }


def _build_sharded_state(models, optimizer, scheduler, *, is_loading: bool, optim_sharding: str,
                         with_rng: bool, with_tp_pp_rng: bool) -> dict[str, Any]:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    meta = _sharded_metadata(optim_sharding)
    state: dict[str, Any] = {}
    for key, model in zip(_model_keys(len(models)), models):
        state[key] = _unwrap(model).sharded_state_dict(metadata=meta)
    if optimizer is not None:
        model_part = {k: state[k] for k in _model_keys(len(models))} if models else {}
        state["optimizer"] = optimizer.sharded_state_dict(model_part, is_loading=is_loading,
                                                          metadata=meta)
    if scheduler is not None:
        state["opt_param_scheduler"] = scheduler.state_dict()
    if with_rng:
        # One object per global rank: a resume in the same layout gives each rank its own states.
        state["rng_state"] = ShardedObject("atpo.rng_state", rng_state() if not is_loading else None,
                                           (distributed.world_size(),), (distributed.rank(),), replica_id=0)
    if with_tp_pp_rng:
        # One per TP x PP position, written by DP rank 0 (Megatron-LM's layout): the DP replicas of a
        # position draw the same streams (seeds depend on the PP and TP rank only), so a resume with
        # another DP size gives every rank the states of its position.
        (tp, tp_rank), (pp, pp_rank), (_, dp_rank) = _grid()
        state["rng_state_tp_pp"] = ShardedObject("atpo.rng_state_tp_pp", rng_state() if not is_loading else None,
                                                 (pp, tp), (pp_rank, tp_rank), replica_id=dp_rank)
    return state


def _grid() -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """((tp, tp_rank), (pp, pp_rank), (dp, dp_rank)) of this rank; world size 1 without megatron."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return (1, 0), (1, 0), (distributed.world_size(), distributed.rank())
    return ((ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()),
            (ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()),
            (ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()))


def _bucket_layout(optimizer: Any) -> list[list[int]]:
    """The distributed optimizer's gradient buckets (unpadded elements per bucket, per buffer):
    what a dp_reshardable checkpoint's optimizer state is cut into."""
    return [[n for sizes in buffer.values() for n in sizes]
            for opt in getattr(optimizer, "chained_optimizers", [optimizer])
            for buffer in getattr(opt, "per_bucket_numel_unpadded", [])]


def _gather_bucket_layouts(optimizer: Any) -> dict[str, list[list[int]]]:
    """Every TP x PP position's bucket layout, keyed "pp,tp" (the same on its DP replicas)."""
    (_, tp_rank), (_, pp_rank), _ = _grid()
    mine = (f"{pp_rank},{tp_rank}", _bucket_layout(optimizer))
    everyone = [None] * distributed.world_size()
    if distributed.initialized():
        torch.distributed.all_gather_object(everyone, mine)
    else:
        everyone = [mine]
    return dict(everyone)


def _config_yaml(config: Any) -> str | None:
    if config is None or isinstance(config, str):
        return config
    from .config import dump_config

    return dump_config(config)


def _install_compat() -> None:
    # CPU: the actor-model engineer's device adaptations (dist_checkpointing's writer calls
    # torch.cuda.synchronize()); with or without CUDA: the distributed-optimizer load fixes.
    try:
        from .actor import cpu_compat
    except ImportError:
        cpu_compat = None
    if cpu_compat is not None:
        cpu_compat.install()
    from .actor import distopt_compat

    distopt_compat.install()


def _strategies(for_load: bool, ckpt: Path | None = None):
    """torch_dist strategies, wrapped to spread the work over data-parallel replicas."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.serialization import (
        get_default_load_sharded_strategy, get_default_save_sharded_strategy)
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelLoadStrategyWrapper, FullyParallelSaveStrategyWrapper)

    base = get_default_load_sharded_strategy(ckpt) if for_load else get_default_save_sharded_strategy()
    if not ps.model_parallel_is_initialized() or ps.get_data_parallel_world_size() == 1:
        return base
    group = ps.get_data_parallel_group(with_context_parallel=True)
    if for_load:
        # "broadcast" (megatron's default) calls Tensor.cuda(); gather_object works everywhere.
        algo = "broadcast" if torch.cuda.is_available() else "gather_object"
        return FullyParallelLoadStrategyWrapper(base, group, exchange_algo=algo)
    return FullyParallelSaveStrategyWrapper(base, group)


# --------------------------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------------------------

_async_queue = None
_pending: list[int] = []
_warned_async = False


def async_supported() -> bool:
    """megatron's async caller needs CUDA (stream sync, a CUDA barrier tensor at finalize)."""
    return torch.cuda.is_available()


def save(
    ckpt_dir: str | Path,
    step: int,
    models: Sequence[torch.nn.Module],
    optimizer: Any = None,
    scheduler: Any = None,
    extra: dict[str, Any] | None = None,
    *,
    config: Any = None,
    keep_last: int = 0,
    async_save: bool = False,
    optim_sharding: OptimSharding = "fully_reshardable",
) -> Path:
    """Save one checkpoint as ``<ckpt_dir>/step_<step>``; collective.

    models: the model chunks (one per virtual pipeline stage), DDP-wrapped or not.
    optimizer: megatron optimizer (distributed or not); scheduler: OptimizerParamScheduler.
    extra: any picklable dict, identical on every rank (rank 0's copy is stored): rollout state,
        data iterator position, metric history.
    config: the run's ``Config`` (or its YAML text), stored as ``config.yaml``.
    keep_last: after the new marker, delete older complete checkpoints beyond this many (0 = keep all).
    async_save: write in the background on CUDA (commit in finalize_async_saves); sync on CPU.
    optim_sharding: "fully_reshardable" (TP/PP/DP may change on load; gathers each DP group's
        optimizer state on its DP rank 0: 24 + 12/DP bytes of host memory per parameter of its
        shard, measured) or "dp_reshardable" (no gather; DP may change, TP/PP not). The trainer
        passes ``checkpoint.optim_sharding`` (default dp_reshardable).

    Saving the step that ``latest`` already names is a no-op (the state is that one).
    """
    global _warned_async
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    if optimizer is not None and not _optimizer_has_state(optimizer):
        raise CheckpointError(
            f"cannot save step {step}: the optimizer has no state yet (no optimizer step was taken); "
            f"save after the first optimizer step, or pass optimizer=None for a weights-only checkpoint")
    _install_compat()
    finalize_async_saves(blocking=True)  # one save in flight at a time
    ckpt_dir, target = Path(ckpt_dir), step_dir(ckpt_dir, step)
    # Rank 0 prepares the folder; the broadcast inside holds the others until it is ready.
    if not _collective_check(prepare_step_dir, ckpt_dir, step):
        log.info("checkpoint %s is already the latest; not saving step %d again", target, step)
        return target

    if async_save and not async_supported():
        if not _warned_async and distributed.rank() == 0:
            log.warning("checkpoint.async_save: megatron's async writer needs CUDA; saving "
                        "synchronously on this CPU-only machine")
        _warned_async = True
        async_save = False

    t0 = time.perf_counter()
    record = {
        "format": FORMAT_VERSION,
        "step": step,
        "model": model_metadata(models),
        "layout": parallel_layout(models),
        "optim_sharding": optim_sharding if optimizer is not None else None,
        "has_scheduler": scheduler is not None,
        "rng_by_tp_pp": True,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if optimizer is not None and optim_sharding == "dp_reshardable":
        record["optim_buckets"] = _gather_bucket_layouts(optimizer)
    config_yaml = _config_yaml(config)
    state = _build_sharded_state(models, optimizer, scheduler, is_loading=False,
                                 optim_sharding=optim_sharding, with_rng=True, with_tp_pp_rng=True)
    state["atpo"] = {"step": step, "extra": extra or {}, "config_yaml": config_yaml, "record": record}
    try:
        request = dist_checkpointing.save(state, str(target), sharded_strategy=_strategies(False),
                                          async_sharded_save=async_save, async_strategy="mcore")
    except (Exception, CheckpointException) as exc:  # megatron gathers the writers' results, raises on every rank
        raise CheckpointError(_write_failure(ckpt_dir, target, exc)) from exc
    commit = functools.partial(_commit, ckpt_dir, step, record, config_yaml, keep_last, t0)
    if request is None:
        commit()
    else:
        global _async_queue
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        if _async_queue is None:
            _async_queue = AsyncCallsQueue()
        request.add_finalize_fn(commit)
        _async_queue.schedule_async_request(request)
        _pending.append(step)
    return target


def _write_failure(ckpt_dir: Path, target: Path, exc: BaseException) -> str:
    """One line on a save that failed while writing its shards (torch's writer loses the errno)."""
    try:
        free = f"{shutil.disk_usage(ckpt_dir).free / 2**30:.1f} GiB are free there now"
    except OSError:
        free = "the free space there is unknown"
    previous = read_latest(ckpt_dir)
    kept = (f"`latest` still names step {previous}, which is intact" if previous is not None
            else "no earlier checkpoint exists")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return (f"checkpoint {target} could not be written ({type(exc).__name__}: {first}; the writer's own "
            f"error is logged above); a full disk or quota is the usual cause ({free}). {kept}; make room "
            f"and run the same command again to resume")


def _optimizer_has_state(optimizer: Any) -> bool:
    """False while a (chained) megatron optimizer's inner torch optimizer has never stepped:
    megatron's state_dict() then fails with a bare assertion (fallback Adam) or saves nothing."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if isinstance(inner, torch.optim.Optimizer):
            has_params = any(p.numel() for g in inner.param_groups for p in g["params"])
            if has_params and len(inner.state) == 0:
                return False
    return True


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


def _commit(ckpt_dir: Path, step: int, record: dict, config_yaml: str | None, keep_last: int,
            t0: float) -> None:
    """Runs on every rank once this rank's shards are on disk: prove every rank got here, then
    mark the checkpoint complete and move ``latest`` (rank 0), then apply retention."""
    target = step_dir(ckpt_dir, step)
    # megatron's own files exist once its finalize ran; check before trusting the save.
    ok = distributed.rank() != 0 or (target / "metadata.json").is_file()
    if not distributed.all_true(ok):
        raise CheckpointError(f"checkpoint {target} was not written completely by every rank; "
                              f"{ckpt_dir / LATEST_FILE} still names the previous checkpoint")
    if distributed.rank() == 0:
        if config_yaml is not None:
            atomic_write_text(target / CONFIG_FILE, config_yaml)
        atomic_write_text(target / COMPLETE_FILE, json.dumps(record, indent=1, sort_keys=True))
        write_latest(ckpt_dir, step)
        apply_retention(ckpt_dir, keep_last)
        log.info("saved checkpoint %s in %.1f s", target, time.perf_counter() - t0)
    if distributed.initialized():
        torch.distributed.barrier()


def pending_async_saves() -> list[int]:
    """Steps whose async save is written or being written but not committed yet."""
    return list(_pending)


def finalize_async_saves(blocking: bool = False) -> list[int]:
    """Commit the async saves whose writes finished on every rank; collective. Returns their steps.

    Call once per training step (cheap: one small all-reduce while a write is in flight, nothing
    otherwise) and with ``blocking=True`` before exiting, or the last checkpoint stays uncommitted.
    """
    if _async_queue is None or not _pending:
        return []
    done = _async_queue.maybe_finalize_async_calls(blocking=blocking)
    steps, _pending[:] = _pending[: len(done)], _pending[len(done):]
    return steps


# --------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Resumed:
    """What :func:`load` restored. Unpacks as ``step, extra = load(...)``."""

    step: int
    extra: dict[str, Any]
    path: Path
    config_yaml: str | None
    rng_restored: bool
    """False when the layout changed (per-rank RNG states cannot map to other ranks)."""

    def __iter__(self):
        yield self.step
        yield self.extra


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


def load(
    ckpt_dir: str | Path,
    models: Sequence[torch.nn.Module],
    optimizer: Any = None,
    scheduler: Any = None,
    *,
    path: str | Path | None = None,
    strict: bool = True,
) -> Resumed | None:
    """Load the newest complete checkpoint of ``ckpt_dir`` (or the folder ``path``); collective.

    Restores what it is given: the model chunks always, the optimizer and scheduler when passed
    (None = weights only, e.g. for evaluation), every rank's RNG states when the parallel layout
    is the one that saved (those of the rank's TP x PP position when only DP changed). Returns None
    when there is no complete checkpoint.
    Raises CheckpointError when the checkpoint belongs to a model of another shape.
    """
    from megatron.core import dist_checkpointing

    target = path if path is not None else _collective_check(find_latest, Path(ckpt_dir))
    if target is None:
        return None
    target = Path(target)
    record = _collective_check(read_record, target)

    current = model_metadata(models)
    mismatch = _shape_mismatch(record.get("model", {}), current)
    if mismatch:
        raise CheckpointError(
            f"checkpoint {target} was saved from a model of another shape ({'; '.join(mismatch)}); "
            f"load it with the model config that saved it (its {CONFIG_FILE}), or start a new run "
            f"in an empty checkpoint.dir"
        )
    saved_vpp = record.get("layout", {}).get("vpp", len(models))
    if models and saved_vpp != len(models) and record.get("layout", {}).get("pp", 1) > 1:
        log.info("checkpoint %s has %d virtual stages, the model %d: resharding", target,
                 saved_vpp, len(models))
    optim_sharding = record.get("optim_sharding") or "fully_reshardable"
    if optimizer is not None and record.get("optim_sharding") is None:
        raise CheckpointError(f"checkpoint {target} holds no optimizer state; pass optimizer=None "
                              f"to load its weights only")
    if scheduler is not None and not record.get("has_scheduler", False):
        raise CheckpointError(f"checkpoint {target} holds no LR scheduler state; pass "
                              f"scheduler=None to keep the fresh schedule")

    _install_compat()
    now = parallel_layout(models)
    same_layout = record.get("layout") == now
    saved = record.get("layout", {})
    same_tp_pp = (saved.get("tp"), saved.get("pp")) == (now["tp"], now["pp"])
    if optimizer is not None and optim_sharding == "dp_reshardable":
        _check_dp_reshardable(target, record, optimizer, same_tp_pp)
    tp_pp_rng = not same_layout and same_tp_pp and record.get("rng_by_tp_pp", False)
    state = _build_sharded_state(models, optimizer, scheduler, is_loading=True, optim_sharding=optim_sharding,
                                 with_rng=same_layout, with_tp_pp_rng=tp_pp_rng)
    loaded = dist_checkpointing.load(state, str(target), sharded_strategy=_strategies(True, target))

    for key, model in zip(_model_keys(len(models)), models):
        _unwrap(model).load_state_dict(loaded[key], strict=strict)
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if same_layout:
        set_rng_state(loaded["rng_state"])
    elif tp_pp_rng:
        set_rng_state(loaded["rng_state_tp_pp"])
        if distributed.rank() == 0:
            log.info("checkpoint %s was saved with DP %s, this run has DP %s: RNG states restored per "
                     "TP x PP position", target, saved.get("dp"), now["dp"])
    elif distributed.rank() == 0:
        log.warning("checkpoint %s was saved with layout %s, this run has %s: weights and optimizer "
                    "are resharded; per-rank RNG states are not restored (fresh seeds)", target,
                    saved, now)
    atpo = loaded["atpo"]
    if distributed.rank() == 0:
        log.info("resumed from %s (step %d)", target, atpo["step"])
    return Resumed(step=atpo["step"], extra=atpo["extra"], path=target,
                   config_yaml=atpo.get("config_yaml"), rng_restored=same_layout or tp_pp_rng)


def _check_dp_reshardable(target: Path, record: dict[str, Any], optimizer: Any, same_tp_pp: bool) -> None:
    """Refuse, on every rank and with the conversion command, a resume that a dp_reshardable
    optimizer state cannot follow: another TP or PP, or other gradient buckets (one per buffer
    unless gradient reduction overlaps the backward; then megatron sizes them max(40M, 1M x DP)
    elements, so a DP change across 40 moves them)."""
    saved = record.get("layout", {})
    convert = (f"Convert it once with the layout that saved it ({saved.get('world')} ranks: "
               f"tp={saved.get('tp')} pp={saved.get('pp')} dp={saved.get('dp')}): `atpo convert "
               f"--optim-sharding fully_reshardable {target} NEW_CHECKPOINT_DIR --nproc-per-node "
               f"{saved.get('world')}` (under torchrun/srun on several nodes), then resume with "
               f"checkpoint.dir=NEW_CHECKPOINT_DIR, or resume with the saving layout.")
    if not same_tp_pp:
        raise CheckpointError(
            f"checkpoint {target} stores the optimizer as dp_reshardable (tp={saved.get('tp')}, "
            f"pp={saved.get('pp')}), which loads only with the same tp and pp; this run has "
            f"tp={_grid()[0][0]}, pp={_grid()[1][0]}. {convert}")
    buckets = record.get("optim_buckets")
    (_, tp_rank), (_, pp_rank), _ = _grid()
    mine = buckets.get(f"{pp_rank},{tp_rank}") if buckets is not None else None
    ok = distributed.all_true(mine is None or mine == _bucket_layout(optimizer))
    if not ok:
        raise CheckpointError(
            f"checkpoint {target} stores the optimizer as dp_reshardable, cut into the gradient "
            f"buckets of dp={saved.get('dp')}; this run (dp={_grid()[2][0]}) has other buckets "
            f"(with overlapped gradient reduction megatron sizes them max(40M, 1M x dp) elements), "
            f"so the optimizer state cannot be mapped. {convert}")
