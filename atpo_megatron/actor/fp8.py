"""FP8 linear layers for megatron's local spec without Transformer Engine (``model.fp8_backend=torch``).

    model: {spec: local, dtype: bfloat16, fp8: hybrid, fp8_backend: torch, fp8_scaling: tensorwise}
    models = build_model(hf_config, cfg.model, cfg.parallel)   # linear_qkv/proj/fc1/fc2 swapped
    optimizer, _ = build_optimizer(models, cfg.optimizer, ...)
    fp8.attach_optimizer(optimizer, models)                     # FP8 weights cached per step

Why not torchao. torchao 0.18's float8 training (``Float8Linear``, ``matmul_with_hp_or_float8_args``)
is an ``nn.Linear`` swap, and megatron's ``ColumnParallelLinear``/``RowParallelLinear`` are not
``nn.Linear``s: their forward runs a custom autograd function that owns the TP collectives
(sequence-parallel all-gather, dgrad all-reduce / reduce-scatter). torchao's function also
re-quantises the weight on every call (it caches nothing across micro-batches) and gets its fused
casts only from ``torch.compile``; measured on the H200 that path reaches 0.99x of bf16 at the 8B
MLP shape (``../shared/notes/environment.md``). So this module is a small autograd function over
``torch._scaled_mm``, put into the layer spec by subclassing megatron's two layers and overriding
their ``_forward_impl`` (the one method that does the matmul); everything else — TP gathers,
bias handling, checkpoints, parameter names — stays megatron's.

Recipe (the names of Transformer Engine's current scaling):

* ``model.fp8``: ``hybrid`` = e4m3 for activations and weights, e5m2 for gradients; ``e4m3`` =
  e4m3 everywhere.
* ``model.fp8_scaling``: ``tensorwise`` = one scale per tensor; ``rowwise`` = one scale per row of
  each GEMM operand (per token for activations, per output/input channel for weights).
* Scales are computed on the device from the current amax (``fmax / amax``, rounded down to a
  power of two so scaling is exact): no host sync, no amax history.

Every GEMM is written as ``A @ B.T`` with both operands row-major [rows, contraction], which is
the layout ``torch._scaled_mm`` wants (A row-major, B column-major):

    forward  y  = x  @ W.T      A = x  [M, K]   B = W   [N, K]
    dgrad    dx = dy @ W        A = dy [M, N]   B = W.T [K, N]
    wgrad    dW = dy.T @ x      A = dy.T [N, M] B = x.T [K, M]

The gradient is always operand A: torch's row-wise FP8 GEMM takes e5m2 only there (B must be
e4m3), so ``hybrid`` works with both scalings. Each quantised tensor is needed both as itself and
as its transpose (each with its own row-wise scales). ``cast_transpose`` writes both in one pass over the input (a Triton kernel on
CUDA; plain torch elsewhere): the forward keeps ``x.T`` in FP8 for the wgrad GEMM instead of the
bf16 input, and the backward casts ``dy`` once for both of its GEMMs. The weight's pair is cached
on the layer and recomputed once per optimizer step (``attach_optimizer``); until a layer is
attached it re-quantises its weight on every call, which is always correct.

On CPU the GEMMs are emulated (de-quantise, fp32 matmul), so tests check the numerics of exactly
this quantisation without a GPU; CPU ``torch._scaled_mm`` agrees with the emulation.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Iterable, Literal, NamedTuple

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

log = logging.getLogger(__name__)

ALIGN = 16
"""``torch._scaled_mm`` needs every GEMM dimension to be a multiple of 16; token counts are
zero-padded up to it (exact), weight dimensions must already be multiples."""
_EPS = 1e-12  # amax floor: an all-zero tensor gets a finite scale (torchao uses the same)


@dataclasses.dataclass(frozen=True)
class Fp8Recipe:
    format: Literal["hybrid", "e4m3"] = "hybrid"
    """hybrid: e4m3 forward (activations, weights), e5m2 gradients; e4m3: e4m3 for all three."""
    scaling: Literal["tensorwise", "rowwise"] = "tensorwise"
    cache_weights: bool = True
    """Keep the weight's FP8 copy and transpose between calls, once ``attach_optimizer`` arms it."""
    kernel: Literal["auto", "triton", "torch"] = "auto"
    """cast+transpose implementation: auto = the Triton kernel for CUDA tensors, torch otherwise."""

    def __post_init__(self):
        if self.format not in ("hybrid", "e4m3"):
            raise ValueError(f"FP8 format {self.format!r}: choose hybrid or e4m3 (model.fp8)")
        if self.scaling not in ("tensorwise", "rowwise"):
            raise ValueError(f"FP8 scaling {self.scaling!r}: choose tensorwise or rowwise (model.fp8_scaling)")
        if self.kernel not in ("auto", "triton", "torch"):
            raise ValueError(f"FP8 kernel {self.kernel!r}: choose auto, triton or torch")

    @property
    def fwd_dtype(self) -> torch.dtype:
        return torch.float8_e4m3fn

    @property
    def grad_dtype(self) -> torch.dtype:
        return torch.float8_e5m2 if self.format == "hybrid" else torch.float8_e4m3fn

    @property
    def rowwise(self) -> bool:
        return self.scaling == "rowwise"

    @classmethod
    def from_model_config(cls, model_cfg) -> "Fp8Recipe":
        return cls(format=model_cfg.fp8, scaling=model_cfg.fp8_scaling)


