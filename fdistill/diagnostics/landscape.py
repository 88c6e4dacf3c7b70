"""1-D loss landscapes along filter-normalised random directions (paper Sec. 4.3, Figure 5;
Li et al., "Visualizing the Loss Landscape of Neural Nets", NeurIPS 2018, Sec. 4).

For a direction ``d`` the curve is ``alpha -> L(theta + alpha * d)`` for alpha in [-1, 1]. Random
directions are made comparable across models and layers by *filter normalisation* (Li et al.
Eq. 1 generalised to every weight tensor): for each parameter with 2+ dims and each slice ``i``
along its first dim (a conv filter, a row of a linear layer), ``d_i <- d_i / ||d_i|| * ||w_i||``.
Parameters with one dim (biases, norm gains) are not perturbed (direction 0), as in Li et al.
Then scaling a layer's weights (which a following normalisation undoes) scales its direction too,
so the curve does not change: flatness is measured in units of each filter's own size. A flatter
curve around alpha = 0 means the model sits in a wider basin (paper: FD students are flatter).

This module's functions take a plain classifier (``nn.Module``: inputs -> logits) and batches;
they do not load models or data.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

#: paper Fig. 5 / issue defaults
DEFAULT_NUM_DIRECTIONS = 5
DEFAULT_NUM_ALPHAS = 51


def _perturbable(model: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    """Floating-point parameters, each once (tied ones are shared), in registration order."""
    return [(n, p) for n, p in model.named_parameters() if p.is_floating_point()]


def filter_normalized_direction(model: nn.Module, seed: int) -> Dict[str, torch.Tensor]:
    """A random filter-normalised direction in ``model``'s parameter space (Li et al. 2018).

    Every floating-point parameter gets an entry (same shape, dtype and device): a standard normal
    draw (from a CPU generator seeded with ``seed``, so the direction does not depend on the
    device) with each slice along dim 0 rescaled to the norm of the same slice of the weight, for
    tensors of 2+ dims; zeros for 1-D tensors (biases, norm parameters: not perturbed). Weight
    slices of norm 0 get a zero direction slice.

    Returns:
        {parameter name: direction tensor}.
    """
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    out: Dict[str, torch.Tensor] = {}
    for name, p in _perturbable(model):
        if p.dim() < 2:
            out[name] = torch.zeros_like(p)
            continue
        d = torch.randn(p.shape, generator=g, dtype=torch.float32)
        w = p.detach().to("cpu", torch.float32)
        d2 = d.reshape(d.shape[0], -1)  # one row per filter / output unit
        w_norm = w.reshape(w.shape[0], -1).norm(dim=1, keepdim=True)
        d2 = d2 / d2.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) * w_norm
        out[name] = d2.reshape(p.shape).to(device=p.device, dtype=p.dtype)
    return out


@torch.no_grad()
def evaluate_classifier(model: nn.Module, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]],
                        device: torch.device | str | None = None,
                        prepare: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> Tuple[float, float]:
    """Mean cross-entropy and accuracy (in [0, 1]) of ``model`` on ``batches`` of (inputs, labels);
    ``prepare`` (e.g. uint8 images -> normalised float) is applied to each batch's inputs on the
    device before the model.

    Sums stay on the device; one host sync at the end."""
    loss_sum = correct = None
    n = 0
    for x, y in batches:
        if device is not None:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x if prepare is None else prepare(x))  # (B, K)
        if logits.dim() != 2:
            raise ValueError(f"classifier must return (B, num_classes) logits, got {tuple(logits.shape)}")
        ls = F.cross_entropy(logits.float(), y, reduction="sum").double()
        c = ((logits.argmax(dim=1) == y) & torch.isfinite(logits).all(dim=1)).sum()  # NaN rows are wrong
        loss_sum = ls if loss_sum is None else loss_sum + ls
        correct = c if correct is None else correct + c
        n += y.shape[0]
    if n == 0:
        raise ValueError("no batches to evaluate")
    loss, acc = float(loss_sum) / n, float(correct) / n
    if loss != loss or loss in (float("inf"), float("-inf")):
        # keep going: a diverged point on a landscape is data, not an error; report it as inf
        loss = float("inf")
    return loss, acc


@dataclass
class LandscapeResult:
    """Curves of one model: ``loss[d][a]`` and ``accuracy[d][a]`` at ``alphas[a]`` along the
    direction with seed ``seeds[d]``; ``loss0``/``accuracy0`` of the unperturbed model, evaluated
    before the sweep (each curve's alpha = 0 point is evaluated again and must equal them)."""

    alphas: List[float]
    seeds: List[int]
    loss: List[List[float]]
    accuracy: List[List[float]]
    loss0: float
    accuracy0: float
    num_images: int
    extra: Dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(alphas=self.alphas, seeds=self.seeds, loss=self.loss, accuracy=self.accuracy,
                    loss0=self.loss0, accuracy0=self.accuracy0, num_images=self.num_images, **self.extra)


def alpha_grid(num: int = DEFAULT_NUM_ALPHAS, limit: float = 1.0) -> List[float]:
    """``num`` evenly spaced alphas in [-limit, limit]; 0 is exactly on the grid when ``num`` is odd."""
    if num < 2:
        raise ValueError(f"need at least 2 alphas, got {num}")
    vals = torch.linspace(-limit, limit, num, dtype=torch.float64).tolist()
    if num % 2 == 1:
        vals[num // 2] = 0.0
    return vals


@torch.no_grad()
def loss_landscape(
    model: nn.Module,
    batches: Sequence[Tuple[torch.Tensor, torch.Tensor]],
    *,
    seeds: Sequence[int] = tuple(range(DEFAULT_NUM_DIRECTIONS)),
    alphas: Optional[Sequence[float]] = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    desc: str = "loss landscape",
    prepare: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> LandscapeResult:
    """Loss and accuracy of ``model`` at ``theta + alpha * d`` for each direction and alpha.

    Args:
        model: a classifier, inputs -> (B, K) logits; evaluated in eval mode (its previous mode is
            restored), parameters restored bit-exactly afterwards (the original values are kept and
            copied back; nothing is added and subtracted).
        batches: a re-iterable of (inputs, labels), e.g. a list; the same images for every point.
            Give them un-augmented (the landscape of the evaluation loss).
        seeds: one direction per seed (:func:`filter_normalized_direction`); must be distinct.
        alphas: step sizes (default :func:`alpha_grid`: 51 points in [-1, 1]).
        device: where batches are moved (the model must already be there).
        progress: tqdm bar over all points.
        prepare: applied to each batch's inputs before the model, e.g. uint8 images -> normalised
            float (:meth:`~fdistill.diagnostics.models.DiagnosticModel.normalize`), so the cached
            images can stay uint8 on the device (4x less memory than float).
    """
    from tqdm.auto import tqdm

    seeds = [int(s) for s in seeds]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"direction seeds must be distinct, got {seeds}")
    alphas = alpha_grid() if alphas is None else [float(a) for a in alphas]
    params = _perturbable(model)
    if not params:
        raise ValueError("the model has no floating-point parameters to perturb")
    was_training = model.training
    model.eval()
    originals = [p.detach().clone() for _, p in params]
    loss = [[0.0] * len(alphas) for _ in seeds]
    acc = [[0.0] * len(alphas) for _ in seeds]
    try:
        loss0, acc0 = evaluate_classifier(model, batches, device, prepare)
        bar = tqdm(total=len(seeds) * len(alphas), desc=desc, unit="pt", disable=not progress, leave=False)
        for di, seed in enumerate(seeds):
            direction = filter_normalized_direction(model, seed)
            for ai, a in enumerate(alphas):
                for (name, p), w0 in zip(params, originals):
                    if a == 0.0:
                        p.copy_(w0)  # exactly the original, not w0 + 0 * d
                    else:
                        torch.add(w0, direction[name], alpha=a, out=p)
                loss[di][ai], acc[di][ai] = evaluate_classifier(model, batches, device, prepare)
                bar.update(1)
            del direction
        bar.close()
    finally:
        for (_, p), w0 in zip(params, originals):
            p.copy_(w0)
        model.train(was_training)
    n = sum(int(y.shape[0]) for _, y in batches)
    return LandscapeResult(alphas=alphas, seeds=seeds, loss=loss, accuracy=acc, loss0=loss0, accuracy0=acc0,
                           num_images=n)
