"""Pre-train a small CLIP-style teacher from scratch with open_clip (the demo's stage 1).

The paper's teacher is a CLIP model; offline we cannot download one, so the demo makes its own:
an open_clip ``CLIP`` built from a tiny custom config (image ViT + text transformer), trained
with open_clip's contrastive ``ClipLoss`` and its BPE tokenizer on image-caption pairs of the
procedural dataset (or "a photo of a {class}" captions for a user's image folder).

The result is written as an open_clip ``local-dir`` folder (``open_clip_config.json`` +
``open_clip_model.safetensors``), so the rest of the pipeline loads it as the teacher spec
``open_clip:local-dir:<folder>``, exactly like any other CLIP teacher.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..engine.trainer import Task
from ..images import normalize_images, to_float_images

log = logging.getLogger(__name__)

#: the demo's tiny CLIP: 32 px images, patch 8 (4x4 tokens), width 128, 4 layers; 2-layer text tower
TINY_CLIP_CFG: Dict[str, Any] = dict(
    embed_dim=64,
    vision_cfg=dict(image_size=32, patch_size=8, width=128, layers=4, head_width=32, mlp_ratio=4.0),
    text_cfg=dict(context_length=32, vocab_size=49408, width=128, heads=4, layers=2),
)
#: the miniature's teacher (``fdistill/assets/clip_mini``): 32 px images, patch 4 (8x8 tokens, so
#: token-level FD targets mean something), width 128, 4 layers; a narrower 2-layer text tower
#: (the caption grammar is small; the token table dominates the file size)
MINI_CLIP_CFG: Dict[str, Any] = dict(
    embed_dim=64,
    vision_cfg=dict(image_size=32, patch_size=4, width=128, layers=4, head_width=32, mlp_ratio=4.0),
    text_cfg=dict(context_length=32, vocab_size=49408, width=64, heads=2, layers=2),
)
#: named model configs of ``fdistill pretrain-clip --model-cfg NAME``
CLIP_CFGS: Dict[str, Dict[str, Any]] = {"tiny": TINY_CLIP_CFG, "mini": MINI_CLIP_CFG}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's statistics, as open_clip uses
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class CaptionedImages(Dataset):
    """(uint8 image (3, H, W), caption) pairs from a dataset of (uint8 image, label).

    ``caption_fn(index) -> str`` gives the caption; by default the base dataset's own ``caption``
    method (the procedural dataset); for class folders use :func:`class_caption_fn`."""

    def __init__(self, base: Dataset, caption_fn: Optional[Callable[[int], str]] = None):
        self.base = base
        if caption_fn is None:
            if not hasattr(base, "caption"):
                raise ValueError("the dataset has no captions: pass caption_fn (e.g. class_caption_fn(dataset))")
            caption_fn = base.caption
        self.caption_fn = caption_fn

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        img, _ = self.base[i]
        return img, self.caption_fn(i)


def class_caption_fn(dataset: Dataset) -> Callable[[int], str]:
    """"a photo of a {class}" for an image folder with class sub-folders (samples: (path, label))."""
    classes = list(dataset.classes)
    samples = dataset.samples

    def caption(i: int) -> str:
        return f"a photo of a {classes[samples[i][1]].replace('_', ' ')}"

    return caption


def _lr_at(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """open_clip's ``cosine_lr`` (``open_clip_train/scheduler.py``: warm-up ``lr * (step + 1) /
    warmup``, then half-cosine) with a floor ``min_lr``, which open_clip's lacks. Not
    :func:`fdistill.engine.schedule.create_warmup_cosine`: timm's warm-up starts from
    ``warmup_lr`` and adds ``s * (peak - warmup_lr) / W``, which no setting makes equal to
    open_clip's ``(s + 1) / W`` ramp, and the shipped teacher (``fdistill/assets/clip_mini``)
    was trained with this one (its first steps are re-run in ``tests/test_assets.py``)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t))


