"""``fdistill demo``: the paper in miniature, offline on a CPU.

Every stage is an ordinary ``fdistill`` command, run in-process through the same entry point a
user types (``fdistill.cli.main.main(argv)``), so the demo doubles as a worked example; the report
lists the exact command lines:

1. ``fdistill pretrain-clip``  -- a tiny CLIP teacher from scratch (open_clip, contrastive loss)
   on image-caption pairs of the procedural dataset (or "a photo of a {class}" for a folder);
2. ``fdistill distill``        -- feature distillation of that teacher into a same-size ViT with
   the paper's defaults (shared relative position bias, smooth-L1 beta 2, standardised target,
   [CLS] x10, drop path on the student);
3. ``fdistill finetune`` / ``linprobe`` / ``knn`` / ``zeroshot`` / ``segprobe`` with
   ``--compare TEACHER STUDENT`` -- one identical recipe for both (the segmentation probe needs
   label maps: it runs on the built-in scenes' object masks, not on a class-folder ``DATA``);
4. ``fdistill diagnose report``  -- attention distance, attention maps, loss landscape for both;
5. ``report.html``               -- a Table-1-like comparison, curves, figures, timings, versions.

With ``seeds > 1`` the whole comparison is repeated with seeds 0..n-1 and reported as mean and
spread. The seed is never chosen: seeds are 0, 1, 2, ... whatever the outcome.
"""
from __future__ import annotations

import json
import logging
import platform
import shlex
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "recipes" / "demo"  # package data (fdistill/recipes)
METRICS = ("finetune", "linprobe", "knn", "zeroshot", "segprobe")
#: the number each metric's compare.json gives per model (``top1`` unless listed)
METRIC_KEYS = {"segprobe": "miou"}


@dataclass
class DemoPlan:
    """Sizes of each stage (``quick``: every stage smaller); most of the time goes to the CLIP
    teacher's pre-training. Measured times: README, "Measured"."""

    clip_images: int = 10000
    clip_steps: int = 500
    clip_batch: int = 256
    distill_images: int = 10000
    distill_epochs: int = 5
    finetune_train: int = 5000
    finetune_epochs: int = 5
    eval_train: int = 5000
    diagnose_images: int = 64
    landscape_points: int = 21
    landscape_directions: int = 5
    seg_train: int = 2000
    seg_epochs: int = 5

    @classmethod
    def quick(cls) -> "DemoPlan":
        return cls(clip_images=4000, clip_steps=160, clip_batch=256, distill_images=3000, distill_epochs=3,
                   finetune_train=2000, finetune_epochs=3, eval_train=2000, diagnose_images=32,
                   landscape_points=11, landscape_directions=3, seg_train=1000, seg_epochs=3)


@dataclass
class Stage:
    name: str
    command: List[str]
    seconds: float = 0.0
    seed: int = 0


def _cmd_str(argv: List[str]) -> str:
    return "fdistill " + " ".join(shlex.quote(a) for a in argv)


def run_command(argv: List[str]) -> None:
    """Run one ``fdistill`` command in-process; a non-zero exit is an error."""
    from ..cli.main import main

    rc = main(list(argv))
    if rc != 0:
        raise RuntimeError(f"demo stage failed (exit {rc}): {_cmd_str(argv)}")


def _data_args(data: Optional[str], n: int) -> str:
    """``synthetic:N`` for the built-in data, else the user's folder as given."""
    return f"synthetic:{n}" if data is None else data


#: the stages of :func:`run_seed`, in order (the report's checker expects each one timed)
STAGE_NAMES = ("pretrain CLIP teacher", "feature distillation", "fine-tune teacher and student", "linear probe",
               "k-NN", "zero-shot", "segmentation probe", "diagnostics")


def has_masks(data: Optional[str]) -> bool:
    """Whether the demo's data has label maps for the segmentation probe (the built-in scenes do;
    a folder of class sub-folders does not)."""
    return data is None or data == "synthetic" or str(data).startswith("synthetic:")


def expected_metrics(data: Optional[str]) -> List[str]:
    return [m for m in METRICS if m != "segprobe" or has_masks(data)]


def expected_stages(data: Optional[str]) -> List[str]:
    return [n for n in STAGE_NAMES if n != "segmentation probe" or has_masks(data)]


