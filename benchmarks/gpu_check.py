#!/usr/bin/env python
"""One GPU check of fdistill, in under 8 minutes on one CUDA GPU (``benchmarks/gpu_check.sh``).

Stages (each one's status, seconds and key numbers go into ONE JSON summary, rewritten after
every stage so that a run cut short still leaves what it measured):

    cuda_tests     the tests that need a CUDA GPU (``skipif(not torch.cuda.is_available())``)
    fd_bf16        300 bf16 FD steps of the CLIP ViT-B/16 -> ViT-B/16 recipe
                   (configs/distill/clip_vit_base_300ep.yaml, random-init teacher: no download) on
                   synthetic 224 px images, under ``torchrun --nproc_per_node=1``: the loss falls,
                   checkpoints are written
    fd_resume      the same command with ``train.max_steps`` raised: resumes from the last
                   checkpoint and continues
    fp16_scaler    ``train.precision=fp16`` (loss scaler) for a few dozen steps
    gpu_decode     ``data.gpu_decode=true`` on a small JPEG folder written here (nvJPEG)
    bench_*        ``benchmarks/bench_distill.py --record`` for the GPU configs

``--dry-run`` runs the same stages on the CPU with tiny sizes (tiny ViTs at 32 px, a handful of
steps, bf16 only where the CPU has it): the CUDA-only stages (the CUDA tests, the GPU benchmark
configs) still run their command lines -- the tests are collected and skip, the benchmark runs
``--config tiny`` with the same options -- and report ``skipped: no CUDA``; tests/test_gpu_check.py
runs it. Exit status: 0 when no stage failed, 1 otherwise, 2 for bad usage (no GPU without
``--dry-run``).

    bash benchmarks/gpu_check.sh                         # on a GPU: $OUT/gpu_check.json or runs/gpu_check.json
    bash benchmarks/gpu_check.sh --dry-run --out /tmp/x.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
RECIPE = "configs/distill/clip_vit_base_300ep.yaml"
TINY = "configs/distill/tiny_cpu.yaml"
#: every stage, in order (the JSON has each of them, whatever happened)
STAGES = ("cuda_tests", "fd_bf16", "fd_resume", "fp16_scaler", "gpu_decode", "bench_gpu-vitb-bf16",
          "bench_gpu-vitl-bf16")
#: stages that need CUDA: in a dry run they exercise their command line and report "skipped: no CUDA"
CUDA_ONLY = ("cuda_tests", "bench_gpu-vitb-bf16", "bench_gpu-vitl-bf16")
#: benchmark configs and their options (docs/performance.md, benchmarks/RESULTS.md "GPU")
BENCH = {"bench_gpu-vitb-bf16": ("gpu-vitb-bf16", ["--baseline"]),
         "bench_gpu-vitl-bf16": ("gpu-vitl-bf16", ["--grad-ckpt", "--baseline"])}
SKIP_NO_CUDA = "skipped: no CUDA"


# -- sizes ------------------------------------------------------------------------------------------
def sizes(dry_run: bool) -> Dict[str, Any]:
    """Steps, batch sizes and data of every stage: the GPU check, or the dry run's tiny CPU version."""
    if dry_run:
        return dict(config=TINY, batch=16, data="synthetic:512", epochs=2, warmup_epochs=0.1, fd_steps=30,
                    resume_steps=40, log_interval=5, ckpt_interval=15, fp16_steps=10, decode_steps=6,
                    jpegs=48, jpeg_size=(40, 56), workers=0, extra=["train.device=cpu", "train.cpu_threads=1"],
                    stage_timeout=120)
    workers = max(2, min(14, (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 8) - 2))
    # 6400 synthetic images / 64 = 100 steps per epoch; the schedule spans 4 epochs (400 steps) with
    # half an epoch of warm-up, so the 300 steps and the resume to 340 are both inside it
    return dict(config=RECIPE, batch=64, data="synthetic:6400", epochs=4, warmup_epochs=0.5, fd_steps=300,
                resume_steps=340, log_interval=25, ckpt_interval=100, fp16_steps=40, decode_steps=40,
                jpegs=1536, jpeg_size=(240, 320), workers=workers,
                extra=["teacher.kwargs.pretrained=false", "train.device=cuda"], stage_timeout=300)


