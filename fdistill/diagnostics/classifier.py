"""Classifiers for the loss landscape: a fine-tuned model as is, or a frozen backbone with a linear
head fitted on its features.

The loss landscape needs a loss, so a model that is not a classifier (a teacher, an FD student)
first gets a linear head: features are the first prefix token ([CLS]) of the final token map,
or the mean of the patch tokens when there is none (CNNs, models without [CLS]); the head is a
multinomial logistic regression fitted by full-batch L-BFGS on those frozen features (a convex
problem, so the fit is deterministic and needs no learning-rate schedule). The landscape then
perturbs backbone and head together, like any classifier.

The features are the evaluation's (:func:`fdistill.eval.features.extract_features`, default
pooling). Its linear probes (:mod:`fdistill.eval.linear_probe`) are not reused: they are accuracy
benchmarks (LARS schedules, a learning-rate grid picked on the evaluation split) that return
scores rather than the fitted head; the landscape needs one head, fitted without looking at the
images it is evaluated on.

The fit is a solver call, not a training loop, so it does not run on the training engine
(:class:`fdistill.engine.trainer.Trainer`): ``torch.optim.LBFGS.step(closure)`` re-evaluates the
full-batch loss as often as its line search needs within one call, which the engine's step (one
forward and backward per update, then clip and skip) cannot express; and a fit of a few hundred
cached features finishes in well under a second, so checkpoints, resume, signals and a progress
bar would have nothing to protect. It is ``sklearn``'s ``LogisticRegression.fit`` in torch.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..backbone import Backbone
from ..eval.classifier import Classifier
from ..eval.features import default_pool


def fit_linear_head(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    weight_decay: float = 1e-3,
    max_iter: int = 100,
) -> nn.Linear:
    """Multinomial logistic regression on (N, C) features by full-batch L-BFGS.

    Features are used as given (no standardisation), so the head applies to the backbone's raw
    output. ``weight_decay`` is the L2 penalty on the weights (not the bias), per sample."""
    if features.dim() != 2 or labels.shape != features.shape[:1]:
        raise ValueError(f"features must be (N, C) with N labels, got {tuple(features.shape)} and {tuple(labels.shape)}")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"labels must be in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]")
    x = features.detach().float()
    y = labels.to(x.device)
    head = nn.Linear(x.shape[1], num_classes).to(x.device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-6, tolerance_change=1e-9)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(head(x), y) + 0.5 * weight_decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    head.requires_grad_(False)
    return head


def linear_probe_classifier(backbone: Backbone, train_batches, num_classes: int, *,
                            device: Optional[torch.device | str] = None, weight_decay: float = 1e-3,
                            progress: bool = True) -> Tuple[Classifier, float]:
    """Fit a linear head on ``backbone``'s frozen features (the evaluation's
    :func:`~fdistill.eval.features.extract_features`, its default pooling); returns the
    classifier (:class:`~fdistill.eval.classifier.Classifier` without ``fc_norm``, over
    normalised images) and the head's training accuracy."""
    from ..eval.features import extract_features

    pool = default_pool(backbone)
    device = torch.device(device) if device is not None else next(backbone.parameters()).device
    fs = extract_features(backbone, train_batches, features=[pool], device=device, store_device=device,
                          desc=f"features {backbone.name}", progress=progress)
    feats, labels = fs.feats[pool], fs.labels
    head = fit_linear_head(feats, labels, num_classes, weight_decay=weight_decay)
    with torch.no_grad():
        train_acc = float((head(feats).argmax(1) == labels).float().mean())
    return Classifier(backbone, num_classes, backbone.global_pool, fc_norm=False, head=head), train_acc  # pool, by timm's name
