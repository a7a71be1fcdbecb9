"""actor/fp8.py on CPU: scales, casts, the emulated FP8 GEMMs, the linear function's forward and
backward against fp32, the weight cache's lifetime, no host syncs, the Triton kernel's indexing
(Triton's CPU interpreter) and the megatron layers at TP=1 and TP=2 (gloo)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from atpo_megatron.actor import fp8

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
REPO = Path(__file__).resolve().parents[2]


def test_recipe_dtypes_and_validation():
    assert (fp8.Fp8Recipe().fwd_dtype, fp8.Fp8Recipe().grad_dtype) == (E4M3, E5M2)
    assert fp8.Fp8Recipe(format="e4m3").grad_dtype == E4M3
    assert fp8.Fp8Recipe(scaling="rowwise").rowwise
    with pytest.raises(ValueError, match="choose tensorwise or rowwise"):
        fp8.Fp8Recipe(scaling="blockwise")
    cfg = SimpleNamespace(fp8="e4m3", fp8_scaling="rowwise")
    assert fp8.Fp8Recipe.from_model_config(cfg) == fp8.Fp8Recipe(format="e4m3", scaling="rowwise")


def test_scales_are_powers_of_two_below_fmax_over_amax():
    t = torch.tensor([[1.0, -2.0], [0.5, 4.0]])
    s, same = fp8.scales(t, E4M3, rowwise=False)
    assert s.item() == 64.0 and same is s  # 448 / 4 = 112 -> 64
    rows, cols = fp8.scales(t, E4M3, rowwise=True)
    assert rows.flatten().tolist() == [128.0, 64.0]  # 448/2 = 224, 448/4 = 112
    assert cols.flatten().tolist() == [256.0, 64.0]  # 448/1, 448/4
    assert fp8.scales(t, E5M2, rowwise=False)[0].item() == 8192.0  # 57344 / 4 = 14336
    zero, _ = fp8.scales(torch.zeros(2, 2), E4M3, rowwise=False)
    assert torch.isfinite(zero) and zero > 0  # an all-zero tensor still has a usable scale


@pytest.mark.parametrize("rowwise", [False, True])
def test_cast_transpose_round_trip_and_layout(rowwise):
    t = torch.randn(40, 96, generator=torch.Generator().manual_seed(0))
    a, at = fp8.cast_transpose(t, E4M3, rowwise)
    assert a.data.dtype == E4M3 and a.data.shape == (40, 96) and a.data.is_contiguous()
    assert at.data.shape == (96, 40) and at.data.is_contiguous()
    assert a.scale_inv.shape == ((40, 1) if rowwise else ())
    assert at.scale_inv.shape == ((96, 1) if rowwise else ())
    back, back_t = a.data.float() * a.scale_inv, at.data.float() * at.scale_inv
    normal = t.abs() > 1e-2  # away from e4m3's subnormals: relative error <= half an ulp = 2^-4
    assert ((back - t).abs() <= t.abs() / 16 + 1e-6)[normal].all()
    assert ((back_t.t() - t).abs() <= t.abs() / 16 + 1e-6)[normal].all()
    assert (a.data.float().abs().amax() <= 448) and (a.data.float().abs().amax() > 224)  # top binade used


def test_rowwise_keeps_rows_that_tensorwise_pushes_into_subnormals():
    t = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    t[0] *= 1e5  # one outlier row sets the tensor-wise scale
    err = {}
    for rowwise in (False, True):
        a, _ = fp8.cast_transpose(t, E4M3, rowwise, transpose=False)
        err[rowwise] = fp8.relative_error(a.data.float()[1:] * (a.scale_inv[1:] if rowwise else a.scale_inv), t[1:])
    assert err[True] < 0.04 < 0.3 < err[False]


@pytest.mark.parametrize("rowwise", [False, True])
def test_emulated_gemm_matches_torch_scaled_mm(rowwise):
    g = torch.Generator().manual_seed(2)
    a, _ = fp8.cast_transpose(torch.randn(32, 64, generator=g), E4M3, rowwise, transpose=False)
    b, _ = fp8.cast_transpose(torch.randn(48, 64, generator=g), E5M2, rowwise, transpose=False)
    out = torch.bfloat16 if rowwise else torch.float32
    ref = torch._scaled_mm(a.data, b.data.t(), scale_a=a.scale_inv, scale_b=b.scale_inv.t(), out_dtype=out)
    emu = fp8.scaled_mm(a, b, torch.float32)
    assert emu.shape == (32, 48)
    torch.testing.assert_close(emu.to(out), ref, rtol=0 if not rowwise else 1e-2, atol=0 if not rowwise else 1e-2)


@pytest.mark.parametrize("fmt,scaling", [("hybrid", "tensorwise"), ("hybrid", "rowwise"), ("e4m3", "tensorwise")])
def test_linear_forward_backward_close_to_fp32(fmt, scaling):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 7, 64, generator=g, dtype=torch.float64)  # 21 tokens: padded to 32 inside
    w = torch.randn(48, 64, generator=g, dtype=torch.float64) / 8
    b = torch.randn(48, generator=g, dtype=torch.float64)
    dy = torch.randn(3, 7, 48, generator=g, dtype=torch.float64)
    ref = [t.clone().requires_grad_() for t in (x, w, b)]
    torch.nn.functional.linear(*ref).backward(dy)
    got = [t.float().requires_grad_() for t in (x, w, b)]
    y = fp8.fp8_linear(*got, recipe=fp8.Fp8Recipe(format=fmt, scaling=scaling))
    y.backward(dy.float())
    assert y.shape == (3, 7, 48) and y.dtype == torch.float32
    grad_tol = 0.08 if fmt == "hybrid" else 0.04  # e5m2 keeps 2 mantissa bits, e4m3 3
    assert fp8.relative_error(y, torch.nn.functional.linear(x, w, b)) < 0.03
    assert fp8.relative_error(got[0].grad, ref[0].grad) < grad_tol
    assert fp8.relative_error(got[1].grad, ref[1].grad) < grad_tol
    assert fp8.relative_error(got[2].grad, ref[2].grad) < 1e-6  # the bias gradient stays in high precision


def test_gradients_only_for_inputs_that_need_them():
    x, w = torch.randn(16, 32, requires_grad=True), torch.randn(16, 32)
    fp8.fp8_linear(x, w).sum().backward()
    assert x.grad is not None and w.grad is None
    x, w = torch.randn(16, 32), torch.randn(16, 32, requires_grad=True)
    fp8.fp8_linear(x, w).sum().backward()
    assert w.grad is not None and w.grad.shape == (16, 32)
    with torch.no_grad():
        assert fp8.fp8_linear(x, w).shape == (16, 16)


def test_weight_dims_must_be_multiples_of_16():
    with pytest.raises(ValueError, match="multiples of 16"):
        fp8.fp8_linear(torch.randn(4, 24), torch.randn(8, 24))


class TinyFp8Layer(fp8._Fp8Mixin, torch.nn.Module):
    """The mixin on a bare module (megatron's layers need process groups)."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(gradient_accumulation_fusion=False, defer_embedding_wgrad_compute=False)
        self.weight = torch.nn.Parameter(torch.randn(32, 16))
        self._init_fp8(fp8.Fp8Recipe())

    def forward(self, x):
        return self._forward_impl(x, self.weight, None, False, False, False)


def test_weight_cache_lives_one_optimizer_step():
    layer = TinyFp8Layer()
    x = torch.randn(16, 16)
    layer(x).sum().backward()
    assert layer.fp8_cache.pair is None  # not attached: quantised on every call, nothing kept
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    assert fp8.attach_optimizer(opt, [layer]) == 1
    layer(x).sum().backward()
    first = layer.fp8_cache.pair
    layer(x).sum().backward()
    assert layer.fp8_cache.pair is first  # second micro-batch: the same FP8 weight
    opt.step()
    assert layer.fp8_cache.pair is None  # invalidated by the step
    layer(x)
    fresh, _ = fp8.cast_transpose(layer.weight.detach(), E4M3, False)
    assert torch.equal(layer.fp8_cache.pair[0].data.float(), fresh.data.float())  # the updated weight
    before = layer.fp8_cache.pair
    with torch.no_grad():
        layer.weight.mul_(2)  # an in-place edit of the parameter itself is seen through _version
    layer(x)
    assert layer.fp8_cache.pair is not before
    with pytest.raises(ValueError, match="already attached"):
        fp8.attach_optimizer(opt, [layer])
    fp8.invalidate_weight_caches([layer])
    assert layer.fp8_cache.pair is None
    assert fp8.attach_optimizer(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1), [torch.nn.Linear(2, 2)]) == 0


