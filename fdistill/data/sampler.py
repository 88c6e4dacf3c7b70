"""``ResumableDistributedSampler``: torch's DistributedSampler order, startable mid-epoch.

Hand-written because ``torch.utils.data.DistributedSampler`` cannot skip the samples a rank
has already consumed: resuming a preempted run mid-epoch would either repeat them or need the
whole epoch replayed. The epoch order here is exactly DistributedSampler's (a ``randperm``
from a generator seeded with ``seed + epoch``, padded or truncated to a multiple of
``num_replicas``, rank ``r`` taking every ``num_replicas``-th index from ``r``), so a run that
is interrupted and resumed with :meth:`set_start` sees exactly the samples an uninterrupted
run sees, in the same order.
"""
from __future__ import annotations

import math
from typing import Iterator, List, Optional, Tuple, Union

import torch
from torch.utils.data import Sampler


class ResumableDistributedSampler(Sampler):
    """Per-rank shard of a (shuffled) epoch order, startable at any position.

    Args:
        dataset_len: number of samples in the dataset.
        num_replicas, rank: world size and this process's rank.
        shuffle: a new permutation per epoch (``seed + epoch``); else ``0..n-1``.
        seed: shuffle seed; must be the same on every rank.
        drop_last: drop the tail so every rank gets ``floor(n / num_replicas)`` samples; else
            pad with samples from the start of the order to ``ceil(n / num_replicas)``.
        yield_epoch: yield ``(epoch, index)`` pairs instead of indices. The distillation
            loader uses this so each sample's augmentation seed travels with its index and
            needs no epoch state in (possibly persistent) worker processes.

    ``len(sampler)`` is what is left of this rank's epoch after the start position;
    ``num_samples`` is the whole per-rank epoch.
    """

    def __init__(self, dataset_len: int, *, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = True, yield_epoch: bool = False):
        if dataset_len <= 0:
            raise ValueError(f"dataset_len must be positive, got {dataset_len}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need num_replicas >= 1 and 0 <= rank < num_replicas, got {num_replicas}, {rank}")
        if drop_last and dataset_len < num_replicas:
            raise ValueError(f"drop_last with {dataset_len} samples for {num_replicas} ranks leaves none per rank")
        self.dataset_len, self.num_replicas, self.rank = int(dataset_len), int(num_replicas), int(rank)
        self.shuffle, self.seed, self.drop_last, self.yield_epoch = bool(shuffle), int(seed), bool(drop_last), yield_epoch
        if self.drop_last:
            self.num_samples = self.dataset_len // self.num_replicas
        else:
            self.num_samples = math.ceil(self.dataset_len / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's order. Moving to another epoch resets the start position to 0."""
        if int(epoch) != self.epoch:
            self.start = 0
        self.epoch = int(epoch)

    def set_start(self, index: int) -> None:
        """Skip the first ``index`` samples of this rank's order for the current epoch (the
        number this rank had consumed when the run stopped: batches done x batch size)."""
        if not 0 <= index <= self.num_samples:
            raise ValueError(f"start {index} outside this rank's epoch of {self.num_samples} samples")
        self.start = int(index)

    def epoch_indices(self, epoch: Optional[int] = None) -> List[int]:
        """This rank's full index order for ``epoch`` (default: the current one), from position 0."""
        epoch = self.epoch if epoch is None else int(epoch)
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + epoch)
            order = torch.randperm(self.dataset_len, generator=g).tolist()
        else:
            order = list(range(self.dataset_len))
        if self.total_size > len(order):  # pad (drop_last=False), as DistributedSampler does
            pad = self.total_size - len(order)
            order += (order * math.ceil(pad / len(order)))[:pad]
        else:
            order = order[:self.total_size]
        return order[self.rank:self.total_size:self.num_replicas]

    def __iter__(self) -> Iterator[Union[int, Tuple[int, int]]]:
        order = self.epoch_indices()[self.start:]
        if self.yield_epoch:
            e = self.epoch
            return iter([(e, i) for i in order])
        return iter(order)

    def __len__(self) -> int:
        return self.num_samples - self.start

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "start": self.start, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(f"sampler state has seed {state['seed']}, this sampler {self.seed}: "
                             "the epoch order would differ")
        self.set_epoch(int(state["epoch"]))
        self.set_start(int(state["start"]))