class Fp8Operand(NamedTuple):
    """A GEMM operand: ``data`` FP8 [rows, cols] row-major; ``data * scale_inv`` ~ the original.
    ``scale_inv`` is a 0-dim tensor (tensorwise) or [rows, 1] (rowwise), fp32, on the device."""

    data: torch.Tensor
    scale_inv: torch.Tensor


# ----------------------------------------------------------------------------------------------
# quantisation


def _scale(amax: torch.Tensor, fmax: float) -> torch.Tensor:
    """Quantisation multiplier ``fmax / amax``, rounded down to a power of two (exact scaling)."""
    return torch.exp2(torch.floor(torch.log2(fmax / amax.float().clamp(min=_EPS))))


def scales(t: torch.Tensor, dtype: torch.dtype, rowwise: bool, transpose: bool = True):
    """Multipliers for ``t`` [R, C]: (rows [R, 1] | [], columns [1, C] | [] or None)."""
    fmax = torch.finfo(dtype).max
    if not rowwise:
        s = _scale(torch.linalg.vector_norm(t, float("inf")), fmax)
        return s, (s if transpose else None)
    rows = _scale(torch.linalg.vector_norm(t, float("inf"), dim=1, keepdim=True), fmax)
    cols = _scale(torch.linalg.vector_norm(t, float("inf"), dim=0, keepdim=True), fmax) if transpose else None
    return rows, cols


