"""``fdistill diagnose {attention-distance,attention-maps,loss-landscape,resolution,report}``: the paper's
Section 4 diagnostics on any models fdistill loads (see docs/diagnose.md). Parses arguments and
calls :mod:`fdistill.diagnostics.commands`."""
from __future__ import annotations

import argparse
from typing import List

EXAMPLES = """examples:
  fdistill diagnose attention-distance --model timm:vit_base_patch16_clip_quickgelu_224.openai --model runs/fd_clip \\
      --data /data/imagenet --images 128 --device cuda --out diag/
  fdistill diagnose attention-maps --model runs/fd_clip --layers 1,2,-3,-2,-1 --data synthetic --out diag/
  fdistill diagnose loss-landscape --model finetune/clip --model finetune/fd_clip --data /data/imagenet --out diag/
  fdistill diagnose resolution --model runs/multi --sizes 112,224,448 --data synthetic --out diag/
  fdistill diagnose report --model python:resnet.py:build --model-kwargs '{"weights": "r.safetensors"}' \\
      --model runs/fd_resnet --data ../shared/data/cifar10-jpg-mini --out diag/
"""


class _ModelAction(argparse.Action):
    """``--model SPEC`` starts a model; ``--model-kwargs`` / ``--label`` apply to the last one."""

    def __call__(self, parser, namespace, values, option_string=None):
        models: List[dict] = getattr(namespace, "models", None) or []
        if option_string == "--model":
            models.append(dict(spec=values, kwargs=None, label=None))
        else:
            if not models:
                parser.error(f"{option_string} must follow the --model it applies to")
            key = "kwargs" if option_string == "--model-kwargs" else "label"
            if models[-1][key] is not None:
                parser.error(f"{option_string} given twice for --model {models[-1]['spec']}")
            models[-1][key] = values
        namespace.models = models


def _layers(text: str) -> List[int]:
    try:
        vals = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers takes comma-separated layer numbers like 1,2,-1; got {text!r}")
    if not vals or any(v == 0 for v in vals):
        raise argparse.ArgumentTypeError("--layers are 1-based (1 = first) or negative from the end (-1 = last)")
    return vals


def _positive(text: str) -> int:
    v = int(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {v}")
    return v


def _common(p: argparse.ArgumentParser, *, images_default: int, images_help: str) -> None:
    g = p.add_argument_group("models (repeat --model to compare several in one figure)")
    g.add_argument("--model", dest="models", action=_ModelAction, required=True, metavar="SPEC",
                   help="timm:NAME, open_clip:ARCH/TAG, hf:REPO_OR_DIR, python:FILE:FACTORY, a distillation run "
                        "folder or checkpoint, an exported model folder, or a fine-tuning output folder")
    g.add_argument("--model-kwargs", dest="models", action=_ModelAction, metavar="JSON",
                   help="JSON keyword arguments for the preceding --model (e.g. '{\"pretrained\": false}')")
    g.add_argument("--label", dest="models", action=_ModelAction, metavar="NAME",
                   help="figure label for the preceding --model (default: its spec)")
    d = p.add_argument_group("data")
    d.add_argument("--data", required=True, help="image folder (with train/ val/ or class folders), synthetic[:N], "
                                                 "or a torchvision dataset name")
    d.add_argument("--split", default="val", choices=["train", "val"], help="split to measure (default: val)")
    d.add_argument("--images", type=_positive, default=images_default, help=images_help)
    d.add_argument("--batch-size", type=_positive, default=32)
    d.add_argument("--workers", type=int, default=None, help="data loader workers (default: up to 4)")
    r = p.add_argument_group("run")
    r.add_argument("--out", required=True, help="output folder (JSON, PNG)")
    r.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu)")
    r.add_argument("--seed", type=int, default=0, help="image subset and direction seeds (default: 0)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")


def _distance_args(p: argparse.ArgumentParser) -> None:
    from ..diagnostics.distance import DEFAULT_RENORMALIZE

    g = p.add_argument_group("attention distance")
    g.add_argument("--keep-self", action="store_true",
                   help="keep each query's weight on its own patch (default: omitted, as in the paper)")
    g.add_argument("--renormalize", action=argparse.BooleanOptionalAction, default=DEFAULT_RENORMALIZE,
                   help="renormalise the kept weights (patches, minus self) to sum to 1 per query "
                        f"(default: {'on' if DEFAULT_RENORMALIZE else 'off'}); the choice is stated in the outputs")