class HostSyncSpy(TorchDispatchMode):
    """Records the ops that make the host wait for the device (``.item()``, ``bool()``, data-dependent shapes)."""

    SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "is_nonzero", "equal", "item"}

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.SYNCING:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("scaling", ["tensorwise", "rowwise"])
def test_forward_and_backward_have_no_host_sync(scaling):
    layer = TinyFp8Layer()
    layer.fp8_recipe = fp8.Fp8Recipe(scaling=scaling)
    fp8.attach_optimizer(torch.optim.SGD(layer.parameters(), lr=0.1), [layer])
    x = torch.randn(20, 16, requires_grad=True)
    with HostSyncSpy() as spy:
        layer(x).square().sum().backward()
        layer(x).sum().backward()  # the cached weight too
    assert spy.seen == []
    with HostSyncSpy() as spy:  # the spy itself works
        x.sum().item()
    assert spy.seen


@pytest.mark.slow
def test_triton_kernel_indexing_under_the_interpreter():
    """The CUDA kernel's tiles, masks, transposed stores and scales, run by Triton's CPU interpreter.
    Outputs are stored as fp32 there: the interpreter's own fp32->fp8 rounding is not the GPU's."""
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import torch
        from atpo_megatron.actor import fp8
        for rowwise in (False, True):
            for R, C in ((64, 64), (70, 130), (5, 200)):
                t = torch.randn(R, C)
                rs, cs = fp8.scales(t, torch.float8_e4m3fn, rowwise)
                q, qt = fp8._cast_transpose_triton(t, rs, cs, torch.float8_e4m3fn, rowwise, True, out_dtype=torch.float32)
                assert torch.equal(q, (t * rs).clamp(-448, 448)), (rowwise, R, C)
                assert torch.equal(qt, (t * cs).clamp(-448, 448).t()), (rowwise, R, C)
                q1, none = fp8._cast_transpose_triton(t, rs, cs, torch.float8_e4m3fn, rowwise, False, out_dtype=torch.float32)
                assert torch.equal(q1, q) and none is None
        print("ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


# ------------------------------------------------------------------------------ megatron layers (gloo)

def megatron_worker(tp: int) -> dict:
    """On each rank: the same tiny Llama built in fp32 and with FP8 torch-backend layers (same
    weights); loss, the layer norms' gradients (they cross the TP dgrad all-reduce) and the HF names; then the
    sequence-parallel path of the function (all-gather in, reduce-scatter out) against no SP."""
    import warnings

    warnings.filterwarnings("ignore")
    import torch.distributed as dist
    from transformers import LlamaConfig

    from atpo_megatron.actor.model import build_model, unwrap
    from atpo_megatron.actor.parallel import destroy_distributed, init_distributed
    from atpo_megatron.config import ModelConfig, ParallelConfig
    from atpo_megatron.weights.hf_bridge import export_hf_weights

    hf = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    init_distributed(tp, 1, seed=0)
    out = {}
    runs = {}
    for label, cfg in (("ref", ModelConfig(dtype="float32", spec="local")),
                       ("fp8", ModelConfig(dtype="float32", spec="local", fp8="hybrid", fp8_backend="torch"))):
        torch.manual_seed(0)
        model = build_model(hf, cfg, ParallelConfig(tp=tp))[0]
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, 256, (2, 32), generator=g)
        loss = model(ids, torch.arange(32)[None].expand(2, -1), None, labels=torch.randint(0, 256, (2, 32), generator=g)).mean()
        loss.backward()
        norms = unwrap(model).decoder.layers[0]  # their gradients flow only through the qkv / fc1 dgrad
        norm_grads = torch.cat([norms.input_layernorm.weight.grad, norms.pre_mlp_layernorm.weight.grad])
        runs[label] = (loss.item(), norm_grads,
                       [n for n, _ in export_hf_weights([model])],
                       sorted({type(m).__name__ for m in model.modules() if "ParallelLinear" in type(m).__name__}))
    out["loss"] = [runs["ref"][0], runs["fp8"][0]]
    out["norm_grad_error"] = fp8.relative_error(runs["fp8"][1], runs["ref"][1])
    out["same_hf_names"] = runs["ref"][2] == runs["fp8"][2]
    out["fp8_layer_types"] = runs["fp8"][3]
    if tp > 1:  # sequence parallel through the function itself
        from megatron.core import parallel_state

        group, rank = parallel_state.get_tensor_model_parallel_group(), dist.get_rank()
        g = torch.Generator().manual_seed(5)
        x_full, w = torch.randn(8, 2, 64, generator=g), torch.randn(tp * 32, 64, generator=g) / 8
        dy_full = torch.randn(8, 2, 32, generator=g)
        w_mine = w[rank * 32:(rank + 1) * 32]
        x_local = x_full.chunk(tp)[rank].clone().requires_grad_()
        y = fp8.fp8_linear(x_local, w_mine, sequence_parallel=True, tp_group=group)
        y.backward(dy_full)
        x_ref = x_full.clone().requires_grad_()
        y_ref = fp8.fp8_linear(x_ref, w_mine)
        y_ref.backward(dy_full)
        dx = x_ref.grad.clone()
        dist.all_reduce(dx, group=group)
        out["sp_forward_equal"] = torch.equal(y, y_ref)
        out["sp_dgrad_error"] = fp8.relative_error(x_local.grad, dx.chunk(tp)[rank])
    destroy_distributed()
    return out


@pytest.mark.slow
@pytest.mark.dist
def test_megatron_layers_tp1_and_tp2_match_fp32():
    sys.path.insert(0, str(REPO / "tests" / "dist"))
    from launch import run_dist

    for tp in (1, 2):
        for r in run_dist(__file__, "megatron_worker", nproc=tp, kwargs={"tp": tp}, timeout=240):
            ref, low = r["loss"]
            assert abs(low - ref) / ref < 2e-3, r
            assert r["norm_grad_error"] < 0.15, r  # without the TP dgrad all-reduce: ~0.7
            assert r["same_hf_names"], r
            assert r["fp8_layer_types"] == ["ColumnParallelLinear", "Fp8ColumnParallelLinear", "Fp8RowParallelLinear"], r
            if tp > 1:
                assert r["sp_forward_equal"], r
                assert r["sp_dgrad_error"] < 1e-5, r