#: what a seed's folder holds: one sub-folder per stage
SEED_DIRS = frozenset({"teacher", "fd", "diagnose", *METRICS})


def clear_previous_seeds(out: Path, seeds: int) -> None:
    """Make ``out/seed<i>`` fresh so the demo can be run again into the same folder (each stage
    starts anew: distillation refuses a folder that already holds checkpoints). A seed folder is
    removed only if it holds nothing but the demo's own stage folders; anything else is an error
    raised before any training, and nothing is deleted."""
    import shutil

    dirs = {out / f"seed{i}" for i in range(seeds)}
    if out.is_dir():  # and the extra seeds of an earlier run with more of them
        dirs |= {d for d in out.iterdir() if d.name.startswith("seed") and d.name[4:].isdigit()}
    dirs = sorted(dirs)
    for d in dirs:
        if d.exists():
            foreign = sorted(p.name for p in d.iterdir() if p.name not in SEED_DIRS) if d.is_dir() else [d.name]
            if foreign:
                raise FileExistsError(f"{d} is not a previous demo's seed folder (it holds {foreign}); "
                                      "choose another output folder (make demo DEMO_OUT=... / --output)")
    for d in dirs:
        if d.exists():
            log.info("demo: replacing the previous run in %s", d)
            shutil.rmtree(d)


def check_demo_data(data: Optional[str]) -> None:
    """Fail before any training when ``data`` cannot serve every stage: the demo needs a ``train/``
    and a ``val/`` folder with the same class sub-folders (evaluation never scores the images it
    trained on), or the built-in ``synthetic[:N]``."""
    from ..data.errors import DataError

    if has_masks(data):  # the built-in procedural data
        return
    root = Path(data).expanduser()
    if not root.is_dir():
        raise DataError(f"demo data {data!r} is not a folder (give a folder with train/ and val/ class "
                        "sub-folders, or leave DATA unset for the built-in procedural dataset)")
    missing = [s for s in ("train", "val") if not (root / s).is_dir()]
    if missing:
        raise DataError(f"demo data {data!r} has no {' or '.join(s + '/' for s in missing)} folder: the demo "
                        "trains on <DATA>/train/<class>/* and evaluates on <DATA>/val/<class>/*")
    classes = {split: sorted(p.name for p in (root / split).iterdir() if p.is_dir() and not p.name.startswith("."))
               for split in ("train", "val")}
    if len(classes["train"]) < 2 or classes["train"] != classes["val"]:
        raise DataError(f"demo data {data!r}: train/ and val/ need the same class sub-folders (at least 2); "
                        f"found {classes['train']} and {classes['val']}")


def run_seed(out: Path, seed: int, plan: DemoPlan, *, data: Optional[str], device: str,
             stages: List[Stage]) -> Dict[str, Any]:
    """All stages for one seed; returns {metric: {"teacher": top1, "student": top1}} and paths."""
    out.mkdir(parents=True, exist_ok=True)
    teacher_dir, fd_dir = out / "teacher", out / "fd"
    teacher = f"open_clip:local-dir:{teacher_dir.resolve()}"
    student = str(fd_dir.resolve())

    def stage(name: str, argv: List[str]) -> None:
        log.info("demo [seed %d] %s: %s", seed, name, _cmd_str(argv))
        t0 = time.perf_counter()
        run_command(argv)
        stages.append(Stage(name, argv, time.perf_counter() - t0, seed))

    stage("pretrain CLIP teacher", [
        "pretrain-clip", "--data", _data_args(data, plan.clip_images), "--output", str(teacher_dir),
        "--steps", str(plan.clip_steps), "--batch-size", str(plan.clip_batch), "--seed", str(seed),
        "--device", device])
    stage("feature distillation", [
        "distill", "--config", str(CONFIG_DIR / "distill.yaml"), "--data", _data_args(data, plan.distill_images),
        "--output", str(fd_dir), "--resume", "none", f"teacher.spec={teacher}", f"train.seed={seed}",
        f"train.epochs={plan.distill_epochs}", f"train.device={device}"])
    train = _data_args(data, plan.finetune_train)
    stage("fine-tune teacher and student", [
        "finetune", "--config", str(CONFIG_DIR / "finetune.yaml"), "--compare", teacher, student,
        "--train", train, "--output", str(out / "finetune"), "--resume", "none",
        f"seed={seed}", f"epochs={plan.finetune_epochs}", f"device={device}"])
    evtrain = _data_args(data, plan.eval_train)
    stage("linear probe", [
        "linprobe", "--config", str(CONFIG_DIR / "linprobe.yaml"), "--compare", teacher, student,
        "--train", evtrain, "--output", str(out / "linprobe"), f"seed={seed}", f"device={device}"])
    stage("k-NN", ["knn", "--compare", teacher, student, "--train", evtrain, "--output", str(out / "knn"),
                   f"device={device}", "data.num_workers=0"])
    stage("zero-shot", ["zeroshot", "--compare", teacher, student, "--val", evtrain, "--output",
                        str(out / "zeroshot"), f"device={device}", "data.num_workers=0"])
    if has_masks(data):
        stage("segmentation probe", [
            "segprobe", "--config", str(CONFIG_DIR / "segprobe.yaml"), "--compare", teacher, student,
            "--train", _data_args(data, plan.seg_train), "--output", str(out / "segprobe"), f"seed={seed}",
            f"epochs={plan.seg_epochs}", f"device={device}"])
    stage("diagnostics", [
        "diagnose", "report", "--model", teacher, "--label", "CLIP teacher", "--model", student,
        "--label", "FD student", "--data", _data_args(data, plan.eval_train), "--images", str(plan.diagnose_images),
        "--directions", str(plan.landscape_directions), "--alphas", str(plan.landscape_points),
        "--seed", str(seed), "--device", device, "--out", str(out / "diagnose"), "--no-progress"])
    return collect_seed(out, expected_metrics(data))


