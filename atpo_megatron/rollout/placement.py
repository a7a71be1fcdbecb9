"""Where rollouts run and where their weights come from: a pure function of the job's shape.

SPMD colocated rollouts: every rank of the torchrun/srun job builds one rollout engine on its own
device (``LOCAL_RANK``), so every GPU samples; ``rollout.tp_size`` consecutive ranks form one
*rollout group* (one tensor-parallel vLLM engine, ``external_launcher``), independent of the actor's
TP x PP. Groups never cross a node. The prompts of a step are split evenly over the groups; inside
a group every rank runs the same agent loop on the same prompts (SPMD), and the group's first rank
reports the result.

Weights reach the engines without a host hop: ``weights.hf_bridge.export_hf_weights`` gathers each
actor parameter once over its TP group on the pipeline stage that owns it, broadcasts it over the
pipeline group, and every rank converts it to the Hugging Face layout; each engine then loads the
full tensors it is handed (a vLLM TP rank keeps its own shard). :meth:`RolloutPlacement.weight_source`
names, for any rank and layer, the rank whose pipeline stage sends it.

Megatron orders ranks ``tp-cp-ep-dp-pp`` (tensor fastest, pipeline slowest; cp = ep = 1 here):
``rank = tp_rank + TP * (dp_rank + DP * pp_rank)``.

Example, the 70B job (8 nodes x 8 GPUs, actor TP4 x PP4 -> DP4, rollout TP8): 8 engines, one per
node (ranks 0-7, 8-15, ...); the engine of node 0 receives layers 0-19 from pipeline stage 0
(ranks 0-15), layers 20-39 from stage 1 (ranks 16-31), and so on.
"""

from __future__ import annotations

from dataclasses import dataclass

from atpo_megatron.config import ConfigError


@dataclass(frozen=True)
class RolloutPlacement:
    world_size: int
    ranks_per_node: int
    """Ranks (devices) on one node: torchrun's LOCAL_WORLD_SIZE."""
    rollout_tp: int
    """``rollout.tp_size``: ranks per rollout engine."""
    actor_tp: int = 1
    actor_pp: int = 1

    def __post_init__(self):
        if min(self.world_size, self.ranks_per_node, self.rollout_tp, self.actor_tp, self.actor_pp) < 1:
            raise ConfigError(f"rollout placement needs positive sizes, got {self}")
        if self.world_size % self.ranks_per_node:
            raise ConfigError(f"{self.world_size} ranks do not fill nodes of {self.ranks_per_node} ranks each")
        if self.ranks_per_node % self.rollout_tp:
            raise ConfigError(
                f"rollout.tp_size={self.rollout_tp} must divide the {self.ranks_per_node} ranks of a node "
                f"(a rollout engine never spans nodes)"
            )
        if self.world_size % (self.actor_tp * self.actor_pp):
            raise ConfigError(f"parallel.tp * parallel.pp = {self.actor_tp * self.actor_pp} does not divide "
                              f"the world size {self.world_size}")

    # ------------------------------------------------------------------ rollout groups
    @property
    def num_groups(self) -> int:
        """Rollout engines in the job (the rollout's data-parallel size)."""
        return self.world_size // self.rollout_tp

    def group_of(self, rank: int) -> int:
        return self._check(rank) // self.rollout_tp

    def group_ranks(self, group: int) -> list[int]:
        return list(range(group * self.rollout_tp, (group + 1) * self.rollout_tp))

    def is_group_leader(self, rank: int) -> bool:
        """The rank that reports its group's trees (all ranks of a group compute the same ones)."""
        return self._check(rank) % self.rollout_tp == 0

    def device_index(self, rank: int) -> int:
        """The local device of ``rank``'s engine: its LOCAL_RANK, never a shared ``cuda:0``."""
        return self._check(rank) % self.ranks_per_node

    def prompt_slice(self, group: int, batch: int) -> slice:
        """The group's contiguous share of a batch of ``batch`` prompts."""
        if batch % self.num_groups:
            raise ConfigError(f"train.batch_prompts={batch} must be divisible by the {self.num_groups} rollout "
                              f"engines (world size / rollout.tp_size), so each samples an equal share")
        share = batch // self.num_groups
        return slice(group * share, (group + 1) * share)

    # ------------------------------------------------------------------ weights
    @property
    def actor_dp(self) -> int:
        return self.world_size // (self.actor_tp * self.actor_pp)

    def actor_coords(self, rank: int) -> tuple[int, int, int]:
        """(tp_rank, dp_rank, pp_rank) of ``rank`` in Megatron's tp-dp-pp order."""
        self._check(rank)
        tp_rank = rank % self.actor_tp
        dp_rank = (rank // self.actor_tp) % self.actor_dp
        return tp_rank, dp_rank, rank // (self.actor_tp * self.actor_dp)

    def pp_stage_of_layer(self, layer: int, num_layers: int) -> int:
        """The pipeline stage holding decoder layer ``layer`` (layers split evenly, no VPP)."""
        if num_layers % self.actor_pp:
            raise ConfigError(f"{num_layers} layers do not split evenly over parallel.pp={self.actor_pp}")
        if not 0 <= layer < num_layers:
            raise ValueError(f"layer {layer} is outside 0..{num_layers - 1}")
        return layer // (num_layers // self.actor_pp)

    def weight_source(self, rank: int, layer: int, num_layers: int) -> int:
        """The rank that broadcasts layer ``layer``'s (TP-gathered) tensors to ``rank``: the rank of
        ``rank``'s pipeline group on the stage that owns the layer. ``layer=-1`` is the embedding
        (stage 0), ``layer=num_layers`` the final norm and output layer (the last stage)."""
        tp_rank, dp_rank, _ = self.actor_coords(rank)
        if layer == -1:
            stage = 0
        elif layer == num_layers:
            stage = self.actor_pp - 1
        else:
            stage = self.pp_stage_of_layer(layer, num_layers)
        return tp_rank + self.actor_tp * (dp_rank + self.actor_dp * stage)

    def _check(self, rank: int) -> int:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside the world of {self.world_size} ranks")
        return rank
