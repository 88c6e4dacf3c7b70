"""Where a run continues from: the one resume check of every command (:class:`~fdistill.engine.trainer.Trainer`).

- :func:`resolve_resume`: ``none`` / ``auto`` / a file / a run folder -> the checkpoint to load
  (rank 0 looks, every rank reads the same file; a folder whose checkpoints all fail to load is
  refused, naming each file's problem, rather than silently started over).
- :func:`check_resume_compatible`: the recipe recorded in the checkpoint against this run's,
  except the keys a resume may change (more epochs, another log interval, ...). Given both world
  sizes, the per-process batch and the accumulation may change too, at the same global batch.
- :func:`resume_position`: (epoch, this rank's start in it, steps of it done): the samples of the
  epoch that *all* ranks had consumed, re-split over this run's ranks
  (:func:`fdistill.data.sampler.split_position`).
- :func:`rederived_seed`: the generators' seed when the saved per-rank states cannot map 1:1.
"""
from __future__ import annotations

import hashlib
import json
import logging
import struct
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

from ..config import diff_configs
from ..config.distill import global_batch_of
from ..data.sampler import split_position
from .checkpoint import find_resume_checkpoint, list_checkpoints, load_checkpoint
from .distributed import DistEnv, broadcast_object
from .errors import RunError

log = logging.getLogger(__name__)

__all__ = ["find_checked_resume", "resolve_resume", "check_resume_compatible", "resume_position", "saved_layout", "saved_position",
           "rederived_seed", "no_loadable_checkpoint"]


def resolve_resume(resume: Optional[str], run_dir: Path, env: DistEnv, *, task: str
                   ) -> Tuple[Optional[Path], Optional[Dict[str, Any]]]:
    """(path, checkpoint dict) to resume ``task``'s run in ``run_dir`` from, or (None, None).

    ``resume``: None (start over; the caller clears the folder), ``"none"`` (start over, refused
    if the folder already holds checkpoints), ``"auto"`` (the newest checkpoint that loads, if
    any), or a checkpoint file / run folder. Every rank reads the checkpoint (its own world size
    need not be the writer's: the state is re-split by the caller)."""
    if resume is None:
        return None, None
    if resume == "none":
        # rank 0 looks; all ranks raise together (a lone raise would leave the others waiting)
        if broadcast_object(bool(env.is_main and list_checkpoints(run_dir)), env):
            raise RunError(f"{run_dir} already holds checkpoints and --resume none was given: use another "
                           "--output folder, or --resume auto to continue that run")
        return None, None
    if resume == "auto":
        path, ckpt = find_resume_checkpoint(run_dir, task=task) if env.is_main else (None, None)
        # checkpoints there but none loads: stop (starting from step 0 would silently drop the run)
        problem = no_loadable_checkpoint(run_dir, task) if env.is_main and path is None else None
        problem = broadcast_object(problem, env)
        if problem:
            raise RunError(problem)
        path = broadcast_object(None if path is None else str(path), env)
        if path is None:
            return None, None
        # rank 0 verified the file; the others read the same one
        return Path(path), ckpt if ckpt is not None else load_checkpoint(path, verify=False, task=task)
    p = Path(resume).expanduser()
    if p.is_dir():
        found, ckpt = find_resume_checkpoint(p, task=task)
        if found is None:
            raise RunError(f"--resume {p}: no valid checkpoint in {p}")
        return found, ckpt
    return p, load_checkpoint(p, task=task)


def no_loadable_checkpoint(run_dir: Path, task: Optional[str] = None) -> Optional[str]:
    """The error for a folder whose checkpoints all fail to load (each named with its problem),
    or ``None`` when it holds none."""
    found = list_checkpoints(run_dir)
    if not found:
        return None
    problems = []
    for p in found:
        try:
            load_checkpoint(p, task=task)
        except RunError as e:
            problems.append(f"  {p.name}: {str(e).splitlines()[0][:200]}")
    return (f"{run_dir} holds {len(found)} checkpoint(s) and none loads:\n" + "\n".join(problems)
            + "\nFix or move them, resume from a file with --resume PATH, or start over with --resume none in "
              "another --output folder")


def find_checked_resume(resume: Optional[str], run_dir: Path, env: DistEnv, *, task: str, recipe: Dict[str, Any],
                        safe_keys: Sequence[str], batch_keys: Sequence[str] = ()
                        ) -> Tuple[Optional[Path], Optional[Dict[str, Any]]]:
    """:func:`resolve_resume`, then :func:`check_resume_compatible` of the checkpoint's recipe
    against ``recipe``: the checkpoint a run continues from, or (None, None) to start over."""
    path, ck = resolve_resume(resume, run_dir, env, task=task)
    if ck is not None:
        check_resume_compatible(ck["config"], recipe, where=str(path), safe_keys=safe_keys, batch_keys=batch_keys,
                                saved_world_size=saved_layout(ck)["world_size"], world_size=env.world_size)
    return path, ck


