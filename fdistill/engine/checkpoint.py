"""Run checkpoints: written atomically, loaded safely, the newest valid one found.

A checkpoint is one ``torch.save`` file, ``<run>/checkpoints/ckpt_<step:08d>.pt``, holding only
values that ``torch.load(weights_only=True)`` accepts (tensors, dicts, lists, tuples, numbers,
strings)::

    {"format": "fdistill-checkpoint", "version": 1,
     "config": <resolved config dict>, "student_args": <create_student kwargs>,
     "model": {"student": state_dict, "projector": state_dict},
     "teacher": {"spec", "kwargs", "embed_dim", "num_prefix_tokens"},
     "optimizer": ..., "scheduler": ..., "scaler": ..., "rng": {"per_rank": [...]},
     "progress": {"step", "epoch", "step_in_epoch", "samples_in_epoch", "samples", "world_size",
                  "batch_size", "accum_steps", "num_workers", "total_batch", "steps_per_epoch",
                  "total_steps"}}

``samples_in_epoch`` counts the samples of the current epoch consumed by *all* processes
together (not per process), so a run resumed on another number of processes at the same global
batch (``total_batch``) re-splits it over its ranks; ``rng["per_rank"]`` holds one state per
process of the writing run (re-derived, not mapped, under another world size). ``batch_size``,
``accum_steps`` and ``num_workers`` (the writer's split; older checkpoints lack them and their
``config`` says the same) let the engine check what may change.

Writes go to a temporary file in the same folder, are flushed and fsync'ed, then renamed over
the final name (``os.replace`` is atomic on POSIX) and the folder is fsync'ed: a crash at any
moment leaves either the old set of checkpoints or the new one, never a half-written file
under a checkpoint name. ``torch.load`` does not verify the zip records' CRCs, so
:func:`load_checkpoint` checks them first: a corrupted (not only truncated) file is detected.
"""
from __future__ import annotations

import logging
import os
import re
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..io import atomic_path, fsync_dir
from .errors import RunError

log = logging.getLogger(__name__)

FORMAT = "fdistill-checkpoint"
VERSION = 1
CKPT_DIR = "checkpoints"
_NAME = re.compile(r"^ckpt_(\d{8,})\.pt$")

__all__ = ["FORMAT", "VERSION", "CKPT_DIR", "TASK_KEYS", "checkpoint_task", "checkpoint_path", "list_checkpoints", "save_checkpoint",
           "load_checkpoint", "latest_valid_checkpoint", "find_resume_checkpoint", "prune_checkpoints",
           "clean_partial_writes"]


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    """``<run>/checkpoints`` (a checkpoints folder itself is accepted too)."""
    p = Path(run_dir)
    return p if p.name == CKPT_DIR and not (p / CKPT_DIR).is_dir() else p / CKPT_DIR


def checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"ckpt_{int(step):08d}.pt"


def list_checkpoints(run_dir: str | os.PathLike) -> List[Path]:
    """Checkpoint files of a run, oldest (lowest step) first."""
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name)) and p.is_file()]
    return [p for _, p in sorted(found)]


