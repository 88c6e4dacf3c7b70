"""``fdistill finetune | linprobe | knn | zeroshot | segprobe | segment | depth | detect``: argument parsing only; the work is in
:mod:`fdistill.eval.commands` (configs: :mod:`fdistill.config.finetune`)."""
from __future__ import annotations

import argparse
import json

from ..errors import UsageError

OVERRIDES_HELP = "recipe overrides, dotted keys: optim.layer_decay=0.65 data.batch_size=64 epochs=10"
MODEL_HELP = ("a teacher spec (timm:..., open_clip:ARCH/TAG, hf:REPO, python:FILE:FN), a distillation run folder "
              "or checkpoint (the FD student), or an exported model folder")


def _schema(command: str):
    from ..config.schemas import schemas

    return schemas()[command]


def parse_model_kwargs(text):
    """One ``--model-kwargs`` value (a JSON object, every command's) -> dict; {} for none."""
    if not text:
        return {}
    try:
        v = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"--model-kwargs {text!r} is not valid JSON (e.g. '{{\"pretrained\": false}}'): {e}") from e
    if not isinstance(v, dict):
        raise UsageError(f"--model-kwargs must be a JSON object, got {text!r}")
    return v


def _kwargs_list(raw, n_models: int):
    parsed = [parse_model_kwargs(r) for r in raw or []]
    if not parsed:
        return [None] * n_models
    if len(parsed) != n_models:
        raise UsageError(f"give --model-kwargs once per model ({n_models}), in order ('{{}}' for none); got {len(parsed)}")
    return parsed


def _config(args):
    from ..config import build_config

    extra = list(args.overrides or [])
    for flag, key in getattr(args, "_flag_keys", ()):
        v = getattr(args, flag, None)
        if v is not None and v is not False:
            extra.append(f"{key}={json.dumps(v) if isinstance(v, (dict, list)) else v}")
    if getattr(args, "download", False):
        extra.append("data.download=true")
    if getattr(args, "device", None):
        extra.append(f"device={args.device}")
    from ..config.recipes import resolve_recipe

    return build_config(_schema(args.command), resolve_recipe(args.config, args.command), extra)


def _run(args) -> int:
    from ..eval.commands import COMMANDS, TRAINING_COMMANDS, compare

    cfg = _config(args)
    models = args.compare if args.compare else ([args.model] if args.model else [])
    if not models:
        raise UsageError(f"{args.command}: give --model SPEC (or --compare A B ...)")
    if args.model and args.compare:
        raise UsageError("give either --model or --compare, not both")
    kws = _kwargs_list(args.model_kwargs, len(models))
    if getattr(args, "head", None):
        from pathlib import Path

        kws = [dict(kw or {}, head=args.head) if Path(m).expanduser().exists() else kw for m, kw in zip(models, kws)]
        if all("head" not in (kw or {}) for kw in kws):
            raise UsageError(f"--head {args.head}: none of the models is a run folder or checkpoint")
    data = {"val": args.val}
    if args.command == "zeroshot":
        if not (args.val or args.train):
            raise UsageError("zeroshot: give the evaluation images with --val PATH")
        data = {"val": args.val or args.train}
    else:
        if not args.train:
            raise UsageError(f"{args.command}: give the training images with --train PATH")
        data["train"] = args.train
    if args.command in TRAINING_COMMANDS:
        if not args.output:
            raise UsageError(f"{args.command}: give an output folder with --output DIR")
        data["resume"] = None if args.resume in ("none", "None", "") else args.resume
    if len(models) > 1 or args.compare:
        compare(args.command, cfg, models=models, model_kwargs=kws, output=args.output, **data)
    else:
        COMMANDS[args.command](cfg, model=models[0], model_kwargs=kws[0], output=args.output, **data)
    return 0


def _int_list(text: str):
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None
    if not vals:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return vals


TRAIN_HELP = ("training images: a folder with class sub-folders (or a root with train/ and val/), 'synthetic[:N]', "
              "or a torchvision name such as cifar10")


