"""Per-sample random seeds: an augmentation that is a pure function of ``(seed, epoch, sample)``.

Why: with the usual per-worker seeding a sample's random crop depends on which worker
process loaded it and on how many samples that worker drew before, so changing
``num_workers`` or resuming mid-epoch changes the views, and an interrupted run cannot be
reproduced. Here every sample is transformed inside a forked RNG seeded from a hash of
``(seed, epoch, index)``; the process's own generators (torch CPU, python ``random``, numpy)
are restored afterwards, so data loading in the main process does not perturb training's RNG.
"""
from __future__ import annotations

import hashlib
import random
import struct
from contextlib import contextmanager
from typing import Iterator, Union

import numpy as np
import torch
import torch.utils.data

_MASK63 = (1 << 63) - 1


def sample_seed(seed: int, epoch: int, key: Union[int, str]) -> int:
    """A 63-bit seed mixing ``seed``, ``epoch`` and a sample key (its dataset index, or a string
    such as a shard sample's ``url/__key__``). Stable across processes, machines and Python
    versions (blake2b, not Python's salted ``hash``)."""
    if isinstance(key, str):
        payload = struct.pack("<qq", int(seed), int(epoch)) + b"s" + key.encode("utf-8")
    else:
        payload = struct.pack("<qqq", int(seed), int(epoch), int(key))
    return int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "little") & _MASK63


@contextmanager
def seeded(seed: int, *, restore: bool = True) -> Iterator[None]:
    """Run a block with torch's CPU generator, python ``random`` and numpy's global generator
    seeded from ``seed``.

    ``restore=True`` puts all three back afterwards (~150 us, numpy's state being the slow
    part): needed in a training process. DataLoader worker processes pass ``restore=False``:
    their global generators serve nothing else and every sample reseeds them.

    Only the CPU generator is touched (``torch.default_generator``, not ``torch.manual_seed``,
    which would also reseed every CUDA generator of a training process that loads data in its
    main thread)."""
    if not restore:
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed & 0xFFFFFFFF)
        yield
        return
    py_state = random.getstate()
    np_state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed & 0xFFFFFFFF)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def in_worker() -> bool:
    """True inside a DataLoader worker process."""
    return torch.utils.data.get_worker_info() is not None
