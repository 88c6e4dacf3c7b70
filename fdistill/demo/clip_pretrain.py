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
import torch.nn.functional as F
from torch.utils.data import Dataset
from tqdm.auto import tqdm

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
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t))


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
) -> Dict[str, Any]:
    """Train a CLIP model from scratch on image-caption ``pairs`` and save it for open_clip.

    Random batches (indices drawn with replacement from a seeded generator), AdamW, warm-up +
    cosine over ``steps``, open_clip's ``ClipLoss`` with a learned temperature. When the run draws
    at least as many samples as the set holds, the pairs are materialised once (images as uint8,
    captions tokenised); a larger set (e.g. ``synthetic:1000000``, a stream the run samples from)
    is read batch by batch. Both give the same batches, so the result does not depend on which.

    ``max_steps`` stops early (the schedule still spans ``steps``): a prefix of the same run, which
    is how a shipped teacher is checked to reproduce (``summary["prefix"]``: the losses of the first
    ``prefix_steps`` steps and a fingerprint of the weights after them).

    Returns ``{"spec", "output", "loss_first", "loss_last", "seconds", "curve", "prefix"}``
    (``curve``: ``[(step, loss), ...]``) and writes ``metrics.jsonl`` next to the weights.
    """
    import open_clip
    from open_clip.loss import ClipLoss
    from safetensors.torch import save_file

    cfg = json.loads(json.dumps(model_cfg or TINY_CLIP_CFG))  # deep copy, JSON-safe
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
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
    loss_fn = ClipLoss()
    curve: List[tuple] = []
    metrics_path = out / "metrics.jsonl"
    metrics = metrics_path.open("w")
    run_steps = steps if max_steps is None else min(steps, max_steps)
    bar = tqdm(range(run_steps), desc="pretrain CLIP", disable=not progress)
    prefix: Dict[str, Any] = {"steps": prefix_steps, "loss": []}
    model.train()
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, warmup_steps, lr, min_lr)
        idx = torch.randint(0, len(pairs), (batch_size,), generator=g)
        images_u8, tokens = batch_of(idx)  # (B, 3, H, W) uint8, (B, L)
        x = (images_u8.to(device).float().div_(255) - mean) / std
        img_f, txt_f, scale = model(x, tokens.to(device))
        loss = loss_fn(img_f, txt_f, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step < prefix_steps:
            prefix["loss"].append(float(loss.detach()))
            if step == prefix_steps - 1:
                prefix["weights"] = weights_fingerprint(model)
        if step % log_every == 0 or step == run_steps - 1:
            lv = float(loss.detach())
            curve.append((step, lv))
            bar.set_postfix(loss=f"{lv:.3f}")
            metrics.write(json.dumps({"step": step, "loss": lv, "lr": opt.param_groups[0]["lr"],
                                      "logit_scale": float(model.logit_scale.detach().exp())}) + "\n")
    metrics.close()
    seconds = time.perf_counter() - t0

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
    mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1)
    img = F.normalize(model.encode_image((images_u8.to(device).float() / 255 - mean) / std), dim=-1)
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
    summary = pretrain_clip(pairs, output_dir, model_cfg=cfg, **kwargs)
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