class _ClipSchedule:
    """Linear warm-up then cosine to ``min_lr`` over ``steps`` (:func:`_lr_at`), as the trainer's
    scheduler: ``step_update(step)`` sets every group's lr before update ``step`` (0-based)."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, steps: int, warmup_steps: int, lr: float, min_lr: float):
        self.optimizer = optimizer
        self.steps, self.warmup_steps, self.lr, self.min_lr = steps, warmup_steps, lr, min_lr

    def step_update(self, step: int) -> None:
        value = _lr_at(step, self.steps, self.warmup_steps, self.lr, self.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = value

    def state_dict(self) -> Dict[str, Any]:
        return {"steps": self.steps, "warmup_steps": self.warmup_steps, "lr": self.lr, "min_lr": self.min_lr}


class _RandomBatches:
    """The run's batches, as the trainer's loader and sampler in one: step ``k`` reads the ``k``-th
    draw of ``batch_size`` indices with replacement from a generator seeded with ``seed``.

    The whole run is one epoch of this stream; ``set_start(n)`` (``n`` samples already consumed,
    a resume) replays the generator past the first ``n / batch_size`` draws, so a resumed run
    reads exactly the batches the uninterrupted one would."""

    num_workers = 0  # read in the training process

    def __init__(self, size: int, batch_size: int, seed: int, read: Callable[[torch.Tensor], Any]):
        self.size, self.batch_size, self.seed, self.read = size, batch_size, seed, read
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != 0:
            raise ValueError(f"the pre-training stream is a single epoch, got epoch {epoch}")

    def set_start(self, start: int) -> None:
        if start % self.batch_size:
            raise ValueError(f"start {start} is not a whole number of batches of {self.batch_size}")
        self.start = start

    def _draw(self, g: torch.Generator) -> torch.Tensor:
        return torch.randint(0, self.size, (self.batch_size,), generator=g)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        for _ in range(self.start // self.batch_size):
            self._draw(g)
        while True:
            yield self.read(self._draw(g))  # (uint8 images (B, 3, H, W), token ids (B, L))


class _ClipLossModule(nn.Module):
    """The contrastive loss of a batch ``(uint8 images, token ids)``: normalise with CLIP's
    statistics, encode both towers, open_clip's ``ClipLoss``. Each step's detached loss is handed
    to ``record`` (a device tensor: no host sync)."""

    def __init__(self, model: nn.Module, loss_fn: nn.Module, mean: torch.Tensor, std: torch.Tensor,
                 record: Callable[[torch.Tensor], None]):
        super().__init__()
        self.model, self.loss_fn, self.record = model, loss_fn, record
        self.mean, self.std = mean, std

    def forward(self, batch) -> Dict[str, torch.Tensor]:
        images_u8, tokens = batch
        device = self.mean.device
        x = normalize_images(to_float_images(images_u8.to(device)), self.mean, self.std)
        img_f, txt_f, scale = self.model(x, tokens.to(device))
        loss = self.loss_fn(img_f, txt_f, scale)
        self.record(loss.detach())
        return {"loss": loss, "logit_scale": scale.detach()}


class ClipPretrainTask(Task):
    """CLIP pre-training as a task of :class:`fdistill.engine.trainer.Trainer`: the model, its
    contrastive loss, the ``logit_scale`` clamp after every update (to ``[0, log 100]``, as
    open_clip's training does) and the run's record: every step's loss (``curve`` and
    ``prefix`` of the summary) and the weights fingerprint after ``prefix_steps`` updates. The
    record is the task's checkpointed state, so a resumed run reports the whole run."""

    name = "pretrain-clip"
    metric_extra = ("logit_scale",)  # exp(logit_scale): the learned inverse temperature, in metrics.jsonl

    def __init__(self, model: nn.Module, loss_fn: nn.Module, mean: torch.Tensor, std: torch.Tensor, *,
                 prefix_steps: int):
        self.model, self.loss_fn, self.mean, self.std = model, loss_fn, mean, std
        self.prefix_steps = prefix_steps
        self.losses: List[Any] = []  # per step: floats (restored) then 0-dim device tensors (this run)
        self.prefix_weights: Optional[List[float]] = None

    def loss_module(self, model: nn.Module) -> nn.Module:
        return _ClipLossModule(model, self.loss_fn, self.mean, self.std, self.losses.append)

    def after_update(self, step: int) -> None:
        """The trainer's ``on_step``: ``step`` updates done (1-based)."""
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(100))
        if step == self.prefix_steps:
            self.prefix_weights = weights_fingerprint(self.model)

    def step_losses(self) -> List[float]:
        """Every step's loss so far (one host sync)."""
        done = [v for v in self.losses if not isinstance(v, torch.Tensor)]
        pending = self.losses[len(done):]
        if pending:
            done += torch.stack(pending).tolist()
        self.losses[:] = done
        return list(done)

    def state_dict(self) -> Dict[str, Any]:
        return {"losses": self.step_losses(), "prefix_weights": self.prefix_weights}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.losses[:] = [float(v) for v in state.get("losses", [])]
        self.prefix_weights = state.get("prefix_weights")


#: recipe entries that may differ between a checkpoint and the resumed run (how far to go: the
#: schedule spans ``steps`` either way)
RESUME_SAFE = ("max_steps",)


