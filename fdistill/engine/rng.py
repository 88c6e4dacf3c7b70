"""Every random-number generator's state, as values ``torch.load(weights_only=True)`` accepts.

A resumed run must draw exactly the numbers the uninterrupted run would have drawn (drop
path, masks, anything else using the global generators), so checkpoints carry the state of
Python's ``random``, NumPy's global generator, torch's CPU generator and every CUDA device's.
NumPy's state holds an ndarray, which ``weights_only`` loading refuses: it is stored as a list.
"""
from __future__ import annotations

import random
from typing import Any, Dict

import numpy as np
import torch


def capture_rng_state() -> Dict[str, Any]:
    """The current state of all global generators (tensors, tuples, lists, ints, floats, strs)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: Dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": str(kind), "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    """Put back a state from :func:`capture_rng_state` (CUDA states only where devices match)."""
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _as_tuple(x):
    # random.setstate wants (version, tuple_of_ints, gauss_next); lists from a round trip are fine too
    if isinstance(x, list):
        return tuple(_as_tuple(v) for v in x)
    if isinstance(x, tuple):
        return tuple(_as_tuple(v) if isinstance(v, (list, tuple)) else v for v in x)
    return x
