"""The miniature reproduction of the paper's claim (docs/evidence.md; ``make reproduce-mini``).

Does the FD student fine-tune better than its teacher (Wei et al., Table 1)? The protocol in
docs/evidence.md, run end to end on a CPU as resumable stages. Every stage is an ordinary
``fdistill`` command run in-process (as the demo does), so each result can be re-run by hand:

- ``fd/<variant>/s<seed>``   -- ``fdistill distill`` of the shipped teacher
  (``fdistill/assets/clip_mini``) into a same-size student; ``e0`` is ``train.max_steps=0``, the
  initialised student (the from-scratch floor); ``e3``/``e10``/``e30`` the FD-length sweep
  (paper: 100-300 epochs); ``cls``/``nonorm``/``ape`` the ablations of Tables 4, 5-6 and 7;
- ``finetune|linprobe|knn/<model>/s<seed>`` -- one recipe for teacher, students and scratch;
- ``attention-distance`` -- per-head attention distance of the teacher and the students (Fig. 3).

A stage's folder is named after a hash of its command line (the output folder written as
``<out>``), and a finished stage leaves ``stage.json``: a rerun skips finished stages and resumes
an interrupted distillation or fine-tuning from its checkpoint, so the run continues where it
stopped. Changing a stage's settings gives it a new hash, and a new folder.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "recipes" / "mini"  # package data (fdistill/recipes)

#: FD variants beyond the length sweep: name -> (overrides, what the paper's table tests)
ABLATIONS: Dict[str, Tuple[List[str], str]] = {
    "cls": (["distill.granularity=cls"], "[CLS] token only instead of the full token map (Table 4)"),
    "nonorm": (["distill.norm=none"], "raw teacher features instead of the standardised target (Tables 5-6)"),
    "ape": (["student.pos_embed=ape"], "absolute position embedding instead of shared relative bias (Table 7)"),
}


@dataclass(frozen=True)
class MiniPlan:
    """Sizes of the protocol. ``full()`` is docs/evidence.md's protocol; ``quick()`` a subset
    with the same stages (fewer images and epochs) for the slow test and a first look."""

    fd_images: int = 5000
    fd_epochs: Tuple[int, ...] = (3, 10, 30)  # the sweep at seed 0 (0 = scratch is always run)
    main_epochs: int = 10  # the FD length of the seeded comparison and of the ablations
    seeds: Tuple[int, ...] = (0, 1, 2)
    ablations: Tuple[str, ...] = ("cls", "nonorm", "ape")
    ft_images: int = 5000
    ft_epochs: int = 10
    probe_images: int = 5000
    val_images: int = 2000  # one fixed validation set for every evaluation
    diag_images: int = 64
    batch_size: int = 128

    @classmethod
    def full(cls) -> "MiniPlan":
        return cls()

    @classmethod
    def quick(cls) -> "MiniPlan":
        return cls(fd_images=2000, fd_epochs=(3,), main_epochs=3, ft_images=2000, ft_epochs=4, probe_images=2000,
                   val_images=1000, diag_images=32)

    def runs(self) -> List[Tuple[str, int]]:
        """Every (model, seed) in run order: the headline comparison (teacher, scratch, FD of the
        main length) for each seed first, so a stopped run has it, then the sweep, then the
        ablations. Every model but the teacher is a distillation run (``e0``: 0 epochs)."""
        out: List[Tuple[str, int]] = []
        for s in self.seeds:
            out += [("teacher", s), ("e0", s), (f"e{self.main_epochs}", s)]
        out += [(f"e{e}", self.seeds[0]) for e in self.fd_epochs if (f"e{e}", self.seeds[0]) not in out]
        out += [(a, self.seeds[0]) for a in self.ablations]
        return out


@dataclass
class StageRecord:
    name: str
    argv: List[str]
    folder: str
    seconds: float
    cached: bool = False
    extra: Dict = field(default_factory=dict)


def _canonical(argv: List[str], out: Path) -> List[str]:
    """The command line with the output root and the package's location written as placeholders,
    so the hash is the same on every machine and in every output folder."""
    from ..assets import asset_path

    root, asset = str(out.resolve()), str(asset_path("clip_mini"))
    return [a.replace(root, "<out>").replace(asset, "<clip_mini>").replace(str(CONFIG_DIR), "<configs/mini>")
            for a in argv]


def stage_hash(argv: List[str], out: Path) -> str:
    return hashlib.sha256(json.dumps(_canonical(argv, out)).encode()).hexdigest()[:10]


class StageStopped(RuntimeError):
    """A stop signal (SIGTERM/SIGUSR1) arrived during a stage: the stage checkpointed and is not
    finished; running the same command again continues it."""


class StageRunner:
    """Runs ``fdistill`` commands as cached stages under ``out/stages``. Use it as a context
    manager: a stop signal during a stage (which the stage's own loop turns into a checkpoint and
    a normal return) then leaves that stage unfinished and stops the pipeline."""

    def __init__(self, out: Path):
        from ..engine.signals import StopRequest

        self.out = out
        self.records: List[StageRecord] = []
        self.stop = StopRequest()

    def __enter__(self) -> "StageRunner":
        self.stop.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.__exit__(*exc)

    def _check_stop(self, name: str) -> None:
        if self.stop.requested:
            raise StageStopped(f"stopped by {self.stop.signame} during stage {name!r} (not marked finished); "
                               "run the same command again to continue where it stopped")

    def folder(self, name: str, argv_without_output: List[str]) -> Path:
        return self.out / "stages" / f"{name.replace('/', '_')}-{stage_hash(argv_without_output, self.out)}"

    def run(self, name: str, argv: List[str], *, output_flag: str = "--output") -> Path:
        from ..demo.pipeline import run_command

        d = self.folder(name, argv)
        marker = d / "stage.json"
        if marker.is_file():
            rec = json.loads(marker.read_text())
            self.records.append(StageRecord(name, argv, str(d), rec["seconds"], cached=True))
            log.info("mini: %s cached (%s)", name, d.name)
            return d
        self._check_stop(name)
        full = argv + [output_flag, str(d)]
        log.info("mini: %s -> %s", name, d.name)
        t0 = time.perf_counter()
        run_command(full)
        sec = time.perf_counter() - t0
        self._check_stop(name)
        from ..eval.commands import write_json

        write_json({"name": name, "command": _canonical(full, self.out), "seconds": sec,
                    "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z")}, marker)
        self.records.append(StageRecord(name, argv, str(d), sec))
        return d


def _teacher() -> str:
    from ..assets import teacher_spec

    return teacher_spec("clip_mini")


def _fd_argv(variant: str, seed: int, plan: MiniPlan) -> List[str]:
    argv = ["distill", "--config", str(CONFIG_DIR / "distill.yaml"), "--data", f"synthetic:{plan.fd_images}",
            "--resume", "auto", f"teacher.spec={_teacher()}", f"train.seed={seed}",
            f"data.batch_size={plan.batch_size}"]
    if variant == "e0":
        return argv + ["train.epochs=1", "train.max_steps=0"]
    if variant.startswith("e"):
        return argv + [f"train.epochs={int(variant[1:])}"]
    return argv + [f"train.epochs={plan.main_epochs}"] + ABLATIONS[variant][0]


def run_miniature(output: str | Path = "runs/mini", *, quick: bool = False, plan: Optional[MiniPlan] = None,
                  diagnostics: bool = True) -> Path:
    """Run (or continue) the protocol into ``output``; writes ``results.json``, ``results.md``
    and the figures, and returns the path of ``results.json``. A stop signal during a stage
    raises :class:`StageStopped` after the stage has checkpointed."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    plan = plan or (MiniPlan.quick() if quick else MiniPlan.full())
    with StageRunner(out) as runner:
        return _run_stages(out, plan, runner, diagnostics=diagnostics)