def cpu_bf16_ok() -> bool:
    """Whether this CPU runs bf16 matmuls natively (else the dry run uses fp32)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # noqa: BLE001 - an older/odd build: play safe
        return False


# -- running commands -----------------------------------------------------------------------------
class GpuMemSampler:
    """Peak GPU memory in use (``nvidia-smi``, MiB, all processes on the GPU) while a stage runs."""

    def __init__(self, enabled: bool, interval: float = 0.5):
        self.enabled = enabled and shutil.which("nvidia-smi") is not None
        self.interval = interval
        self.peak: Optional[int] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _sample(self) -> Optional[int]:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10).stdout
            return max(int(x) for x in out.split())
        except Exception:  # noqa: BLE001 - sampling is best effort
            return None

    def __enter__(self):
        if self.enabled:
            def loop():
                while not self._stop.is_set():
                    v = self._sample()
                    if v is not None:
                        self.peak = v if self.peak is None else max(self.peak, v)
                    self._stop.wait(self.interval)

            self._thread = threading.Thread(target=loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)


def run_cmd(cmd: List[str], log_path: Path, timeout: float, *, gpu: bool, env: Optional[dict] = None) -> dict:
    """Run ``cmd`` from the repository root, output to ``log_path``; returns rc, seconds, the
    child's peak RSS (its whole process tree, MiB) and the GPU's peak memory in use (MiB)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    full_env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    t0 = time.perf_counter()
    timed_out = False
    with open(log_path, "w") as log, GpuMemSampler(gpu) as mem:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=full_env,
                                start_new_session=True)
        rusage = None
        try:
            while True:
                pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
                if pid == proc.pid:
                    rc = os.waitstatus_to_exitcode(status)
                    break
                if time.perf_counter() - t0 > timeout:
                    timed_out = True
                    rusage = _terminate(proc)
                    rc = 124
                    break
                time.sleep(0.1)
        except BaseException:  # interrupted (Ctrl-C, SIGTERM): take the stage's processes down with us
            _terminate(proc, grace=5.0)
            proc.returncode = -1
            raise
        proc.returncode = rc
    out = {"rc": rc, "seconds": round(time.perf_counter() - t0, 2), "log": str(log_path)}
    if timed_out:
        out["timed_out"] = True
    if rusage is not None:
        out["peak_rss_mib"] = round(rusage.ru_maxrss / 1024, 1)  # Linux: KiB
    if mem.peak is not None:
        out["peak_gpu_mem_used_mib"] = mem.peak
    return out


def _terminate(proc: subprocess.Popen, grace: float = 20.0):
    """SIGTERM to our child's process group (a run then writes its checkpoint and exits), SIGKILL
    after ``grace`` seconds; returns the child's rusage."""
    os.killpg(proc.pid, signal.SIGTERM)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < grace:
        pid, _, rusage = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            return rusage
        time.sleep(0.2)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return os.wait4(proc.pid, 0)[2]


def log_tail(path, n: int = 15) -> str:
    """The last ``n`` non-empty lines of a log (progress-bar carriage returns as line breaks)."""
    try:
        lines = Path(path).read_text(errors="replace").replace("\r", "\n").splitlines()
    except OSError:
        return ""
    return "\n".join([l for l in lines if l.strip()][-n:])


def _verdict(res: dict, r: dict, problems: list) -> dict:
    """A stage's result: ``status`` ok or the problems found, the log's tail when it failed."""
    res["status"] = "ok" if not problems else "failed: " + "; ".join(problems)
    if problems:
        res["log_tail"] = log_tail(r["log"])
    return res


def torchrun_cmd() -> List[str]:
    """``torchrun`` of this interpreter (the script next to it, else ``python -m torch.distributed.run``)."""
    exe = Path(sys.executable).with_name("torchrun")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "torch.distributed.run"]


# -- reading a run ----------------------------------------------------------------------------------
def read_metrics(run_dir: Path) -> List[dict]:
    from fdistill.io import read_jsonl  # the project's reader (lines cut by a crash are skipped)

    return read_jsonl(Path(run_dir) / "metrics.jsonl")


def _run_problems(r: dict, nums: dict, steps: int, *, finite_loss: bool = False) -> List[str]:
    """What every stage that trains checks first: exit status, the last logged step, and (when
    asked) a finite last loss."""
    problems = []
    if r["rc"] != 0:
        problems.append(f"rc {r['rc']}")
    if nums.get("last_step") != steps:
        problems.append(f"last logged step {nums.get('last_step')} != {steps}")
    if finite_loss and nums.get("loss_last") is None:
        problems.append("the last loss is not finite")
    return problems


