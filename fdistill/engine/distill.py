"""A feature-distillation run, top to bottom: ``distill(cfg)``.

    set-up      process group, device, precision, seeds, run folder, resume checkpoint
    build       teacher + student + projector (FeatureDistiller), data, AdamW, schedule
    restore     weights, optimizer, scaler, data position and every RNG of the checkpoint
    loop        for each optimizer step: lr <- schedule(step); accum_steps micro-batches of
                forward (autocast) + backward (DDP syncs on the last); unscale, clip, skip the
                update on a non-finite gradient norm; log every log_interval steps (the only
                host syncs); checkpoint every ckpt_interval steps, on SIGTERM/SIGUSR1, at the end

The run folder (``train.output``) holds ``config.yaml`` (the resolved config),
``metrics.jsonl`` (one JSON object per log interval) and ``checkpoints/ckpt_<step>.pt``.

Exact resume: the data order and views are a pure function of (seed, epoch, index) and the
loader starts at any sample (``fdistill.data``); the checkpoint carries the optimizer, scaler,
every RNG state of every rank, the step and the samples of the epoch consumed by all ranks
together. So a run stopped at step k and resumed ends with the same weights as one that never
stopped (``tests/test_engine_distill.py`` checks with ``torch.equal`` on CPU).

Resume on another number of processes: allowed at the same global batch (``data.batch_size x
processes x optim.accum_steps``; the per-process batch and the accumulation may change). The
epoch position is re-split over the new ranks (the sampler's global positions,
:mod:`fdistill.data.sampler`), so every later step takes the same set of samples, with the same
views, as the original run would have; per-rank generators that cannot map 1:1 are re-derived
from (seed, step, rank) (:func:`rederived_seed`). Tar-shard streams refuse another layout mid-epoch
(:func:`fdistill.data.shards.check_resume_layout`). Checked in ``tests/test_resume_world_size.py``.
"""
from __future__ import annotations


import hashlib
import logging
import math
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from ..config import ConfigError, diff_configs, save_yaml, to_dict
from ..config.distill import (RESUME_GLOBAL_BATCH_KEYS, RESUME_SAFE_KEYS, DistillConfig, global_batch_of, resolve_lr,
                              student_args_of, teachers_description)
from ..data.errors import DataError
from ..data.sampler import split_position
from ..data.shards import WebShardDataset, check_resume_layout
from ..logs import run_log_file
from ..precision import resolve_precision
from .builders import (build_batch_view, build_dataset, build_distiller, build_loader, build_optimizer,
                       build_scheduler)
from .checkpoint import (checkpoint_path, clean_partial_writes, find_resume_checkpoint, list_checkpoints,
                         load_checkpoint, prune_checkpoints, save_checkpoint, set_aside_later_checkpoints,
                         FORMAT, VERSION)
from .distributed import (DistEnv, any_rank, any_ranks, barrier, broadcast_object, gather_objects, init_distributed,
                          shutdown, unwrap, wrap_ddp)
from .errors import RunError
from .lock import hold_run_lock
from .metrics import NonFiniteGuard, RunLog, StepMetrics
from .rng import capture_rng_state, restore_rng_state, seed_everything
from .signals import StopRequest, StopWhileWaiting
from .step import TrainStep

log = logging.getLogger(__name__)

@dataclass
class RunResult:
    """What a finished (or pre-empted) run leaves behind."""

    run_dir: Path
    step: int  # optimizer steps done
    total_steps: int
    checkpoint: Optional[Path]  # the last checkpoint written or resumed from
    loss: float  # mean loss of the last log interval (nan if none)
    stopped_by: Optional[str] = None  # signal name when pre-empted
    elapsed_s: float = 0.0

    @property
    def complete(self) -> bool:
        return self.step >= self.total_steps