def _common(p: argparse.ArgumentParser, *, train: bool = True, train_help: str = TRAIN_HELP,
            download: bool = True) -> None:
    p.add_argument("--model", metavar="SPEC", help=MODEL_HELP)
    p.add_argument("--model-kwargs", action="append", metavar="JSON",
                   help="keyword arguments for the model's spec as JSON, e.g. '{\"weights\": \"r56.safetensors\"}'; "
                        "with --compare repeat it once per model, in order ('{}' for none)")
    p.add_argument("--compare", nargs="+", metavar="SPEC",
                   help="run several models with the same recipe and print them side by side (writes compare.json)")
    if train:
        p.add_argument("--train", metavar="PATH", help=train_help)
    p.add_argument("--val", metavar="PATH", help="evaluation images (default: the val split of --train)")
    p.add_argument("--head", metavar="NAME", help="a multi-teacher run seen through its head NAME (that teacher's "
                                                  "feature space; fdistill.multi); applies to the run folders / "
                                                  "checkpoints among the models")
    if download:
        p.add_argument("--download", action="store_true", help="let torchvision download a named dataset")
    p.add_argument("--output", metavar="DIR", help="where metrics.json (and, for finetune, weights) go")
    p.add_argument("--config", metavar="FILE|NAME", help="a YAML recipe file or a shipped recipe by name (e.g. "
                                                         "vit_base, tiny_cpu; `fdistill recipes`); default: the "
                                                         "schema's defaults")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), help="sets device=")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)
    p.set_defaults(func=_run, train=None)


