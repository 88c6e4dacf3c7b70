"""Linear probing of frozen features (paper Table 1's "linear probe" column, 79.5 -> 80.1 for
CLIP ViT-B/16 -> FD).

Two modes:

* :func:`linear_probe` -- MAE's ``main_linprobe.py`` (He et al. 2022, Appendix A.2): every epoch,
  augmented images (RandomResizedCrop + flip) go through the frozen model; the head is
  ``BatchNorm1d(affine=False, eps=1e-6)`` + ``Linear`` (weights trunc-normal std 0.01), trained
  with LARS (timm ``Lars``: momentum 0.9, trust coefficient 0.001, adapted only for the weight
  matrix as MAE's LARS, no weight decay), lr = 0.1 x batch / 256, 10 warm-up epochs then a
  cosine to 0, per step. The final epoch's top-1 / top-5 are reported.
* :func:`linear_probe_sweep` -- fast: features are extracted once (no augmentation) and a grid
  of heads, every feature (``cls``, ``avg``, ``cls+avg``, ``last<n>``) x every learning rate,
  is trained in the same pass over the cached tensors with SGD + momentum (DINOv2's linear
  evaluation grid, Oquab et al. 2023; LARS's per-tensor trust ratio makes a step move a weight by
  about ``lr x 0.001`` of its norm, far too slow for the few hundred steps of cached features). The
  whole grid and the best cell are reported; the best cell is picked on the evaluation split,
  as DINOv2 does, so it is an optimistic number -- compare models by the same grid.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..engine.trainer import Task
from ..backbone import Backbone
from ..errors import TeacherError

from .data import dataset_classes, model_inputs
from .features import FeatureSet, batch_features, default_pool
from .knn import topk_accuracy

log = logging.getLogger(__name__)

__all__ = ["LinearProbeHead", "LinearProbeTask", "LinearProbeSweepTask", "lars_param_groups", "linear_probe", "linear_probe_sweep",
           "available_features"]


class LinearProbeHead(nn.Module):
    """MAE's linear-probe head: BatchNorm without affine (a per-feature standardisation with
    running statistics), then a linear layer."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        from timm.layers import trunc_normal_

        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.fc = nn.Linear(dim, num_classes)
        trunc_normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(x))  # (B, num_classes)


def lars_param_groups(module: nn.Module, *, weight_decay: float = 0.0, lr_scale: float = 1.0) -> List[dict]:
    """MAE's LARS grouping: weight matrices get weight decay and the trust-ratio adaptation
    (``always_adapt``), biases neither."""
    mats = [p for p in module.parameters() if p.ndim > 1]
    vecs = [p for p in module.parameters() if p.ndim <= 1]
    groups = [dict(params=mats, weight_decay=weight_decay, always_adapt=True, lr_scale=lr_scale)]
    if vecs:
        groups.append(dict(params=vecs, weight_decay=0.0, always_adapt=False, lr_scale=lr_scale))
    return groups


def available_features(backbone: Backbone, names: Sequence[str]) -> List[str]:
    """``names`` that apply to ``backbone`` (``auto`` resolved): without the [CLS]-based ones for a
    model with no prefix token, and without ``last<n>`` beyond its number of blocks."""
    import re

    from .layer_decay import find_blocks

    out, depth = [], None
    for n in names:
        n = default_pool(backbone) if n == "auto" else n
        if backbone.num_prefix_tokens == 0 and n in ("cls", "cls+avg"):
            log.info("%s has no [CLS] token: skipping feature %r", backbone.name, n)
            continue
        m = re.fullmatch(r"last(\d+)", n)
        if m:
            depth = len(find_blocks(backbone.model)) if depth is None else depth
            if int(m.group(1)) > depth:
                log.info("%s has %d blocks: skipping feature %r", backbone.name, depth, n)
                continue
        if n not in out:
            out.append(n)
    if not out:
        raise TeacherError(f"none of the features {list(names)} applies to {backbone.name}")
    return out


def _scheduler(optimizer, total_steps: int, warmup_steps: int):
    from timm.scheduler import CosineLRScheduler

    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    return CosineLRScheduler(optimizer, t_initial=max(total_steps - warmup_steps, 1), lr_min=0.0,
                             warmup_t=warmup_steps, warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)


@torch.no_grad()
def _evaluate_heads(heads: Dict[Any, nn.Module], feats: Dict[Any, torch.Tensor], labels: torch.Tensor,
                    batch: int = 4096) -> Dict[Any, Dict[str, float]]:
    out = {}
    for key, head in heads.items():
        head.eval()
        x = feats[key]
        scores = torch.cat([head(x[i:i + batch]) for i in range(0, x.shape[0], batch)])
        out[key] = topk_accuracy(scores, labels)
        head.train()
    return out