def distill(cfg: DistillConfig, *, resume: str = "auto",
            on_step: Optional[Callable[[int], None]] = None,
            on_batch: Optional[Callable[[int, dict], None]] = None) -> RunResult:
    """Run feature distillation as ``cfg`` says (see module docstring).

    Args:
        cfg: the resolved config (``build_config(DistillConfig, path, overrides)``).
        resume: ``auto`` (the newest valid checkpoint in ``cfg.train.output``, if any), ``none``
            (start fresh; refused if the folder already holds checkpoints), or a checkpoint
            file / run folder to continue from.
        on_step: called with the step number after every optimizer step (on every rank).
        on_batch: a debug hook, called on every rank with ``(step, batch)`` for each micro-batch
            the loop takes from the loader, before its forward; ``step`` is the number of the
            optimizer step it belongs to (1-based, as in ``on_step`` and the metrics);
            ``batch["indices"]`` holds its dataset indices (-1 for tar shards).

    Raises:
        RunError: incompatible/unreadable checkpoint, too many non-finite losses in a row.
        ConfigError, DataError, TeacherError: bad config, data or teacher, before any compute.
    """
    env = init_distributed(cfg.train.device)
    threads = torch.get_num_threads()
    if env.device.type == "cpu" and cfg.train.cpu_threads:
        torch.set_num_threads(cfg.train.cpu_threads)
    try:
        # one run per output folder; its run.log gets every library's INFO lines (fdistill.logs)
        with hold_run_lock(cfg.train.output, env), run_log_file(Path(cfg.train.output).expanduser(), env.is_main):
            return _run(cfg, env, resume, on_step, on_batch)
    finally:
        torch.set_num_threads(threads)
        shutdown(env)


# -- set-up helpers ---------------------------------------------------------------------------------
def check_resume_compatible(saved: Dict[str, Any], current: Dict[str, Any], where: str = "checkpoint", *,
                            saved_world_size: Optional[int] = None, world_size: Optional[int] = None) -> None:
    """Refuse a checkpoint whose config differs in keys that change the model, data or
    optimisation (anything not in :data:`RESUME_SAFE_KEYS`).

    Given both world sizes (the checkpoint's ``progress["world_size"]`` and this run's), the
    per-process batch and the accumulation (:data:`RESUME_GLOBAL_BATCH_KEYS`) may differ too, as
    long as the global batch ``data.batch_size x processes x optim.accum_steps`` is equal; a
    differing global batch is refused with both named. Without world sizes those keys must match."""
    resplit = saved_world_size is not None and world_size is not None
    free = RESUME_SAFE_KEYS + (RESUME_GLOBAL_BATCH_KEYS if resplit else ())
    diffs = [d for d in diff_configs(saved, current)
             if not any(d.split(":")[0] == k or d.startswith(k + ".") for k in free)]
    if diffs:
        raise RunError(f"{where} was written by an incompatible config; these keys differ "
                       f"(checkpoint != now): " + "; ".join(diffs)
                       + ". Resume with the original values, or start a new run (--output DIR / --resume none).")
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


def _saved_layout(ckpt: Dict[str, Any]) -> Dict[str, int]:
    """World size, per-process batch, accumulation and workers of the run that wrote ``ckpt``."""
    prog, c = ckpt["progress"], ckpt["config"]
    return {"world_size": int(prog.get("world_size", 1)),
            "batch_size": int(prog.get("batch_size", c["data"]["batch_size"])),
            "accum_steps": int(prog.get("accum_steps", c["optim"]["accum_steps"])),
            "num_workers": int(prog.get("num_workers", c["data"]["num_workers"]))}


def _saved_position(ckpt: Dict[str, Any]) -> Tuple[int, int]:
    """(epoch, samples of it consumed by all ranks together) at the checkpoint."""
    prog = ckpt["progress"]
    if "samples_in_epoch" in prog and "epoch" in prog:
        return int(prog["epoch"]), int(prog["samples_in_epoch"])
    step, spe = int(prog["step"]), int(prog["steps_per_epoch"])
    return step // spe, (step % spe) * int(prog["total_batch"])


