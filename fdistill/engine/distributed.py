"""Distributed runs under ``torchrun``: process group, device, DDP wrapping, reductions.

``torchrun`` (single node: ``--standalone --nproc_per_node=N``; several nodes: ``--nnodes`` with
a rendezvous endpoint) sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``; a plain ``python`` /
``fdistill`` call is a world of one and needs no process group. NCCL carries the gradients on
GPUs, gloo on CPU. Small control messages (the pre-emption flag, RNG states at checkpoint
time) go over a gloo group so that they never wait on the GPU streams.

Only the trainable branch (student + projector) is wrapped in DDP; the frozen teacher runs
locally on every rank and is never synchronised.
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

log = logging.getLogger(__name__)


@dataclass
class DistEnv:
    """Where this process runs: ``rank`` of ``world_size``, on ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None
    control_group: Any = None  # gloo group for CPU-side messages (None = the default group)
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else default


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistEnv:
    """Join the ``torchrun`` process group if there is one, and pick this process's device.

    ``device``: ``auto`` (the local GPU when CUDA is available, else CPU), ``cuda`` or ``cpu``."""
    world = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    from ..device import resolve_device

    if resolve_device(device).type == "cuda":  # this process's GPU: the local rank's
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    env = DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=dev)
    if world > 1:
        env.backend = "nccl" if dev.type == "cuda" else "gloo"
        if not dist.is_initialized():
            kw = dict(device_id=dev) if dev.type == "cuda" else {}
            dist.init_process_group(backend=env.backend, timeout=datetime.timedelta(seconds=timeout_s), **kw)
            env.owns_group = True
        env.control_group = dist.new_group(backend="gloo") if env.backend != "gloo" else None
    return env


def shutdown(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(module: nn.Module, env: DistEnv) -> nn.Module:
    """DDP-wrap the trainable branch on a multi-process run (identity on one process).

    ``broadcast_buffers=False``: the student has no running statistics to sync (as in the
    official code); ``gradient_as_bucket_view`` saves a gradient-sized copy."""
    if not env.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [env.device.index] if env.device.type == "cuda" else None
    return DDP(module, device_ids=ids, broadcast_buffers=False, gradient_as_bucket_view=True)


def all_reduce_sum_(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """In-place sum over ranks (no-op on one process)."""
    if env.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(flag: bool, env: DistEnv) -> bool:
    """True if ``flag`` is true on any rank (a CPU-side gloo message: no GPU sync)."""
    if not env.distributed:
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=env.control_group)
    return bool(t.item())


def any_ranks(flags: List[bool], env: DistEnv) -> List[bool]:
    """Several :func:`any_rank` answers in one message (one all-reduce of a small CPU tensor)."""
    if not env.distributed:
        return [bool(f) for f in flags]
    t = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=env.control_group)
    return [bool(v) for v in t.tolist()]


def gather_objects(obj: Any, env: DistEnv) -> List[Any]:
    """Every rank's ``obj`` (a list in rank order), on every rank."""
    if not env.distributed:
        return [obj]
    out: List[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj, group=env.control_group)
    return out


def broadcast_object(obj: Any, env: DistEnv, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=env.control_group)
    return box[0]


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier(group=env.control_group)


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside DDP / torch.compile wrappers."""
    while True:
        if hasattr(module, "module") and isinstance(module.module, nn.Module):
            module = module.module
        elif hasattr(module, "_orig_mod"):
            module = module._orig_mod
        else:
            return module
