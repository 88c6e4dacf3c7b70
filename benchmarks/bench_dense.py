#!/usr/bin/env python
"""Benchmark one training step of each dense fine-tuning command (segment, depth, detect).

    python benchmarks/bench_dense.py                      # the tiny CPU recipes, all three tasks
    python benchmarks/bench_dense.py --size vitb --batch 1 --task detect
    python benchmarks/bench_dense.py --size vitb --batch 2 --json out.json

One step = the task's forward + loss + backward + AdamW with layer decay, exactly what the
engine runs (:class:`fdistill.engine.step.TrainStep` over the task's ``loss_module``), on a fixed
batch of random images already on the device:

- ``tiny``: each task's ``tiny_cpu`` recipe with a randomly initialised ViT-Ti/16 (depth 4) at the
  recipe's size (segment / depth: the crop; detect: 32 px scenes resized to the recipe's sizes).
- ``vitb``: the paper's recipes with a randomly initialised CLIP ViT-B/16 (QuickGELU) at the
  paper's input size: segment 512 x 512 crops (UPerNet), depth 480 x 480 crops (DPT), detect
  640 x 480 images resized by Mask R-CNN's transform to a shorter side of 480-800 (longer <= 1333),
  window-14 attention + the added global block.

Prints step time (median over rounds after a warm-up step), images/s and peak memory (the
measurement of ``benchmarks/measure.py``) per task, one JSON line each; ``--json`` writes them
all. Results are recorded by hand in ``benchmarks/RESULTS.md`` ("Dense fine-tuning at CPU scale").
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "benchmarks"

import torch  # noqa: E402

from benchmarks.measure import (device_name, live_tensor_bytes, load_average, peak_step_memory,  # noqa: E402
                                summarize, time_rounds)

TASKS = ("segment", "depth", "detect")
RECIPES = {"tiny": {t: "tiny_cpu" for t in TASKS},
           "vitb": {"segment": "ade20k_upernet_vit_base", "depth": "nyuv2_vit_base", "detect": "coco_maskrcnn_vit_base"}}
MODELS = {"tiny": ("timm:vit_tiny_patch16_224", {"pretrained": False, "depth": 4}),
          "vitb": ("timm:vit_base_patch16_clip_quickgelu_224.openai", {"pretrained": False})}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=TASKS + ("all",), default="all")
    p.add_argument("--size", choices=sorted(RECIPES), default="tiny", help="tiny recipes or the paper's ViT-B")
    p.add_argument("--batch", type=int, default=None, help="images per step (default: the recipe's)")
    p.add_argument("--rounds", type=int, default=3, help="timed steps (after one warm-up step)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    return p.parse_args(argv)


def _batch(task: str, cfg, batch: int, num_classes: int, size: str):
    """A fixed batch in the form each task's loss module takes (the loaders' output)."""
    g = torch.Generator().manual_seed(0)
    if task == "detect":
        h, w = (480, 640) if size == "vitb" else (32, 32)
        images, targets = [], []
        for _ in range(batch):
            images.append(torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g))
            boxes = torch.tensor([[0.1, 0.1, 0.5, 0.6], [0.4, 0.3, 0.9, 0.9], [0.2, 0.5, 0.45, 0.95]]) * \
                torch.tensor([w, h, w, h])
            masks = torch.zeros(3, h, w, dtype=torch.uint8)
            for j, (x0, y0, x1, y1) in enumerate(boxes.round().long().tolist()):
                masks[j, y0:y1, x0:x1] = 1
            targets.append({"boxes": boxes, "labels": torch.tensor([1, 2, 3]) % num_classes + 1, "masks": masks})
        return images, targets
    c = cfg.data.crop_size
    images = torch.randint(0, 256, (batch, 3, c, c), dtype=torch.uint8, generator=g)
    if task == "segment":
        return images, torch.randint(0, num_classes, (batch, c, c), generator=g)
    return images, torch.rand(batch, 1, c, c, generator=g) * 9.5 + 0.5


def _tensors(data) -> List[torch.Tensor]:
    images, targets = data
    if isinstance(images, list):
        return images + [v for t in targets for v in t.values()]
    return [images, targets]


def bench_task(task: str, size: str, *, batch: Optional[int], rounds: int, precision: str, device: str) -> dict:
    from fdistill.config import build_config
    from fdistill.config.recipes import resolve_recipe
    from fdistill.config.schemas import schemas
    from fdistill.dense.common import build_dense_optimizer
    from fdistill.engine.distributed import DistEnv
    from fdistill.engine.step import TrainStep
    from fdistill.models.loading import load_model

    dev = torch.device(device)
    cfg = build_config(schemas()[task], resolve_recipe(RECIPES[size][task], task), [f"precision={precision}"])
    spec, kw = MODELS[size]
    kw = dict(kw)
    if size == "tiny":
        kw["img_size"] = cfg.data.crop_size if task != "detect" else 128
    torch.manual_seed(0)
    adapter = load_model(spec, **kw)
    num_classes = {"segment": 150, "depth": 0, "detect": 80}[task] if size == "vitb" else 10
    with tempfile.TemporaryDirectory() as tmp:
        if task == "segment":
            from fdistill.dense.segment import SegmentTask, build_segmenter

            model, _ = build_segmenter(adapter, cfg, num_classes)
            t = SegmentTask(model.to(dev), val_loader=None, classes=[str(i) for i in range(num_classes)],
                            ignore_index=255, crop=cfg.data.crop_size, stride=cfg.data.slide_stride, mean=adapter.mean,
                            std=adapter.std, aux_weight=cfg.model.aux_weight, precision=precision, env=DistEnv(),
                            out=Path(tmp))
        elif task == "depth":
            from fdistill.dense.depth import DepthTask, build_depth_estimator

            model, criterion, _ = build_depth_estimator(adapter, cfg)
            t = DepthTask(model.to(dev), criterion, val_loader=None, crop=cfg.data.crop_size, mean=adapter.mean,
                          std=adapter.std, metric_args={}, precision=precision, env=DistEnv(), out=Path(tmp))
        else:
            from fdistill.dense.detect import DetectTask, build_detector

            model, _, _ = build_detector(adapter, cfg, num_classes)
            t = DetectTask(model.to(dev), val_loader=None, coco_gt=None, precision=precision, env=DistEnv(),
                           out=Path(tmp))
        bs = batch or cfg.data.batch_size
        data = _batch(task, cfg, bs, max(num_classes, 1), size)
        model.train()
        optimizer = build_dense_optimizer(model, cfg.optim)
        step = TrainStep(t.loss_module(model), optimizer, precision=precision, clip_grad=cfg.optim.clip_grad)
        step([data])  # warm-up: allocator, lazy inits
        peak = peak_step_memory(lambda: step([data]), dev,
                                static_cpu_bytes=live_tensor_bytes([model], [optimizer], extra=_tensors(data)))
        times = time_rounds({"step": lambda: step([data])}, dev, rounds=rounds)["step"]
    s = summarize(times)
    params = sum(p.numel() for p in model.parameters())
    return {"task": task, "size": size, "recipe": RECIPES[size][task], "model": spec, "batch": bs,
            "precision": precision, "step_s": s["median_s"], "spread": s["rel_spread"],
            "images_per_s": bs / s["median_s"], "peak_bytes": peak,
            "params_m": params / 1e6}


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    import timm

    torch.manual_seed(0)
    meta = {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "device": device_name(torch.device(args.device)),
            "torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "load": load_average()}
    print(json.dumps(meta))
    out = []
    for task in (TASKS if args.task == "all" else (args.task,)):
        r = bench_task(task, args.size, batch=args.batch, rounds=args.rounds, precision=args.precision,
                       device=args.device)
        out.append(dict(meta, **r))
        print(json.dumps(r), flush=True)
    print("\n| task | recipe | model | batch | step s | img/s | peak mem |\n|---|---|---|---|---|---|---|")
    for r in out:
        print(f"| {r['task']} | {r['recipe']} | {r['model'].split(':')[-1]} | {r['batch']} | {r['step_s']:.3f} | "
              f"{r['images_per_s']:.2f} | {r['peak_bytes'] / 2**30:.2f} GiB |")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