def _resume_position(ckpt: Dict[str, Any], *, step: int, steps_per_epoch: int, total_batch: int,
                     world_size: int, batch_size: int) -> Tuple[int, int, int]:
    """(epoch, this rank's start position in it, steps of it done) to continue a checkpoint from:
    the samples of the epoch that *all* ranks had consumed, re-split over this run's ranks (each
    rank starts at ``consumed / world_size``; :mod:`fdistill.data.sampler`)."""
    epoch, consumed = _saved_position(ckpt)
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


def _resolve_resume(resume: str, run_dir: Path, env: DistEnv):
    """(path, checkpoint dict) to resume from, or (None, None). Every rank reads the checkpoint
    (its own world size need not be the writer's: the state is re-split in ``_run``)."""
    if resume == "none":
        # rank 0 looks; all ranks raise together (a lone raise would leave the others waiting)
        if broadcast_object(bool(env.is_main and list_checkpoints(run_dir)), env):
            raise RunError(f"{run_dir} already holds checkpoints and --resume none was given: use another "
                           "--output folder, or --resume auto to continue that run")
        return None, None
    if resume == "auto":
        path, ckpt = find_resume_checkpoint(run_dir, task="distill") if env.is_main else (None, None)
        # checkpoints there but none loads: stop (starting from step 0 would silently drop the run)
        problem = _no_loadable_checkpoint(run_dir) if env.is_main and path is None else None
        problem = broadcast_object(problem, env)
        if problem:
            raise RunError(problem)
        path = broadcast_object(None if path is None else str(path), env)
        if path is None:
            return None, None
        # rank 0 verified the file; the others read the same one
        return Path(path), ckpt if ckpt is not None else load_checkpoint(path, verify=False, task="distill")
    p = Path(resume).expanduser()
    if p.is_dir():
        found, ckpt = find_resume_checkpoint(p, task="distill")
        if found is None:
            raise RunError(f"--resume {p}: no valid checkpoint in {p}")
        return found, ckpt
    return p, load_checkpoint(p, task="distill")


def _no_loadable_checkpoint(run_dir: Path) -> Optional[str]:
    """The error for a folder whose checkpoints all fail to load (each named with its problem),
    or ``None`` when it holds none."""
    found = list_checkpoints(run_dir)
    if not found:
        return None
    problems = []
    for p in found:
        try:
            load_checkpoint(p, task="distill")
        except RunError as e:
            problems.append(f"  {p.name}: {str(e).splitlines()[0][:200]}")
    return (f"{run_dir} holds {len(found)} checkpoint(s) and none loads:\n" + "\n".join(problems)
            + "\nFix or move them, resume from a file with --resume PATH, or start over with --resume none in "
              "another --output folder")


def _teacher_info(cfg: DistillConfig, distiller) -> Dict[str, Any]:
    """What the checkpoint records of the teacher; with ``teachers:``, the first teacher's
    fields at the top (what single-teacher readers use) and every teacher under ``teachers``."""
    if not cfg.teachers:
        return _one_teacher_info(cfg.teacher, distiller.teacher)
    infos = [dict(_one_teacher_info(t, distiller.targets[t.name].teacher), name=t.name, weight=t.weight,
                  norm=t.norm, targets=t.targets, head=t.head, cls_target=distiller.targets[t.name].cls_target)
             for t in cfg.teachers]
    return dict(infos[0], teachers=infos)


def _one_teacher_info(tc, teacher) -> Dict[str, Any]:
    # provenance: which weights the teacher carries and their licence, which the student inherits
    # (plain strings / None, so the checkpoint still loads with weights_only=True)
    prov = dict(getattr(teacher, "provenance", None) or {})
    provenance = {"spec": str(prov.get("spec") or tc.spec),
                  "weights": None if prov.get("weights") is None else str(prov["weights"]),
                  "license": str(prov.get("license") or "unknown"),
                  "license_source": None if prov.get("license_source") is None else str(prov["license_source"])}
    return {"spec": tc.spec, "kwargs": dict(tc.kwargs), "after_norm": tc.after_norm,
            "embed_dim": int(teacher.embed_dim), "num_prefix_tokens": int(teacher.num_prefix_tokens),
            "provenance": provenance}


