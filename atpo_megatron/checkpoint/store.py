"""Writing and reading one checkpoint (collective): :func:`save` with its commit protocol and async
commits, :func:`load` with its layout and shape checks."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from atpo_megatron import distributed
from atpo_megatron.checkpoint.folder import (
    COMPLETE_FILE,
    CONFIG_FILE,
    FORMAT_VERSION,
    LATEST_FILE,
    CheckpointError,
    OptimSharding,
    apply_retention,
    atomic_write_text,
    collective_check,
    find_latest,
    prepare_step_dir,
    read_latest,
    read_record,
    step_dir,
    write_latest,
)
from atpo_megatron.checkpoint.state import (
    bucket_layout,
    build_sharded_state,
    config_text,
    gather_bucket_layouts,
    grid,
    install_compat,
    model_keys,
    model_metadata,
    parallel_layout,
    set_rng_state,
    shape_mismatch,
    strategies,
    unwrap,
)

log = logging.getLogger("atpo_megatron.checkpoint")

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
    install_compat()
    finalize_async_saves(blocking=True)  # one save in flight at a time
    ckpt_dir, target = Path(ckpt_dir), step_dir(ckpt_dir, step)
    # Rank 0 prepares the folder; the broadcast inside holds the others until it is ready.
    if not collective_check(prepare_step_dir, ckpt_dir, step):
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
        record["optim_buckets"] = gather_bucket_layouts(optimizer)
    config_yaml = config_text(config)
    state = build_sharded_state(models, optimizer, scheduler, is_loading=False,
                                 optim_sharding=optim_sharding, with_rng=True, with_tp_pp_rng=True)
    state["atpo"] = {"step": step, "extra": extra or {}, "config_yaml": config_yaml, "record": record}
    try:
        request = dist_checkpointing.save(state, str(target), sharded_strategy=strategies(False),
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

    target = path if path is not None else collective_check(find_latest, Path(ckpt_dir))
    if target is None:
        return None
    target = Path(target)
    record = collective_check(read_record, target)

    current = model_metadata(models)
    mismatch = shape_mismatch(record.get("model", {}), current)
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

    install_compat()
    now = parallel_layout(models)
    same_layout = record.get("layout") == now
    saved = record.get("layout", {})
    same_tp_pp = (saved.get("tp"), saved.get("pp")) == (now["tp"], now["pp"])
    if optimizer is not None and optim_sharding == "dp_reshardable":
        _check_dp_reshardable(target, record, optimizer, same_tp_pp)
    tp_pp_rng = not same_layout and same_tp_pp and record.get("rng_by_tp_pp", False)
    state = build_sharded_state(models, optimizer, scheduler, is_loading=True, optim_sharding=optim_sharding,
                                 with_rng=same_layout, with_tp_pp_rng=tp_pp_rng)
    loaded = dist_checkpointing.load(state, str(target), sharded_strategy=strategies(True, target))

    for key, model in zip(model_keys(len(models)), models):
        unwrap(model).load_state_dict(loaded[key], strict=strict)
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
            f"tp={grid()[0][0]}, pp={grid()[1][0]}. {convert}")
    buckets = record.get("optim_buckets")
    (_, tp_rank), (_, pp_rank), _ = grid()
    mine = buckets.get(f"{pp_rank},{tp_rank}") if buckets is not None else None
    ok = distributed.all_true(mine is None or mine == bucket_layout(optimizer))
    if not ok:
        raise CheckpointError(
            f"checkpoint {target} stores the optimizer as dp_reshardable, cut into the gradient "
            f"buckets of dp={saved.get('dp')}; this run (dp={grid()[2][0]}) has other buckets "
            f"(with overlapped gradient reduction megatron sizes them max(40M, 1M x dp) elements), "
            f"so the optimizer state cannot be mapped. {convert}")