def save_checkpoint(path: str | os.PathLike, obj: Dict[str, Any]) -> Path:
    """Write ``obj`` to ``path`` atomically (:func:`fdistill.io.atomic_path`: temporary file, fsync,
    rename, fsync folder)."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:  # the one atomic writer (fdistill.io)
            with open(tmp, "wb") as f:
                torch.save(obj, f)
    except BaseException as e:
        if _is_disk_full(e):  # one line instead of torch's traceback; nothing older was touched
            kept = sorted((p for p in path.parent.glob("*.pt") if p != path), key=lambda p: p.stat().st_mtime)
            raise RunError(f"no space left on the device writing {path}: free some space and run the same command "
                           f"again to resume; the last good checkpoint is "
                           f"{kept[-1] if kept else 'none (this was the first)'}") from None
        raise
    return path


def _is_disk_full(e: BaseException) -> bool:
    """ENOSPC / EDQUOT, raised directly or wrapped by torch's zip writer (a RuntimeError whose
    message carries the OS error)."""
    import errno

    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    cause = e.__cause__ or e.__context__
    return (isinstance(e, RuntimeError) and "No space left on device" in str(e)) or (
        cause is not None and cause is not e and _is_disk_full(cause))


#: what each task's checkpoint holds beyond config / model / progress (older files have no
#: ``task`` entry: they are distillation checkpoints)
TASK_KEYS = {"distill": ("student_args",)}


def checkpoint_task(ckpt: Dict[str, Any]) -> str:
    """The command that wrote a checkpoint: ``distill``, ``finetune``, ..."""
    return str(ckpt.get("task", "distill"))


def load_checkpoint(path: str | os.PathLike, *, verify: bool = True, task: Optional[str] = None) -> Dict[str, Any]:
    """Load a run checkpoint with ``weights_only=True`` (no arbitrary code runs).

    Raises :class:`RunError` if the file is missing, truncated, corrupted (zip CRC check when
    ``verify``), not an fdistill checkpoint of a version this code reads, or (``task`` given)
    written by another command."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"checkpoint not found: {path}")
    if verify:
        try:
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise RunError(f"checkpoint {path} is truncated or corrupt ({e})") from e
        except Exception as e:  # zlib errors and the like inside a damaged record
            raise RunError(f"checkpoint {path} is corrupt ({type(e).__name__}: {e})") from e
        if bad is not None:
            raise RunError(f"checkpoint {path} is corrupt (bad CRC in record {bad!r})")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RunError(f"cannot load checkpoint {path} safely: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise RunError(f"{path} is not an fdistill checkpoint (no format={FORMAT!r})")
    if int(ckpt.get("version", -1)) > VERSION:
        raise RunError(f"{path} has checkpoint version {ckpt.get('version')}; this fdistill reads up to {VERSION}")
    if task is not None and checkpoint_task(ckpt) != task:
        raise RunError(f"{path} is a checkpoint of `fdistill {checkpoint_task(ckpt)}`, not of `fdistill {task}`")
    need = ("config", "model", "progress") + TASK_KEYS.get(checkpoint_task(ckpt), ())
    missing = [k for k in need if k not in ckpt]
    if missing:
        raise RunError(f"checkpoint {path} lacks {missing}")
    return ckpt


def find_resume_checkpoint(run_dir: str | os.PathLike, *, task: Optional[str] = None
                           ) -> Tuple[Optional[Path], Optional[Dict[str, Any]]]:
    """The newest checkpoint of ``run_dir`` that loads, and its contents; ``(None, None)`` if none.

    Newer files that fail to load (truncated, corrupt) are reported with ``logging.warning``
    and skipped; they are left in place for inspection."""
    for p in reversed(list_checkpoints(run_dir)):
        try:
            return p, load_checkpoint(p, task=task)
        except RunError as e:
            log.warning("skipping unusable checkpoint: %s", e)
    return None, None


def latest_valid_checkpoint(run_dir: str | os.PathLike, *, task: Optional[str] = None) -> Optional[Path]:
    """Path of the newest checkpoint of ``run_dir`` that loads (see :func:`find_resume_checkpoint`)."""
    return find_resume_checkpoint(run_dir, task=task)[0]


def prune_checkpoints(run_dir: str | os.PathLike, keep_last: int, *,
                      protect: Optional[str | os.PathLike] = None) -> List[Path]:
    """Delete all but the ``keep_last`` newest (highest-step) checkpoints; returns the deleted
    paths. ``protect`` (the file this run has just written) is never deleted, whatever its step."""
    ckpts = list_checkpoints(run_dir)
    keep = Path(protect).resolve() if protect is not None else None
    doomed = [p for p in (ckpts[:-keep_last] if keep_last > 0 else ckpts) if p.resolve() != keep]
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed


def set_aside_later_checkpoints(run_dir: str | os.PathLike, step: int) -> List[Path]:
    """Move checkpoints of steps beyond ``step`` (a branch this resume abandons: after a fallback
    over a corrupt newest file, or an explicit resume from an older one) into
    ``checkpoints/abandoned-after-<step>/``: kept for inspection, never mixed into this run's
    retention or a later ``--resume auto``. Returns their new paths."""
    later = [p for p in list_checkpoints(run_dir) if int(_NAME.match(p.name).group(1)) > int(step)]
    if not later:
        return []
    dest = checkpoint_dir(run_dir) / f"abandoned-after-{int(step):08d}"
    dest.mkdir(exist_ok=True)
    moved = []
    for p in later:
        target = dest / p.name
        os.replace(p, target)
        moved.append(target)
    fsync_dir(checkpoint_dir(run_dir))
    log.warning("resuming at step %d: %d later checkpoint(s) set aside in %s (%s)", step, len(moved), dest,
                ", ".join(p.name for p in moved))
    return moved


def clean_partial_writes(run_dir: str | os.PathLike) -> List[Path]:
    """Remove temporary files left by a crash in the middle of :func:`save_checkpoint`."""
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    stale = [p for p in d.glob(".ckpt_*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale
