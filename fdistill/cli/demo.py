"""``fdistill demo`` and ``fdistill pretrain-clip`` (the demo's first stage)."""
from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the paper in miniature, offline on CPU: CLIP teacher -> FD student -> "
                                    "evaluation -> diagnostics -> report.html",
                       description="Pre-train a tiny CLIP teacher, feature-distil it, evaluate teacher and "
                                   "student with one recipe, run the diagnostics and write a report.")
    p.add_argument("--output", default="runs/demo", help="output folder (report.html, results.json)")
    p.add_argument("--quick", action="store_true", help="smaller stages (the times are in the README)")
    p.add_argument("--seeds", type=int, default=1, help="repeat with seeds 0..N-1 and report mean and spread")
    p.add_argument("--data", default=None, help="a folder with train/ and val/ class sub-folders (captions 'a "
                                                "photo of a {class}') instead of the built-in procedural dataset")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--check", action="store_true", help="only check the report already in --output (table, "
                                                        "figures, timings); exit 1 if anything is missing")
    p.set_defaults(func=_demo)

    r = sub.add_parser("reproduce-mini", help="the miniature test of the paper's claim (docs/evidence.md): FD "
                                              "length sweep, seeds, ablations, one fine-tuning recipe",
                       description="Distil the shipped CLIP teacher (fdistill/assets/clip_mini) into students "
                                   "for 0-30 epochs, fine-tune and probe teacher, students and scratch with one "
                                   "recipe, measure attention distance; writes results.json, results.md and "
                                   "figures/. Stages are cached by their command's hash: a rerun continues.")
    r.add_argument("--output", default="runs/mini", help="output folder (stages/, results.json, figures/)")
    r.add_argument("--quick", action="store_true", help="the same stages on less data and fewer epochs (~20 min)")
    r.add_argument("--check", action="store_true", help="only check the results already in --output; exit 1 on "
                                                        "any problem")
    r.set_defaults(func=_reproduce_mini)

    q = sub.add_parser("pretrain-clip", help="train a small CLIP model from scratch on image-caption pairs "
                                              "(the demo's teacher)",
                       description="Contrastive pre-training of a tiny open_clip CLIP (image ViT + text "
                                   "transformer) on synthetic captions or 'a photo of a {class}'. Writes an "
                                   "open_clip local-dir folder usable as teacher spec open_clip:local-dir:DIR.")
    q.add_argument("--data", default="synthetic:10000", help="synthetic[:N] or an image folder with classes")
    q.add_argument("--output", required=True)
    q.add_argument("--steps", type=int, default=600)
    q.add_argument("--batch-size", type=int, default=256)
    q.add_argument("--lr", type=float, default=1e-3)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--device", default="cpu")
    q.add_argument("--warmup-steps", type=int, default=50)
    q.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many steps (the schedule still spans --steps): a prefix of the same run")
    q.add_argument("--model-cfg", default=None,
                   help="'tiny' (the demo's CLIP, 4x4 tokens; default), 'mini' (the miniature's teacher, 8x8 "
                        "tokens) or an open_clip model config JSON file")
    q.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads); the shipped "
                                                             "teachers were trained with 1, which reproduces them")
    q.add_argument("--resume", default="auto", metavar="auto|none|PATH",
                   help="auto: continue from the newest checkpoint in OUTPUT/checkpoints (default; the same "
                        "result as a run that was not stopped); none: start over; PATH: a checkpoint file")
    q.add_argument("--no-progress", action="store_true")
    q.set_defaults(func=_pretrain_clip)


def _demo(args) -> int:
    from ..demo.pipeline import run_demo
    from ..demo.report import check_demo_report

    if args.check:
        problems = check_demo_report(args.output)
        for p in problems:
            print(f"demo report: {p}")
        print(f"demo report in {args.output}: " + ("OK" if not problems else f"{len(problems)} problem(s)"))
        return 1 if problems else 0
    report = run_demo(args.output, quick=args.quick, seeds=args.seeds, data=args.data, device=args.device)
    print(f"report: {report}")
    return 0


def _reproduce_mini(args) -> int:
    from ..experiments.miniature import StageStopped, run_miniature
    from ..experiments.miniature_report import check_results

    if not args.check:
        try:
            print(f"results: {run_miniature(args.output, quick=args.quick)}")
        except StageStopped as e:  # pre-empted: the stage checkpointed; as distill, a clean exit
            print(f"reproduce-mini: {e}")
            return 0
    problems = check_results(args.output)
    for p in problems:
        print(f"reproduce-mini: {p}")
    print(f"reproduce-mini results in {args.output}: " + ("OK" if not problems else f"{len(problems)} problem(s)"))
    return 1 if problems else 0


def _pretrain_clip(args) -> int:
    import torch

    from ..demo.clip_pretrain import CLIP_CFGS, pretrain_clip_on

    if args.model_cfg is None or args.model_cfg in CLIP_CFGS:
        cfg = CLIP_CFGS[args.model_cfg or "tiny"]
    else:
        cfg = json.loads(open(args.model_cfg).read())
    if args.threads:
        torch.set_num_threads(args.threads)
    summary = pretrain_clip_on(args.data, args.output, model_cfg=cfg, steps=args.steps, batch_size=args.batch_size,
                               lr=args.lr, seed=args.seed, device=args.device, progress=not args.no_progress,
                               warmup_steps=args.warmup_steps, max_steps=args.max_steps,
                               resume=None if args.resume in ("none", "None", "") else args.resume)
    print(f"CLIP teacher: {summary['spec']}  (loss {summary['loss_first']:.3f} -> {summary['loss_last']:.3f}, "
          f"zero-shot top-1 on val {summary['zero_shot_top1']:.1f}%, {summary['seconds']:.0f} s)")
    return 0
