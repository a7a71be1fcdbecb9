"""actor.parallel + actor.cpu_compat on gloo: groups, layout errors, seeds, the CPU RNG tracker."""

import os
import subprocess
import sys

import pytest
from launch import REPO_ROOT, run_dist

pytestmark = [pytest.mark.dist]


def layout_worker():
    """World 4: a bad layout is refused, then TP=2 x PP=2 with seeded generators."""
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from atpo_megatron.actor.parallel import destroy_distributed, init_distributed
    from atpo_megatron.config import ConfigError

    try:
        init_distributed(tp=3, pp=1)
        refused = ""
    except ConfigError as exc:
        refused = str(exc)
    dp = init_distributed(tp=2, pp=2, seed=7)
    default_draw = torch.rand(1).item()
    with tensor_parallel.get_cuda_rng_tracker().fork():  # model-parallel stream: differs per TP rank
        tracker_draw = torch.rand(1).item()
    after_fork = torch.rand(1).item()
    result = {"refused": refused, "dp": dp, "tp_rank": ps.get_tensor_model_parallel_rank(),
              "pp_rank": ps.get_pipeline_model_parallel_rank(), "default": default_draw,
              "tracker": tracker_draw, "after_fork": after_fork}
    destroy_distributed()
    return result


def test_layout_groups_and_seeds():
    results = run_dist(__file__, "layout_worker", nproc=4)
    assert all("does not divide the world size 4" in r["refused"] for r in results)
    assert [r["dp"] for r in results] == [1, 1, 1, 1]
    assert [(r["pp_rank"], r["tp_rank"]) for r in results] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    by_stage = {p: [r for r in results if r["pp_rank"] == p] for p in (0, 1)}
    for stage in by_stage.values():
        # default generator: the same on both TP ranks (identical CPU-initialised weights) ...
        assert stage[0]["default"] == stage[1]["default"]
        assert stage[0]["after_fork"] == stage[1]["after_fork"]
        # ... the tracker's model-parallel stream: different per TP rank
        assert stage[0]["tracker"] != stage[1]["tracker"]
    assert by_stage[0][0]["default"] != by_stage[1][0]["default"]  # seed + 100 * pp_rank


def test_world_size_one_without_torchrun():
    code = (
        "import torch, torch.distributed as dist\n"
        "from atpo_megatron.actor.parallel import init_distributed, destroy_distributed, set_seed\n"
        "assert init_distributed(seed=3) == 1 and dist.get_world_size() == 1\n"
        "a = torch.rand(2); set_seed(3); assert torch.equal(a, torch.rand(2))\n"
        "destroy_distributed(); destroy_distributed(); print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=120, env={**env, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
