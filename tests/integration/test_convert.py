"""`atpo convert`: HF -> a TP=2 Megatron checkpoint -> HF round-trips bit-exactly, and transformers
loads the export with the same logits."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file


def _atpo(*args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "atpo_megatron.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
    return proc


@pytest.mark.integration
@pytest.mark.dist
@pytest.mark.slow
def test_from_hf_at_tp2_then_to_hf_round_trips(tmp_path, tiny_llama_dir):
    ckpt, out = tmp_path / "ckpt", tmp_path / "hf"
    _atpo("convert", "--from-hf", str(tiny_llama_dir), str(ckpt), "parallel.tp=2", "--nproc-per-node", "2",
          cwd=tmp_path)
    assert (ckpt / "latest").read_text().strip() == "0"
    _atpo("convert", "--to-hf", str(ckpt), str(out), cwd=tmp_path)  # one process: resharded on load

    original = load_file(tiny_llama_dir / "model.safetensors")
    exported = {}
    for f in out.glob("*.safetensors"):
        exported.update(load_file(f))
    assert set(exported) == set(original)
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor), name

    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 42, 7, 900, 31, 5]])
    a = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()(ids).logits
    b = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
    assert torch.equal(a, b)


@pytest.mark.integration
def test_to_hf_without_checkpoint_names_the_folder(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "atpo_megatron.cli", "convert", "--to-hf", str(tmp_path),
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"{tmp_path} holds no complete checkpoint" in proc.stderr
