"""Speed paths that reach into a library's internals, behind one switch.

Each keeps the values of the plain path (tests/test_perf_student_paths.py, tests/test_speed.py)
and is measured in benchmarks/RESULTS.md (how to read it: docs/performance.md):

- :class:`FDAttention` -- on CPU, timm's explicit attention where SDPA would fall back to its
  slower math path (a relative position bias that needs a gradient);
- :class:`FDBlock` -- on CPU, drop path computes only the samples it keeps;
- :func:`tune_cpu_allocator` -- glibc ``mallopt`` so freed tensor memory stays in the process;
- :func:`fused_step` -- fused AdamW skips a non-finite step on a device-side flag (the
  mechanism ``GradScaler`` uses), so the trainer needs no host sync per step.

**The switch**: ``FDISTILL_SPEED_PATHS=0`` in the environment (or :func:`set_enabled` ``(False)``
before models and optimizers are built) turns all four off: students have timm's BEiT blocks as
they are, the allocator keeps glibc's defaults, and the trainer reads the non-finite flag on the
host (one sync per step). Each path checks the internals it relies on before it uses them
(:func:`check_timm_beit`, :func:`fused_skip_supported`): a timm or torch release that changes
them fails here with an error naming the switch, and in tests/test_speed.py, not silently in a run.
"""
from __future__ import annotations

import ctypes
import functools
import inspect
import logging
import os
import sys
from typing import Optional

import torch
import torch.nn as nn
from timm.layers import DropPath
from timm.models.beit import Attention as BeitAttention
from timm.models.beit import Block as BeitBlock

log = logging.getLogger(__name__)

__all__ = ["enabled", "set_enabled", "FDAttention", "FDBlock", "check_timm_beit", "apply_student_speed_paths",
           "tune_cpu_allocator", "fused_skip_supported", "fused_step"]

_ENABLED = os.environ.get("FDISTILL_SPEED_PATHS", "1").strip().lower() not in ("0", "false", "no", "off")


def enabled() -> bool:
    """Whether the speed paths are on (default; ``FDISTILL_SPEED_PATHS=0`` turns them off)."""
    return _ENABLED


def set_enabled(flag: bool) -> None:
    """Turn the speed paths on or off for models, optimizers and steps built from now on."""
    global _ENABLED
    _ENABLED = bool(flag)


class FDAttention(BeitAttention):
    """timm's BEiT attention, taking its explicit path where that is the faster one.

    SDPA gets the relative position bias as an additive mask. On CUDA the memory-efficient
    kernel also returns the bias's gradient. On CPU no fused kernel does: with a bias that needs
    a gradient SDPA falls back to its math path (q and k scaled separately, a "safe" softmax with
    three extra passes over the (B, H, T, T) logits), slower than timm's explicit path (measured in
    benchmarks/RESULTS.md). So on CPU, when the
    bias needs a gradient, this runs the explicit path; everywhere else (GPU, evaluation, a
    frozen bias, inside ``torch.compile``) SDPA. A module set to ``fused_attn = False`` by its
    user (e.g. attention capture) stays explicit."""

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.fused_attn and x.device.type == "cpu" and torch.is_grad_enabled() \
                and not torch.compiler.is_compiling() and self._bias_needs_grad(shared_rel_pos_bias):
            self.fused_attn = False
            try:
                return super().forward(x, shared_rel_pos_bias)
            finally:
                self.fused_attn = True
        return super().forward(x, shared_rel_pos_bias)

    def _bias_needs_grad(self, shared: Optional[torch.Tensor]) -> bool:
        table = self.relative_position_bias_table
        return (shared is not None and shared.requires_grad) or (table is not None and table.requires_grad)


class FDBlock(BeitBlock):
    """timm's BEiT block that, on CPU, does not compute the samples drop path drops.

    Stochastic depth zeroes a residual branch for a random subset of the batch; timm computes
    the branch for every sample and multiplies by the 0/1 mask. Here (CPU, training) the same
    Bernoulli draw picks the kept samples and the branch runs on them only: with the recipes'
    drop-path rates (0.1-0.3, linear in depth) that skips 5-15% of the student's block compute.
    The result is timm's: ``x + (gamma * branch(x)) * mask / keep`` on kept samples, ``x`` on
    dropped ones, from the same random draws. Not on GPU: the kept count is data the host would
    have to wait for (a sync per block), and not inside ``torch.compile``."""

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not (self.training and x.device.type == "cpu" and isinstance(self.drop_path1, DropPath)
                and self.drop_path1.drop_prob > 0 and not torch.compiler.is_compiling()):
            return super().forward(x, shared_rel_pos_bias)
        x = _kept_residual(x, lambda h, b: self.attn(self.norm1(h), shared_rel_pos_bias=b), self.gamma_1,
                           self.drop_path1, shared_rel_pos_bias)
        return _kept_residual(x, lambda h, b: self.mlp(self.norm2(h)), self.gamma_2, self.drop_path2, None)


