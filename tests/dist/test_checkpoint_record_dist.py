"""A damaged checkpoint record on 2 gloo ranks: every rank raises the same one-line CheckpointError.

Issue 13 defect 4: ``atpo_checkpoint.json`` that is not valid JSON (or not UTF-8) ended a resume with a
``JSONDecodeError`` traceback, and the collective check inside ``checkpoint.load`` caught only
``CheckpointError``/``OSError`` on rank 0, so when rank 0 alone failed to read the record the other
ranks waited in the broadcast that follows (gloo errors out when rank 0 exits; NCCL waits for its
timeout). No megatron model is needed to get there; other damage kinds are in
tests/unit/test_checkpoint_unit.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from launch import run_dist

pytestmark = [pytest.mark.dist]


def load_worker(ckpt: str):
    import torch.distributed as dist

    from atpo_megatron import checkpoint
    from atpo_megatron.config import UserError

    dist.init_process_group("gloo")
    try:
        checkpoint.load(ckpt, [])
        out = {"type": None}
    except Exception as exc:  # noqa: BLE001 - what each rank raised is the result
        out = {"type": type(exc).__name__, "message": str(exc), "user_error": isinstance(exc, UserError)}
    dist.destroy_process_group()
    return out


def test_damaged_record_fails_on_every_rank_naming_the_file(tmp_path):
    ckpt = tmp_path / "ckpt"
    for step in (1, 2):
        (ckpt / f"step_{step:06d}").mkdir(parents=True)
        (ckpt / f"step_{step:06d}" / "atpo_checkpoint.json").write_text('{"format": 1, "step": %d}' % step)
    record = ckpt / "step_000002" / "atpo_checkpoint.json"
    record.write_bytes(b'{"format": 1, "step": 2, "mod')  # cut short
    (ckpt / "latest").write_text("2\n")
    results = run_dist(__file__, "load_worker", nproc=2, kwargs={"ckpt": str(ckpt)}, timeout=90)
    assert results[0] == results[1]
    assert results[0]["type"] == "CheckpointError" and results[0]["user_error"]
    message = results[0]["message"]
    assert "\n" not in message and str(record) in message
    assert "echo 1 > " + str(Path(ckpt) / "latest") in message  # how to fall back to the previous one
