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

from atpo_megatron.checkpoint.folder import (  # noqa: F401  (the package's API)
    COMPLETE_FILE,
    CONFIG_FILE,
    LATEST_FILE,
    CheckpointError,
    OptimSharding,
    apply_retention,
    atomic_write_text,
    checkpoint_dir,
    find_latest,
    is_complete,
    list_checkpoints,
    prepare,
    read_latest,
    read_record,
    resolve_resume,
    step_dir,
    write_latest,
)
from atpo_megatron.checkpoint.store import (  # noqa: F401
    Resumed,
    async_supported,
    finalize_async_saves,
    load,
    pending_async_saves,
    save,
)
