"""Checkpoint folder logic on fake step folders: the latest marker, partial saves, retention,
resume policy, writability, and the model-shape check (one process, no megatron save)."""

from __future__ import annotations

import json
import logging
import types

import pytest
import torch

from atpo_megatron import checkpoint as ck
from atpo_megatron.checkpoint import CheckpointError
from atpo_megatron.checkpoint import folder as ck_folder
from atpo_megatron.checkpoint import state as ck_state
from atpo_megatron.checkpoint import store as ck_store


def _fake(ckpt_dir, step, complete=True, model=None):
    d = ck.step_dir(ckpt_dir, step)
    d.mkdir(parents=True)
    (d / "__0_0.distcp").write_bytes(b"shard")
    if complete:
        record = {"format": 1, "step": step, "model": model or {}, "layout": {}, "optim_sharding": None}
        (d / ck.COMPLETE_FILE).write_text(json.dumps(record))
    return d


def test_latest_marker_names_newest_complete_and_partial_is_ignored(tmp_path, caplog):
    _fake(tmp_path, 10)
    _fake(tmp_path, 20)
    _fake(tmp_path, 30, complete=False)  # a save killed before its commit
    ck.write_latest(tmp_path, 20)
    (tmp_path / "latest.tmp").write_text("30\n")  # killed between write and rename: ignored
    with caplog.at_level(logging.WARNING):
        assert ck.find_latest(tmp_path) == tmp_path / "step_000020"
    assert "step_000030 has no atpo_checkpoint.json" in caplog.text
    assert ck.read_latest(tmp_path) == 20
    assert [s for s, _ in ck.list_checkpoints(tmp_path)[0]] == [10, 20]
    assert [s for s, _ in ck.list_checkpoints(tmp_path)[1]] == [30]


def test_no_marker_falls_back_to_newest_complete(tmp_path, caplog):
    _fake(tmp_path, 5)
    _fake(tmp_path, 7)
    _fake(tmp_path, 9, complete=False)
    with caplog.at_level(logging.WARNING):
        assert ck.find_latest(tmp_path) == tmp_path / "step_000007"
    assert "no 'latest' marker" in caplog.text
    assert ck.find_latest(tmp_path / "missing") is None


def test_marker_to_missing_or_incomplete_folder_is_an_error(tmp_path):
    _fake(tmp_path, 3)
    _fake(tmp_path, 4, complete=False)
    ck.write_latest(tmp_path, 4)
    with pytest.raises(CheckpointError, match=r"names step 4.*step_000004 is missing or has no.*step_000003"):
        ck.find_latest(tmp_path)
    (tmp_path / "latest").write_text("garbage")
    with pytest.raises(CheckpointError, match="should hold a step number"):
        ck.find_latest(tmp_path)


@pytest.mark.parametrize("damage", [b'{"format": 1, "st', b"\xff\xfe garbage", b"[1, 2]"],
                         ids=["truncated_json", "not_utf8", "not_a_record"])
def test_damaged_record_is_one_line_naming_the_file_and_the_way_back(tmp_path, damage):
    """Issue 13 defect 4 (single process; tests/dist/test_checkpoint_record_dist.py has the 2-rank case)."""
    _fake(tmp_path, 3)
    record = _fake(tmp_path, 4) / ck.COMPLETE_FILE
    record.write_bytes(damage)
    ck.write_latest(tmp_path, 4)
    for find in (ck.find_latest, lambda d: ck.resolve_resume(d, "auto")):
        with pytest.raises(CheckpointError) as info:
            find(tmp_path)
        message = str(info.value)
        assert "\n" not in message and f"{record} is damaged" in message
        assert f"`echo 3 > {tmp_path / 'latest'}`" in message
    (tmp_path / "latest").unlink()  # without the marker the newest complete folder is the damaged one
    with pytest.raises(CheckpointError, match="is damaged"):
        ck.find_latest(tmp_path)


def test_atomic_write_replaces_whole_file(tmp_path):
    p = tmp_path / "latest"
    ck.atomic_write_text(p, "1\n")
    ck.atomic_write_text(p, "12\n")
    assert p.read_text() == "12\n" and not (tmp_path / "latest.tmp").exists()


