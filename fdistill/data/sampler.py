"""``ResumableDistributedSampler``: torch's DistributedSampler order, startable mid-epoch.

Hand-written because ``torch.utils.data.DistributedSampler`` cannot skip the samples a rank
has already consumed: resuming a preempted run mid-epoch would either repeat them or need the
whole epoch replayed. The epoch order here is exactly DistributedSampler's (a ``randperm``
from a generator seeded with ``seed + epoch``, padded or truncated to a multiple of
``num_replicas``, rank ``r`` taking every ``num_replicas``-th index from ``r``), so a run that
is interrupted and resumed with :meth:`set_start` sees exactly the samples an uninterrupted
run sees, in the same order.

Global positions (resuming on another number of processes). Position ``p`` of rank ``r``'s
order is position ``p * num_replicas + r`` of the epoch's *global* order
(:meth:`~ResumableDistributedSampler.global_order`: the permutation, which does not depend on
the world size, padded or truncated at its tail). So when every rank has consumed ``k``
samples, all ranks together have consumed exactly the global positions ``[0, k * num_replicas)``,
whatever the world size. A training step of global batch ``G = batch_size x ranks x
accum_steps`` therefore takes global positions ``[s*G, (s+1)*G)`` of the epoch for any split of
``G``: a run resumed on another number of processes (same ``G``) sees the same *set* of samples
at every step, and a checkpoint only needs the number of samples of the epoch consumed by all
ranks together, re-split on resume with :func:`split_position` /
:meth:`~ResumableDistributedSampler.set_global_start`. What depends on the split is which rank
(and which micro-batch) holds which sample of a step, i.e. only the order of the float
reductions and the per-rank random draws, not the samples.
"""
from __future__ import annotations

import math
from typing import Iterator, List, Optional, Tuple, Union

import torch
from torch.utils.data import Sampler


def split_position(consumed: int, num_replicas: int, batch_size: int = 1) -> int:
    """This rank's start position for ``consumed`` samples of the epoch consumed by all ranks
    together (a global position, see the module doc): ``consumed / num_replicas``.

    Raises ValueError unless ``consumed`` is a whole number of global batches of ``batch_size``
    per rank (``consumed % (num_replicas * batch_size) == 0``): otherwise ranks would start at
    different depths and the union of what they have seen would not be a prefix of the order."""
    consumed, num_replicas, batch_size = int(consumed), int(num_replicas), int(batch_size)
    if consumed < 0 or num_replicas < 1 or batch_size < 1:
        raise ValueError(f"need consumed >= 0, num_replicas >= 1, batch_size >= 1; got {consumed}, "
                         f"{num_replicas}, {batch_size}")
    if consumed % (num_replicas * batch_size):
        raise ValueError(f"{consumed} samples consumed in the epoch are not a whole number of batches of "
                         f"{batch_size} on each of {num_replicas} rank(s): cannot re-split the position")
    return consumed // num_replicas


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

    def set_global_start(self, consumed: int) -> None:
        """Skip what all ranks together consumed of the current epoch: ``consumed`` samples of
        the global order (see the module doc), possibly counted under another world size.
        Must be a multiple of ``num_replicas`` (:func:`split_position`)."""
        self.set_start(split_position(consumed, self.num_replicas))

    @property
    def global_start(self) -> int:
        """Samples of the current epoch consumed by all ranks together at the start position."""
        return self.start * self.num_replicas

    def global_order(self, epoch: Optional[int] = None) -> List[int]:
        """The epoch's order over all ranks (``total_size`` indices; rank ``r`` takes
        ``[r::num_replicas]``). Up to its padded or truncated tail (the first
        ``min(dataset_len, total_size)`` entries) it is the epoch's permutation, the same for
        every world size."""
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
        return order

    def epoch_indices(self, epoch: Optional[int] = None) -> List[int]:
        """This rank's full index order for ``epoch`` (default: the current one), from position 0."""
        return self.global_order(epoch)[self.rank:self.total_size:self.num_replicas]

    def __iter__(self) -> Iterator[Union[int, Tuple[int, int]]]:
        order = self.epoch_indices()[self.start:]
        if self.yield_epoch:
            e = self.epoch
            return iter([(e, i) for i in order])
        return iter(order)

    def __len__(self) -> int:
        return self.num_samples - self.start

    def state_dict(self) -> dict:
        """``start`` is this rank's position; ``global_start`` (with ``num_replicas``) what all
        ranks consumed, which :meth:`load_state_dict` re-splits under another world size."""
        return {"epoch": self.epoch, "start": self.start, "seed": self.seed,
                "global_start": self.global_start, "num_replicas": self.num_replicas}

    def load_state_dict(self, state: dict) -> None:
        if int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(f"sampler state has seed {state['seed']}, this sampler {self.seed}: "
                             "the epoch order would differ")
        self.set_epoch(int(state["epoch"]))
        if "global_start" in state:
            self.set_global_start(int(state["global_start"]))
        else:  # an old state: a per-rank position, valid only under its own world size
            self.set_start(int(state["start"]))
