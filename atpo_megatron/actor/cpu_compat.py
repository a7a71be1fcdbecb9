"""Let megatron-core 0.19.2 run on CPU over gloo (tests, laptops); inert when CUDA is available.

Usage (``actor.parallel.init_distributed`` does this for you)::

    from atpo_megatron.actor import cpu_compat
    cpu_compat.install()        # after `import megatron.core`, before model_parallel_cuda_manual_seed

Three adaptations, each found by a probe (``shared/notes/megatron-cpu.md``):

1. RNG: megatron's ``CudaRNGStatesTracker`` stores named CUDA generator states, and attention and
   embedding dropout always enter ``get_cuda_rng_tracker().fork()``. A subclass tracks named CPU
   generator states instead; activation recompute's state save/restore goes to the CPU generator.
2. Device: some megatron modules allocate on ``device="cuda"`` or ``torch.cuda.current_device()``
   and call ``torch.cuda.synchronize()`` / streams / events. In exactly those modules the global
   name ``torch`` is rebound to a proxy that maps CUDA devices to the CPU and makes the sync
   primitives no-ops. User code and torch itself never see the proxy.
3. Tensor methods: the optimizers classify parameters by ``param.type() == 'torch.cuda.FloatTensor'``,
   and tied embeddings under pipeline parallelism do ``weight.data.cuda()`` before their
   all-reduce. While (only) those functions run, ``Tensor.type()`` reports the CUDA spelling and
   ``Tensor.cuda()`` returns the tensor itself.

Not covered here: the distributed-optimizer checkpoint-load bugs of the torch.optim fallback
(they are not CPU-specific; see ``checkpoint/state.py``), and sequence parallelism, which needs TE/Apex.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
import types
from collections.abc import Callable, Iterator

import torch

# Modules whose hard-coded CUDA use blocks a CPU run, with what needs the proxy.
PROXIED_MODULES = (
    "megatron.core.models.common.embeddings.rotary_pos_embedding",  # inv_freq to current_device()
    "megatron.core.utils",  # GlobalMemoryBuffer (attention scratch, TP all-gather buffers)
    "megatron.core.transformer.utils",  # default causal / sliding-window masks on "cuda"
    "megatron.core.pipeline_parallel.schedules",  # total_num_tokens on "cuda", even at PP=1
    "megatron.core.pipeline_parallel.p2p_communication",  # recv buffers, synchronize()
    "megatron.core.distributed.param_and_grad_buffer",  # grad/param buffers, streams
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.optimizer.optimizer",  # found_inf and other scalars on "cuda"
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads",  # grad-norm buffers
    "megatron.core.dist_checkpointing.strategies.filesystem_async",  # synchronize() before save
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",  # failure flag on current_device()
    "megatron.core.dist_checkpointing.strategies.fully_parallel",  # synchronize() on load
)

_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}
_FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "rand", "randn", "randint",
              "zeros_like", "ones_like", "empty_like", "full_like", "as_tensor", "eye", "linspace",
              "empty_strided")
_installed = False


def install() -> None:
    """Apply the CPU adaptations once per process; a no-op when CUDA is available."""
    global _installed
    if _installed or torch.cuda.is_available():
        return
    _install_cpu_rng_tracker()
    proxy = _CpuTorch()
    for name in PROXIED_MODULES:
        importlib.import_module(name).torch = proxy
    _install_scoped_tensor_methods()
    _installed = True


# ----------------------------------------------------------------------------------------- 1. RNG
def _install_cpu_rng_tracker() -> None:
    """Rebind megatron's tracker class (and its state getters) to CPU-generator versions, so the
    stock ``model_parallel_cuda_manual_seed`` works unchanged. It does not seed the default CPU
    generator: call ``torch.manual_seed`` first (``parallel.set_seed`` does)."""
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """``CudaRNGStatesTracker`` over the default CPU generator."""

        def add(self, name: str, seed: int) -> None:
            if seed in self.seeds_ or name in self.states_:
                raise ValueError(f"RNG tracker: seed {seed} or state {name!r} was already added")
            self._is_initialized = True
            self.seeds_.add(seed)
            outer = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)

        @contextlib.contextmanager
        def fork(self, name: str = mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
            # The stock fork() would also warn that the CPU state changed: on CPU that is the point.
            if name not in self.states_:
                raise ValueError(f"RNG tracker: state {name!r} was never added")
            outer, outer_name = torch.get_rng_state(), self._current_state_name
            if outer_name != "default-rng":
                self.states_[outer_name] = outer
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer if outer_name == "default-rng" else self.states_[outer_name])
                self._current_state_name = outer_name

    mrandom.CudaRNGStatesTracker = CpuRNGStatesTracker
    mrandom._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    mrandom._CUDA_RNG_STATE_TRACKER = None  # a tracker built before install() would be the CUDA one
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = False


# -------------------------------------------------------------------------------------- 2. device
def _cpu_device(device):
    """Map a CUDA device (name, torch.device or ordinal) to the CPU; leave anything else."""
    if isinstance(device, int) and not isinstance(device, bool):
        return torch.device("cpu")
    if str(device).startswith("cuda"):
        return torch.device("cpu")
    return device


class _NoSync:
    """CPU stand-in for CUDA streams and events: CPU ops run eagerly and in order."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name: str) -> Callable[..., "_NoSync"]:
        return lambda *args, **kwargs: _NoSync()  # wait_stream, record_event, synchronize, ...

    def query(self) -> bool:
        return True


