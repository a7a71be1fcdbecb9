"""The Megatron actor: model construction (``model``, ``attention``), process groups (``parallel``),
CPU adaptations (``cpu_compat``), log-probs and the PPO train step."""