def collect_seed(out: Path, metrics=METRICS) -> Dict[str, Any]:
    """Read each stage's JSON: {metric: {"teacher": value, "student": value}} (top-1, or mIoU)."""
    res: Dict[str, Any] = {}
    for metric in metrics:
        js = json.loads((out / metric / "compare.json").read_text())
        t, s = js["results"][0], js["results"][1]
        key = METRIC_KEYS.get(metric, "top1")
        res[metric] = {"teacher": float(t[key]), "student": float(s[key])}
    clip = json.loads((out / "teacher" / "summary.json").read_text())
    res["clip_zero_shot_check"] = clip.get("zero_shot_top1")
    return res


def versions() -> Dict[str, str]:
    import open_clip
    import timm
    import torch
    import torchvision

    from .. import __version__

    return {"fdistill": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "timm": timm.__version__,
            "open_clip": getattr(open_clip, "__version__", "?"), "platform": platform.platform(),
            "cpu_threads": str(torch.get_num_threads())}


def run_demo(output: str | Path = "runs/demo", *, quick: bool = False, seeds: int = 1,
             data: Optional[str] = None, device: str = "cpu", plan: Optional[DemoPlan] = None) -> Path:
    """Run the whole demo and write ``<output>/report.html`` (+ ``results.json``); returns the
    report's path. ``data``: a folder with ``train/`` and ``val/`` class sub-folders instead of
    the built-in procedural dataset (captions "a photo of a {class}"). ``plan`` overrides the stage sizes (``quick`` picks
    :meth:`DemoPlan.quick`, else the default plan)."""
    from .report import write_demo_report

    if seeds < 1:
        raise ValueError("seeds must be >= 1")
    check_demo_data(data)
    out = Path(output)
    clear_previous_seeds(out, seeds)
    out.mkdir(parents=True, exist_ok=True)
    if plan is None:
        plan = DemoPlan.quick() if quick else DemoPlan()
    stages: List[Stage] = []
    t0 = time.perf_counter()
    per_seed = []
    for seed in range(seeds):
        per_seed.append({"seed": seed, **run_seed(out / f"seed{seed}", seed, plan, data=data, device=device,
                                                   stages=stages)})
    results = {
        "quick": quick, "seeds": list(range(seeds)), "data": data or "synthetic (built-in procedural shapes)",
        "data_spec": data, "metrics": expected_metrics(data),
        "device": device, "plan": asdict(plan), "versions": versions(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "total_seconds": time.perf_counter() - t0,
        "stages": [{"name": s.name, "seed": s.seed, "seconds": s.seconds, "command": _cmd_str(s.command)}
                   for s in stages],
        "per_seed": per_seed,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return write_demo_report(out, results)
