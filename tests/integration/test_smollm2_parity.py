"""The real SmolLM2-135M-Instruct in Megatron (TP=1, PP=2, TP=3) vs transformers' LlamaForCausalLM.

Runs the rank workers of ``tests/dist/test_actor_model.py`` on the bundled model's weights. SmolLM2
has 9 query and 3 KV heads, so TP=2 is impossible; TP=3 is the tensor-parallel layout tested.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dist"))  # the shared torchrun launcher
from launch import run_dist  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.dist]
WORKERS = Path(__file__).resolve().parents[1] / "dist" / "test_actor_model.py"


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """The model folder and a reference file: a chat prompt's tokens, fp32 logits, RoPE frequencies."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from atpo_megatron.model_files import resolve_model

    hf_dir = resolve_model("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    messages = [{"role": "user", "content": "Which river flows through Paris? Answer in one word."}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    tokens = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(tokens).logits
    ref = tmp_path_factory.mktemp("smollm2") / "ref.pt"
    torch.save({"tokens": tokens, "logits": logits, "inv_freq": model.model.rotary_emb.inv_freq}, ref)
    return str(hf_dir), str(ref)


@pytest.mark.parametrize("nproc, layouts", [(2, [(1, 1, 1), (1, 2, 1)]), (3, [(3, 1, 1)])],
                         ids=["tp1+pp2", "tp3"])
def test_smollm2_logits_match_transformers(smollm2, nproc, layouts):
    hf_dir, ref = smollm2
    results = run_dist(WORKERS, "layouts_worker", nproc=nproc, timeout=300,
                       kwargs={"cases": {"smollm2": hf_dir}, "refs": {"smollm2": ref},
                               "layouts": [[*layout, []] for layout in layouts]})
    print(json.dumps(results, indent=1))
    for key in results[0]:
        last_stage = [rank[key] for rank in results if rank[key]["max_diff"] is not None]
        assert last_stage, key
        for r in last_stage:
            assert r["max_diff"] <= 1e-4 and r["padded_columns"] == 0, (key, r)  # 49152 = 384 * 128
        assert all(rank[key]["inv_freq_diff"] == 0.0 for rank in results)