def _cast_torch(t: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    fmax = torch.finfo(dtype).max
    return (t.float() * scale).clamp_(-fmax, fmax).to(dtype)


def cast_transpose(t: torch.Tensor, dtype: torch.dtype, rowwise: bool, transpose: bool = True,
                   kernel: str = "auto") -> tuple[Fp8Operand, Fp8Operand | None]:
    """Quantise ``t`` [R, C] to ``dtype``: (t as an operand, t.T [C, R] contiguous as an operand or None).

    The two share one scale (tensorwise) or have their own per-row scales (rowwise: per row of t,
    per column of t). One read of ``t`` for the amax, one for both casts (Triton on CUDA).
    """
    if t.dim() != 2:
        raise ValueError(f"cast_transpose takes a 2-D tensor, got shape {tuple(t.shape)}")
    t = t.contiguous()
    row_s, col_s = scales(t, dtype, rowwise, transpose)
    if _use_triton(t, kernel):
        q, qt = _cast_transpose_triton(t, row_s, col_s, dtype, rowwise, transpose)
    else:
        q = _cast_torch(t, row_s, dtype)
        qt = _cast_torch(t, col_s, dtype).t().contiguous() if transpose else None
    rows = Fp8Operand(q, row_s.reciprocal())
    if not transpose:
        return rows, None
    return rows, Fp8Operand(qt, col_s.reciprocal().t())  # [1, C] -> [C, 1]: per row of t.T


def scaled_mm(a: Fp8Operand, b: Fp8Operand, out_dtype: torch.dtype, fast_accum: bool = False) -> torch.Tensor:
    """``(a.data * a.scale_inv) @ (b.data * b.scale_inv).T`` -> [rows(a), rows(b)] in ``out_dtype``.

    CUDA: ``torch._scaled_mm`` (rowwise scaling needs bf16 output; other dtypes are cast after).
    Elsewhere: the same product de-quantised in fp32 (the reference the tests compare against).
    """
    if a.data.shape[1] != b.data.shape[1]:
        raise ValueError(f"FP8 GEMM contraction mismatch: A {tuple(a.data.shape)} vs B {tuple(b.data.shape)}")
    if a.data.is_cuda:
        rowwise = a.scale_inv.dim() > 0
        mm_dtype = torch.bfloat16 if rowwise else out_dtype
        out = torch._scaled_mm(a.data, b.data.t(), scale_a=a.scale_inv, scale_b=b.scale_inv.t(),
                               out_dtype=mm_dtype, use_fast_accum=fast_accum)
        return out if mm_dtype == out_dtype else out.to(out_dtype)
    return ((a.data.float() * a.scale_inv) @ (b.data.float() * b.scale_inv).t()).to(out_dtype)


def _pad_rows(t: torch.Tensor) -> torch.Tensor:
    pad = -t.shape[0] % ALIGN
    return F.pad(t, (0, 0, 0, pad)) if pad else t


# ----------------------------------------------------------------------------------------------
# the Triton cast+transpose kernel (CUDA, or TRITON_INTERPRET=1 on CPU in the tests)

_TRITON_BROKEN: list[str] = []  # set once if the kernel fails to build here; torch takes over


def _use_triton(t: torch.Tensor, kernel: str) -> bool:
    if kernel == "torch" or (kernel == "auto" and (not t.is_cuda or _TRITON_BROKEN)):
        return False
    return _triton_kernel() is not None


@functools.cache
def _triton_kernel():
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def cast_transpose_kernel(x_ptr, rs_ptr, cs_ptr, q_ptr, qt_ptr, R, C,
                              FMAX: tl.constexpr, ROWWISE: tl.constexpr, TRANSPOSE: tl.constexpr,
                              BR: tl.constexpr, BC: tl.constexpr):
        # one [BR, BC] tile of x: q[r, c] = x[r, c] * rs, qt[c, r] = x[r, c] * cs
        r = tl.program_id(0) * BR + tl.arange(0, BR)
        c = tl.program_id(1) * BC + tl.arange(0, BC)
        mask = (r[:, None] < R) & (c[None, :] < C)
        x = tl.load(x_ptr + r[:, None] * C + c[None, :], mask=mask, other=0.0).to(tl.float32)
        if ROWWISE:
            rs = tl.load(rs_ptr + r, mask=r < R, other=1.0)[:, None]
        else:
            rs = tl.load(rs_ptr)
        q = tl.minimum(tl.maximum(x * rs, -FMAX), FMAX).to(q_ptr.dtype.element_ty)
        tl.store(q_ptr + r[:, None] * C + c[None, :], q, mask=mask)
        if TRANSPOSE:
            if ROWWISE:
                cs = tl.load(cs_ptr + c, mask=c < C, other=1.0)[None, :]
            else:
                cs = rs
            qt = tl.minimum(tl.maximum(x * cs, -FMAX), FMAX).to(qt_ptr.dtype.element_ty)
            tl.store(qt_ptr + c[:, None] * R + r[None, :], tl.trans(qt), mask=tl.trans(mask))

    return triton, cast_transpose_kernel


def _cast_transpose_triton(t, row_s, col_s, dtype, rowwise, transpose, out_dtype=None):
    """Launch the kernel; ``out_dtype`` overrides the FP8 output dtype (the CPU interpreter test
    stores fp32 to check indexing and scaling apart from the interpreter's own FP8 rounding)."""
    triton, kernel = _triton_kernel()
    R, C = t.shape
    store = out_dtype or dtype
    q = torch.empty((R, C), dtype=store, device=t.device)
    qt = torch.empty((C, R), dtype=store, device=t.device) if transpose else q
    BR = BC = 64
    try:
        kernel[(triton.cdiv(R, BR), triton.cdiv(C, BC))](
            t, row_s.contiguous(), (col_s if transpose else row_s).contiguous(), q, qt, R, C,
            FMAX=torch.finfo(dtype).max, ROWWISE=rowwise, TRANSPOSE=transpose, BR=BR, BC=BC, num_warps=4)
    except Exception as exc:  # a Triton/driver mismatch: say so once, fall back to torch for good
        if not t.is_cuda:
            raise
        _TRITON_BROKEN.append(f"{type(exc).__name__}: {exc}")
        log.warning("FP8 cast+transpose Triton kernel failed (%s); using the slower torch casts", exc)
        q = _cast_torch(t, row_s, dtype)
        qt = _cast_torch(t, col_s, dtype).t().contiguous() if transpose else None
        return q, qt
    return q, (qt if transpose else None)


# ----------------------------------------------------------------------------------------------
# the linear function


_NOT_ATTACHED_LOGGED: list[bool] = []  # say once per process that caching is off


class _WeightCache:
    """The weight's FP8 pair (W, W.T), valid for one weight version.

    The key is (generation, ``weight._version``, storage address): ``generation`` is bumped after each
    optimizer step by ``attach_optimizer`` (megatron's optimizers write the new weights through
    ``.data``/the DDP buffer, which ``_version`` does not see); ``_version`` catches in-place edits of
    the parameter itself; the address catches a moved or re-allocated parameter.
    """

    def __init__(self):
        self.armed = False
        self.generation = 0
        self.key = None
        self.pair: tuple[Fp8Operand, Fp8Operand] | None = None

    def get(self, weight: torch.Tensor, recipe: Fp8Recipe) -> tuple[Fp8Operand, Fp8Operand]:
        key = (self.generation, weight._version, weight.data_ptr(), weight.dtype)
        if self.pair is not None and self.key == key:
            return self.pair
        pair = cast_transpose(weight.detach(), recipe.fwd_dtype, recipe.rowwise, kernel=recipe.kernel)
        if self.armed and recipe.cache_weights:
            self.key, self.pair = key, pair
        elif recipe.cache_weights and weight.requires_grad and not _NOT_ATTACHED_LOGGED:
            _NOT_ATTACHED_LOGGED.append(True)
            log.info("FP8 layers are not attached to an optimizer: weights are re-quantised on every call; "
                     "call actor.fp8.attach_optimizer(optimizer, models) to quantise them once per step")
        return pair

    def invalidate(self) -> None:
        self.generation += 1
        self.key = self.pair = None  # frees the FP8 copies until the next forward


class _Fp8LinearFunction(torch.autograd.Function):
    """y = x @ W.T (+ b) with FP8 GEMMs and megatron's TP communication (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, bias, cache: _WeightCache, recipe: Fp8Recipe, allreduce_dgrad: bool,
                sequence_parallel: bool, tp_group):
        ctx.recipe, ctx.allreduce_dgrad, ctx.sequence_parallel, ctx.tp_group = recipe, allreduce_dgrad, sequence_parallel, tp_group
        if sequence_parallel:  # gather the sequence-sharded input over TP (dim 0)
            world = torch.distributed.get_world_size(tp_group)
            total = torch.empty((x.shape[0] * world, *x.shape[1:]), dtype=x.dtype, device=x.device)
            torch.distributed.all_gather_into_tensor(total, x.contiguous(), group=tp_group)
        else:
            total = x
        lead, K = total.shape[:-1], total.shape[-1]
        x2d = total.reshape(-1, K)
        M = x2d.shape[0]
        w_op, wt_op = cache.get(weight, recipe)
        need_wgrad = ctx.needs_input_grad[1]
        x_op, xt_op = cast_transpose(_pad_rows(x2d), recipe.fwd_dtype, recipe.rowwise, transpose=need_wgrad,
                                     kernel=recipe.kernel)
        y = scaled_mm(x_op, w_op, out_dtype=x.dtype, fast_accum=True)[:M]
        y = y.reshape(*lead, y.shape[-1])
        if bias is not None:
            y = y + bias
        # FP8 copies, not the bf16 tensors, are what the backward keeps: x.T for wgrad, W.T for dgrad
        ctx.xt_op, ctx.wt_op = xt_op, (wt_op if ctx.needs_input_grad[0] else None)
        ctx.M, ctx.x_shape, ctx.use_bias, ctx.w_dtype = M, x.shape, bias is not None, weight.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        recipe = ctx.recipe
        need_dgrad, need_wgrad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dy2d = dy.reshape(-1, dy.shape[-1])
        dy_op, dyt_op = cast_transpose(_pad_rows(dy2d), recipe.grad_dtype, recipe.rowwise, transpose=need_wgrad,
                                       kernel=recipe.kernel)
        dx = dw = db = None
        handle = None
        if need_dgrad:
            dx = scaled_mm(dy_op, ctx.wt_op, out_dtype=dy.dtype)[: ctx.M]
            dx = dx.reshape(*dy.shape[:-1], dx.shape[-1])
            if ctx.sequence_parallel:  # reduce-scatter back to this rank's sequence shard
                out = torch.empty(ctx.x_shape, dtype=dx.dtype, device=dx.device)
                handle = torch.distributed.reduce_scatter_tensor(out, dx.contiguous(), group=ctx.tp_group, async_op=True)
                dx = out
            elif ctx.allreduce_dgrad:
                handle = torch.distributed.all_reduce(dx, group=ctx.tp_group, async_op=True)
        if need_wgrad:  # overlaps the dgrad collective
            dw = scaled_mm(dyt_op, ctx.xt_op, out_dtype=ctx.w_dtype)
        if ctx.use_bias and ctx.needs_input_grad[2]:
            db = dy2d.sum(0)
        if handle is not None:
            handle.wait()
        ctx.xt_op = ctx.wt_op = None
        return dx, dw, db, None, None, None, None, None


def fp8_linear(x, weight, bias=None, recipe: Fp8Recipe = Fp8Recipe(), cache: _WeightCache | None = None,
               allreduce_dgrad: bool = False, sequence_parallel: bool = False, tp_group=None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with FP8 GEMMs (forward and backward). ``cache``: a layer's weight cache."""
    _check_dims(weight, "fp8_linear")
    return _Fp8LinearFunction.apply(x, weight, bias, cache or _WeightCache(), recipe, allreduce_dgrad,
                                    sequence_parallel, tp_group)


def _check_dims(weight: torch.Tensor, where: str) -> None:
    if weight.dim() != 2 or any(d % ALIGN for d in weight.shape):
        raise ValueError(f"{where}: FP8 GEMMs need weight dimensions that are multiples of {ALIGN}, got "
                         f"{tuple(weight.shape)} (per TP rank); set model.fp8=none or choose a TP size "
                         f"that keeps every linear layer's shard a multiple of {ALIGN}")


# ----------------------------------------------------------------------------------------------
# megatron layers


class _Fp8Mixin:
    """Replaces megatron's ``_forward_impl`` (the matmul + TP collectives) with the FP8 function."""

    def _init_fp8(self, recipe: Fp8Recipe) -> None:
        cfg = self.config
        if cfg.gradient_accumulation_fusion or cfg.defer_embedding_wgrad_compute:
            raise ValueError("model.fp8_backend=torch does not implement gradient_accumulation_fusion or "
                             "defer_embedding_wgrad_compute; turn them off")
        if self.weight is None:
            raise ValueError("model.fp8_backend=torch needs the layer to own its weight (skip_weight_param_allocation=False)")
        _check_dims(self.weight, type(self).__name__)
        self.fp8_recipe = recipe
        self.fp8_cache = _WeightCache()

    def _forward_impl(self, input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad, sequence_parallel,
                      grad_output_buffer=None, wgrad_deferral_limit=None, tp_group=None, gtp_remat_size=1):
        if grad_output_buffer is not None or gtp_remat_size > 1:
            raise NotImplementedError("FP8 torch backend: deferred wgrad and GTP weight sharding are not supported")
        if (allreduce_dgrad or sequence_parallel) and tp_group is None:
            from megatron.core import parallel_state

            tp_group = parallel_state.get_tensor_model_parallel_group()
        cache = self.fp8_cache if weight is self.weight else _WeightCache()
        return _Fp8LinearFunction.apply(input, weight, bias, cache, self.fp8_recipe, allreduce_dgrad,
                                        sequence_parallel, tp_group)


class Fp8ColumnParallelLinear(_Fp8Mixin, ColumnParallelLinear):
    """megatron's ``ColumnParallelLinear`` with FP8 GEMMs; same parameters, names and checkpoints."""

    def __init__(self, *args, fp8_recipe: Fp8Recipe = Fp8Recipe(), **kwargs):
        super().__init__(*args, **kwargs)
        self._init_fp8(fp8_recipe)


class Fp8RowParallelLinear(_Fp8Mixin, RowParallelLinear):
    """megatron's ``RowParallelLinear`` with FP8 GEMMs; same parameters, names and checkpoints."""

    def __init__(self, *args, fp8_recipe: Fp8Recipe = Fp8Recipe(), **kwargs):
        super().__init__(*args, **kwargs)
        self._init_fp8(fp8_recipe)


def fp8_layer_spec(spec, recipe: Fp8Recipe):
    """A local transformer-layer spec with linear_qkv/linear_proj/linear_fc1/linear_fc2 in FP8.

    The embedding and the output layer stay in high precision, as with Transformer Engine.
    """
    column = functools.partial(Fp8ColumnParallelLinear, fp8_recipe=recipe)
    row = functools.partial(Fp8RowParallelLinear, fp8_recipe=recipe)
    attn = spec.submodules.self_attention
    attn = dataclasses.replace(attn, submodules=dataclasses.replace(attn.submodules, linear_qkv=column, linear_proj=row))
    mlp = spec.submodules.mlp
    if isinstance(mlp, functools.partial):  # megatron 0.19: partial(MLP.as_mlp_submodule, submodules=...)
        subs = dataclasses.replace(mlp.keywords["submodules"], linear_fc1=column, linear_fc2=row)
        mlp = functools.partial(mlp.func, *mlp.args, **{**mlp.keywords, "submodules": subs})
    else:  # a ModuleSpec(MLP, submodules=MLPSubmodules(...))
        mlp = dataclasses.replace(mlp, submodules=dataclasses.replace(mlp.submodules, linear_fc1=column, linear_fc2=row))
    return dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, self_attention=attn, mlp=mlp))