def _finite(x) -> Optional[float]:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def run_numbers(records: List[dict], after_step: int = 0) -> dict:
    """Loss first/last, steps/s and images/s (mean over the log intervals after the first, which
    holds start-up) of the records logged after ``after_step``."""
    recs = [r for r in records if r.get("step", 0) > after_step]
    if not recs:
        return {"records": 0}
    timed = recs[1:] or recs
    step_t = [r["step_time_s"] for r in timed if _finite(r.get("step_time_s"))]
    ips = [r["images_per_s"] for r in timed if _finite(r.get("images_per_s"))]
    first, last = _finite(recs[0].get("loss")), _finite(recs[-1].get("loss"))
    return {
        "records": len(recs), "first_step": recs[0]["step"], "last_step": recs[-1]["step"],
        "loss_first": first, "loss_last": last,
        "loss_fell": first is not None and last is not None and last < first,
        "steps_per_s": round(len(step_t) / sum(step_t), 3) if step_t and sum(step_t) > 0 else None,
        "images_per_s": round(sum(ips) / len(ips), 1) if ips else None,
        "nonfinite_steps": int(sum(r.get("nonfinite", 0) for r in recs)),
        "skipped_images": int(sum(r.get("skipped_images", 0) for r in recs)),
    }


def checkpoints(run_dir: Path) -> List[str]:
    d = Path(run_dir) / "checkpoints"
    return sorted(p.name for p in d.glob("ckpt_*.pt")) if d.is_dir() else []