def _maps_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("attention maps")
    g.add_argument("--layers", type=_layers, default=None,
                   help="layers to show, 1-based, negative from the end (default: 1,2,-3,-2,-1)")


def _sizes(text: str) -> List[int]:
    try:
        vals = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sizes takes comma-separated pixel sizes like 112,224,448; got {text!r}")
    if not vals or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"--sizes must be positive, got {text!r}")
    return vals


def _at_least_two(text: str) -> int:
    v = int(text)
    if v < 2:
        raise argparse.ArgumentTypeError(f"needs at least 2 points, got {v}")
    return v


def _positive_float(text: str) -> float:
    v = float(text)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return v


def _landscape_args(p: argparse.ArgumentParser, report: bool = False) -> None:
    from ..diagnostics.commands import DEFAULT_HEAD_IMAGES
    from ..diagnostics.landscape import DEFAULT_NUM_ALPHAS, DEFAULT_NUM_DIRECTIONS

    g = p.add_argument_group("loss landscape")
    g.add_argument("--directions", type=_positive, default=DEFAULT_NUM_DIRECTIONS,
                   help="random directions, seeds SEED..SEED+n-1 (default: 5)")
    g.add_argument("--alphas", type=_at_least_two, default=DEFAULT_NUM_ALPHAS,
                   help="points in [-range, range] (default: 51)")
    g.add_argument("--alpha-range", type=_positive_float, default=1.0, help="largest |alpha| (default: 1)")
    g.add_argument("--head-split", default="train", choices=["train", "val"],
                   help="split the linear head of a non-classifier is fitted on (default: train)")
    g.add_argument("--head-images", type=_positive, default=DEFAULT_HEAD_IMAGES,
                   help=f"images to fit that head on (default: {DEFAULT_HEAD_IMAGES})")
    if report:
        g.add_argument("--landscape-images", type=_positive, default=None,
                       help="images per landscape point (default: 500)")


def register(subparsers) -> None:
    from ..diagnostics.commands import DEFAULT_ATTENTION_IMAGES, DEFAULT_LANDSCAPE_IMAGES

    p = subparsers.add_parser(
        "diagnose", help="attention distance, attention maps and loss landscapes (paper Sec. 4)",
        description="The paper's diagnostics (Sec. 4, Figures 3-5) on any models fdistill loads, several models per "
                    "figure.", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="diagnostic", metavar="DIAGNOSTIC", required=True)
    att_help = f"images (a seeded random subset; default: {DEFAULT_ATTENTION_IMAGES})"

    d = sub.add_parser("attention-distance", help="per-head mean attention distance (Figure 3)",
                       description="For every layer and head: the mean distance in pixels between a query patch and "
                                   "the patches it attends to, weighted by attention. Writes attention_distance.json "
                                   "and attention_distance.png.")
    _common(d, images_default=DEFAULT_ATTENTION_IMAGES, images_help=att_help)
    _distance_args(d)
    d.set_defaults(func=cmd_attention_distance)

    m = sub.add_parser("attention-maps", help="per-layer attention maps averaged over heads and images (Figure 4)",
                       description="Writes attention_maps.json, attention_maps.png and the maps themselves "
                                   "(attention_maps.safetensors).")
    _common(m, images_default=DEFAULT_ATTENTION_IMAGES, images_help=att_help)
    _maps_args(m)
    m.set_defaults(func=cmd_attention_maps)

    ll = sub.add_parser("loss-landscape", help="loss/accuracy along filter-normalised random directions (Figure 5)",
                        description="A fine-tuned classifier is used as is; any other model gets a linear head "
                                    "fitted on its frozen features first. Writes loss_landscape.json and "
                                    "loss_landscape.png.")
    _common(ll, images_default=DEFAULT_LANDSCAPE_IMAGES,
            images_help=f"images per landscape point (default: {DEFAULT_LANDSCAPE_IMAGES})")
    _landscape_args(ll)
    ll.set_defaults(func=cmd_loss_landscape)

    rs = sub.add_parser("resolution", help="feature similarity of the same images at several input sizes",
                        description="RADIO v2.5's 'mode switching' check: each model's patch and summary features at "
                                    "each of --sizes, compared (cosine) with its features at its own input size. "
                                    "Writes resolution.json and resolution.png.")
    _common(rs, images_default=DEFAULT_ATTENTION_IMAGES, images_help=att_help)
    rs.add_argument("--sizes", type=_sizes, required=True, metavar="PX,PX,...",
                    help="input sizes in pixels, e.g. 112,224,448 (the model's own size is always included)")
    rs.set_defaults(func=cmd_resolution)

    r = sub.add_parser("report", help="all three diagnostics and one self-contained HTML report",
                       description="Runs attention-distance, attention-maps and loss-landscape and writes "
                                   "report.html (figures embedded) next to their JSON and PNG files.")
    _common(r, images_default=DEFAULT_ATTENTION_IMAGES, images_help=att_help + " for the attention diagnostics")
    _distance_args(r)
    _maps_args(r)
    _landscape_args(r, report=True)
    r.set_defaults(func=cmd_report)


