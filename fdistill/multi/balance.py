"""Balancing the losses of several teachers in multi-teacher distillation.

A student learns from ``T`` frozen teachers at once; teacher ``t`` gives a per-sample loss
``l[b, t]`` (a differentiable ``(B, T)`` tensor). Three ways to combine them:

1. **Teacher dropping** (UNIC: "Universal Classification Models via Multi-teacher
   Distillation", Sariyildiz et al., ECCV 2024, arXiv 2408.05088; official code
   ``naver/unic``). The rule below is the one in the official code, read from
   ``modeling/teacher_dropping.py`` (commit 698a3829), functions
   ``_get_teacher_coefficients_by_loss`` (lines 40-66) and ``aggregate_losses``
   (lines 5-37); ``drop_prob`` is ``--t_drop_prob`` in ``main_unic.py`` (default 0.5)::

       per sample b:  t* = argmax_t l[b, t]               (detached; first index on ties)
                      c[b, t*] = 1                          (the worst-fit teacher is kept)
                      c[b, t]  = 0 w.p. drop_prob, else 1   (every other t, independently)
       loss = sum_{b,t} c[b, t] * l[b, t] / sum_{b,t} c[b, t]      (coefficients detached)

   The drop probability is a *constant* for every non-maximal teacher; it does not depend
   on how much smaller that teacher's loss is. (A loss-proportional rule such as
   ``p_t = 1 - l_t / max l`` is not what the code does.) With all-equal losses, teacher 0
   is the argmax and is kept; the others are dropped with ``drop_prob``.
   UNIC has no per-teacher weights; :func:`apply_teacher_dropping` takes static weights
   ``w`` and uses ``c[b, t] * w[t]`` in the numerator, keeping the count of kept entries as
   the denominator, so ``w = 1`` is exactly UNIC's ``aggregate_losses``.

2. **Normalisation by each teacher's initial loss** (:class:`InitialLossNormalizer`): divide
   teacher ``t``'s loss by its mean over the first ``warmup_steps`` steps, so teachers whose
   losses live on different scales all start near 1. This is a generic heuristic, not part
   of UNIC (whose code balances teachers only by dropping).

3. **Static weights** (:func:`weighted_sum`, validated by :func:`check_weights`).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..errors import ConfigError

__all__ = [
    "drop_probabilities",
    "teacher_drop_mask",
    "apply_teacher_dropping",
    "InitialLossNormalizer",
    "weighted_sum",
    "check_weights",
    "UNIC_DROP_PROB",
]

UNIC_DROP_PROB = 0.5  # main_unic.py: --t_drop_prob default

WeightsLike = Union[Tensor, Sequence[float]]


# --------------------------------------------------------------------------- validation
def _check_losses(losses: Tensor, name: str = "losses") -> None:
    if not isinstance(losses, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, T), got {type(losses).__name__}")
    if losses.dim() != 2 or losses.shape[0] == 0 or losses.shape[1] == 0:
        raise ValueError(f"{name} must have shape (B, T) with B, T >= 1, got {tuple(losses.shape)}")
    if not losses.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {losses.dtype}")
    if not bool(torch.isfinite(losses.detach()).all()):
        raise ValueError(f"{name} contains non-finite values (NaN or inf); cannot pick the max-loss teacher")


def _check_drop_prob(drop_prob: float) -> float:
    if isinstance(drop_prob, bool) or not isinstance(drop_prob, (int, float)):
        raise ConfigError(f"drop_prob must be a number in [0, 1], got {drop_prob!r}")
    drop_prob = float(drop_prob)
    if not (0.0 <= drop_prob <= 1.0):  # also rejects NaN
        raise ConfigError(f"drop_prob must be in [0, 1], got {drop_prob}")
    return drop_prob


def check_weights(weights: WeightsLike, num_teachers: Optional[int] = None) -> Tensor:
    """Validate static per-teacher weights and return them as a 1-D float tensor (T,).

    Raises :class:`~fdistill.errors.ConfigError` (a ``ValueError``) for a non-1-D or empty
    input, a length other than ``num_teachers`` (when given), and negative, non-finite or
    all-zero weights.
    """
    try:
        w = torch.as_tensor(weights).detach()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"weights must be a 1-D sequence of numbers, got {weights!r}") from exc
    if w.dim() != 1 or w.numel() == 0:
        raise ConfigError(f"weights must be a non-empty 1-D sequence (T,), got shape {tuple(w.shape)}")
    if w.dtype == torch.bool or w.is_complex():
        raise ConfigError(f"weights must be real numbers, got dtype {w.dtype}")
    w = w.to(torch.float64) if not w.is_floating_point() else w
    if num_teachers is not None and w.numel() != num_teachers:
        raise ConfigError(f"got {w.numel()} weights for {num_teachers} teachers")
    if not bool(torch.isfinite(w).all()):
        raise ConfigError(f"weights must be finite, got {w.tolist()}")
    if bool((w < 0).any()):
        raise ConfigError(f"weights must be >= 0, got {w.tolist()}")
    if not bool((w > 0).any()):
        raise ConfigError(f"weights must not all be zero, got {w.tolist()}")
    return w


# --------------------------------------------------------------------------- teacher dropping
def drop_probabilities(losses: Tensor, drop_prob: float = UNIC_DROP_PROB) -> Tensor:
    """UNIC's per-entry drop probability, a pure function of the detached losses.

    ``losses``: (B, T). Returns (B, T), same dtype/device: 0 at each sample's max-loss teacher
    (first index on ties, as ``torch.argmax``), ``drop_prob`` everywhere else.
    """
    _check_losses(losses)
    drop_prob = _check_drop_prob(drop_prob)
    l = losses.detach()  # (B, T)
    probs = torch.full_like(l, drop_prob)  # (B, T)
    top = l.argmax(dim=1, keepdim=True)  # (B, 1)
    probs.scatter_(1, top, 0.0)
    return probs


def teacher_drop_mask(
    losses: Tensor, generator: Optional[torch.Generator] = None, *, drop_prob: float = UNIC_DROP_PROB
) -> Tensor:
    """Draw UNIC's keep-mask (B, T) bool: True = the teacher's loss counts for that sample.

    Entry (b, t) is dropped when ``u < p[b, t]`` with ``u ~ U[0, 1)`` (as UNIC's
    ``random.random() < drop_prob``) and ``p = drop_probabilities(losses, drop_prob)``;
    ``p = 0`` at the max-loss teacher, so it is always kept. ``generator`` (a
    ``torch.Generator`` on ``losses.device``) makes the draws reproducible; ``None`` uses the
    global RNG. No gradient flows through the mask.
    """
    probs = drop_probabilities(losses, drop_prob).to(torch.float32)  # (B, T)
    u = torch.rand(probs.shape, generator=generator, device=probs.device, dtype=torch.float32)  # (B, T)
    return u >= probs  # (B, T) bool keep-mask


def apply_teacher_dropping(
    losses: Tensor,
    weights: WeightsLike,
    *,
    drop_prob: float = UNIC_DROP_PROB,
    generator: Optional[torch.Generator] = None,
) -> Tuple[Tensor, Tensor]:
    """UNIC's ``aggregate_losses`` with optional static weights.

    ``losses``: (B, T), differentiable; ``weights``: (T,). Returns ``(total, keep)``::

        total = sum_{b,t} keep[b,t] * w[t] * l[b,t] / sum_{b,t} keep[b,t]     # scalar

    The coefficients ``keep * w / keep.sum()`` are constants (detached, as in UNIC), so the
    gradient w.r.t. ``l[b, t]`` is ``w[t] / keep.sum()`` on kept entries and 0 on dropped ones.
    ``keep`` is the (B, T) bool mask from :func:`teacher_drop_mask`.
    """
    _check_losses(losses)
    w = check_weights(weights, num_teachers=losses.shape[1]).to(device=losses.device, dtype=losses.dtype)  # (T,)
    keep = teacher_drop_mask(losses, generator, drop_prob=drop_prob)  # (B, T)
    keep_f = keep.to(losses.dtype)  # (B, T)
    coeffs = keep_f * w / keep_f.sum()  # (B, T); keep.sum() >= B since the max is always kept
    total = (coeffs.detach() * losses).sum()  # ()
    return total, keep


# --------------------------------------------------------------------------- initial-loss normalisation
class InitialLossNormalizer(nn.Module):
    """Divide each teacher's loss by its mean loss over the first ``warmup_steps`` updates.

    Buffers (persistent, in ``state_dict()``, so kill + resume is bit-exact):

    * ``initial`` (T,) float64: running mean of the per-teacher loss over the updates seen so
      far; all ones before the first update, fixed once ``count == warmup_steps``.
    * ``count`` () int64: number of updates recorded (stops at ``warmup_steps``).

    Call :meth:`update` once per optimisation step with the per-teacher batch-mean loss
    (T,) (or the (B, T) per-sample losses, which are batch-averaged), then call the module on
    the losses to normalise. Values are detached. The warm-up mean must be positive and
    finite, or the divisor would be meaningless; :meth:`update` raises otherwise.

    DDP: this module does no communication. Pass losses that are already averaged across
    ranks (e.g. ``torch.distributed.all_reduce(x, op=AVG)``) so every rank records the same
    divisor; with per-rank losses the ranks' divisors would drift apart.
    """

    initial: Tensor
    count: Tensor

    def __init__(self, num_teachers: int, warmup_steps: int = 1) -> None:
        super().__init__()
        if isinstance(num_teachers, bool) or not isinstance(num_teachers, int) or num_teachers < 1:
            raise ConfigError(f"num_teachers must be an int >= 1, got {num_teachers!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ConfigError(f"warmup_steps must be an int >= 1, got {warmup_steps!r}")
        self.num_teachers = num_teachers
        self.warmup_steps = warmup_steps
        self.register_buffer("initial", torch.ones(num_teachers, dtype=torch.float64))  # (T,)
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))  # ()

    @property
    def warm(self) -> bool:
        """True once the divisor is fixed (``warmup_steps`` updates recorded)."""
        return int(self.count) >= self.warmup_steps

    def _check_per_teacher(self, x: Tensor, name: str) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.num_teachers:
            raise ValueError(
                f"{name} must have shape (T,) or (B, T) with T = {self.num_teachers}, got {tuple(x.shape)}"
            )

    @torch.no_grad()
    def update(self, per_teacher_loss: Tensor) -> None:
        """Record one step's per-teacher loss (T,) (or (B, T), batch-averaged); no-op once warm."""
        self._check_per_teacher(per_teacher_loss, "per_teacher_loss")
        if per_teacher_loss.dim() > 2:
            raise ValueError(f"per_teacher_loss must be (T,) or (B, T), got {tuple(per_teacher_loss.shape)}")
        if self.warm:
            return
        x = per_teacher_loss.detach().to(device=self.initial.device, dtype=torch.float64)
        if x.dim() == 2:
            x = x.mean(dim=0)  # (B, T) -> (T,)
        if not bool(torch.isfinite(x).all()) or not bool((x > 0).all()):
            raise ValueError(
                f"per_teacher_loss must be finite and > 0 during warm-up (it becomes the divisor), got {x.tolist()}"
            )
        n = int(self.count)
        # running mean, exact at n = 0 (initial * 0 + x) / 1 == x
        self.initial.copy_((self.initial * n + x) / (n + 1))
        self.count.add_(1)

    def forward(self, per_teacher_loss: Tensor) -> Tensor:
        """``per_teacher_loss / initial`` (broadcast over the last dim T), in the input's dtype."""
        self._check_per_teacher(per_teacher_loss, "per_teacher_loss")
        if not per_teacher_loss.is_floating_point():
            raise ValueError(f"per_teacher_loss must be a floating-point tensor, got dtype {per_teacher_loss.dtype}")
        divisor = self.initial.to(device=per_teacher_loss.device, dtype=per_teacher_loss.dtype)  # (T,)
        return per_teacher_loss / divisor

    def extra_repr(self) -> str:
        return f"num_teachers={self.num_teachers}, warmup_steps={self.warmup_steps}"


# --------------------------------------------------------------------------- static weights
def weighted_sum(per_teacher: Tensor, weights: WeightsLike) -> Tensor:
    """``sum_t w[t] * per_teacher[t]`` for per-teacher losses (T,) and weights (T,); a scalar."""
    if not isinstance(per_teacher, Tensor):
        raise TypeError(f"per_teacher must be a torch.Tensor of shape (T,), got {type(per_teacher).__name__}")
    if per_teacher.dim() != 1:
        raise ValueError(f"per_teacher must have shape (T,), got {tuple(per_teacher.shape)}")
    if not per_teacher.is_floating_point():
        raise ValueError(f"per_teacher must be a floating-point tensor, got dtype {per_teacher.dtype}")
    w = check_weights(weights, num_teachers=per_teacher.shape[0])
    w = w.to(device=per_teacher.device, dtype=per_teacher.dtype)  # (T,)
    return (w * per_teacher).sum()
