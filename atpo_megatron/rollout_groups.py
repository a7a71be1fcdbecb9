"""The distributed plumbing of SPMD rollouts: which rollout group this rank is in, a search client the
group shares, and the gathering of every group's sequences on every rank (plain data only).

``rollout/placement.py`` decides the layout as a pure function; this module applies it to the running
job (torch.distributed, torchrun's environment). ``rollout/`` itself never sees a process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from atpo_megatron.config import Config, UserError
from atpo_megatron.rollout.placement import RolloutPlacement
from atpo_megatron.rollout.statistics import merge_rollout_stats


@dataclass
class RolloutRank:
    """This rank's place among the rollout engines of the job."""

    placement: RolloutPlacement
    rank: int
    group: int
    """Index of this rank's rollout group (engine)."""
    reports: bool
    """The group's leader: its trees are the group's contribution to the gather."""
    process_group: Any
    """torch.distributed group of the engine's ranks (None for single-rank engines)."""

    @classmethod
    def from_job(cls, cfg: Config) -> "RolloutRank":
        """Collective (creates one process group per multi-rank engine): call on every rank."""
        world, rank = dist.get_world_size(), dist.get_rank()
        placement = RolloutPlacement(world_size=world,
                                     ranks_per_node=int(os.environ.get("LOCAL_WORLD_SIZE", world)),
                                     rollout_tp=cfg.rollout.tp_size, actor_tp=cfg.parallel.tp,
                                     actor_pp=cfg.parallel.pp)
        placement.prompt_slice(0, cfg.train.batch_prompts)  # validates the split up front
        mine = None
        if placement.rollout_tp > 1:
            for g in range(placement.num_groups):  # new_group is collective: every rank creates every group
                pg = dist.new_group(placement.group_ranks(g))
                if g == placement.group_of(rank):
                    mine = pg
        return cls(placement, rank, placement.group_of(rank), placement.is_group_leader(rank), mine)

    @property
    def device_index(self) -> int:
        return self.placement.device_index(self.rank)

    @property
    def leader(self) -> int:
        return self.placement.group_ranks(self.group)[0]

    def my_prompts(self, batch: list) -> list:
        return batch[self.placement.prompt_slice(self.group, len(batch))]

    def my_eval_examples(self, examples: list) -> list:
        return examples[self.group::self.placement.num_groups]


class GroupSearch:
    """A search client shared by the ranks of one rollout group: the leader queries the retriever and
    broadcasts the results, so the group's SPMD agent loops stay identical (a tensor-parallel engine
    needs identical inputs on all its ranks, and a retriever may answer two callers differently)."""

    def __init__(self, client: Any, ranks: RolloutRank):
        self.client = client
        self.ranks = ranks

    def search_batch(self, queries: list[str]) -> list:
        results = self.client.search_batch(queries) if self.ranks.rank == self.ranks.leader else None
        box = [results]
        dist.broadcast_object_list(box, src=self.ranks.leader, group=self.ranks.process_group)
        return box[0]

    def close(self) -> None:
        self.client.close()


@dataclass
class _Failed:
    """What a rank sends in a gather instead of its result when its part raised (the exception stays home)."""

    rank: int
    message: str


class RankFailedError(UserError, RuntimeError):
    """Another rank's part of a collective step failed; that rank reports its own error."""


def all_gather_checked(payload: Any, error: BaseException | None = None) -> list:
    """``all_gather_object`` of ``payload``, unless this rank's part raised ``error``: then every rank
    raises, this one its own exception, the others a one-line RankFailedError (none waits for it)."""
    sent = payload if error is None else _Failed(dist.get_rank(), f"{type(error).__name__}: {error}")
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, sent)
    if error is not None:
        raise error
    failed = [p for p in gathered if isinstance(p, _Failed)]
    if failed:
        raise RankFailedError(f"rank {failed[0].rank} failed, so this rank stops too: {failed[0].message}")
    return gathered


def gather_rollouts(local, ranks: RolloutRank, share: int,
                    error: BaseException | None = None) -> tuple[list, dict[str, float]]:
    """Every reporting rank's sequences on every rank, prompts renumbered globally, and the engines'
    statistics merged (``merge_rollout_stats``: counts summed, means weighted). A rank's ``error``
    stops every rank."""
    payload = None
    if local is not None and ranks.reports:
        for seq in local.sequences:
            seq.tree_index += ranks.group * share
        payload = (local.sequences, local.stats)
    parts = [p for p in all_gather_checked(payload, error) if p is not None]
    sequences = [s for seqs, _ in parts for s in seqs]
    return sequences, merge_rollout_stats([stats for _, stats in parts])
