"""Fixes for megatron-core 0.19.2's distributed-optimizer checkpoint load with the torch Adam fallback.

Without Apex or Transformer Engine, ``megatron.core.optimizer.distrib_optimizer`` falls back to
``torch.optim.Adam(W)`` (``HAVE_APEX_OR_TE = False``). torch's Adam keeps a ``step`` tensor per
parameter, and four places of the distributed optimizer's checkpoint code do not expect that.
They are library bugs, not CPU problems: they hit a GPU machine without Apex/TE (our H200 image) the
same way. ``install()`` patches exactly those four places, once, and does nothing when the fused
Apex/TE Adam is in use (its ``step`` lives in the param groups, where megatron expects it).

    from atpo_megatron.actor import distopt_compat
    distopt_compat.install()      # before building/loading a checkpoint; idempotent

E1  ``sharded_state_dict(is_loading=True)`` calls ``state_dict()`` on a fresh optimizer whose
    state is still empty; ``state_dict()`` asserts exactly one distinct ``step`` over that empty
    state -> ``AssertionError``. Fix: materialise the state first with the library's own
    ``_init_optimizer_states_with_dummy_values()`` (a zero-grad step whose values the load
    overwrites, ``step`` included).
E2  ``fully_reshardable`` load: ``_set_main_param_and_optimizer_states`` copies every tensor of the
    inner state, ``step`` included, from a source dict that has no ``step`` -> ``KeyError: 'step'``.
    Fix: a missing source key reads as None, which the method already skips.
E3  (silent) ``load_state_dict`` puts ONE ``step`` tensor object into every parameter's state.
    torch's foreach Adam increments each parameter's ``step`` in place, so after one step the
    shared tensor has advanced by the number of parameters: wrong bias correction, and a resumed
    run drifts from the uninterrupted one (4.56314 instead of 4.56328 in the CPU probe). With
    ``dp_reshardable`` the dummy value 1 also survived. Fix: after the load, give every parameter
    its own ``step`` tensor holding the checkpoint's value (``param_groups[i]["step"]``).
E4  ``load_parameter_state_from_dp_reshardable`` lacks the ``@torch.no_grad()`` of its
    ``fully_reshardable`` sibling; with fp32 params the main params are views of leaf tensors that
    require grad -> "a view of a leaf Variable that requires grad is being used in an in-place
    operation". Fix: wrap it in ``torch.no_grad()``.
"""

from __future__ import annotations

import collections
import functools

import torch

_INSTALLED_FLAG = "_atpo_distopt_compat"
# What install() replaced: fix -> (DistributedOptimizer attribute, the library's function).
# Tests put one back to show that the fix is still needed with the installed megatron.
ORIGINALS: dict[str, tuple[str, object]] = {}


def needed() -> bool:
    """True when megatron uses the torch Adam fallback (no Apex/TE fused Adam)."""
    from megatron.core.optimizer import distrib_optimizer

    return not getattr(distrib_optimizer, "HAVE_APEX_OR_TE", True)


def install() -> bool:
    """Patch E1-E4 into ``DistributedOptimizer``; returns True if patches are (now) active."""
    from megatron.core.optimizer import distrib_optimizer

    DO = distrib_optimizer.DistributedOptimizer
    if getattr(DO, _INSTALLED_FLAG, False):
        return True
    if not needed():
        return False

    # E1: build the optimizer state before sharded_state_dict(is_loading=True) reads it.
    orig_sharded_state_dict = DO.sharded_state_dict

    @functools.wraps(orig_sharded_state_dict)
    def sharded_state_dict(self, model_sharded_state_dict=None, is_loading=False, *args, **kwargs):
        if is_loading and len(self.optimizer.state) == 0:
            self._init_optimizer_states_with_dummy_values()
        if model_sharded_state_dict is None:
            model_sharded_state_dict = {}
        return orig_sharded_state_dict(self, model_sharded_state_dict, is_loading, *args, **kwargs)

    # E2: the fully_reshardable source dict has no "step"; let it read as None (= skipped).
    orig_set_states = DO._set_main_param_and_optimizer_states

    @functools.wraps(orig_set_states)
    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        return orig_set_states(self, model_param, collections.defaultdict(lambda: None, tensors))

    # E3: one fresh step tensor per parameter, with the checkpoint's value.
    orig_load_state_dict = DO.load_state_dict

    @functools.wraps(orig_load_state_dict)
    def load_state_dict(self, state_dict):
        out = orig_load_state_dict(self, state_dict)
        for group in self.optimizer.param_groups:
            if "step" not in group:
                continue
            for p in group["params"]:
                st = self.optimizer.state.get(p)
                if st is not None and "step" in st:
                    old = st["step"]
                    st["step"] = torch.tensor(float(group["step"]), dtype=old.dtype, device=old.device)
        return out

    for fix, name in (("E1", "sharded_state_dict"), ("E2", "_set_main_param_and_optimizer_states"),
                      ("E3", "load_state_dict"), ("E4", "load_parameter_state_from_dp_reshardable")):
        ORIGINALS[fix] = (name, DO.__dict__[name])
    # E4: in-place copies into views of grad-requiring leaves need no_grad.
    DO.load_parameter_state_from_dp_reshardable = torch.no_grad()(
        DO.load_parameter_state_from_dp_reshardable)
    DO.sharded_state_dict = sharded_state_dict
    DO._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states
    DO.load_state_dict = load_state_dict
    setattr(DO, _INSTALLED_FLAG, True)
    return True