class _CpuCuda:
    """Stand-in for ``torch.cuda`` inside the proxied modules."""

    Stream = Event = _NoSync

    def current_device(self) -> torch.device:
        return torch.device("cpu")

    def current_stream(self, *args, **kwargs) -> _NoSync:
        return _NoSync()

    def stream(self, *args, **kwargs):
        return contextlib.nullcontext()

    def synchronize(self, *args, **kwargs) -> None:
        pass

    def empty_cache(self) -> None:
        pass

    def __getattr__(self, name: str):
        return getattr(torch.cuda, name)


class _CpuTorch(types.ModuleType):
    """Stand-in for the ``torch`` module inside the proxied modules: factories map CUDA devices to
    the CPU, ``torch.cuda`` is :class:`_CpuCuda`, everything else is the real torch."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CpuCuda()
        for name in _FACTORIES:
            setattr(self, name, self._on_cpu(getattr(torch, name)))

    @staticmethod
    def _on_cpu(factory: Callable) -> Callable:
        @functools.wraps(factory)
        def wrapper(*args, **kwargs):
            if "device" in kwargs:
                kwargs["device"] = _cpu_device(kwargs["device"])
            return factory(*args, **kwargs)

        return wrapper

    def __getattr__(self, name: str):
        value = getattr(torch, name)
        setattr(self, name, value)  # cache: proxied modules call torch.* in hot loops
        return value


# ------------------------------------------------------------------------------- 3. tensor methods
@contextlib.contextmanager
def _tensor_method(name: str, make: Callable[[Callable], Callable]) -> Iterator[None]:
    """Temporarily replace ``torch.Tensor.<name>`` by ``make(original)`` (nesting-safe)."""
    own = torch.Tensor.__dict__.get(name)  # None: inherited from torch._C.TensorBase
    setattr(torch.Tensor, name, make(getattr(torch.Tensor, name)))
    try:
        yield
    finally:
        if own is None:
            delattr(torch.Tensor, name)
        else:
            setattr(torch.Tensor, name, own)


def _cuda_type_names(original: Callable) -> Callable:
    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not non_blocking and not kwargs:
            spelling = original(self)
            return _CUDA_TYPE_NAMES.get(spelling, spelling)
        return original(self, dtype, non_blocking, **kwargs)

    return type_


def _cuda_is_identity(original: Callable) -> Callable:
    return lambda self, *args, **kwargs: self


def _run_within(owner: object, name: str, context: Callable[[], contextlib.AbstractContextManager]):
    """Make ``owner.name`` run inside ``context()``; rebind module-level aliases of a function."""
    function = getattr(owner, name)

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with context():
            return function(*args, **kwargs)

    setattr(owner, name, wrapper)
    if isinstance(owner, types.ModuleType):  # `from ...clip_grads import clip_grad_by_total_norm_fp32`
        for module in list(sys.modules.values()):
            in_megatron = getattr(module, "__name__", "").startswith("megatron.core")
            if in_megatron and getattr(module, name, None) is function:
                setattr(module, name, wrapper)


def _install_scoped_tensor_methods() -> None:
    from megatron.core.models.common.language_module.language_module import LanguageModule
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer

    type_names = functools.partial(_tensor_method, "type", _cuda_type_names)
    _run_within(distrib_optimizer.DistributedOptimizer, "__init__", type_names)
    _run_within(optimizer.Float16OptimizerWithFloat16Params, "__init__", type_names)
    _run_within(clip_grads, "clip_grad_by_total_norm_fp32", type_names)
    # Tied embeddings with PP > 1: `weight.data = weight.data.cuda()` before the embedding all-reduce.
    _run_within(LanguageModule, "setup_embeddings_and_output_layer",
                functools.partial(_tensor_method, "cuda", _cuda_is_identity))