def _model_refs(args):
    from ..diagnostics.commands import ModelRef
    from .evaluate import parse_model_kwargs  # the one --model-kwargs parser

    return [ModelRef(m["spec"], parse_model_kwargs(m["kwargs"]), m["label"]) for m in args.models]


def _data(args, images=None):
    from ..diagnostics.commands import DataOptions

    return DataOptions(args.data, args.split, images or args.images, args.batch_size, args.seed, args.workers)


def _landscape_opts(args):
    from ..diagnostics.commands import LandscapeOptions

    return LandscapeOptions(directions=args.directions, num_alphas=args.alphas, alpha_range=args.alpha_range,
                            head_split=args.head_split, head_images=args.head_images)


def _print_summary(title: str, lines: List[str]) -> None:
    print(title)
    for line in lines:
        print("  " + line)


def cmd_attention_distance(args) -> int:
    from ..diagnostics.commands import run_attention_distance

    js = run_attention_distance(_model_refs(args), _data(args), args.out, exclude_self=not args.keep_self,
                                renormalize=args.renormalize, device=args.device, progress=not args.no_progress)
    _print_summary(f"attention distance ({js['note']})",
                   [f"{m['label']}: layer means " + ", ".join(f"{v:.1f}" for v in m["layer_mean_px"]) + " px"
                    for m in js["models"]])
    print(f"wrote {args.out}/attention_distance.json and attention_distance.png")
    return 0


def cmd_attention_maps(args) -> int:
    from ..diagnostics.commands import run_attention_maps

    js = run_attention_maps(_model_refs(args), _data(args), args.out, layers=args.layers, device=args.device,
                            progress=not args.no_progress)
    _print_summary("attention maps", [f"{m['label']}: layers {m['layers']} of {m['depth']}" for m in js["models"]])
    print(f"wrote {args.out}/attention_maps.json, attention_maps.png and attention_maps.safetensors")
    return 0


def cmd_loss_landscape(args) -> int:
    from ..diagnostics.commands import run_loss_landscape

    js = run_loss_landscape(_model_refs(args), _data(args), args.out, options=_landscape_opts(args),
                            device=args.device, progress=not args.no_progress)
    _print_summary("loss landscape", [f"{m['label']}: loss {m['loss0']:.4f}, accuracy {100 * m['accuracy0']:.2f}% "
                                      f"at alpha=0; mean loss {m['loss_at_1']:.4f} at |alpha|=1 ({m['classifier']})"
                                      for m in js["models"]])
    print(f"wrote {args.out}/loss_landscape.json and loss_landscape.png")
    return 0


def cmd_resolution(args) -> int:
    from ..diagnostics.resolution import run_resolution_consistency

    js = run_resolution_consistency(_model_refs(args), _data(args), args.out, sizes=args.sizes, device=args.device,
                                    progress=not args.no_progress)
    _print_summary("feature similarity to each model's own input size (patch / summary cosine)",
                   [f"{m['label']}: " + ", ".join(f"{s} px {p:.3f} / {v:.3f}" for s, p, v in
                                                  zip(m["sizes"], m["patch_cosine"], m["summary_cosine"]))
                    for m in js["models"]] + [f"{m['label']}: skipped ({m['reason']})" for m in js["skipped"]])
    print(f"wrote {args.out}/resolution.json" + (" and resolution.png" if js["models"] else ""))
    return 0


def cmd_report(args) -> int:
    from ..diagnostics.commands import DEFAULT_LANDSCAPE_IMAGES, run_report

    out = run_report(_model_refs(args), _data(args), args.out,
                     landscape_data=_data(args, images=args.landscape_images or DEFAULT_LANDSCAPE_IMAGES),
                     landscape=_landscape_opts(args), layers=args.layers, exclude_self=not args.keep_self,
                     renormalize=args.renormalize, device=args.device, progress=not args.no_progress)
    print(f"attention distance: {out['distance']['note']}")
    print(f"wrote {out['report']}")
    return 0