def test_retention_keeps_newest_complete_and_never_touches_partials(tmp_path):
    for s in (10, 20, 30, 40, 50):
        _fake(tmp_path, s)
    _fake(tmp_path, 35, complete=False)
    _fake(tmp_path, 60)  # complete but newer than the marker (its commit raced a crash): keep
    ck.write_latest(tmp_path, 50)
    deleted = ck.apply_retention(tmp_path, keep_last=2)
    assert sorted(p.name for p in deleted) == ["step_000010", "step_000020", "step_000030"]
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step_"))
    assert left == ["step_000035", "step_000040", "step_000050", "step_000060"]
    assert ck.apply_retention(tmp_path, keep_last=0) == []  # 0 keeps everything
    assert ck.apply_retention(tmp_path, keep_last=1) == [tmp_path / "step_000040"]
    assert ck.find_latest(tmp_path) == tmp_path / "step_000050"


def test_resume_policies(tmp_path, caplog):
    empty = tmp_path / "empty"
    assert ck.resolve_resume(empty, "never") is None  # missing folder: fresh start
    empty.mkdir()
    assert ck.resolve_resume(empty, "never") is None
    assert ck.resolve_resume(empty, "auto") is None
    with pytest.raises(CheckpointError, match="resume=required but .* holds no complete checkpoint"):
        ck.resolve_resume(empty, "required")

    run = tmp_path / "run"
    _fake(run, 8, complete=False)
    with pytest.raises(CheckpointError, match=r"no complete checkpoint \(only partial saves: .*step_000008\)"):
        ck.resolve_resume(run, "required")
    _fake(run, 6)
    ck.write_latest(run, 6)
    assert ck.resolve_resume(run, "auto") == run / "step_000006"
    assert ck.resolve_resume(run, "required") == run / "step_000006"
    with pytest.raises(CheckpointError, match=r"resume=never but .*run is not empty \(latest, step_000006.*"
                                              r"would overwrite.*resume=auto"):
        ck.resolve_resume(run, "never")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not empty"):
        ck.resolve_resume(other, "never")
    with pytest.raises(CheckpointError, match="choose one of"):
        ck.resolve_resume(run, "sometimes")


def test_unwritable_dir_is_reported_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CheckpointError, match=r"file/ckpt is not writable.*checkpoint.dir"):
        ck.prepare(blocker / "ckpt", "auto")
    assert ck.prepare(tmp_path / "fresh", "never") is None
    assert (tmp_path / "fresh").is_dir() and not list((tmp_path / "fresh").iterdir())  # probe removed


def test_checkpoint_dir_default():
    cfg = types.SimpleNamespace(checkpoint=types.SimpleNamespace(dir=""),
                                logging=types.SimpleNamespace(run_dir="runs/x"))
    assert str(ck.checkpoint_dir(cfg)) == "runs/x/checkpoints"
    cfg.checkpoint.dir = "/ckpt"
    assert str(ck.checkpoint_dir(cfg)) == "/ckpt"


class _FakeModel(torch.nn.Module):
    def __init__(self, **shape):
        super().__init__()
        self.vocab_size = shape.pop("vocab_size")
        base = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                    num_query_groups=2, kv_channels=16, tensor_model_parallel_size=1,
                    params_dtype=torch.float32)
        self.config = types.SimpleNamespace(**{**base, **shape})


def test_load_refuses_other_model_shape_naming_the_field(tmp_path):
    saved = ck_state.model_metadata([_FakeModel(vocab_size=128)])
    assert saved["hidden_size"] == 64 and saved["num_query_groups"] == 2
    _fake(tmp_path, 4, model=saved)
    ck.write_latest(tmp_path, 4)
    with pytest.raises(CheckpointError, match=r"another shape \(num_layers: checkpoint 2 vs model 3; "
                                              r"hidden_size: checkpoint 64 vs model 96\)"):
        ck.load(tmp_path, [_FakeModel(vocab_size=128, hidden_size=96, num_layers=3)])
    with pytest.raises(CheckpointError, match="vocab_size: checkpoint 128 vs model 32000"):
        ck.load(tmp_path, [_FakeModel(vocab_size=32000)])
    # Loading an optimizer from a weights-only checkpoint is refused before any I/O.
    with pytest.raises(CheckpointError, match="holds no optimizer state; pass optimizer=None"):
        ck.load(tmp_path, [_FakeModel(vocab_size=128)], optimizer=object())