def check_resume_compatible(saved: Dict[str, Any], current: Dict[str, Any], where: str = "checkpoint", *,
                            saved_world_size: Optional[int] = None, world_size: Optional[int] = None,
                            safe_keys: Sequence[str], batch_keys: Sequence[str] = ()) -> None:
    """Refuse a checkpoint whose recipe differs in keys that change the model, data or
    optimisation (anything not in ``safe_keys``; a distillation run's:
    :data:`fdistill.config.distill.RESUME_SAFE_KEYS`).

    Given both world sizes (the checkpoint's ``progress["world_size"]`` and this run's), the
    keys of the global batch (``batch_keys``: ``data.batch_size``, ``optim.accum_steps``) may
    differ too, as long as the global batch ``data.batch_size x processes x optim.accum_steps``
    is equal; a differing global batch is refused with both named. Without world sizes (or with
    no ``batch_keys``) those keys must match and so must the world size."""
    resplit = saved_world_size is not None and world_size is not None and bool(batch_keys)
    free = tuple(safe_keys) + (tuple(batch_keys) if resplit else ())
    # JSON-normalised (a checkpoint's tuples come back as lists)
    a, b = (json.loads(json.dumps(c, default=str)) for c in (saved, current))
    diffs = [d for d in diff_configs(a, b) if not any(d.split(":")[0] == k or d.startswith(k + ".") for k in free)]
    if diffs:
        raise RunError(f"{where} was written with another recipe (an incompatible config); these keys differ "
                       f"(checkpoint != now): " + "; ".join(diffs)
                       + ". Resume with the original values, or start a new run (--output DIR / --resume none).")
    if saved_world_size is not None and world_size is not None and not batch_keys and saved_world_size != world_size:
        raise RunError(f"{where} was written by {saved_world_size} process(es), this run has {world_size}: this "
                       f"command resumes on the same number of processes only")
    if not resplit:
        return
    g0, b0, w0, a0 = global_batch_of(saved, saved_world_size)
    g1, b1, w1, a1 = global_batch_of(current, world_size)
    if g0 != g1:
        if g0 % w1:
            fix = (f"{g0} images do not split over {w1} processes: use a number of processes that divides {g0} "
                   f"(e.g. {w0})")
        elif (g0 // w1) % a1 == 0:
            fix = f"e.g. data.batch_size={g0 // (w1 * a1)} with optim.accum_steps={a1} on {w1} process(es)"
        else:
            fix = f"data.batch_size x optim.accum_steps = {g0 // w1} on {w1} process(es)"
        raise RunError(
            f"{where} was written with a global batch of {g0} images per optimizer step (data.batch_size={b0} x "
            f"{w0} process(es) x optim.accum_steps={a0}); this run's global batch is {g1} (data.batch_size={b1} x "
            f"{w1} process(es) x optim.accum_steps={a1}). A run resumes, on any number of processes, only at the "
            f"same global batch (the learning rate, the steps per epoch and each step's samples follow from it): "
            f"{fix}; or start a new run (--output DIR / --resume none).")


def rederived_seed(seed: int, step: int, rank: int) -> int:
    """The seed of rank ``rank``'s global generators when a run resumes at ``step`` on another
    number of processes (the saved per-rank states cannot map 1:1): a 63-bit blake2b hash of
    ``(seed, step, rank)``, the same on every machine and for every resume at that step."""
    payload = b"fdistill-resume-rng" + struct.pack("<qqq", int(seed), int(step), int(rank))
    return int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "little") & ((1 << 63) - 1)


def saved_layout(ckpt: Dict[str, Any]) -> Dict[str, int]:
    """World size, per-process batch, accumulation and loader workers of the run that wrote ``ckpt``."""
    prog = ckpt["progress"]
    return {k: int(prog.get(k, default)) for k, default in
            (("world_size", 1), ("batch_size", 0), ("accum_steps", 1), ("num_workers", 0))}


def saved_position(ckpt: Dict[str, Any]) -> Tuple[int, int]:
    """(epoch, samples of it consumed by all ranks together) at the checkpoint."""
    prog = ckpt["progress"]
    if "samples_in_epoch" in prog and "epoch" in prog:
        return int(prog["epoch"]), int(prog["samples_in_epoch"])
    if "step_in_epoch" in prog and "epoch" in prog:
        return int(prog["epoch"]), int(prog["step_in_epoch"]) * int(prog["total_batch"])
    step, spe = int(prog["step"]), int(prog["steps_per_epoch"])
    return step // spe, (step % spe) * int(prog["total_batch"])


def resume_position(ckpt: Dict[str, Any], *, step: int, steps_per_epoch: int, total_batch: int,
                    world_size: int, batch_size: int) -> Tuple[int, int, int]:
    """(epoch, this rank's start position in it, steps of it done) to continue ``ckpt`` from."""
    epoch, consumed = saved_position(ckpt)
    saved_spe = ckpt["progress"].get("steps_per_epoch")
    if saved_spe is not None and int(saved_spe) != steps_per_epoch:
        # the epoch length changed (data.path names other data): no position maps exactly
        log.warning("the checkpoint's epochs held %s steps, this run's %d (other data?): continuing at step %d "
                    "with this run's epochs", saved_spe, steps_per_epoch, step)
        epoch, consumed = divmod(step, steps_per_epoch)
        consumed *= total_batch
    elif consumed % total_batch or not 0 <= consumed // total_batch < steps_per_epoch or epoch > step:
        # epoch and position are saved explicitly (a short shard epoch ends early, so they need not
        # be step // steps_per_epoch), but they must describe a place inside an epoch
        raise RunError(f"checkpoint progress is inconsistent: step {step} with {steps_per_epoch} steps of "
                       f"{total_batch} per epoch, but epoch {epoch} with {consumed} samples consumed")
    try:
        return epoch, split_position(consumed, world_size, batch_size), consumed // total_batch
    except ValueError as e:
        raise RunError(f"cannot re-split the checkpoint's position over {world_size} process(es): {e}") from e