def pretrain_clip(
    pairs: Dataset,
    output_dir: str | os.PathLike,
    *,
    model_cfg: Optional[Dict[str, Any]] = None,
    steps: int = 800,
    batch_size: int = 256,
    lr: float = 1e-3,
    min_lr: float = 1e-5,
    weight_decay: float = 0.1,
    warmup_steps: int = 50,
    seed: int = 0,
    device: str = "cpu",
    log_every: int = 25,
    progress: bool = True,
    max_steps: Optional[int] = None,
    prefix_steps: int = 3,
    ckpt_interval: Optional[int] = 200,
    resume: Optional[str] = "auto",
    recipe_extra: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """Train a CLIP model from scratch on image-caption ``pairs`` and save it for open_clip.

    Random batches (indices drawn with replacement from a seeded generator), AdamW, warm-up +
    cosine over ``steps``, open_clip's ``ClipLoss`` with a learned temperature, fp32 without
    gradient clipping. When the run draws at least as many samples as the set holds, the pairs
    are materialised once (images as uint8, captions tokenised); a larger set (e.g.
    ``synthetic:1000000``, a stream the run samples from) is read batch by batch. Both give the
    same batches, so the result does not depend on which.

    The loop is the project's :class:`~fdistill.engine.trainer.Trainer` (task
    :class:`ClipPretrainTask`): ``output_dir`` is its run folder, with ``metrics.jsonl`` (the
    trainer's records every ``log_every`` steps, with ``logit_scale``) and
    ``checkpoints/ckpt_<step>.pt`` (every ``ckpt_interval`` steps, on SIGTERM/SIGUSR1 and at the
    end). ``resume``: ``"auto"`` continues from the newest checkpoint there (the same batches and
    weights as a run that was not stopped; only ``RESUME_SAFE`` entries may differ), a path
    from that checkpoint, None starts over (removing the folder's checkpoints and metrics).

    ``max_steps`` stops early (the schedule still spans ``steps``): a prefix of the same run, which
    is how a shipped teacher is checked to reproduce (``summary["prefix"]``: the losses of the first
    ``prefix_steps`` steps and a fingerprint of the weights after them). ``recipe_extra``: more
    entries of the recipe a resume must match (the data spec).

    Returns ``{"spec", "output", "loss_first", "loss_last", "seconds", "curve", "prefix", "steps",
    "steps_run", "batch_size", "seed"}`` (``curve``: ``[(step, loss), ...]``, 0-based steps, every
    ``log_every`` and the last) once the run is complete; a run stopped by a signal raises
    :class:`~fdistill.engine.errors.RunError` after checkpointing (run it again to continue).
    """
    import open_clip
    from open_clip.loss import ClipLoss
    from safetensors.torch import save_file

    from ..engine.distributed import DistEnv
    from ..engine.errors import RunError
    from ..engine.lock import hold_run_lock
    from ..engine.trainer import Trainer, TrainerConfig

    cfg = json.loads(json.dumps(model_cfg or TINY_CLIP_CFG))  # deep copy, JSON-safe
    out = Path(output_dir)
    env = DistEnv(device=torch.device(device))
    run_steps = steps if max_steps is None else min(steps, max_steps)
    recipe = dict(model_cfg=cfg, steps=steps, batch_size=batch_size, lr=lr, min_lr=min_lr, weight_decay=weight_decay,
                  warmup_steps=warmup_steps, seed=seed, pairs=len(pairs), prefix_steps=prefix_steps,
                  max_steps=max_steps, **(recipe_extra or {}))
    with hold_run_lock(out, env):  # one run per folder: a start-over below deletes its checkpoints
        torch.manual_seed(seed)
        model = open_clip.CLIP(**cfg).to(device)
        tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=cfg["text_cfg"]["context_length"])

        t0 = time.perf_counter()
        size = cfg["vision_cfg"]["image_size"]
        batch_of = _batch_reader(pairs, tokenizer, materialise=len(pairs) <= steps * batch_size, progress=progress)
        first = batch_of(torch.zeros(1, dtype=torch.long))[0]
        if first.shape[-1] != size or first.shape[-2] != size:
            raise ValueError(f"images are {tuple(first.shape[-2:])}, the CLIP config expects {size}x{size}")
        mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1)

        decay, no_decay = [], []
        for n, p in model.named_parameters():
            (no_decay if p.ndim < 2 or "logit_scale" in n or "embedding" in n or "token" in n else decay).append(p)
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98), eps=1e-6)
        task = ClipPretrainTask(model, ClipLoss(), mean, std, prefix_steps=prefix_steps)
        batches = _RandomBatches(len(pairs), batch_size, seed, batch_of)
        trainer = Trainer(task, optimizer=opt,
                          scheduler=_ClipSchedule(opt, steps=steps, warmup_steps=warmup_steps, lr=lr, min_lr=min_lr),
                          loader=batches, sampler=batches, output_dir=out, recipe=recipe, resume_safe=RESUME_SAFE,
                          env=env, on_step=task.after_update,
                          config=TrainerConfig(epochs=1, steps_per_epoch=steps, total_steps=run_steps,
                                               batch_size=batch_size, precision="fp32", clip_grad=0.0,
                                               log_interval=log_every, ckpt_interval=ckpt_interval,
                                               progress=progress))
        if trainer.resume(resume) is None:  # starting over: nothing of an earlier run may mix in
            trainer.start_over()
        result = trainer.fit()
        if result.stopped_by is not None:
            raise RunError(f"pre-training stopped by {result.stopped_by} at step {result.step}/{run_steps}; "
                           f"checkpoint {result.checkpoint}: run the same command again to continue")
        seconds = time.perf_counter() - t0

        losses = task.step_losses()
        curve: List[tuple] = [(s, v) for s, v in enumerate(losses) if s % log_every == 0 or s == len(losses) - 1]
        prefix: Dict[str, Any] = {"steps": prefix_steps, "loss": losses[:prefix_steps]}
        if task.prefix_weights is not None:
            prefix["weights"] = task.prefix_weights

        model.eval()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors"))
        (out / "open_clip_config.json").write_text(json.dumps({
            "model_cfg": cfg,
            "preprocess_cfg": {"size": size, "mean": list(CLIP_MEAN), "std": list(CLIP_STD)},
        }, indent=2))
    return {"spec": f"open_clip:local-dir:{out.resolve()}", "output": str(out), "loss_first": curve[0][1],
            "loss_last": curve[-1][1], "seconds": seconds, "curve": curve, "prefix": prefix,
            "steps": steps, "steps_run": run_steps, "batch_size": batch_size, "seed": seed}