def _resume(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", default="auto", metavar="auto|none|PATH",
                   help="auto: continue from the newest checkpoint in OUTPUT/checkpoints that loads (default); "
                        "none: start over")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune", help="fine-tune a model for image classification (BEiT/MAE recipe, layer-wise lr decay)",
        description="End-to-end fine-tuning with AdamW + layer-wise lr decay, drop path, RandAugment, mixup/cutmix, "
                    "label smoothing, warm-up + cosine, optional EMA; top-1/top-5; best and last weights; resumable. "
                    "Default recipe: the official FD CLIP ViT-B/16 fine-tuning (configs/finetune/vit_base.yaml). "
                    "Several GPUs: torchrun --nproc_per_node=N -m fdistill.cli.main finetune ...")
    _common(p)
    _resume(p)
    p.set_defaults(_flag_keys=())

    p = sub.add_parser(
        "linprobe", help="linear probe on frozen features (MAE recipe, or a fast sweep of heads)",
        description="MAE linear probing (BatchNorm without affine + linear head, LARS, 90 epochs) with mode=standard; "
                    "--fast extracts features once and trains a grid of heads (features x learning rates) in one pass.")
    _common(p)
    p.add_argument("--fast", dest="mode", action="store_const", const="fast", help="sets mode=fast (the sweep)")
    p.add_argument("--feature", help="standard mode: cls | avg | cls+avg | last<n> | auto")
    p.set_defaults(_flag_keys=(("mode", "mode"), ("feature", "feature")))

    p = sub.add_parser("knn", help="weighted k-NN classification on frozen features (DINO: k=20, T=0.07)",
                       description="Weighted k-NN on L2-normalised frozen features, streamed over the test set.")
    _common(p)
    p.add_argument("--k", type=_int_list, metavar="K[,K...]",
                   help="neighbour counts, comma-separated (the first gives top1/top5), e.g. 20 or 10,20,100,200")
    p.add_argument("--feature", help="cls | avg | cls+avg | last<n> | auto")
    p.set_defaults(_flag_keys=(("k", "k"), ("feature", "feature")))

    p = sub.add_parser(
        "zeroshot", help="CLIP zero-shot classification (teacher, or FD student through its projector)",
        description="Class-name prompts through the CLIP text tower vs image embeddings. For an FD student distilled "
                    "from a CLIP teacher: student [CLS] -> projector -> the teacher's projection, teacher side by side.")
    _common(p)
    p.add_argument("--templates", help="openai (80 prompts) | simple | a text file, one template per line with {}")
    p.add_argument("--classnames", metavar="FILE", help="class names, one per line, in the dataset's class order")
    p.add_argument("--text-model", metavar="SPEC", help="text tower for a timm CLIP image tower: open_clip:ARCH/TAG")
    p.add_argument("--teacher", metavar="SPEC", help="teacher of an FD student (default: the one its run recorded)")
    p.set_defaults(_flag_keys=(("templates", "templates"), ("classnames", "classnames"),
                               ("text_model", "text_model"), ("teacher", "teacher")))

    p = sub.add_parser(
        "segprobe", help="linear semantic segmentation probe on the frozen token map (DINOv2-style; mIoU)",
        description="A dense evaluation: BatchNorm + 1x1 conv on the frozen model's output patch tokens, upsampled "
                    "to the label map, per-pixel cross-entropy; mIoU / pixel accuracy / mean class accuracy. Data: an "
                    "ADE20K-style folder (images/<split>, annotations/<split>; ADE20K itself with "
                    "--reduce-zero-label --num-classes 150) or synthetic[:N].")
    _common(p, download=False, train_help="an ADE20K-style folder (images/<split>/*.jpg + annotations/<split>/*.png; "
                                          "train = train or training, val = val or validation) or 'synthetic[:N]' "
                                          "(the built-in scenes' object masks)")
    p.add_argument("--num-classes", type=int, help="sets num_classes= (default: classes.txt, or 11 for synthetic)")
    p.add_argument("--reduce-zero-label", action="store_true",
                   help="sets reduce_zero_label=true: label 0 ignored, 1..K -> 0..K-1 (ADE20K)")
    p.set_defaults(_flag_keys=(("num_classes", "num_classes"), ("reduce_zero_label", "reduce_zero_label")))

    p = sub.add_parser(
        "segment", help="fine-tune a model inside UPerNet for semantic segmentation (ADE20K; mIoU)",
        description="The paper's ADE20K benchmark (Sec. 5): the backbone's blocks 4/6/8/12 through BEiT's pyramid "
                    "neck into UPerNet + an auxiliary FCN head, AdamW with layer-wise lr decay, poly schedule, "
                    "random rescale / crop / flip / photometric distortion; single-scale sliding-window inference "
                    "at each image's original size; mIoU / aAcc / mAcc; best and last weights; resumable. Default "
                    "recipe: configs/segment/ade20k_upernet_vit_base.yaml. Several GPUs: torchrun "
                    "--nproc_per_node=N -m fdistill.cli.main segment ...")
    _common(p, download=False, train_help="an ADE20K-style folder (images/<split>/*.jpg + annotations/<split>/*.png; "
                                          "train = train or training, val = val or validation) or 'synthetic[:N]'")
    p.add_argument("--num-classes", type=int, help="sets num_classes= (default: classes.txt, or 11 for synthetic)")
    p.add_argument("--reduce-zero-label", action="store_true",
                   help="sets reduce_zero_label=true: label 0 ignored, 1..K -> 0..K-1 (ADE20K)")
    _resume(p)
    p.set_defaults(_flag_keys=(("num_classes", "num_classes"), ("reduce_zero_label", "reduce_zero_label")))

    p = sub.add_parser(
        "depth", help="fine-tune a model inside a DPT decoder for monocular depth (NYUv2; RMSE)",
        description="The paper's NYUv2 benchmark (Sec. 5): the backbone's blocks 4/6/8/12 through BEiT's pyramid "
                    "neck into DPT's fusion decoder, depth = max_depth x sigmoid, SiLog loss, random crops + flip, "
                    "one-cycle schedule; whole test images scored on the Eigen crop; RMSE, abs rel, log10, "
                    "delta1-3; best and last weights; resumable. Default recipe: configs/depth/nyuv2_vit_base.yaml. "
                    "Several GPUs: torchrun --nproc_per_node=N -m fdistill.cli.main depth ...")
    _common(p, download=False, train_help="a NYUv2-layout folder (a split file of 'rgb depth [focal]' lines, 16-bit "
                                          "depth PNGs in millimetres: nyu_train.txt / nyu_test.txt or train.txt / "
                                          "test.txt) or 'synthetic[:N]' (the built-in scenes' depth maps)")
    _resume(p)
    p.set_defaults(_flag_keys=())

    p = sub.add_parser(
        "detect", help="fine-tune a model inside Mask R-CNN for detection + instance segmentation (COCO; AP)",
        description="The paper's COCO benchmark (Sec. 5): every block with window-14 attention plus one added "
                    "global block, ViTDet's simple feature pyramid, torchvision's Mask R-CNN; 1x schedule (12 "
                    "epochs, lr x0.1 after 8 and 11), multi-scale training (shorter side 480-800, longer <= 1333), "
                    "single-scale test; AdamW with layer-wise lr decay; AP box / AP mask (+ AP50/75/S/M/L) by the "
                    "COCO API; best (AP box) and last weights; resumable. Default recipe: "
                    "configs/detect/coco_maskrcnn_vit_base.yaml. Several GPUs: torchrun --nproc_per_node=N -m "
                    "fdistill.cli.main detect ...")
    _common(p, download=False, train_help="a COCO root (train2017/, val2017/, annotations/instances_train2017.json "
                                          "and instances_val2017.json) or 'synthetic[:N]' (the built-in scenes "
                                          "exported as one under OUTPUT/data)")
    _resume(p)
    p.set_defaults(_flag_keys=())