# ----------------------------------------------------------------------------------------------
# weight-cache lifetime


def fp8_layers(models: Iterable[torch.nn.Module]) -> list[_Fp8Mixin]:
    return [m for model in models for m in model.modules() if isinstance(m, _Fp8Mixin)]


def invalidate_weight_caches(models: Iterable[torch.nn.Module]) -> None:
    """Drop every layer's cached FP8 weights (after a weight update, or to free memory)."""
    for layer in fp8_layers(models):
        layer.fp8_cache.invalidate()


def attach_optimizer(optimizer, models: list[torch.nn.Module]) -> int:
    """Cache FP8 weights between optimizer steps: arm every FP8 layer's cache and wrap
    ``optimizer.step`` to invalidate them after each step. Returns the number of FP8 layers (0:
    nothing to do, the optimizer is left alone). Works with megatron's and torch's optimizers."""
    layers = fp8_layers(models)
    if not layers:
        return 0
    if getattr(optimizer.step, "_fp8_attached", False):
        raise ValueError("attach_optimizer: this optimizer is already attached to FP8 layers")
    for layer in layers:
        layer.fp8_cache.armed = True
        layer.fp8_cache.invalidate()
    step = optimizer.step

    @functools.wraps(step)
    def step_then_invalidate(*args, **kwargs):
        try:
            return step(*args, **kwargs)
        finally:  # even a skipped (NaN) step: recomputing is always correct
            for layer in layers:
                layer.fp8_cache.invalidate()

    step_then_invalidate._fp8_attached = True
    optimizer.step = step_then_invalidate
    return len(layers)


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """||approx - exact|| / ||exact|| in fp64 (benchmarks and tests; syncs, not for the hot path)."""
    a, e = approx.double(), exact.double()
    return (torch.linalg.vector_norm(a - e) / torch.linalg.vector_norm(e).clamp(min=math.ulp(0.0))).item()
