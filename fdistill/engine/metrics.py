"""Training metrics without host syncs in the step, and where they are written.

:class:`StepMetrics` accumulates losses, gradient norms and non-finite counts in device
tensors (no ``.item()`` per step); :meth:`StepMetrics.collect` reduces them over ranks and
brings them to the host once per log interval. :class:`RunLog` (rank 0 only) writes one JSON
object per interval to ``metrics.jsonl``, drives the tqdm bar (loss, lr, img/s, ETA) and,
optionally, TensorBoard.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from .distributed import DistEnv, all_reduce_sum_
from .errors import RunError

log = logging.getLogger(__name__)

# rank-local sums, summed over ranks at collect time
_LOCAL = ("loss", "loss_prefix", "loss_patch", "mask_fraction", "finite_micro", "micro")


class StepMetrics:
    """Device-side running sums between two log points."""

    def __init__(self, device: torch.device, parts: Tuple[str, ...] = ("loss_prefix", "loss_patch"),
                 extra: Tuple[str, ...] = ()):
        self.device = device
        self.parts = tuple(parts)  # which loss parts the records report (FD: [CLS] and patch terms)
        self.extra = tuple(extra)  # further 0-dim outputs averaged like the loss (e.g. each teacher's loss)
        self.local = torch.zeros(len(_LOCAL) + len(self.extra), device=device, dtype=torch.float64)
        self.grad_norm = torch.zeros((), device=device, dtype=torch.float64)  # same on all ranks
        self.steps = 0  # host counters (no sync needed)
        self.images = 0
        self.skipped = 0
        self.nonfinite = torch.zeros((), device=device, dtype=torch.int64)  # skipped steps since last collect
        self.streak = torch.zeros((), device=device, dtype=torch.int64)  # consecutive skipped steps (kept)
        self.t0 = time.perf_counter()

    def add_micro(self, out: Dict[str, torch.Tensor]) -> None:
        """One micro-batch's loss parts (0-dim tensors); non-finite ones are left out of the means."""
        loss = out["loss"].detach()
        ok = torch.isfinite(loss)
        vals = torch.stack([loss.float(), out.get("loss_prefix", loss).detach().float(),
                            out.get("loss_patch", loss).detach().float(),
                            out.get("mask_fraction", torch.zeros((), device=loss.device)).float()]).double()
        vals = torch.where(ok, vals, torch.zeros_like(vals))
        extra = [torch.where(ok, out[k].detach().double(), torch.zeros((), device=loss.device, dtype=torch.float64))
                 for k in self.extra]
        self.local += torch.cat([vals, ok.double().view(1), vals.new_ones(1), *[e.view(1) for e in extra]])

    def add_step(self, grad_norm: torch.Tensor, ok: torch.Tensor, images: int, skipped: int = 0) -> None:
        """One optimizer step: its global gradient norm and whether it was applied."""
        self.grad_norm += torch.where(ok, grad_norm.detach().double(), torch.zeros((), device=self.device,
                                                                                   dtype=torch.float64))
        bad = (~ok).to(torch.int64)
        self.nonfinite += bad
        self.streak.add_(bad).mul_(bad)  # +1 on a skipped step, back to 0 on an applied one
        self.steps += 1
        self.images += images
        self.skipped += int(skipped)

    def collect(self, env: DistEnv) -> Dict[str, float]:
        """Reduce over ranks, sync once, reset the interval sums; returns the interval's means."""
        local = all_reduce_sum_(self.local.clone(), env)
        skipped = all_reduce_sum_(torch.tensor([float(self.skipped)], device=self.device, dtype=torch.float64), env)
        host = torch.cat([local, self.grad_norm.view(1), self.nonfinite.double().view(1),
                          self.streak.double().view(1), skipped]).tolist()  # the one host sync
        keys = _LOCAL + self.extra
        n = dict(zip(keys, host[:len(keys)]))
        grad_norm, nonfinite, streak, skipped_all = host[len(keys):]
        now = time.perf_counter()
        dt = max(now - self.t0, 1e-9)
        good = max(n["finite_micro"], 1.0)
        applied = self.steps - int(nonfinite)
        out = {
            "loss": n["loss"] / good if n["finite_micro"] else math.nan,
            **{k: n[k] / good if n["finite_micro"] else math.nan for k in self.parts + self.extra},
            "grad_norm": grad_norm / applied if applied else math.nan,
            "nonfinite": int(nonfinite),
            "nonfinite_streak": int(streak),
            "skipped_images": int(skipped_all),
            "images_per_s": self.images * env.world_size / dt,
            "step_time_s": dt / max(self.steps, 1),
        }
        if n["mask_fraction"]:
            out["mask_fraction"] = n["mask_fraction"] / good
        self.local.zero_()
        self.grad_norm.zero_()
        self.nonfinite.zero_()
        self.steps = self.images = self.skipped = 0
        self.t0 = now
        return out

    def current_streak(self) -> int:
        """Consecutive skipped steps so far (a host sync: call at log / checkpoint time only)."""
        return int(self.streak.item())


