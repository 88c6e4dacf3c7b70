"""Measuring tools of the benchmark: step timing, the matmul ceiling, peak memory, machine load.

Peak memory, the same quantity on both devices: the most bytes held by live tensors during
one training step -- parameters, gradients, optimizer state, the batch and every activation.

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (the caching
  allocator's own count; the allocator's reserved-but-free cache is not included).
* CPU: torch has no allocator statistics for host memory, and the process's peak RSS mixes in
  the Python heap, libraries and glibc's retained free pages. So the step runs once (untimed)
  under ``torch.profiler`` with ``profile_memory=True``, whose allocation records give the
  exact high-water mark of tensor bytes above the start
  (:func:`fdistill.engine.memory.peak_allocated_bytes`, also behind ``fdistill info``'s
  per-teacher peak); the bytes already live at the start
  (the storages of the model's parameters, buffers and gradients, the optimizer state and the
  batch, counted once each) are added.
"""
from __future__ import annotations

import math
import os
import statistics
import time
from typing import Callable, Dict, Iterable, List, Optional

import torch

from fdistill.engine.memory import peak_allocated_bytes

__all__ = ["sync", "time_rounds", "matmul_ceiling", "peak_step_memory", "live_tensor_bytes", "load_average",
           "device_name"]


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (the benchmark's sync, outside the step)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_rounds(fns: Dict[str, Callable[[], object]], device: torch.device, *, rounds: int, steps_per_round: int = 1,
                progress: Optional[Callable[[str], None]] = None) -> Dict[str, List[float]]:
    """Seconds per call of each function, interleaved: every round runs ``steps_per_round``
    back-to-back calls of each function in turn (one device sync at the end of each run, so the
    host can queue ahead as in training). Interleaving keeps a slow drift of the machine (other
    jobs on a shared CPU, GPU clocks) from favouring one variant.

    Returns {name: [seconds per call, one value per round]}.
    """
    out: Dict[str, List[float]] = {k: [] for k in fns}
    for r in range(rounds):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            for _ in range(steps_per_round):
                fn()
            sync(device)
            out[name].append((time.perf_counter() - t0) / steps_per_round)
        if progress is not None:
            progress(f"round {r + 1}/{rounds}: " + ", ".join(f"{k} {1e3 * v[-1]:.0f} ms" for k, v in out.items()))
    return out


def summarize(times: List[float]) -> dict:
    """Median and spread of per-step seconds."""
    med = statistics.median(times)
    return {"median_s": med, "min_s": min(times), "max_s": max(times),
            "rel_spread": (max(times) - min(times)) / med if med > 0 else math.nan}


def matmul_ceiling(device: torch.device, dtype: torch.dtype, *, n: Optional[int] = None, repeats: int = 5,
                   inner: Optional[int] = None) -> dict:
    """The dense-matmul throughput this device reaches now: the best of ``repeats`` timings of
    ``torch.mm`` on two ``n x n`` matrices of ``dtype`` (``inner`` products per timing), in
    FLOP/s (2 n^3 per product). Measured in the benchmark's own process, with its thread count
    and TF32 setting, so the MFU denominator is what this run could reach, not a datasheet."""
    if n is None:
        n = 8192 if device.type == "cuda" else 2048
    if inner is None:
        inner = 10 if device.type == "cuda" else 1
    a = torch.randn(n, n, device=device, dtype=torch.float32).to(dtype)
    b = torch.randn(n, n, device=device, dtype=torch.float32).to(dtype)
    c = torch.mm(a, b)  # warm-up (kernel selection, page faults)
    sync(device)
    best = math.inf
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b, out=c)
        sync(device)
        best = min(best, (time.perf_counter() - t0) / inner)
    del a, b, c
    return {"flops_per_s": 2 * n ** 3 / best, "n": n, "dtype": str(dtype).replace("torch.", ""), "best_s": best}


def _storages(tensors: Iterable[torch.Tensor]) -> Dict[int, int]:
    seen: Dict[int, int] = {}
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor) or t.device.type != "cpu":
            continue
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return seen


def live_tensor_bytes(modules: Iterable[torch.nn.Module], optimizers: Iterable[torch.optim.Optimizer] = (),
                      extra: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct CPU storages behind the modules' parameters, gradients and
    buffers, the optimizers' state tensors and ``extra`` tensors (each storage once)."""
    tensors: List[torch.Tensor] = []
    for m in modules:
        for p in m.parameters():
            tensors.append(p)
            tensors.append(p.grad)
        tensors.extend(m.buffers())
    for opt in optimizers:
        for state in opt.state.values():
            tensors.extend(v for v in state.values() if isinstance(v, torch.Tensor))
    tensors.extend(extra)
    return sum(_storages(tensors).values())


def peak_step_memory(fn: Callable[[], object], device: torch.device, *, static_cpu_bytes: int = 0) -> int:
    """Peak bytes of live tensors while ``fn`` (one training step) runs; see the module doc.

    On CUDA the allocator's peak (everything allocated on the device, including what existed
    before the call); on CPU ``static_cpu_bytes`` (what is live at the start, from
    :func:`live_tensor_bytes`) plus the profiled high-water mark of the step's allocations. Both
    from :func:`fdistill.engine.memory.peak_allocated_bytes` (the peak above the start)."""
    if device.type == "cuda":
        sync(device)
        return int(torch.cuda.memory_allocated(device)) + peak_allocated_bytes(fn, device)
    return int(static_cpu_bytes) + peak_allocated_bytes(fn, device)


def load_average() -> Optional[float]:
    """The machine's 1-minute load average (None where the OS does not say)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover - Windows
        return None


def device_name(device: torch.device) -> str:
    """A readable device description: the GPU's name, or the CPU model and torch's thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:  # pragma: no cover - not Linux
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        cores = os.cpu_count() or 0
    return f"{model} ({cores} cores, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()})"
