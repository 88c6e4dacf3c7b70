"""Peak tensor memory of a piece of work: the most bytes allocated above the start while it runs.

The same quantity on both devices (what ``fdistill info`` reports per teacher forward and what
``benchmarks/measure.py`` builds a training step's peak on):

* CUDA: the caching allocator's own count -- ``torch.cuda.max_memory_allocated`` after
  ``torch.cuda.reset_peak_memory_stats``, less ``torch.cuda.memory_allocated`` at the reset
  (the allocator's reserved-but-free cache is not included; sizes are the allocator's, rounded
  up to its 512-byte blocks).
* CPU: torch keeps no allocator statistics for host memory, and the process's peak RSS mixes in
  the Python heap, libraries and glibc's retained free pages. So the work runs under
  ``torch.profiler`` with ``profile_memory=True``, whose allocation records (``[memory]``
  events: bytes, positive on allocation, negative on free) give the exact high-water mark of
  tensor bytes above the start. The profiler makes the run slower: time it separately.

Tensors alive before the call (parameters, inputs) are not counted; a tensor freed by the work
that existed before it lowers the running count, so the result is relative to the start.
"""
from __future__ import annotations

from typing import Callable, Union

import torch

__all__ = ["peak_allocated_bytes", "profiled_peak_delta"]


def profiled_peak_delta(fn: Callable[[], object]) -> int:
    """High-water mark of CPU tensor bytes allocated by ``fn()`` above the start, from the
    ``[memory]`` records of ``torch.profiler`` (``profile_memory=True``): the running sum of
    allocations and frees, in time order, at its maximum (0 if ``fn`` allocates nothing)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def peak_allocated_bytes(fn: Callable[[], object], device: Union[torch.device, str]) -> int:
    """Most bytes of tensors allocated on ``device`` above what was allocated at the start while
    ``fn()`` runs (see the module doc: the CUDA allocator's peak less its count at the start, or on
    CPU the profiler's high-water mark). ``fn``'s result is dropped."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device)) - int(start)
    if device.type != "cpu":
        raise ValueError(f"peak memory is measured on cpu or cuda, not {device.type}")
    return profiled_peak_delta(fn)
