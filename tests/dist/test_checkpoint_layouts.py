"""Resuming a checkpoint with another layout: what dp_reshardable (the default) can follow, what it
refuses with the conversion command, and the conversion itself.

One checkpoint, written by 2 ranks (TP1, DP2) as dp_reshardable at step 2 of the trainer's actor
(build_model, megatron DDP, distributed Adam, the LR schedule), is

* resumed on 1 rank (DP1): step, ``extra`` (the data position) and the RNG states of its TP x PP
  position come back (the resuming run was seeded differently), and step 3's loss equals the
  uninterrupted run's; in the same run a model whose gradient buckets differ (overlapped gradient
  reduction in small buckets; megatron's default bucket grows with DP above 40) is refused with the
  conversion command instead of megatron's assertion deep inside the load;
* refused at TP2 with the conversion command; converted by ``atpo convert --optim-sharding
  fully_reshardable`` on the saving layout; and the converted checkpoint resumes at TP2 to the
  same step-3 loss.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from launch import REPO_ROOT, run_dist

pytestmark = [pytest.mark.dist, pytest.mark.slow]

SEQ, GLOBAL_BATCH, VOCAB = 16, 4, 100  # the actor of test_checkpoint_dist: tiny tied Llama, vocab 100


def _hf_dir(tmp: Path) -> Path:
    import transformers

    folder = tmp / "model"
    transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             tie_word_embeddings=True).save_pretrained(folder)
    return folder


def _rng_digest() -> str:
    import random

    import numpy as np
    import torch

    return hashlib.sha256(pickle.dumps((random.getstate(), np.random.get_state()[1].tobytes(),
                                        torch.get_rng_state().numpy().tobytes()))).hexdigest()[:16]


def _actor(cfg, bucket_size: int | None = None):
    """The trainer's actor, DDP and optimizer for ``cfg`` (its model folder and layout); with
    ``bucket_size``, gradient reduction overlapping the backward in buckets of that size."""
    from transformers import AutoConfig

    from atpo_megatron.actor.model import build_model
    from atpo_megatron.actor.optimizer import build_optimizer, wrap_ddp

    models = build_model(AutoConfig.from_pretrained(cfg.model.name_or_path), cfg.model, cfg.parallel)
    models = wrap_ddp(models, overlap_grad_reduce=bucket_size is not None, bucket_size=bucket_size)
    return (models, *build_optimizer(models, cfg.optimizer, total_steps=20))


def _step(models, optimizer, scheduler, step: int) -> float:
    """One optimizer step on a global batch that depends on the step only, split over DP; the
    token-mean loss of the whole batch. Draws from every RNG, as a run does."""
    import random

    import numpy as np
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from atpo_megatron.actor.logprobs import vocab_parallel_logprobs_entropy

    random.random(), np.random.rand(), torch.rand(2)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(step))
    local = tokens[dp_rank * GLOBAL_BATCH // dp:(dp_rank + 1) * GLOBAL_BATCH // dp]
    positions = torch.arange(SEQ).unsqueeze(0)

    def forward_step(it, model):
        batch = next(it)
        logits = model(batch[:, :-1], positions, attention_mask=None)
        logp, _ = vocab_parallel_logprobs_entropy(logits, batch[:, 1:], vocab_size=VOCAB)

        def loss(per_token):
            total = per_token.float().sum()
            return total, torch.tensor(per_token.numel(), dtype=torch.int), {"sum": total.detach().clone()}

        return -logp, loss

    for m in models:
        m.zero_grad_buffer()
    optimizer.zero_grad()
    out = get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(local.split(1)),
                                      model=models, num_microbatches=local.shape[0], seq_length=SEQ,
                                      micro_batch_size=1, forward_only=False)
    assert optimizer.step()[0]
    scheduler.step(1)
    total = torch.stack([o["sum"] for o in out]).sum().reshape(1)
    torch.distributed.all_reduce(total, group=ps.get_data_parallel_group())
    return float(total) / (GLOBAL_BATCH * SEQ)


def run(ckpt: str, model: str, tp: int, seed: int, steps: int, save_at: int = 0, load: str = "",
        refuse: str = "", bucket_probe: int = 0) -> dict:
    """A rank: optionally prove ``refuse`` (a checkpoint) is refused, resume from ``load``, train to
    ``steps``, save at ``save_at``; returns losses, RNG digests and what resuming restored."""
    import torch

    from atpo_megatron import checkpoint
    from atpo_megatron.actor.parallel import destroy_distributed, init_distributed
    from atpo_megatron.config import load_config

    torch.set_num_threads(1)
    cfg = load_config(None, [f"model.name_or_path={model}", f"parallel.tp={tp}"])
    init_distributed(tp=tp, seed=seed)
    models, optimizer, scheduler = _actor(cfg)
    out: dict = {"losses": {}}

    def refused(path: str, bucket_size: int | None = None) -> str:
        fresh = _actor(cfg, bucket_size) if bucket_size else (models, optimizer, scheduler)
        try:
            checkpoint.load(path, *fresh)
        except checkpoint.CheckpointError as exc:
            return str(exc)
        return ""

    if refuse:
        out["refused"] = refused(refuse)
    step = 0
    if load:
        resumed = checkpoint.load(load, models, optimizer, scheduler)
        step = resumed.step
        out.update(step=step, extra=resumed.extra, rng_restored=resumed.rng_restored, rng=_rng_digest())
        if bucket_probe:
            out["bucket_refused"] = refused(load, bucket_probe)
    while step < steps:
        step += 1
        out["losses"][step] = _step(models, optimizer, scheduler, step)
        if step == save_at:
            out["rng_at_save"] = _rng_digest()
            checkpoint.save(ckpt, step, models, optimizer, scheduler, extra={"data_position": step * 8},
                            config=cfg, optim_sharding="dp_reshardable")
    destroy_distributed()
    return out


def test_dp_change_resumes_and_tp_change_converts(tmp_path):
    ckpt, model = tmp_path / "ckpt", _hf_dir(tmp_path)
    common = dict(ckpt=str(ckpt), model=str(model))
    ref = run_dist(__file__, "run", nproc=2, kwargs=dict(**common, tp=1, seed=1234, steps=3, save_at=2))
    assert ref[0]["rng_at_save"] == ref[1]["rng_at_save"]  # DP replicas draw the same streams

    # DP 2 -> 1: the data position and the RNG states of position (tp 0, pp 0) come back
    (dp1,) = run_dist(__file__, "run", nproc=1, kwargs=dict(**common, tp=1, seed=999, steps=3,
                                                             load=str(ckpt), bucket_probe=1000))
    assert (dp1["step"], dp1["extra"], dp1["rng_restored"]) == (2, {"data_position": 16}, True)
    assert dp1["rng"] == ref[0]["rng_at_save"]
    assert dp1["losses"]["3"] == pytest.approx(ref[0]["losses"]["3"], rel=1e-5)
    assert "gradient buckets of dp=2" in dp1["bucket_refused"], dp1["bucket_refused"]
    assert "atpo convert --optim-sharding fully_reshardable" in dp1["bucket_refused"]

    # TP 1 -> 2: refused with the command, converted on the saving layout, then resumed
    converted = tmp_path / "converted"
    from process_tags import kill_tagged, tagged  # tests/: ends whatever the conversion leaves behind

    env, tag = tagged({**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)})
    try:
        proc = subprocess.run([sys.executable, "-m", "atpo_megatron.cli", "convert", "--optim-sharding",
                               "fully_reshardable", str(ckpt), str(converted), "--nproc-per-node", "2"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    finally:
        kill_tagged(tag)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    tp2 = run_dist(__file__, "run", nproc=2, kwargs=dict(**common, tp=2, seed=999, steps=3, load=str(converted),
                                                          refuse=str(ckpt)))
    message = tp2[0]["refused"]
    assert "loads only with the same tp and pp" in message and "tp=2, pp=1" in message, message
    assert f"atpo convert --optim-sharding fully_reshardable {ckpt / 'step_000002'}" in message
    assert "--nproc-per-node 2" in message
    assert (tp2[0]["step"], tp2[0]["extra"]) == (2, {"data_position": 16})
    assert tp2[0]["rng_restored"] is False  # another TP: positions do not map
    assert tp2[0]["losses"]["3"] == pytest.approx(ref[0]["losses"]["3"], rel=1e-5)