def weights_fingerprint(model: torch.nn.Module) -> List[float]:
    """Per-tensor sums of absolute values (float64) in ``state_dict`` order: two runs with the
    same weights give the same list; one changed value changes it."""
    return [float(v.detach().double().abs().sum()) for v in model.state_dict().values()]


def _batch_reader(pairs: Dataset, tokenizer, *, materialise: bool, progress: bool):
    """``indices (B,) -> (uint8 images (B, 3, H, W), token ids (B, L))`` over ``pairs``: from a
    copy held in memory (``materialise``) or read and tokenised per batch."""
    if not materialise:
        def read(idx: torch.Tensor):
            items = [pairs[int(i)] for i in idx]
            return torch.stack([torch.as_tensor(im) for im, _ in items]), tokenizer([c for _, c in items])

        return read
    images, captions = [], []
    for i in tqdm(range(len(pairs)), desc="clip data", disable=not progress, leave=False):
        img, cap = pairs[i]
        images.append(torch.as_tensor(img))
        captions.append(cap)
    images_u8 = torch.stack(images)  # (N, 3, H, W)
    tokens = tokenizer(captions)  # (N, L)
    return lambda idx: (images_u8[idx], tokens[idx])


@torch.no_grad()
def clip_zero_shot_accuracy(model, tokenizer, images_u8: torch.Tensor, labels: torch.Tensor,
                            class_names: Sequence[str], device: str = "cpu") -> float:
    """Top-1 of "a photo of a {class}" prompts (a quick check of the teacher's semantics)."""
    text = model.encode_text(tokenizer([f"a photo of a {c}" for c in class_names]).to(device))
    text = F.normalize(text, dim=-1)
    img = F.normalize(model.encode_image(normalize_images(to_float_images(images_u8.to(device)), CLIP_MEAN, CLIP_STD)),
                      dim=-1)
    return float(((img @ text.T).argmax(1).cpu() == labels).float().mean())


def pretrain_clip_on(data: str, output_dir: str | os.PathLike, *, model_cfg: Optional[Dict[str, Any]] = None,
                     **kwargs) -> Dict[str, Any]:
    """:func:`pretrain_clip` on a data spec (``synthetic[:N]`` or a class folder), then a zero-shot
    check on its val split; writes ``summary.json`` beside the weights and returns it."""
    import open_clip

    from .teacher_data import build_caption_pairs

    cfg = model_cfg or TINY_CLIP_CFG
    size = cfg["vision_cfg"]["image_size"]
    pairs, _ = build_caption_pairs(data, "train", size)
    summary = pretrain_clip(pairs, output_dir, model_cfg=cfg, recipe_extra={"data": data}, **kwargs)
    _, val = build_caption_pairs(data, "val", size)
    model = open_clip.CLIP(**cfg)
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(Path(output_dir) / "open_clip_model.safetensors")))
    model.eval()
    n = min(len(val), 2000)
    imgs = torch.stack([torch.as_tensor(val[i][0]) for i in range(n)])
    labels = torch.tensor([int(val[i][1]) for i in range(n)])
    tok = open_clip.tokenizer.SimpleTokenizer(context_length=cfg["text_cfg"]["context_length"])
    summary["zero_shot_top1"] = 100.0 * clip_zero_shot_accuracy(model, tok, imgs, labels, list(val.classes))
    summary["val_images"] = n
    (Path(output_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
