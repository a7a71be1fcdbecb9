"""Rollout: engines (token-in/token-out generation) and the multi-turn / tree loops built on them."""

from atpo_megatron.rollout.engine import Completion, Engine, SamplingParams, segment_entropy
from atpo_megatron.rollout.factory import make_engine

__all__ = ["Completion", "Engine", "SamplingParams", "make_engine", "segment_entropy"]