class _ProbeClassifier(nn.Module):
    """The frozen model's ``feature`` of normalised images, then the probe head: (B, 3, H, W) ->
    (B, num_classes). The features are taken without gradients under the step's autocast; the
    head runs in fp32 outside it, as MAE's probe."""

    def __init__(self, backbone: Backbone, head: nn.Module, feature: str):
        super().__init__()
        self.backbone, self.head, self.feature = backbone, head, feature

    def features(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return batch_features(self.backbone, x, [self.feature])[self.feature]  # (B, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        with torch.autocast(x.device.type, enabled=False):
            return self.head(f.float())


class _ProbeLoss(nn.Module):
    def __init__(self, probe: _ProbeClassifier, head: nn.Module):
        super().__init__()
        self.probe, self.head = probe, head  # head: the (DDP-wrapped) trained part

    def forward(self, batch) -> Dict[str, torch.Tensor]:
        images, y = batch
        device = next(self.head.parameters()).device
        x = model_inputs(images, self.probe.backbone.mean, self.probe.backbone.std, device)
        f = self.probe.features(x)  # (B, C), frozen
        with torch.autocast(device.type, enabled=False):
            logits = self.head(f.float())  # (B, num_classes)
            loss = F.cross_entropy(logits, torch.as_tensor(y).to(device))
        return {"loss": loss}


class LinearProbeTask(Task):
    """MAE's linear probe as a task of :class:`fdistill.engine.trainer.Trainer`: the head is the
    trained model, the frozen backbone only gives features; evaluated after the last epoch."""

    name = "linprobe"

    def __init__(self, probe: _ProbeClassifier, val_loader, *, precision: str, env, device: torch.device):
        self.probe, self.model, self.val_loader = probe, probe.head, val_loader
        self.precision, self.env, self.device = precision, env, device

    def loss_module(self, model: nn.Module) -> nn.Module:
        return _ProbeLoss(self.probe, model)

    def evaluate(self, model, ema, epoch: int, step: int) -> Dict[str, Any]:
        from .finetune import evaluate_classifier

        a = self.probe.backbone
        res = evaluate_classifier(self.probe, self.val_loader, mean=a.mean, std=a.std, device=self.device,
                                  precision=self.precision, env=self.env, desc="linprobe eval")
        return {"epoch": epoch + 1, "step": step, "model": res}

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass


def linear_probe(
    backbone: Backbone,
    train_ds,
    val_ds,
    *,
    feature: str = "auto",
    epochs: int = 90,
    warmup_epochs: float = 10.0,
    lr: float = 0.1 * 16384 / 256,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    batch_size: int = 16384,
    num_workers: int = 8,
    precision: str = "fp32",
    seed: int = 0,
    device: str | torch.device = "cpu",
    max_steps: Optional[int] = None,
    output_dir: Optional[str] = None,
    resume: Optional[str] = "auto",
    env=None,
    progress: bool = True,
    on_step=None,
) -> Dict[str, Any]:
    """MAE-style linear probe (module docstring) on the shared training engine. ``train_ds`` /
    ``val_ds`` give images in [0, 1] / uint8 with labels (augmented for training); ``lr`` is the
    absolute peak learning rate; ``batch_size`` is per process (``torchrun``: ``env``).

    ``output_dir`` gets ``checkpoints/`` (the head, LARS state, RNG, sampler position: a stopped
    probe resumes exactly with ``resume="auto"``) and ``metrics.jsonl``; None: a temporary folder,
    removed afterwards (no resume). ``train_loss`` is the last log interval's mean loss."""
    from timm.optim import Lars

    from ..data import DataError
    from ..engine.distributed import DistEnv
    from ..engine.trainer import Trainer, TrainerConfig
    from .data import probe_loaders, probe_run_folder

    device = torch.device(device)
    env = env or DistEnv(device=device)
    torch.manual_seed(seed + env.rank)
    feature = available_features(backbone, [feature])[0]
    classes = dataset_classes(train_ds)
    if dataset_classes(val_ds) != classes:
        raise DataError("train and val classes differ")
    sampler, train_loader, val_loader, steps_per_epoch = probe_loaders(
        train_ds, val_ds, batch_size=batch_size, num_workers=num_workers, seed=seed, device=device, env=env)
    backbone = backbone.to(device).eval()
    total = epochs * steps_per_epoch if max_steps is None else min(epochs * steps_per_epoch, int(max_steps))

    # the feature width, from one evaluation image (deterministic: no random draw)
    probe = _ProbeClassifier(backbone, nn.Identity(), feature)
    x0 = model_inputs(torch.as_tensor(val_ds[0][0])[None], backbone.mean, backbone.std, device)
    dim = probe.features(x0).shape[1]
    probe.head = LinearProbeHead(dim, len(classes)).to(device)
    optimizer = Lars(lars_param_groups(probe.head, weight_decay=weight_decay), lr=lr, momentum=momentum,
                     trust_coeff=0.001)
    scheduler = _scheduler(optimizer, total, int(round(warmup_epochs * steps_per_epoch)))
    recipe = dict(model=backbone.name, feature=feature, epochs=epochs, warmup_epochs=warmup_epochs, lr=lr, weight_decay=weight_decay,
                  momentum=momentum, batch_size=batch_size, world_size=env.world_size, precision=precision, seed=seed,
                  max_steps=max_steps, train_images=len(train_ds), num_classes=len(classes))
    task = LinearProbeTask(probe, val_loader, precision=precision, env=env, device=device)
    if output_dir is None:
        resume = None  # a temporary folder holds no earlier run
    with probe_run_folder(output_dir, env, "fdistill-linprobe-") as out:
        trainer = Trainer(task, optimizer=optimizer, scheduler=scheduler, loader=train_loader, sampler=sampler,
                          output_dir=out, recipe=recipe, resume_safe=("epochs", "max_steps"), env=env, on_step=on_step,
                          config=TrainerConfig(epochs=epochs, steps_per_epoch=steps_per_epoch, total_steps=total,
                                               batch_size=batch_size, precision=precision, eval_interval=epochs,
                                               log_interval=max(1, min(50, steps_per_epoch)), keep_last=1,
                                               progress=progress))
        trainer.resume(resume)
        result = trainer.fit()
    last = result.history[-1]["model"] if result.history else {}
    res = {k: v for k, v in last.items() if k in ("top1", "top5")}
    return dict(res, feature=feature, lr=lr, epochs_done=result.step / max(steps_per_epoch, 1), steps=result.step,
                train_loss=result.last_record.get("loss", math.nan), train_images=len(train_ds),
                val_images=len(val_ds), stopped_early=result.stopped_by is not None)


class _FeatureBatches:
    """The sweep's batches as the trainer's loader: epoch ``e`` is the ``e``-th permutation drawn
    from one generator seeded with ``seed``, cut into ``steps_per_epoch`` index batches of
    ``batch_size`` (the remainder dropped). Yields (batch_size,) index tensors on the device."""

    num_workers = 0

    def __init__(self, n: int, batch_size: int, steps_per_epoch: int, seed: int, device: torch.device):
        self.n, self.bs, self.steps, self.seed, self.device = n, batch_size, steps_per_epoch, seed, device
        self._g, self._drawn = None, 0  # the generator and how many permutations it has given
        self._perm: Optional[torch.Tensor] = None
        self._start = 0

    def set_epoch(self, epoch: int, start_index: int = 0) -> None:
        if self._g is None or self._drawn > epoch + 1:  # first use, or an earlier epoch: replay
            self._g, self._drawn = torch.Generator(device="cpu").manual_seed(self.seed), 0
        while self._drawn < epoch + 1:
            self._perm = torch.randperm(self.n, generator=self._g)
            self._drawn += 1
        self._start = start_index

    def __iter__(self):
        perm = self._perm.to(self.device)
        for i in range(self._start // self.bs, self.steps):
            yield perm[i * self.bs:(i + 1) * self.bs]


class _SweepLoss(nn.Module):
    """The summed cross-entropy of every head on its own feature of the batch; the heads are
    independent, so the sum's gradient is each head's own. A linear head's gradient is bounded by
    its inputs, so with finite features no learning rate of the grid makes the sum non-finite
    (the engine's non-finite policy would otherwise skip the step for every head)."""

    def __init__(self, heads: nn.ModuleDict, keys: List[tuple], feats: Dict[str, torch.Tensor], labels: torch.Tensor):
        super().__init__()
        self.heads, self.keys, self.feats, self.labels = heads, keys, feats, labels

    def forward(self, idx: torch.Tensor) -> Dict[str, torch.Tensor]:
        y = self.labels[idx]
        loss = 0.0
        for i, (name, _lr) in enumerate(self.keys):
            loss = loss + F.cross_entropy(self.heads[str(i)](self.feats[name][idx]), y)
        return {"loss": loss}


class LinearProbeSweepTask(Task):
    """The fast probe grid as a task of :class:`fdistill.engine.trainer.Trainer`: every
    (feature, lr) head trained in one pass over cached features, all evaluated after the last
    epoch (no run folder: a sweep of cached features is cheap to redo)."""

    name = "linprobe sweep"

    def __init__(self, heads: nn.ModuleDict, keys: List[tuple], train: Dict[str, torch.Tensor], labels: torch.Tensor,
                 val: Dict[str, torch.Tensor], val_labels: torch.Tensor):
        self.model, self.keys = heads, keys
        self.train, self.labels, self.val, self.val_labels = train, labels, val, val_labels

    def loss_module(self, model: nn.Module) -> nn.Module:
        return _SweepLoss(model, self.keys, self.train, self.labels)

    def evaluate(self, model, ema, epoch: int, step: int) -> Dict[str, Any]:
        heads = {key: model[str(i)] for i, key in enumerate(self.keys)}
        res = _evaluate_heads(heads, {key: self.val[key[0]] for key in heads}, self.val_labels)
        return {"epoch": epoch + 1, "step": step, "grid": [dict(feature=n, lr=lr, **res[(n, lr)]) for (n, lr) in heads]}


def linear_probe_sweep(
    train: FeatureSet,
    val: FeatureSet,
    *,
    lrs: Sequence[float],
    epochs: int = 50,
    batch_size: int = 1024,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    warmup_epochs: float = 5.0,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> Dict[str, Any]:
    """Train one head per (feature, lr) on cached features, all in one pass; evaluate each.

    The loop is the project's :class:`~fdistill.engine.trainer.Trainer` (task
    :class:`LinearProbeSweepTask`, no run folder): SGD + momentum, warm-up + cosine to 0 per step.

    Args:
        train, val: :class:`FeatureSet` s with the same feature names (e.g. from
            :func:`fdistill.eval.features.extract_features`).
        lrs: absolute peak learning rates (SGD + momentum, warm-up + cosine to 0).

    Returns:
        ``grid``: a list of ``{feature, lr, top1, top5}``; ``best``: the grid cell with the
        highest top-1 (ties: the first); ``top1``/``top5``/``feature``/``lr`` of that cell.
    """
    from ..engine.trainer import Trainer, TrainerConfig

    device = torch.device(device)
    torch.manual_seed(seed)
    names = list(train.feats)
    if set(names) != set(val.feats):
        raise ValueError(f"train features {sorted(names)} != val features {sorted(val.feats)}")
    n = len(train)
    C = int(max(int(train.labels.max()), int(val.labels.max()))) + 1
    if train.classes:
        C = max(C, len(train.classes))
    xtr = {k: v.to(device).float() for k, v in train.feats.items()}
    keys = [(name, float(lr)) for name in names for lr in lrs]
    heads = nn.ModuleDict({str(i): LinearProbeHead(xtr[name].shape[1], C).to(device) for i, (name, _) in enumerate(keys)})
    # base lr 1: the scheduler multiplies each group's schedule value by its lr_scale (= its lr)
    opt = torch.optim.SGD([dict(params=list(heads[str(i)].parameters()), lr_scale=lr) for i, (_, lr) in enumerate(keys)],
                          lr=1.0, momentum=momentum, weight_decay=weight_decay)
    bs = min(batch_size, n)
    steps_per_epoch = max(n // bs, 1)
    total = epochs * steps_per_epoch
    sched = _scheduler(opt, total, int(round(warmup_epochs * steps_per_epoch)))
    xva = {k: v.to(device).float() for k, v in val.feats.items()}
    task = LinearProbeSweepTask(heads, keys, xtr, train.labels.to(device), xva, val.labels.to(device))
    batches = _FeatureBatches(n, bs, steps_per_epoch, seed, device)
    trainer = Trainer(task, optimizer=opt, scheduler=sched, loader=batches, sampler=None, output_dir=None,
                      recipe={}, config=TrainerConfig(epochs=epochs, steps_per_epoch=steps_per_epoch, total_steps=total,
                                                      batch_size=bs, eval_interval=epochs, progress=progress,
                                                      log_interval=max(1, min(50, steps_per_epoch)), seed=seed))
    result = trainer.fit()
    grid = result.history[-1]["grid"]
    best = max(grid, key=lambda c: c["top1"])
    return dict(top1=best["top1"], **({"top5": best["top5"]} if "top5" in best else {}), feature=best["feature"], lr=best["lr"], best=best,
                grid=grid, epochs=epochs, steps=result.step, train_images=n, val_images=len(val))
