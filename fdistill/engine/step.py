"""One optimizer step of any task: ``TrainStep(model, optimizer, ...)(micro_batches)``, where
``model(batch)`` returns a dict with the ``"loss"`` (FD's :class:`~fdistill.FeatureDistiller`, or
a task's loss module such as fine-tuning's, :mod:`fdistill.engine.trainer`).

For each micro-batch: the forward (for FD: the teacher's targets and the student's prediction) under autocast
(bf16 by default on GPU; fp16 with a loss scaler on request), backward of ``loss /
accum_steps`` (DDP all-reduces only on the last micro-batch). Then the update: unscale (fp16),
clip the global gradient norm, and skip the update if that norm is not finite.

A skipped step leaves no trace: the forward of a batch norm in training mode updates its running
statistics before anyone knows the gradient is not finite, so the step keeps a copy of those
buffers and puts them back where the step is skipped (``torch.where`` on the same device flag: no
sync). Without this a single NaN batch would poison a BatchNorm head's statistics for good.

No host sync: the skip is a device-side flag that fused AdamW reads (``optimizer.found_inf``,
the mechanism GradScaler uses; :func:`fdistill.speed.fused_step`), so the CPU can queue the next
step while the GPU works. Optimizers without that kernel (``optim.fused: false``), or the speed
paths switched off (``FDISTILL_SPEED_PATHS=0``), pay one ``bool(ok)`` sync per step.

``torch.compile`` (``compile=True``) wraps the distiller's forward (teacher, student,
projector, loss in one graph); if compiling or the compiled graph fails on the first step, the
step is redone in eager mode with a warning.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..speed import fused_skip_supported, fused_step

log = logging.getLogger(__name__)

from ..precision import AUTOCAST_DTYPES, PRECISIONS, autocast  # noqa: E402,F401  (the one autocast; re-exported)


class TrainStep:
    """A callable training step over a module that returns its loss (for FD, a
    :class:`~fdistill.FeatureDistiller`, its ``branch`` possibly DDP-wrapped).

    Args:
        distiller: the module: ``distiller(batch)`` -> ``{"loss": ..., ...}`` (for FD: teacher +
            student + projector + loss).
        optimizer: over its trainable parameters (see :func:`create_adamw`).
        precision: ``fp32`` | ``bf16`` (autocast) | ``fp16`` (autocast + loss scaler).
        clip_grad: max global gradient norm; 0 = no clipping (the norm is still measured).
        accum_steps: micro-batches per update (the caller passes that many).
        compile: ``torch.compile`` the forward, falling back to eager if it fails.
        scaler: a GradScaler to use for fp16 (one is made if None).
        params: the parameters whose gradient norm is clipped, in this order (default: the
            optimizer's groups'; the order fixes the float summation of the norm).
        sync_module: the DDP-wrapped part whose all-reduce waits for the last micro-batch
            (default: ``distiller.branch`` if it has one, else ``distiller``).
    """

    def __init__(self, distiller: torch.nn.Module, optimizer: torch.optim.Optimizer, *, precision: str = "fp32",
                 clip_grad: float = 0.0, accum_steps: int = 1, compile: bool = False,
                 scaler: Optional[torch.amp.GradScaler] = None, params: Optional[Sequence[torch.Tensor]] = None,
                 sync_module: Optional[torch.nn.Module] = None):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.distiller, self.optimizer = distiller, optimizer
        self.precision, self.clip_grad, self.accum_steps = precision, float(clip_grad), int(accum_steps)
        p0 = next(iter(optimizer.param_groups[0]["params"]))
        self.device = p0.device
        self.scaler = scaler if scaler is not None else torch.amp.GradScaler(self.device.type,
                                                                           enabled=precision == "fp16")
        self.params: List[torch.Tensor] = (list(params) if params is not None else
                                           [p for g in optimizer.param_groups for p in g["params"]])
        self.sync_module = sync_module if sync_module is not None else getattr(distiller, "branch", distiller)
        self.device_skip = fused_skip_supported(optimizer) and not self.scaler.is_enabled()
        self.forward = torch.compile(distiller) if compile else distiller
        self._compile_checked = not compile
        #: the batch norms whose running statistics a forward in training mode changes
        self._norms = [m for m in distiller.modules()
                       if isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.track_running_stats]

    # -- pieces ---------------------------------------------------------------------------------
    def autocast(self):
        return autocast(self.device, self.precision)

    def _forward_backward(self, images) -> Dict[str, torch.Tensor]:
        with self.autocast():
            out = self.forward(images)
        loss = out["loss"] / self.accum_steps if self.accum_steps > 1 else out["loss"]
        if self.scaler.is_enabled():
            self.scaler.scale(loss).backward()
        else:
            loss.backward()
        return out

    def micro_step(self, images, last: bool = True) -> Dict[str, torch.Tensor]:
        """Forward + backward of one micro-batch (for FD ``images``: (B, 3, H, W) uint8 or [0, 1];
        for other tasks whatever their module takes)."""
        branch = self.sync_module
        sync = last or not hasattr(branch, "no_sync")
        with contextlib.nullcontext() if sync else branch.no_sync():
            if self._compile_checked:
                return self._forward_backward(images)
            try:
                out = self._forward_backward(images)
            except Exception as e:  # noqa: BLE001 - any compile failure: fall back to eager
                msg = str(e).splitlines()[0][:200] if str(e) else ""
                log.warning("torch.compile failed (%s: %s); continuing in eager mode", type(e).__name__, msg)
                self.optimizer.zero_grad(set_to_none=True)
                self.forward = self.distiller
                out = self._forward_backward(images)
            self._compile_checked = True
            return out

    def update(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Unscale, clip, step (skipped on a non-finite gradient norm), zero the gradients.
        Returns (global gradient norm, applied) as device tensors."""
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        grad_norm = self._clip_and_norm()  # the same on every rank: gradients are all-reduced
        ok = torch.isfinite(grad_norm)
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)  # skips (and lowers the scale) on inf/nan by itself
            self.scaler.update()
        elif self.device_skip:  # fused AdamW skips on a device flag: no host sync (fdistill.speed)
            fused_step(self.optimizer, ok)
        elif bool(ok):  # other optimizers cannot skip on a device flag: one host sync
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, ok

    def _clip_and_norm(self) -> torch.Tensor:
        if self.clip_grad > 0:
            return torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad)
        grads = [p.grad for p in self.params if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)

    # -- the step -------------------------------------------------------------------------------
    def __call__(self, micro_batches: Sequence):
        """Run one optimizer step over ``accum_steps`` micro-batches of images (on the device).

        Returns (list of each micro-batch's loss parts, gradient norm, applied flag)."""
        if len(micro_batches) != self.accum_steps:
            raise ValueError(f"expected {self.accum_steps} micro-batches, got {len(micro_batches)}")
        stats = self._running_stats()
        outs = [self.micro_step(x, last=i == len(micro_batches) - 1) for i, x in enumerate(micro_batches)]
        grad_norm, ok = self.update()
        self._restore_if_skipped(stats, ok)
        return outs, grad_norm, ok

    def _running_stats(self) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """(buffer, copy) of every running statistic this step's forward will update."""
        return [(b, b.clone()) for m in self._norms if m.training
                for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]

    @staticmethod
    def _restore_if_skipped(stats: List[Tuple[torch.Tensor, torch.Tensor]], ok: torch.Tensor) -> None:
        """Put the running statistics back where the update was skipped (``ok`` False), on the device."""
        for buf, old in stats:
            buf.copy_(torch.where(ok.to(buf.device), buf, old))