# -- the check ------------------------------------------------------------------------------------
class Check:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.dry = args.dry_run
        import torch

        self.cuda = torch.cuda.is_available()
        self.sz = sizes(self.dry)
        self.precision = "bf16" if (not self.dry or cpu_bf16_ok()) else "fp32"
        self.work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="fdistill_gpu_check_"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.out = Path(args.out)
        self.logs = self.out.with_name(self.out.stem + "_logs")
        self.t0 = time.perf_counter()
        self.summary: Dict[str, Any] = {
            "version": 1, "mode": "dry-run" if self.dry else "gpu",
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
            "cuda_available": self.cuda,
            "device": torch.cuda.get_device_name(0) if self.cuda else (platform.processor() or platform.machine()),
            "budget_s": args.budget_s, "precision": self.precision, "work_dir": str(self.work),
            "logs": str(self.logs), "stages": {s: {"status": "not run"} for s in STAGES},
        }

    # bookkeeping
    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.t0)

    def write(self) -> None:
        self.summary["seconds"] = round(time.perf_counter() - self.t0, 1)
        st = [v["status"] for v in self.summary["stages"].values()]
        self.summary["failed"] = [k for k, v in self.summary["stages"].items() if v["status"].startswith("failed")]
        self.summary["ok"] = not self.summary["failed"] and all(s != "not run" for s in st)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps(self.summary, indent=2, allow_nan=False, default=str) + "\n")
        os.replace(tmp, self.out)

    def stage(self, name: str, fn, min_s: float) -> dict:
        """Run stage ``fn`` (returns its dict, with a status) unless less than ``min_s`` seconds
        of the budget are left; any exception is the stage's failure."""
        if self.left() < min_s:
            res = {"status": f"skipped: time budget ({self.left():.0f} s left, needs ~{min_s:.0f} s)"}
        else:
            t0 = time.perf_counter()
            try:
                res = fn()
            except Exception as e:  # noqa: BLE001 - one stage's failure is reported, the others still run
                res = {"status": f"failed: {type(e).__name__}: {e}"}
            res["seconds"] = round(time.perf_counter() - t0, 2)
        self.summary["stages"][name] = res
        self.write()
        print(f"[gpu_check] {name}: {res['status']} ({res.get('seconds', 0)} s)", flush=True)
        return res

    def timeout(self) -> float:
        return max(10.0, min(self.sz["stage_timeout"], self.left()))

    # stages
    def cuda_tests(self) -> dict:
        """The tests that skip without CUDA, found by their skipif; on CPU they are collected and skip."""
        files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                       if re.search(r"skipif\(\s*not\s+torch\.cuda\.is_available\(\)", p.read_text()))
        if not files:
            return {"status": "failed: no CUDA-marked tests found under tests/"}
        xml = self.work / "cuda_tests.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-k", "cuda",
               f"--junitxml={xml}", *files]
        r = run_cmd(cmd, self.logs / "cuda_tests.log", self.timeout(), gpu=self.cuda)
        counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
        names = []
        if xml.is_file():
            import xml.etree.ElementTree as ET

            root = ET.parse(xml).getroot()
            suites = [root] if root.tag == "testsuite" else list(root)
            for s in suites:
                for k in counts:
                    counts[k] += int(s.get(k, 0))
                names += [f"{c.get('classname')}::{c.get('name')}" for c in s.iter("testcase")]
        passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
        res = {"command": cmd, "files": files, "tests": names, "passed": passed, "skipped": counts["skipped"],
               "failed": counts["failures"] + counts["errors"], **r}
        if r["rc"] != 0 or res["failed"] or not names:
            res["status"] = f"failed: pytest rc {r['rc']}, {res['failed']} failed, {len(names)} collected"
            res["log_tail"] = log_tail(r["log"])
        elif not self.cuda:
            res["status"] = SKIP_NO_CUDA if res["skipped"] == len(names) else "failed: ran without CUDA"
        else:
            res["status"] = "ok" if res["skipped"] == 0 else f"failed: {res['skipped']} CUDA test(s) skipped on a GPU"
        return res

    def _distill_args(self, out_dir: Path, steps: int, precision: str, data: Optional[str] = None,
                      more: Optional[List[str]] = None) -> List[str]:
        s = self.sz
        return ["distill", "--config", s["config"], "--output", str(out_dir), "--data", data or s["data"],
                *s["extra"], f"data.batch_size={s['batch']}", f"data.num_workers={s['workers']}",
                f"train.epochs={s['epochs']}", f"optim.warmup_epochs={s['warmup_epochs']}",
                f"train.max_steps={steps}", f"train.log_interval={s['log_interval']}",
                f"train.ckpt_interval={s['ckpt_interval']}", f"train.precision={precision}", *(more or [])]

    def fd_bf16(self) -> dict:
        run = self.work / "fd_bf16"
        steps = self.sz["fd_steps"]
        cmd = [*torchrun_cmd(), "--standalone", "--nproc_per_node=1", "-m", "fdistill.cli.main",
               *self._distill_args(run, steps, self.precision)]
        r = run_cmd(cmd, self.logs / "fd_bf16.log", self.timeout(), gpu=self.cuda)
        nums = run_numbers(read_metrics(run))
        ck = checkpoints(run)
        want = f"ckpt_{steps:08d}.pt"
        res = {"command": cmd, "precision": self.precision, "steps": steps, "batch": self.sz["batch"],
               "data": self.sz["data"], **nums, "checkpoints": ck, **r}
        problems = _run_problems(r, nums, steps)
        if not nums.get("loss_fell"):
            problems.append(f"loss did not fall ({nums.get('loss_first')} -> {nums.get('loss_last')})")
        if want not in ck:
            problems.append(f"no checkpoint {want}")
        return _verdict(res, r, problems)

    def fd_resume(self) -> dict:
        run = self.work / "fd_bf16"
        before, steps = self.sz["fd_steps"], self.sz["resume_steps"]
        if f"ckpt_{before:08d}.pt" not in checkpoints(run):
            return {"status": "failed: fd_bf16 left no checkpoint to resume from"}
        records_before = [r for r in read_metrics(run) if r.get("step", 0) <= before]
        cmd = [*torchrun_cmd(), "--standalone", "--nproc_per_node=1", "-m", "fdistill.cli.main",
               *self._distill_args(run, steps, self.precision)]
        r = run_cmd(cmd, self.logs / "fd_resume.log", self.timeout(), gpu=self.cuda)
        text = Path(r["log"]).read_text(errors="replace")
        m = re.search(r"resumed from \S+ at step (\d+)", text)
        nums = run_numbers(read_metrics(run), after_step=before)
        res = {"command": cmd, "resumed_from_step": int(m.group(1)) if m else None, "final_step": nums.get("last_step"),
               "loss_before_resume": _finite(records_before[-1].get("loss")) if records_before else None,
               "loss_after_resume": nums.get("loss_first"), "loss_last": nums.get("loss_last"),
               "steps_per_s": nums.get("steps_per_s"), "images_per_s": nums.get("images_per_s"),
               "checkpoints": checkpoints(run), **r}
        res["continued"] = res["resumed_from_step"] == before and res["final_step"] == steps
        problems = []
        if r["rc"] != 0:
            problems.append(f"rc {r['rc']}")
        if not res["continued"]:
            problems.append(f"resumed from {res['resumed_from_step']} (want {before}), ended at {res['final_step']} "
                            f"(want {steps})")
        if f"ckpt_{steps:08d}.pt" not in res["checkpoints"]:
            problems.append(f"no checkpoint at step {steps}")
        return _verdict(res, r, problems)

    def fp16_scaler(self) -> dict:
        run = self.work / "fp16"
        steps = self.sz["fp16_steps"]
        cmd = [sys.executable, "-m", "fdistill.cli.main",
               *self._distill_args(run, steps, "fp16", more=[f"train.ckpt_interval={steps}"])]
        r = run_cmd(cmd, self.logs / "fp16_scaler.log", self.timeout(), gpu=self.cuda)
        nums = run_numbers(read_metrics(run))
        res = {"command": cmd, "precision": "fp16", "steps": steps, **nums, **r}
        ck = checkpoints(run)
        if ck:
            import torch

            obj = torch.load(run / "checkpoints" / ck[-1], map_location="cpu", mmap=True, weights_only=True)
            scaler = obj.get("scaler") or {}
            res["loss_scale"] = _finite(scaler.get("scale"))
            res["scaler_growth_tracker"] = scaler.get("_growth_tracker")
            del obj
        problems = _run_problems(r, nums, steps, finite_loss=True)
        if nums.get("nonfinite_steps", 0) >= steps // 2:
            problems.append(f"{nums.get('nonfinite_steps')} of {steps} steps skipped as non-finite")
        if res.get("loss_scale") is None:
            problems.append("no loss scale in the checkpoint (scaler not enabled?)")
        return _verdict(res, r, problems)

    def write_jpegs(self) -> Path:
        """A small folder of JPEGs (smooth random colour fields with a few sharp shapes)."""
        import numpy as np
        from PIL import Image

        root = self.work / "jpegs"
        if root.is_dir() and len(list(root.glob("*.jpg"))) == self.sz["jpegs"]:
            return root
        root.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        h0, w0 = self.sz["jpeg_size"]
        for i in range(self.sz["jpegs"]):
            h, w = h0 + int(rng.integers(0, 17)), w0 + int(rng.integers(0, 17))
            low = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
            img = np.asarray(Image.fromarray(low).resize((w, h), Image.BILINEAR)).copy()
            for _ in range(3):
                y, x = int(rng.integers(0, h - 8)), int(rng.integers(0, w - 8))
                img[y:y + int(rng.integers(4, h // 3)), x:x + int(rng.integers(4, w // 3))] = rng.integers(0, 256, 3)
            Image.fromarray(img).save(root / f"{i:05d}.jpg", quality=90)
        return root

    def gpu_decode(self) -> dict:
        folder = self.write_jpegs()
        run = self.work / "gpu_decode"
        steps = self.sz["decode_steps"]
        cmd = [sys.executable, "-m", "fdistill.cli.main",
               *self._distill_args(run, steps, self.precision, data=str(folder),
                                   more=["data.gpu_decode=true", f"train.ckpt_interval={steps}"])]
        r = run_cmd(cmd, self.logs / "gpu_decode.log", self.timeout(), gpu=self.cuda)
        nums = run_numbers(read_metrics(run))
        text = Path(r["log"]).read_text(errors="replace")
        res = {"command": cmd, "jpegs": self.sz["jpegs"], "steps": steps, "decoded_on": "cuda" if self.cuda else "cpu",
               "decode_fallback_warnings": text.count("JPEG decoding on"), **nums, **r}
        problems = _run_problems(r, nums, steps, finite_loss=True)
        if nums.get("skipped_images"):
            problems.append(f"{nums['skipped_images']} images skipped as undecodable")
        if self.cuda and res["decode_fallback_warnings"]:
            problems.append("nvJPEG decoding failed and fell back (see log)")
        return _verdict(res, r, problems)

    def bench(self, stage: str) -> dict:
        config, opts = BENCH[stage]
        js = self.logs / f"{stage}.json"
        results = Path(self.args.results) if self.args.results else (
            self.work / "RESULTS.md" if self.dry else REPO / "benchmarks" / "RESULTS.md")
        gpu_cmd = [sys.executable, "benchmarks/bench_distill.py", "--config", config, *opts, "--record",
                   "--results", str(results), "--json", str(js)]
        if not self.dry:
            jpegs = self.work / "jpegs"  # the loader is timed on the JPEG folder of the gpu_decode stage
            cmd = gpu_cmd + (["--data", str(jpegs)] if jpegs.is_dir() else [])
        else:  # the same command line on the tiny config (on the CPU unless there is a GPU)
            cmd = [sys.executable, "benchmarks/bench_distill.py", "--config", "tiny", *opts, "--record",
                   "--results", str(results), "--json", str(js), "--rounds", "2", "--warmup", "1", "--threads", "1",
                   "--data", "none", "--device", "cuda" if self.cuda else "cpu"]
        r = run_cmd(cmd, self.logs / f"{stage}.log", self.timeout(), gpu=self.cuda)
        res: Dict[str, Any] = {"command": cmd, **r}
        if self.dry:
            res["gpu_command"] = gpu_cmd
        if js.is_file():
            b = json.loads(js.read_text())
            loader = b.get("loader") or {}
            keys = ("config", "device", "dtype", "batch", "images_per_s", "step_ms", "mfu", "peak_mem_bytes",
                    "baseline_images_per_s", "baseline_mfu", "baseline_peak_mem_bytes", "speedup_vs_baseline",
                    "flops_per_image", "matmul_ceiling_flops", "ceiling_drift", "recorded", "targets")
            res.update({k: b.get(k) for k in keys})
            res["peak_mem_gib"] = round(b["peak_mem_bytes"] / 2 ** 30, 3) if b.get("peak_mem_bytes") else None
            res["loader_images_per_s"] = loader.get("images_per_s")
            try:
                from benchmarks.results import table_row

                res["results_row"] = table_row(b).strip()  # the row --record appended (also kept here)
            except Exception:  # noqa: BLE001
                pass
        if r["rc"] != 0 or not js.is_file():
            res["status"] = f"failed: rc {r['rc']}" + ("" if js.is_file() else ", no JSON")
            res["log_tail"] = log_tail(r["log"])
        elif not self.cuda:
            res["status"] = SKIP_NO_CUDA
            res["exercised"] = "the same command line with --config tiny on the CPU: ok"
        elif self.dry:
            res["status"] = "ok"
            res["exercised"] = "the same command line with --config tiny on the GPU"
        else:
            res["status"] = "ok"
        return res

    def run(self) -> int:
        dry = self.dry
        self.write()
        self.stage("cuda_tests", self.cuda_tests, 20 if dry else 45)
        self.stage("fd_bf16", self.fd_bf16, 10 if dry else 90)
        self.stage("fd_resume", self.fd_resume, 8 if dry else 45)
        self.stage("fp16_scaler", self.fp16_scaler, 8 if dry else 40)
        self.stage("gpu_decode", self.gpu_decode, 8 if dry else 40)
        for name in BENCH:
            self.stage(name, lambda name=name: self.bench(name), 8 if dry else 70)
        self.write()
        if not self.args.keep and not self.args.work_dir:
            shutil.rmtree(self.work, ignore_errors=True)
        print(f"[gpu_check] wrote {self.out}: {'ok' if self.summary['ok'] else 'FAILED ' + str(self.summary['failed'])}"
              f" in {self.summary['seconds']} s", flush=True)
        return 0 if not self.summary["failed"] else 1


def default_out() -> Path:
    out = os.environ.get("OUT")
    return Path(out) / "gpu_check.json" if out else REPO / "runs" / "gpu_check.json"


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (CUDA-only stages: command lines only)")
    p.add_argument("--out", type=Path, default=None,
                   help="the JSON summary (default $OUT/gpu_check.json if $OUT is set, else runs/gpu_check.json); "
                   "stage logs go to a *_logs folder beside it")
    p.add_argument("--work-dir", default=None, help="run folders, checkpoints, JPEGs (default: a temporary folder, "
                   "removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    p.add_argument("--results", default=None, help="the table bench_distill.py --record appends to (default "
                   "benchmarks/RESULTS.md; a dry run: one in the work folder)")
    p.add_argument("--budget-s", type=float, default=450.0,
                   help="stop starting stages when less than a stage's need is left of this (default 450 s)")
    args = p.parse_args(argv)
    args.out = args.out or default_out()
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here; run with --dry-run for the CPU version", file=sys.stderr)
        return 2

    def on_term(signum, frame):  # a wall-clock limit: stop the stage; the JSON keeps what is done
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    check = Check(args)
    try:
        return check.run()
    except KeyboardInterrupt as e:
        check.summary["interrupted"] = str(e) or "KeyboardInterrupt"
        check.write()
        print(f"[gpu_check] interrupted; wrote {check.out}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
