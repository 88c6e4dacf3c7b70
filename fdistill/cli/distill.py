"""``fdistill distill | info | validate-config | export``: argument parsing only; the work is in
:mod:`fdistill.engine` and :mod:`fdistill.config.distill`."""
from __future__ import annotations

import argparse

from ..config.schemas import SCHEMA_NAMES

OVERRIDES_HELP = "config overrides, dotted keys: optim.base_lr=1e-3 train.epochs=100"


def _load_config(path, overrides, data=None, output=None):
    from ..config import build_config
    from ..config.distill import DistillConfig
    from ..config.recipes import resolve_recipe

    path = resolve_recipe(path, "distill")  # a file, or a shipped recipe by name

    extra = list(overrides or [])
    if data is not None:
        extra.append(f"data.path={data}")
    if output is not None:
        extra.append(f"train.output={output}")
    return build_config(DistillConfig, path, extra)


def _distill(args) -> int:
    from ..engine import distill

    cfg = _load_config(args.config, args.overrides, args.data, args.output)
    result = distill(cfg, resume=args.resume)
    return 0 if result.complete or result.stopped_by else 1


def _info(args) -> int:
    from ..engine.info import describe_run

    print(describe_run(_load_config(args.config, args.overrides)))
    return 0


def _validate(args) -> int:
    from ..config import to_dict
    from ..engine.builders import validate_without_building
    from ..config.schemas import build_any_config

    from ..config.recipes import resolve_recipe

    kind, cfg = build_any_config(resolve_recipe(args.config, args.schema), list(args.overrides or []),
                                 schema=args.schema)
    if kind == "distill":
        validate_without_building(cfg)
    if args.print:
        import yaml

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    if kind == "distill":
        from ..config.distill import teachers_description

        print(f"{args.config}: valid distill recipe ({teachers_description(cfg)} -> {cfg.student.arch}, "
              f"{cfg.train.epochs:g} epochs)")
    else:
        print(f"{args.config}: valid {kind} recipe (fdistill {kind} --config {args.config})")
    return 0


def _recipes(args) -> int:
    from ..config.recipes import list_recipes

    rows = list_recipes(args.kind)
    if not rows:
        print(f"no shipped recipes of kind {args.kind!r}")
        return 1
    width = max(len(r["kind"]) + 1 + len(r["name"]) for r in rows)
    for r in rows:
        line = f"{r['kind'] + '/' + r['name']:<{width}}  {r['about']}"
        print(line + (f"\n{'':<{width}}  {r['path']}" if args.paths else ""))
    return 0


def _export(args) -> int:
    from ..engine.export import export_student

    out = export_student(args.run, format=args.format, output=args.output, verify=not args.no_verify)
    print(f"exported the student ({args.format}) to {out}")
    _print_licence(out)
    if args.format == "timm":
        print(f"  load it with: timm.create_model('local-dir:{out}', pretrained=True)")
    return 0


def _print_licence(out) -> None:
    """The teacher provenance the export recorded, and the non-commercial warning if it applies."""
    import json
    from pathlib import Path

    from ..engine.export import MODEL_CARD, non_commercial_warning

    try:
        prov = json.loads((Path(out) / "fdistill_export.json").read_text())["teacher"]["provenance"]
    except (OSError, KeyError, ValueError, TypeError):
        return
    print(f"  teacher {prov['spec']}: weights {prov.get('weights')}, license {prov.get('license')} "
          f"(the student's weights derive from them; see {Path(out) / MODEL_CARD})")
    warn = non_commercial_warning(prov)
    if warn:
        print(f"  WARNING: {warn}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "distill", help="run feature distillation from a config (use torchrun for several GPUs)",
        description="Distil a teacher into an FD student as a config says. Resumes from the newest valid "
                    "checkpoint in the output folder by default; SIGTERM/SIGUSR1 checkpoint and stop cleanly. "
                    "Several GPUs: torchrun --nproc_per_node=N -m fdistill.cli.main distill ...")
    p.add_argument("--config", required=True, metavar="FILE|NAME",
                   help="a YAML recipe file, or a shipped recipe by name (e.g. tiny_cpu, clip_vit_base_300ep; "
                        "`fdistill recipes` lists them)")
    p.add_argument("--data", metavar="PATH", help="training images (sets data.path): a folder, tar shards or synthetic:N")
    p.add_argument("--output", metavar="DIR", help="run folder (sets train.output)")
    p.add_argument("--resume", default="auto", metavar="auto|none|PATH",
                   help="auto: continue from the newest valid checkpoint in the run folder (default); "
                        "none: start fresh; PATH: a checkpoint file or run folder")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)
    p.set_defaults(func=_distill)

    p = sub.add_parser("info", help="show what a distillation config builds: sizes, FLOPs, token grids, lr",
                       description="Build the config's teacher and student on CPU and report parameters, FLOPs per "
                                   "image, token grids and their alignment, and the learning rate per GPU count.")
    p.add_argument("--config", required=True, metavar="FILE|NAME")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)
    p.set_defaults(func=_info)

    p = sub.add_parser("recipes", help="list the shipped recipes (usable by name: --config NAME)",
                       description="The recipes inside the package, by kind, with the first line of each one's "
                                   "comment. Any command's --config takes NAME (of its kind) or KIND/NAME.")
    p.add_argument("kind", nargs="?", help="only this kind (distill, finetune, linprobe, segprobe, demo, mini)")
    p.add_argument("--paths", action="store_true", help="print each recipe's file path too")
    p.set_defaults(func=_recipes)

    p = sub.add_parser("validate-config", help=f"check any recipe ({', '.join(SCHEMA_NAMES)}) without building "
                                               "anything",
                       description="Check keys, types and values of a recipe (with overrides) and exit. Its kind is "
                                   "its folder (configs/<kind>/) or file name, or the one schema it fits; "
                                   "--schema says it outright.")
    p.add_argument("config", metavar="FILE")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)
    p.add_argument("--schema", choices=SCHEMA_NAMES, help="the recipe's kind (default: inferred)")
    p.add_argument("--print", action="store_true", help="also print the resolved config")
    p.set_defaults(func=_validate)

    p = sub.add_parser("export", help="write a run's student for timm (or as safetensors)",
                       description="Export the student of a run folder (its newest valid checkpoint) or a checkpoint.")
    p.add_argument("run", metavar="RUN_OR_CKPT")
    p.add_argument("--format", choices=["timm", "safetensors"], default="timm",
                   help="timm: a folder timm.create_model('local-dir:DIR', pretrained=True) loads (default); "
                        "safetensors: student + projector weights and a JSON description")
    p.add_argument("--output", metavar="DIR", help="export folder (default RUN/export_FORMAT)")
    p.add_argument("--no-verify", action="store_true", help="skip reloading a timm export to compare features")
    p.set_defaults(func=_export)