def _fit_target_norms(cfg: DistillConfig, distiller, dataset, to_images, env: DistEnv) -> None:
    """Before a fresh multi-teacher run: the ``stats`` / ``phi_s`` normalisers are fitted on the
    teachers' tokens of ``multi.stats_images`` training images (their own pass over the data, in
    a fixed order; the statistics go into the checkpoint's heads, so a resume does not redo this)."""
    if not cfg.teachers or not distiller.norms_to_fit():
        return
    from ..data import DataError

    loader = build_loader(cfg, dataset, num_replicas=env.world_size, rank=env.rank,
                          pin_memory=env.device.type == "cuda")
    loader.set_epoch(0, start_index=0)
    per_rank = max(1, -(-cfg.multi.stats_images // env.world_size))
    with torch.autocast(env.device.type, enabled=False):
        seen = distiller.fit_target_norms((to_images(b) for b in loader), max_images=per_rank, env=env)
    if not seen:
        raise DataError("the statistics pass saw no images")
    if env.is_main:
        log.info("target statistics fitted: %s", ", ".join(f"{n} ({k} tokens)" for n, k in seen.items()))


# -- the run -------------------------------------------------------------------------------------
def _run(cfg: DistillConfig, env: DistEnv, resume: str, on_step, on_batch=None) -> RunResult:
    t_start = time.perf_counter()
    tc, oc = cfg.train, cfg.optim
    device = env.device
    precision = resolve_precision(tc.precision, device.type)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls (the fp32 recipe) on tensor cores
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest conv kernels once
    seed_everything(tc.seed)  # the same initial weights on every rank (a random-init teacher included)
    run_dir = Path(tc.output).expanduser()
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        clean_partial_writes(run_dir)
    barrier(env)

    # resume target: checked against the config before anything expensive is built
    ckpt_path, ckpt = _resolve_resume(resume, run_dir, env)
    cfg_dict = to_dict(cfg)
    if ckpt is not None:  # the global batch too: data.batch_size/optim.accum_steps may follow the world size
        saved_layout = _saved_layout(ckpt)
        check_resume_compatible(ckpt["config"], cfg_dict, where=str(ckpt_path),
                                saved_world_size=saved_layout["world_size"], world_size=env.world_size)
    if env.is_main:
        save_yaml(cfg, run_dir / "config.yaml")

    # data: the epoch length fixes the schedule
    dataset = build_dataset(cfg)
    if ckpt is not None and isinstance(dataset, WebShardDataset):  # shard streams: same layout mid-epoch
        try:
            saved_epoch, saved_consumed = _saved_position(ckpt)
            check_resume_layout({k: saved_layout[k] for k in ("world_size", "num_workers", "batch_size")},
                                {"world_size": env.world_size, "num_workers": cfg.data.num_workers,
                                 "batch_size": cfg.data.batch_size},
                                samples_in_epoch=saved_consumed, epoch=saved_epoch)
        except DataError as e:
            raise RunError(f"{ckpt_path}: {e}") from e
    loader = build_loader(cfg, dataset, num_replicas=env.world_size, rank=env.rank,
                          pin_memory=device.type == "cuda")
    to_images = build_batch_view(cfg, device)  # batch -> uint8 (B, 3, H, W) on the device
    micro_per_epoch = loader.batches_per_epoch
    if micro_per_epoch is None:  # a shard stream: its length is declared
        if not cfg.data.samples_per_epoch:
            raise ConfigError("tar-shard data has no known length: set data.samples_per_epoch (images per epoch)")
        micro_per_epoch = cfg.data.samples_per_epoch // env.world_size // cfg.data.batch_size
    steps_per_epoch = micro_per_epoch // oc.accum_steps
    if steps_per_epoch < 1:
        raise ConfigError(f"an epoch holds {micro_per_epoch} batches of {cfg.data.batch_size} per process, fewer "
                          f"than optim.accum_steps={oc.accum_steps}: use more data or smaller batches")
    total_batch = cfg.data.batch_size * env.world_size * oc.accum_steps
    schedule_steps = max(1, int(round(tc.epochs * steps_per_epoch)))
    total_steps = min(schedule_steps, tc.max_steps) if tc.max_steps is not None else schedule_steps

    # model, optimizer, schedule, loss scaler
    distiller = build_distiller(cfg, device=device, precision=precision)
    distiller.train()
    seed_everything(tc.seed + env.rank)  # as the official code: each rank its own drop-path/mask stream
    optimizer = build_optimizer(cfg, distiller.branch, total_batch=total_batch)
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch=steps_per_epoch, total_batch=total_batch)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    step, epoch, step_in_epoch, rank_start = 0, 0, 0, None
    rng_states = None
    rng_seed = None  # set instead of rng_states when the saved per-rank states do not map 1:1
    if ckpt is not None:
        step = _restore(ckpt, distiller, optimizer, scaler, env)
        if env.is_main:  # a later branch (corrupt newest file skipped, or an explicit older resume)
            set_aside_later_checkpoints(run_dir, step)
        epoch, rank_start, step_in_epoch = _resume_position(ckpt, step=step, steps_per_epoch=steps_per_epoch,
                                             total_batch=total_batch, world_size=env.world_size,
                                             batch_size=cfg.data.batch_size)
        rng_states = ckpt.get("rng", {}).get("per_rank")
        if rng_states is not None and len(rng_states) != env.world_size:
            rng_seed = rederived_seed(tc.seed, step, env.rank)
            if env.is_main:
                log.warning("checkpoint has the RNG states of %d process(es), this run has %d: each rank's generators "
                            "are re-seeded from (train.seed, step %d, rank); the data is the same, drop-path/mask "
                            "draws differ from the original run's", len(rng_states), env.world_size, step)
            rng_states = None
    else:
        _fit_target_norms(cfg, distiller, dataset, to_images, env)
    last_ckpt = ckpt_path
    del ckpt

    distiller.branch = wrap_ddp(distiller.branch, env)  # only student + projector; never the teacher
    train_step = TrainStep(distiller, optimizer, precision=precision, clip_grad=oc.clip_grad,
                           accum_steps=oc.accum_steps, compile=tc.compile, scaler=scaler)

    runlog = RunLog(run_dir, enabled=env.is_main, total_steps=total_steps, start_step=step,
                    tensorboard=tc.tensorboard)
    if env.is_main:
        lr0 = resolve_lr(oc, total_batch)[0]
        runlog.message(
            f"fdistill distill: {teachers_description(cfg)} -> {cfg.student.arch} | {env.world_size} process(es) on "
            f"{device.type}, {precision} | global batch {total_batch}, peak lr {lr0:.3g} | {steps_per_epoch} steps/epoch, "
            f"{total_steps} steps" + (f" | resumed from {ckpt_path} at step {step}" if ckpt_path else ""))
    # a multi-teacher run reports each teacher's loss (its [CLS] / patch split is per teacher, not one)
    metrics = StepMetrics(device, parts=() if cfg.teachers else ("loss_prefix", "loss_patch"),
                          extra=tuple(f"loss_{t.name}" for t in cfg.teachers)
                          + (("resolution_px",) if cfg.teachers and cfg.multi.resolution_fraction > 0 else ()))
    record: Dict[str, Any] = {"loss": math.nan}
    stopped_by = None

    def save(at_step: int) -> Path:
        # where the next step starts: explicit state, as a short shard epoch ends before
        # steps_per_epoch (a finished epoch is saved as the start of the next one)
        at_epoch, at_step_in_epoch = (epoch + 1, 0) if step_in_epoch >= steps_per_epoch else (epoch, step_in_epoch)
        rngs = gather_objects(capture_rng_state(), env)
        path = checkpoint_path(run_dir, at_step)
        if env.is_main:
            obj = {
                "format": FORMAT, "version": VERSION, "config": cfg_dict, "student_args": student_args_of(cfg),
                "model": {k: m.state_dict() for k, m in distiller.checkpoint_parts().items()},
                "teacher": _teacher_info(cfg, distiller),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "rng": {"per_rank": rngs},
                "progress": {"step": at_step, "epoch": at_epoch, "step_in_epoch": at_step_in_epoch,
                             # consumed by all ranks together: a resume on another world size re-splits it
                             "samples_in_epoch": at_step_in_epoch * total_batch,
                             "samples": at_step * total_batch, "world_size": env.world_size,
                             "batch_size": cfg.data.batch_size, "accum_steps": oc.accum_steps,
                             "num_workers": cfg.data.num_workers,
                             "total_batch": total_batch, "steps_per_epoch": steps_per_epoch,
                             "total_steps": total_steps},
            }
            save_checkpoint(path, obj)
            prune_checkpoints(run_dir, tc.keep_last, protect=path)  # never what this run just wrote
        barrier(env)
        return path

    # -- the loop ---------------------------------------------------------------------------------
    nonfinite = NonFiniteGuard(metrics, tc.max_nonfinite, option="train.max_nonfinite", start_step=step)
    with StopRequest() as stop:
        while step < total_steps:
            if any_rank(stop.requested, env):  # also between epochs (a signal during an epoch's first batch)
                stopped_by = stop.signame or "a stop request"
                last_ckpt = save(step)
                break
            first = step_in_epoch
            # this rank's position: the epoch's samples all ranks consumed (first x global batch) / ranks;
            # on resume, the checkpoint's count re-split over this run's ranks
            if rank_start is None:
                rank_start = split_position(first * total_batch, env.world_size, cfg.data.batch_size)
            loader.set_epoch(epoch, start_index=rank_start)
            rank_start = None
            batches = iter(loader)
            if rng_states is not None:  # after the iterator exists: nothing may draw in between
                restore_rng_state(rng_states[env.rank])
                rng_states = None
            elif rng_seed is not None:
                seed_everything(rng_seed)
                rng_seed = None
            for _ in range(first, steps_per_epoch):
                if step >= total_steps:
                    break
                try:  # a stop arriving while this blocks on data (a stalled file system) is honoured at once
                    with stop.interruptible():
                        micro_batches = _take(batches, oc.accum_steps)
                    interrupted = False
                except StopWhileWaiting:
                    micro_batches, interrupted = None, True
                # every rank learns whether any was stopped while waiting, or ran out of data: a
                # shard stream short of its declared length (bad samples dropped, uneven shards)
                # ends the epoch for all at once (none waits in allreduce)
                stop_now, exhausted = any_ranks([interrupted, micro_batches is None and not interrupted], env)
                if stop_now:  # nothing of this step was done: the checkpoint is at the current step
                    stopped_by = stop.signame or "a stop request"
                    last_ckpt = save(step)
                    break
                if exhausted:
                    if step_in_epoch == first == 0:
                        raise RunError(f"epoch {epoch} yielded no batch of {cfg.data.batch_size} on some process: the "
                                       f"data holds fewer samples than data.samples_per_epoch="
                                       f"{cfg.data.samples_per_epoch} implies, or fewer than one batch per process "
                                       f"and loader worker; check data.path, data.samples_per_epoch, batch size")
                    if env.is_main:
                        log.warning("epoch %d ended after %d of %d steps (the data is shorter than "
                                    "data.samples_per_epoch=%s implies); the next epoch starts at its beginning",
                                    epoch, step_in_epoch, steps_per_epoch, cfg.data.samples_per_epoch)
                    break
                scheduler.step_update(step)  # lr of this update (host-side arithmetic)
                if on_batch is not None:
                    for b in micro_batches:
                        on_batch(step + 1, b)
                images = [to_images(b) for b in micro_batches]  # (B, 3, H, W) uint8 on the device
                outs, grad_norm, ok = train_step(images)
                for out in outs:
                    metrics.add_micro(out)
                images_n = sum(x.shape[0] for x in images)
                skipped = sum(b.get("skipped", 0) for b in micro_batches)
                step += 1
                step_in_epoch += 1
                metrics.add_step(grad_norm, ok, images_n, skipped)
                nonfinite.after_step(step, last_ckpt)
                runlog.advance()
                if on_step is not None:
                    on_step(step)

                stopping = any_rank(stop.requested, env)
                if step % tc.log_interval == 0 or step == total_steps or stopping:
                    record = {"step": step, "epoch": round(step / steps_per_epoch, 4),
                              "lr": optimizer.param_groups[0]["lr"], "samples": step * total_batch,
                              **metrics.collect(env)}
                    runlog.write(record)
                    if record["nonfinite_streak"] >= tc.max_nonfinite:
                        nonfinite.check(step, last_ckpt)
                if step % tc.ckpt_interval == 0 or step == total_steps or stopping:
                    nonfinite.check(step, last_ckpt)
                    last_ckpt = save(step)
                if stopping:
                    stopped_by = stop.signame or "a stop request"
                    break
            if stopped_by:
                break
            epoch, step_in_epoch = epoch + 1, 0
        if total_steps == 0 and last_ckpt is None:  # train.max_steps=0: the initialised student, untrained
            last_ckpt = save(0)

    elapsed = time.perf_counter() - t_start
    if env.is_main:
        if stopped_by:
            runlog.message(f"stopped by {stopped_by} at step {step}/{total_steps}; checkpoint {last_ckpt}. "
                           f"Run the same command again to resume.")
        runlog.message(f"done: step {step}/{total_steps}, loss {record.get('loss', math.nan):.4f}, "
                       f"{elapsed / 60:.1f} min, checkpoint {last_ckpt}, run folder {run_dir}")
    runlog.close()
    return RunResult(run_dir=run_dir, step=step, total_steps=total_steps, checkpoint=last_ckpt,
                     loss=float(record.get("loss", math.nan)), stopped_by=stopped_by, elapsed_s=elapsed)


def _take(batches, n: int):
    """The next ``n`` batches of an iterator, or None if it ends first."""
    out = []
    for _ in range(n):
        try:
            out.append(next(batches))
        except StopIteration:
            return None
    return out


def _restore(ckpt: Dict[str, Any], distiller, optimizer, scaler, env: DistEnv) -> int:
    """Load a checkpoint's state into freshly built objects; returns the step to continue from.
    (The global batch was checked by :func:`check_resume_compatible`; the weights, AdamW state and
    scaler do not depend on the number of processes.)"""
    from ..weights import WeightsError, load_into

    prog = ckpt["progress"]
    try:
        for part, module in distiller.checkpoint_parts().items():
            if part not in ckpt["model"]:
                raise WeightsError(f"the checkpoint has no {part!r} part (it holds {sorted(ckpt['model'])})")
            load_into(unwrap(module), ckpt["model"][part], what=part)
    except WeightsError as e:
        raise RunError(f"checkpoint weights do not fit the model: {e}") from e
    optimizer.load_state_dict(ckpt["optimizer"])
    # the schedule is a function of the step and the *current* config (train.epochs may grow on
    # resume), so the scheduler's saved state is informational and not loaded
    if scaler.is_enabled() and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    return int(prog["step"])