def _run_stages(out: Path, plan: MiniPlan, runner: StageRunner, *, diagnostics: bool) -> Path:
    from .miniature_report import write_results

    t0 = time.perf_counter()
    teacher = _teacher()
    train = {"finetune": f"synthetic:{plan.ft_images}", "probe": f"synthetic:{plan.probe_images}"}
    val = f"synthetic:{plan.val_images * 5}"  # the val split of synthetic:N holds N // 5 images
    models: Dict[Tuple[str, int], str] = {}  # (model, seed) -> spec or run folder
    evals: Dict[str, Dict[str, str]] = {"finetune": {}, "linprobe": {}, "knn": {}}
    for name, seed in plan.runs():
        tag = f"{name}/s{seed}"
        m = teacher if name == "teacher" else str(runner.run(f"fd/{tag}", _fd_argv(name, seed, plan)))
        models[(name, seed)] = m
        evals["finetune"][tag] = str(runner.run(f"finetune/{tag}", [
            "finetune", "--config", str(CONFIG_DIR / "finetune.yaml"), "--model", m, "--train", train["finetune"],
            "--val", val, "--resume", "auto", f"seed={seed}", f"epochs={plan.ft_epochs}"]))
        evals["linprobe"][tag] = str(runner.run(f"linprobe/{tag}", [
            "linprobe", "--config", str(CONFIG_DIR / "linprobe.yaml"), "--model", m, "--train", train["probe"],
            "--val", val, f"seed={seed}"]))
        evals["knn"][tag] = str(runner.run(f"knn/{tag}", [
            "knn", "--model", m, "--train", train["probe"], "--val", val, "data.num_workers=0", "data.img_size=32"]))
    diag = None
    if diagnostics:
        s0 = plan.seeds[0]
        argv = ["diagnose", "attention-distance", "--data", "synthetic:2000", "--images", str(plan.diag_images),
                "--seed", "0", "--no-progress", "--model", teacher, "--label", "teacher (CLIP)"]
        for name in ["e0"] + [f"e{e}" for e in sorted(set(plan.fd_epochs) | {plan.main_epochs})]:
            label = "scratch (FD 0 ep)" if name == "e0" else f"FD {name[1:]} ep"
            argv += ["--model", models[(name, s0)], "--label", label]
        diag = str(runner.run("attention-distance", argv, output_flag="--out"))
    return write_results(out, plan=asdict(plan), evals=evals, models={f"{k[0]}/s{k[1]}": v for k, v in models.items()},
                         diagnostics=diag, stages=runner.records, total_seconds=time.perf_counter() - t0)