def _kept_residual(x, branch, gamma, drop_path: DropPath, bias):
    """``x + drop_path(gamma * branch(x))`` computing ``branch`` on the kept samples only."""
    B = x.shape[0]
    keep_prob = 1.0 - drop_path.drop_prob
    scale = x.new_empty((B,) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)  # timm's drop_path draw
    if keep_prob > 0.0 and drop_path.scale_by_keep:
        scale.div_(keep_prob)
    kept = scale.view(B).nonzero().view(-1)  # CPU tensor: no device to wait for
    n = kept.numel()
    if n == 0:
        return x
    if n == B:
        out = branch(x, bias)
    else:
        if bias is not None and bias.shape[0] == B and B > 1:  # per-sample bias (dropped masked tokens)
            bias = bias.index_select(0, kept)
        out = branch(x.index_select(0, kept), bias)
    if gamma is not None:
        out = gamma * out
    out = out * (scale if n == B else scale.index_select(0, kept))
    return x + out if n == B else x.index_add(0, kept, out)


#: what the two CPU paths read of timm's BEiT block and attention
_BLOCK_ATTRS = ("norm1", "attn", "gamma_1", "drop_path1", "norm2", "mlp", "gamma_2", "drop_path2")
_ATTN_ATTRS = ("fused_attn", "relative_position_bias_table")


@functools.lru_cache(maxsize=None)
def _timm_signature_problems() -> tuple:
    """What is missing from timm's BEiT ``forward`` signatures (the classes are fixed per process:
    inspected once, not once per block)."""
    return tuple(f"{cls.__qualname__}.forward takes no shared_rel_pos_bias" for cls in (BeitBlock, BeitAttention)
                 if "shared_rel_pos_bias" not in inspect.signature(cls.forward).parameters)


def check_timm_beit(block: nn.Module) -> None:
    """Raise unless ``block`` is timm's BEiT block as :class:`FDBlock` / :class:`FDAttention`
    were written for: the classes themselves (not a subclass that may override ``forward``),
    the attributes they read, and ``forward(x, shared_rel_pos_bias=None)``."""
    import timm

    problems = []
    if type(block) not in (BeitBlock, FDBlock):
        problems.append(f"the block is {type(block).__qualname__}, not timm.models.beit.Block")
    attn = getattr(block, "attn", None)
    if attn is not None and type(attn) not in (BeitAttention, FDAttention):
        problems.append(f"its attention is {type(attn).__qualname__}, not timm.models.beit.Attention")
    problems += [f"no block.{a}" for a in _BLOCK_ATTRS if not hasattr(block, a)]
    problems += [f"no attn.{a}" for a in _ATTN_ATTRS if attn is not None and not hasattr(attn, a)]
    problems += _timm_signature_problems()
    if problems:
        raise RuntimeError(f"fdistill.speed: timm {timm.__version__}'s BEiT is not what the CPU speed paths were "
                           f"written for ({'; '.join(problems)}); run with FDISTILL_SPEED_PATHS=0 and report it")


def apply_student_speed_paths(model: nn.Module) -> int:
    """Give ``model``'s BEiT blocks (the FD student's) the CPU paths: the same parameters and
    values, :class:`FDBlock` and :class:`FDAttention` as their classes. Returns the number of
    blocks changed (0 with the switch off)."""
    if not enabled():
        return 0
    blocks = list(getattr(model, "blocks", []))
    for blk in blocks:
        check_timm_beit(blk)
    for blk in blocks:
        blk.__class__ = FDBlock
        blk.attn.__class__ = FDAttention
    return len(blocks)


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_DONE = False


def tune_cpu_allocator(mmap_threshold: int = 32 * 1024 * 1024, trim_threshold: int = 1 << 30) -> bool:
    """Keep freed tensor memory in the process (glibc ``mallopt``): blocks up to
    ``mmap_threshold`` come from the heap (32 MB is glibc's maximum), and up to ``trim_threshold``
    of free heap is kept instead of returned to the OS. Linux/glibc only; a no-op elsewhere or
    with the switch off. Returns True when applied. Idempotent.

    In a virtual machine page faults are expensive: glibc's defaults serve large blocks with
    ``mmap`` and return freed memory to the OS, so a step that allocates and frees activations of
    tens of MB page-faults through every step (measured: benchmarks/RESULTS.md). jemalloc or
    tcmalloc through ``LD_PRELOAD`` do the same; this needs no extra library."""
    global _DONE
    if _DONE:
        return True
    if not enabled() or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
        ok = libc.mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)) == 1 and ok
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    _DONE = ok
    log.debug("glibc malloc tuned for tensor workloads: %s", ok)
    return ok


def fused_skip_supported(optimizer: torch.optim.Optimizer) -> bool:
    """True when the switch is on and ``optimizer.step()`` honours a device-side ``found_inf``
    flag (torch's fused Adam/AdamW mark this with the private ``_step_supports_amp_scaling``;
    that they skip on it is checked in tests/test_engine_optim.py)."""
    return enabled() and bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def fused_step(optimizer: torch.optim.Optimizer, ok: torch.Tensor) -> None:
    """``optimizer.step()``, skipped on the device when ``ok`` (a 0-dim bool tensor) is False,
    without a host sync (``found_inf``, as GradScaler sets it; only for
    :func:`fused_skip_supported` optimizers)."""
    optimizer.found_inf = (~ok).float()
    optimizer.grad_scale = None
    optimizer.step()
