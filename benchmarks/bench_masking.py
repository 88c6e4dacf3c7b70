#!/usr/bin/env python
"""Cheaper students: what dropping masked tokens (MAE-style) costs in distillation quality.

    python benchmarks/bench_masking.py --steps 300 --json masking.json

A real, pre-trained teacher (the CIFAR ResNet-56 of ../shared, its 8x8x64 last-stage map as
the target) is distilled into a small FD ViT student on cifar10-jpg-mini, once per variant:
full input, 50% of the patches replaced by the mask token, 50% and 75% dropped from the
student's encoder. Every variant starts from the same student weights and sees the same
batches (the same FD views, loaded once up front, so the step times exclude data loading).
Reported per variant: the student's tokens, step time and speed relative to full input, and
the distillation loss on 128 held-out val images seen *whole* (no mask) before and after --
what the student learnt, on the input it will be used with. The speed of token dropping on a
full-size model is bench_distill.py's (``--mask-ratio 0.5 --drop-masked``).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import List, Optional

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "benchmarks"

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CIFAR = SHARED / "data" / "cifar10-jpg-mini"
WEIGHTS = SHARED / "weights" / "resnet-cifar10" / "resnet56.safetensors"
EXAMPLE = REPO / "examples" / "cifar_resnet.py"

VARIANTS = [("full input", 0.0, False), ("mask 0.5, mask tokens", 0.5, False),
            ("mask 0.5, dropped", 0.5, True), ("mask 0.75, dropped", 0.75, True)]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--depth", type=int, default=4, help="student blocks")
    p.add_argument("--width", type=int, default=96, help="student embed_dim")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def build_teacher():
    from fdistill import create_teacher

    return create_teacher(f"python:{EXAMPLE}:resnet56", weights=str(WEIGHTS), feature_method="forward_features",
                          img_size=32, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def heldout_loss(distiller, views, targets) -> float:
    """FD loss of the student on whole (unmasked) held-out views, eval mode."""
    from fdistill.losses import feature_distill_loss

    was = distiller.branch.training
    distiller.branch.eval()
    with torch.no_grad():
        losses = [feature_distill_loss(distiller.branch(distiller._normalize(x, "student"))[:, 1:], t,
                                       num_prefix_tokens=0, cls_weight=distiller.cls_weight) for x, t in zip(views, targets)]
    distiller.branch.train(was)
    return float(torch.stack(losses).mean())


def run(args: argparse.Namespace) -> dict:
    from fdistill import FeatureDistiller, create_student
    from fdistill.data import build_distill_dataset, build_distill_loader
    from fdistill.engine.optim import create_adamw
    from fdistill.engine.step import TrainStep
    from fdistill.losses import feature_distill_loss

    missing = [str(p) for p in (CIFAR / "train", CIFAR / "val", WEIGHTS) if not p.exists()]
    if missing:
        raise SystemExit(f"needs the shared CIFAR data and ResNet-56 weights; missing: {missing}")
    torch.set_num_threads(args.threads)
    teacher = build_teacher()

    # the same FD views for every variant, loaded once
    loader = build_distill_loader(build_distill_dataset(CIFAR / "train", img_size=32, seed=args.seed),
                                  batch_size=args.batch, num_workers=0, seed=args.seed)
    batches, epoch = [], 0
    while len(batches) < args.steps:
        loader.set_epoch(epoch)
        for b in loader:
            batches.append(b["images"])
            if len(batches) == args.steps:
                break
        epoch += 1
    val = build_distill_loader(build_distill_dataset(CIFAR / "val", img_size=32, seed=args.seed + 1),
                               batch_size=64, num_workers=0, shuffle=False)
    views = [b["images"].float() / 255 for _, b in zip(range(2), val)]

    results = []
    for name, ratio, drop in VARIANTS:
        torch.manual_seed(args.seed)
        student = create_student("vit_tiny", img_size=32, patch_size=4, embed_dim=args.width, depth=args.depth,
                                 num_heads=max(1, args.width // 32), drop_path_rate=0.0)
        d = FeatureDistiller(teacher, student, mask_ratio=ratio, drop_masked=drop).train()
        if ratio == 0 or drop:
            d.student.mask_token.requires_grad_(False)
        targets = [d.teacher_targets(v) for v in views]
        start = heldout_loss(d, views, targets)
        zero = float(torch.stack([feature_distill_loss(torch.zeros_like(t), t, num_prefix_tokens=0) for t in targets]).mean())
        opt = create_adamw(d.branch, lr=args.lr, weight_decay=0.05)
        warm = max(1, args.steps // 25)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warm if s < warm else
                                                  0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, args.steps - warm))))
        step = TrainStep(d, opt, clip_grad=3.0)
        times, train_loss = [], []
        for x in batches:
            t0 = time.perf_counter()
            (out,), _, _ = step([x])
            times.append(time.perf_counter() - t0)
            sched.step()
            train_loss.append(float(out["loss"].detach()))
        end = heldout_loss(d, views, targets)
        n = d.student_grid[0] * d.student_grid[1]
        tokens = 1 + (n - round(ratio * n) if drop else n)
        results.append({"variant": name, "mask_ratio": ratio, "drop_masked": drop, "student_tokens": tokens,
                        "step_ms": 1e3 * statistics.median(times), "heldout_loss_start": start,
                        "heldout_loss_end": end, "zero_predictor_loss": zero,
                        "train_loss_last10": statistics.mean(train_loss[-10:])})
        print(f"{name:24s} tokens {tokens:3d}  {results[-1]['step_ms']:6.1f} ms/step  held-out loss "
              f"{start:.4f} -> {end:.4f} (zero predictor {zero:.4f})", flush=True)
    full = results[0]
    for r in results:
        r["speed_vs_full"] = full["step_ms"] / r["step_ms"]
        r["loss_vs_full"] = r["heldout_loss_end"] / full["heldout_loss_end"]
    return {"steps": args.steps, "batch": args.batch, "student": f"ViT {args.width}-wide, {args.depth} blocks, "
            f"patch 4 at 32 px (8x8 grid)", "teacher": "CIFAR ResNet-56 (../shared), 8x8x64 map",
            "threads": args.threads, "torch": torch.__version__.split("+")[0], "results": results}


def markdown(r: dict) -> str:
    lines = ["| variant | student tokens | ms/step | speed vs full | held-out loss (whole images) | vs full |",
             "|---|---|---|---|---|---|"]
    for x in r["results"]:
        lines.append(f"| {x['variant']} | {x['student_tokens']} | {x['step_ms']:.1f} | {x['speed_vs_full']:.2f}x | "
                     f"{x['heldout_loss_start']:.4f} -> {x['heldout_loss_end']:.4f} | {x['loss_vs_full']:.3f} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> dict:
    args = parse_args(argv)
    r = run(args)
    print()
    print(markdown(r))
    if args.json:
        args.json.write_text(json.dumps(r, indent=2) + "\n")
    return r


if __name__ == "__main__":
    main()
