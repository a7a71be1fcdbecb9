"""`atpo convert`: HF -> a TP=2 Megatron checkpoint -> HF round-trips bit-exactly, and transformers
loads the export with the same logits."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from atpo_cli import load_safetensors, run_atpo


@pytest.mark.integration
@pytest.mark.dist
@pytest.mark.slow
def test_from_hf_at_tp2_then_to_hf_round_trips(tmp_path, tiny_llama_dir):
    ckpt, out = tmp_path / "ckpt", tmp_path / "hf"
    run_atpo(["convert", "--from-hf", tiny_llama_dir, ckpt, "parallel.tp=2", "--nproc-per-node", "2"], tmp_path)
    assert (ckpt / "latest").read_text().strip() == "0"
    run_atpo(["convert", "--to-hf", ckpt, out], tmp_path)  # one process: resharded on load

    original = load_file(tiny_llama_dir / "model.safetensors")
    exported = load_safetensors(out)
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
    proc = run_atpo(["convert", "--to-hf", tmp_path, tmp_path / "out"], tmp_path, timeout=120, check=False)
    assert proc.returncode == 2
    assert f"{tmp_path} holds no complete checkpoint" in proc.stderr