class NonFiniteGuard:
    """The one non-finite policy of every training loop: :class:`StepMetrics` counts the skipped
    steps; ``limit`` of them in a row stop the run with an error naming the last good checkpoint.

    The streak is read (a host sync) exactly when it could first reach the limit: ``limit`` steps
    after a check that found none, ``limit - c`` after one that found a streak of ``c`` -- not
    every step, and not only at the next log interval (which stopped a few steps late)."""

    def __init__(self, metrics: StepMetrics, limit: int, *, option: str, start_step: int = 0):
        self.metrics, self.limit, self.option = metrics, int(limit), option
        self.check_at = start_step + self.limit

    def check(self, step: int, last_checkpoint) -> int:
        """Raise if the current streak reached the limit; returns the streak."""
        streak = self.metrics.current_streak()
        if streak >= self.limit:
            raise RunError(
                f"{streak} optimizer steps in a row had a non-finite loss or gradient ({self.option}="
                f"{self.limit}); stopped at step {step}. The last good checkpoint is "
                f"{last_checkpoint or 'none'}; lower the learning rate, use precision=fp32/bf16, or check the data.")
        return streak

    def after_step(self, step: int, last_checkpoint) -> None:
        """Call after every optimizer step (cheap: checks only when a streak could reach the limit)."""
        if step >= self.check_at:
            self.check_at = step + self.limit - self.check(step, last_checkpoint)


class RunLog:
    """Rank 0's outputs: ``metrics.jsonl``, the progress bar, TensorBoard, console lines.

    Every method is a no-op on other ranks (``enabled=False``); ``run_dir=None`` writes no file
    (the progress bar and console lines only: a task with no run folder, e.g. a probe sweep)."""

    def __init__(self, run_dir: Optional[Path], *, enabled: bool, total_steps: int, start_step: int,
                 tensorboard: bool = False, desc: str = "distill", progress: bool = True):
        self.enabled = enabled
        self.path = None if run_dir is None else Path(run_dir) / "metrics.jsonl"
        self.bar = None
        self.tb = None
        self.file = None
        if not enabled:
            return
        if self.path is not None:
            self._truncate_after(start_step)
            self.file = open(self.path, "a", buffering=1)
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, unit="step", dynamic_ncols=True,
                        smoothing=0.05, mininterval=1.0) if progress else None
        if tensorboard and run_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.warning("train.tensorboard=true but tensorboard is not installed (pip install 'fdistill[tensorboard]')")
            else:
                self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=start_step or None)

    def _truncate_after(self, step: int) -> None:
        """A resumed run rewrites the records its checkpoint does not cover (logged after it)."""
        if not self.path.is_file():
            return
        lines = self.path.read_text().splitlines()
        keep = []
        for line in lines:
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
        if len(keep) != len(lines):
            from ..io import atomic_write_text

            atomic_write_text(self.path, "".join(line + "\n" for line in keep))

    def set_description(self, text: str) -> None:
        """The bar's label (fine-tuning: ``finetune <epoch>/<epochs>``)."""
        if self.bar is not None:
            self.bar.set_description(text)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def write(self, record: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.file is not None:
            self.file.write(json.dumps(record, allow_nan=True) + "\n")
        if self.bar is not None:
            # each teacher's loss of a multi-teacher run too (its name after "loss_")
            teachers = {k[5:]: f"{v:.3f}" for k, v in record.items()
                        if k.startswith("loss_") and k not in ("loss_prefix", "loss_patch") and isinstance(v, float)}
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", **teachers, lr=f"{record['lr']:.2e}",
                                 img_s=f"{record['images_per_s']:.1f}", refresh=False)
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step",):
                    self.tb.add_scalar(f"train/{k}", v, record["step"])

    def message(self, text: str) -> None:
        """A line on the console that does not break the progress bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.file is not None:
            self.file.close()