def test_vocab_padding_from_a_tp_change_is_not_a_shape_change():
    # Llama-3's 128256 rows pad to 128512 at tp=4 (multiple of 128*4) and stay 128256 at tp=1.
    at_tp4 = {"vocab_size": 128512, "tp": 4}
    at_tp1 = {"vocab_size": 128256, "tp": 1}
    assert ck_state.shape_mismatch(at_tp4, at_tp1) == []
    assert ck_state.shape_mismatch({"vocab_size": 128256, "tp": 1}, {"vocab_size": 32000, "tp": 1}) == [
        "vocab_size: checkpoint 128256 vs model 32000"]


def test_missing_checkpoint_returns_none(tmp_path):
    assert ck.load(tmp_path, [_FakeModel(vocab_size=128)]) is None
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        ck.load(tmp_path, [_FakeModel(vocab_size=128)], path=_fake(tmp_path, 1, complete=False))


def test_rng_state_round_trip():
    import random

    import numpy as np

    state = ck_state.rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    ck_state.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def test_save_target_preparation(tmp_path, caplog):
    # The committed latest step: nothing to do (a second save of the same state).
    _fake(tmp_path, 5)
    ck.write_latest(tmp_path, 5)
    assert ck_folder.prepare_step_dir(tmp_path, 5) is False
    # A partial folder (crash mid-save) is replaced by an empty one.
    _fake(tmp_path, 6, complete=False)
    with caplog.at_level(logging.WARNING):
        assert ck_folder.prepare_step_dir(tmp_path, 6) is True
    assert "partial checkpoint folder" in caplog.text and not any((tmp_path / "step_000006").iterdir())
    # Complete but never the latest (crash between its two commit writes, then an older resume
    # took another path): not this timeline's state, so it is rewritten, not silently kept.
    _fake(tmp_path, 7)
    assert ck_folder.prepare_step_dir(tmp_path, 7) is True
    assert "complete but never committed as latest" in caplog.text
    assert not ck.is_complete(tmp_path / "step_000007")


def test_distopt_compat_is_a_noop_with_apex_or_te(monkeypatch):
    from megatron.core.optimizer import distrib_optimizer

    from atpo_megatron.actor import distopt_compat

    DO = distrib_optimizer.DistributedOptimizer
    if getattr(DO, "_atpo_distopt_compat", False):
        pytest.skip("already installed in this process")
    before = dict(DO.__dict__)
    monkeypatch.setattr(distrib_optimizer, "HAVE_APEX_OR_TE", True)
    assert distopt_compat.install() is False
    assert dict(DO.__dict__) == before
    monkeypatch.setattr(distrib_optimizer, "HAVE_APEX_OR_TE", False)
    assert distopt_compat.needed()


def test_requeue_commits_pending_async_saves_first(monkeypatch):
    from atpo_megatron.launch.preemption import PreemptionHandler

    calls = []
    monkeypatch.setattr(ck_store, "_pending", [12])
    monkeypatch.setattr(ck, "finalize_async_saves", lambda blocking=False: calls.append(blocking) or [12])
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert PreemptionHandler().requeue() is False  # not under SLURM, but the save got committed
    assert calls == [True]


def test_save_before_the_first_optimizer_step_is_refused(tmp_path):
    param = torch.nn.Parameter(torch.ones(3))
    inner = torch.optim.AdamW([param])
    megatron_like = types.SimpleNamespace(optimizer=inner)
    with pytest.raises(CheckpointError, match="no state yet .* optimizer=None for a weights-only"):
        ck.save(tmp_path, 0, [], megatron_like)
    param.grad = torch.zeros(3)
    inner.step()
    assert ck_store._optimizer_has_state(types.SimpleNamespace(chained_optimizers=[megatron_like]))
