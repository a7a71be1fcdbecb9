"""SPMD colocated rollouts with the real vLLM under torchrun on gloo: every rank builds its engine
in-process (``external_launcher``), the actor's weights reach it through ``export_hf_weights`` with
no copy, and each rollout group samples its share of the prompts.

* rollout TP1 x DP2 (actor TP2): the two engines' trees are those one engine makes for the same
  prompts and seeds (rank 0 re-runs rank 1's share on its own engine);
* rollout TP2 (actor TP1 x DP2): one tensor-parallel engine over both ranks; both ranks hold the same
  trees, and its search results come from the group leader (GroupSearch).
Both: the engine's log-probs equal the Megatron actor's recomputation (fp32), and the placement's
pipeline coordinates are Megatron's.
"""

from __future__ import annotations

import pytest
from launch import run_dist

pytestmark = [pytest.mark.dist, pytest.mark.integration, pytest.mark.slow]


def spmd_worker(model_dir: str, task_dir: str, rollout_tp: int, actor_tp: int):
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from transformers import AutoConfig

    from atpo_megatron.actor.model import build_model
    from atpo_megatron.actor.parallel import destroy_distributed, init_distributed
    from atpo_megatron.actor.train_step import compute_logprobs
    from atpo_megatron.config import load_config
    from atpo_megatron.env.retriever import RetrieverServer
    from atpo_megatron.env.search_tool import SearchClient
    from atpo_megatron.rollout.factory import make_engine
    from atpo_megatron.env.data import embedded_task, load_examples
    from atpo_megatron.experience import make_experience
    from atpo_megatron.rollout.tree_rollout import TreeRollout
    from atpo_megatron.rollout_groups import GroupSearch, RolloutRank, gather_rollouts
    from atpo_megatron.weights.hf_bridge import export_hf_weights, load_hf_weights
    from atpo_megatron.weights.sync import sync_weights

    cfg = load_config(None, [
        f"model.name_or_path={model_dir}", f"parallel.tp={actor_tp}", f"rollout.tp_size={rollout_tp}",
        "rollout.engine=vllm", f"rollout.kv_cache_memory_bytes={256 << 20}", "rollout.max_prompt_tokens=1024",
        "rollout.max_response_tokens=40", "rollout.max_turn_tokens=20", "rollout.max_turns=3",
        "rollout.tool_call_limit=2", "rollout.assistant_prefix=<search>", "tree.initial_chains=2",
        "tree.expansion_iterations=1", "tree.top_k=1", "tree.leaves_per_tree=3", "train.batch_prompts=2",
        "train.mini_batch_prompts=1", f"data.embedded_dir={task_dir}"])
    init_distributed(cfg.parallel.tp, cfg.parallel.pp, seed=cfg.train.seed)
    ranks = RolloutRank.from_job(cfg)
    rank = dist.get_rank()
    coords = ranks.placement.actor_coords(rank)
    megatron_coords = (ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank(),
                       ps.get_pipeline_model_parallel_rank())

    server = None
    if rank == 0:
        server = RetrieverServer(str(embedded_task(cfg).corpus), topk=3)
        server.start()
    box = [server.url if server else None]
    dist.broadcast_object_list(box, src=0)
    search = SearchClient(box[0])
    if ranks.process_group is not None:
        search = GroupSearch(search, ranks)

    engine = make_engine(cfg.rollout, model_dir, dtype=torch.float32, device_index=ranks.device_index,
                         in_job=True)
    models = build_model(AutoConfig.from_pretrained(model_dir), cfg.model, cfg.parallel)
    load_hf_weights(models, model_dir)
    stats = sync_weights(export_hf_weights(models), engine, verify=True)

    prompts = load_examples(cfg, ["embedded"], "train")[:cfg.train.batch_prompts]
    rollout = TreeRollout.from_config(engine, search, cfg)
    seed = 1000 + ranks.group
    mine = ranks.my_prompts(prompts)
    local = make_experience(rollout, mine, cfg.credit, seed=seed)
    trees = [[n.tokens for n in t.nodes] for t in local.trees]
    rerun = None
    if rank == 0 and ranks.placement.num_groups == 2:  # rank 1's share, on rank 0's engine
        other = make_experience(rollout, prompts[ranks.placement.prompt_slice(1, len(prompts))], cfg.credit, seed=1001)
        rerun = [[n.tokens for n in t.nodes] for t in other.trees]
    searched = [r.text for r in search.search_batch([prompts[0].question, "who founded it"])]
    sequences, gathered_stats = gather_rollouts(local, ranks, len(mine))
    actor = compute_logprobs(models, sequences, vocab_size=AutoConfig.from_pretrained(model_dir).vocab_size)
    diffs = [(a - torch.tensor(s.old_logprobs))[torch.tensor(s.loss_mask, dtype=torch.bool)].abs().max().item()
             for a, s in zip(actor, sequences) if any(s.loss_mask)]
    result = {"coords": list(coords), "megatron": list(megatron_coords), "trees": trees, "rerun": rerun,
              "sequences": len(sequences), "leaves": gathered_stats["rollout/leaves"],
              "searched": searched, "max_diff": max(diffs),
              "transport": engine.transport, "verified": stats.verified, "group": ranks.group}
    dist.barrier()
    search.close()
    if server:
        server.stop()
    engine.close()  # in-process vLLM: destroys the default process group with its own
    destroy_distributed()
    return result


def _check_common(results, leaves):
    for r in results:
        assert r["coords"] == r["megatron"]  # the placement's tp-dp-pp order is Megatron's
        assert r["transport"] == "in_process" and r["verified"]
        assert r["sequences"] == leaves and r["leaves"] == leaves  # gathered on every rank, counts summed
        assert r["max_diff"] <= 1e-4, r["max_diff"]  # engine log-probs == the actor's (fp32)


def _run(tmp_path, model_dir, rollout_tp: int, actor_tp: int) -> list[dict]:
    results = run_dist(__file__, "spmd_worker", nproc=2, timeout=600,
                       kwargs={"model_dir": str(model_dir), "task_dir": str(tmp_path / "task"),
                               "rollout_tp": rollout_tp, "actor_tp": actor_tp})
    _check_common(results, leaves=6)
    return results


def test_rollout_tp1_dp2_trees_equal_one_engines(tmp_path, tiny_vllm_llama_dir):
    r0, r1 = _run(tmp_path, tiny_vllm_llama_dir, rollout_tp=1, actor_tp=2)
    assert (r0["group"], r1["group"]) == (0, 1)
    assert r0["rerun"] == r1["trees"]  # rank 1's engine made what one engine makes for those prompts
    assert r0["trees"] != r1["trees"]


def test_rollout_tp2_one_engine_over_both_ranks(tmp_path, tiny_vllm_llama_dir):
    r0, r1 = _run(tmp_path, tiny_vllm_llama_dir, rollout_tp=2, actor_tp=1)
    assert r0["group"] == r1["group"] == 0 and r0["trees"] == r1["trees"]
    assert r0["searched"] == r1["searched"] and all("Page 1:" in text for text in r0["searched"])
