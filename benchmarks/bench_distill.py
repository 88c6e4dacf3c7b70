#!/usr/bin/env python
"""Benchmark one feature-distillation training step end to end (issue 7).

    python benchmarks/bench_distill.py --config cpu-vits-fp32 --baseline --json out.json
    python benchmarks/bench_distill.py --config gpu-vitb-bf16 --baseline --compile --record
    python benchmarks/bench_distill.py --config gpu-vitl-bf16 --grad-ckpt --baseline

One step = teacher forward + student forward/backward + gradient clipping + AdamW, exactly
the :class:`fdistill.engine.step.TrainStep` the training loop runs, on a fixed batch of
random uint8 images already on the device. Reported: images/s and step time (median over
interleaved rounds, after warm-up), peak memory, analytic FLOPs per image, achieved FLOP/s and
MFU against a dense matmul ceiling measured here, on this device and dtype; with
``--baseline`` the same numbers for the straightforward step (see ``variants.py``) and the
speed-up; and the data loader's own throughput on a real image folder. See
docs/performance.md.

A several-teacher config (``cpu-multi-vits-fp32``, ``tiny-multi``; issue 15) times the
:class:`fdistill.multi.MultiTeacherDistiller` step: every teacher's forward, the student once,
one head per teacher; its FLOPs count every teacher and every head
(:func:`benchmarks.flops.fd_multi_step_flops`).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import sys
from pathlib import Path
from typing import List, Optional

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "benchmarks"

import torch  # noqa: E402

from benchmarks.configs import CONFIGS, BenchConfig, get_config  # noqa: E402
from benchmarks.flops import fd_multi_step_flops, fd_step_flops, vit_dims, vit_forward_flops  # noqa: E402
from benchmarks.measure import (device_name, live_tensor_bytes, load_average, matmul_ceiling,  # noqa: E402
                                peak_step_memory, summarize, time_rounds)
from benchmarks.results import RESULTS_MD, append_row, options_text  # noqa: E402
from benchmarks.variants import (DTYPES, Options, Variant, build_baseline, build_fast,  # noqa: E402
                                 teacher_targets)

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpg-mini" / "train"

#: the issue's targets: (min MFU, min speed-up over --baseline)
TARGETS = {"cpu-vits-fp32": (0.40, 1.5), "gpu-vitb-bf16": (0.45, 2.0)}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="configs: " + "; ".join(f"{k}: {c.description}" for k, c in CONFIGS.items()))
    p.add_argument("--config", default="cpu-vits-fp32", choices=sorted(CONFIGS), help="what to benchmark")
    p.add_argument("--device", default=None, help="override the config's device (cpu, cuda, cuda:1)")
    p.add_argument("--batch", type=int, default=None, help="override the config's batch size")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="override the config's precision")
    p.add_argument("--baseline", action="store_true", help="also time the straightforward step, interleaved")
    p.add_argument("--compile", action="store_true", help="torch.compile the forward (falls back to eager)")
    p.add_argument("--channels-last", action="store_true", help="channels-last images and patch-embedding weights")
    p.add_argument("--mask-ratio", type=float, default=0.0, help="student input masking ratio")
    p.add_argument("--drop-masked", action="store_true", help="drop masked tokens from the student (MAE-style)")
    p.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing in the student")
    p.add_argument("--teacher-dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="teacher weights' dtype on the fast path (default: the precision's)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant (compilation happens here)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (each variant once per round)")
    p.add_argument("--steps-per-round", type=int, default=None, help="steps per variant per round (default 1 on "
                   "CPU, 10 on GPU)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: the CPUs this process may use)")
    p.add_argument("--data", default=None, help=f"image folder to time the loader on (default {DEFAULT_DATA} when "
                   "present, else synthetic); 'none' skips the loader")
    p.add_argument("--loader-batches", type=int, default=20)
    p.add_argument("--workers", type=int, default=None, help="loader worker processes (default: fdistill's)")
    p.add_argument("--gpu-decode", action="store_true", help="time the loader with JPEG decoding on the device")
    p.add_argument("--no-memory", action="store_true", help="skip the (untimed) peak-memory step")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--record", action="store_true", help=f"append a row to {RESULTS_MD.name}")
    p.add_argument("--results", type=Path, default=RESULTS_MD, help="the results table --record appends to")
    p.add_argument("--max-load", type=float, default=1.5,
                   help="CPU runs: do not --record when the 1-minute load average exceeds this (a shared machine)")
    p.add_argument("--max-drift", type=float, default=0.10,
                   help="do not --record when the matmul ceiling measured at the end differs by more than this "
                   "fraction from the one at the start (the machine changed under the run)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.drop_masked and args.mask_ratio <= 0:
        p.error("--drop-masked needs --mask-ratio > 0")
    if not 0 <= args.mask_ratio < 1:
        p.error("--mask-ratio must be in [0, 1)")
    return args


def log(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def versions() -> dict:
    import timm
    import torchvision

    import fdistill

    return {"torch": torch.__version__.split("+")[0], "timm": timm.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version(), "fdistill": getattr(fdistill, "__version__", "dev")}


def _measure_variant(v: Variant, args, device: torch.device) -> dict:
    """Warm up (and compile), then one untimed step for peak memory."""
    import time

    t0 = time.perf_counter()
    for i in range(max(1, args.warmup)):
        v.step()
        if i == 0:
            from benchmarks.measure import sync

            sync(device)
            first = time.perf_counter() - t0
            log(f"{v.name}: first step {first:.1f} s" + (" (compiled)" if v.compiled else ""))
    out = {"first_step_s": first, "compiled": v.compiled}
    if not args.no_memory:
        static = live_tensor_bytes([v.distiller], [v.optimizer], [v.images]) if device.type == "cpu" else 0
        out["peak_mem_bytes"] = peak_step_memory(v.step, device, static_cpu_bytes=static)
        log(f"{v.name}: peak memory {out['peak_mem_bytes'] / 2 ** 20:.0f} MiB")
    return out


def run(args: argparse.Namespace) -> dict:
    """Run the benchmark described by ``args`` (see :func:`parse_args`); returns the results."""
    cfg: BenchConfig = get_config(args.config).replace(device=args.device, batch=args.batch, precision=args.precision)
    if cfg.multi and args.drop_masked:
        raise SystemExit(f"--drop-masked is a single-teacher option; --config {cfg.name} has "
                         f"{len(cfg.teachers)} teachers (use --mask-ratio alone)")
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--config {cfg.name} needs a CUDA GPU (none here); try --device cpu or a cpu-* config")
    if device.type == "cpu":
        torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    else:
        torch.backends.cuda.matmul.allow_tf32 = True  # as the training loop
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    load0 = load_average()
    log(f"{cfg.name}: {cfg.description} on {device_name(device)}; load average {load0}")
    opts = Options(compile=args.compile, channels_last=args.channels_last, mask_ratio=args.mask_ratio,
                   drop_masked=args.drop_masked, grad_ckpt=args.grad_ckpt, teacher_dtype=args.teacher_dtype,
                   seed=args.seed)

    dtype = DTYPES[cfg.precision]
    ceiling = matmul_ceiling(device, dtype)
    log(f"matmul ceiling ({ceiling['dtype']}, n={ceiling['n']}): {ceiling['flops_per_s'] / 1e12:.3f} TFLOP/s")

    fast = build_fast(cfg, opts, device)
    n = fast.distiller.student_grid[0] * fast.distiller.student_grid[1]
    visible = None
    if opts.drop_masked:
        from fdistill.models.masking import num_masked

        visible = n - num_masked(n, opts.mask_ratio)
    flops = step_flops(fast.distiller, student_visible=visible)
    keep = skipped_drop_path_keep(fast, device)
    hw_flops = flops if keep is None else step_flops(fast.distiller, student_visible=visible, student_block_keep=keep)
    if "teacher_fwd_each" in flops:
        t_text = "teachers " + " + ".join(f"{k} {v / 1e9:.2f}" for k, v in flops["teacher_fwd_each"].items())
        p_text = "heads " + " + ".join(f"{k} {v / 1e9:.2f}" for k, v in flops["projector_each"].items())
    else:
        t_text, p_text = f"teacher {flops['teacher_fwd'] / 1e9:.2f}", f"projector {flops['projector'] / 1e9:.2f}"
    log(f"{flops['total'] / 1e9:.2f} GFLOP per image ({t_text}, student fwd+bwd "
        f"{(flops['student_fwd'] + flops['student_bwd']) / 1e9:.2f}, {p_text})")
    teachers = teacher_summary(cfg, fast)
    measured = {"fast": _measure_variant(fast, args, device)}
    fns = {"fast": fast.step}

    base = None
    if args.baseline:
        base = build_baseline(cfg, opts, device)
        measured["baseline"] = _measure_variant(base, args, device)
        fns["baseline"] = base.step
        if base.precision != cfg.precision:  # its MFU against its own dtype's ceiling
            base_ceiling = matmul_ceiling(device, DTYPES[base.precision])
            log(f"matmul ceiling ({base_ceiling['dtype']}): {base_ceiling['flops_per_s'] / 1e12:.3f} TFLOP/s")
        else:
            base_ceiling = ceiling

    spr = args.steps_per_round or (10 if device.type == "cuda" else 1)
    from tqdm.auto import tqdm

    bar = tqdm(total=args.rounds, desc="timing", unit="round")

    def progress(msg):
        bar.update(1)
        bar.set_postfix_str(msg.split(": ", 1)[1])

    times = time_rounds(fns, device, rounds=args.rounds, steps_per_round=spr, progress=progress)
    bar.close()
    load1 = load_average()
    ceiling_end = matmul_ceiling(device, dtype)
    drift = ceiling_end["flops_per_s"] / ceiling["flops_per_s"] - 1
    if abs(drift) > 0.1:
        log(f"WARNING: the matmul ceiling moved {100 * drift:+.0f}% during the run: the machine was busy or "
            "throttling; the numbers are not reliable")

    s = summarize(times["fast"])
    ips = cfg.batch / s["median_s"]
    achieved = flops["total"] * ips
    result = {
        "timestamp": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": device_name(device), "device_type": device.type, "config": cfg.name,
        "description": cfg.description, "dtype": cfg.precision, "batch": cfg.batch, "img_size": cfg.img_size,
        "teacher": cfg.teacher, "student": cfg.student_arch, "teachers": teachers, "num_teachers": len(teachers),
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "load_avg_1m": load0, "load_avg_1m_end": load1,
        # other jobs' load: at the end the 1-minute average also counts this run's own threads
        "others_load_est": None if load0 is None else max(load0, load1 - (torch.get_num_threads()
                                                                            if device.type == "cpu" else 1)),
        "matmul_ceiling_end_flops": ceiling_end["flops_per_s"], "ceiling_drift": drift,
        "options": {"compile": opts.compile, "channels_last": opts.channels_last, "mask_ratio": opts.mask_ratio,
                    "drop_masked": opts.drop_masked, "grad_ckpt": opts.grad_ckpt,
                    "teacher_dtype": opts.teacher_dtype},
        "versions": versions(),
        "flops_per_image": flops["total"], "flops_breakdown": flops,
        "matmul_ceiling_flops": ceiling["flops_per_s"], "matmul_ceiling": ceiling,
        "images_per_s": ips, "step_ms": 1e3 * s["median_s"], "step_ms_rounds": [1e3 * t for t in times["fast"]],
        "step_rel_spread": s["rel_spread"], "achieved_flops": achieved, "mfu": achieved / ceiling["flops_per_s"],
        "hw_flops_per_image": hw_flops["total"],
        "hfu": hw_flops["total"] * ips / ceiling["flops_per_s"],
        "peak_mem_bytes": measured["fast"].get("peak_mem_bytes"), "compiled": measured["fast"]["compiled"],
        "first_step_s": measured["fast"]["first_step_s"],
        "baseline_images_per_s": None, "baseline_step_ms": None, "baseline_mfu": None,
        "baseline_peak_mem_bytes": None, "baseline_dtype": None, "speedup_vs_baseline": None,
    }
    if base is not None:
        sb = summarize(times["baseline"])
        bips = cfg.batch / sb["median_s"]
        result.update({
            "baseline_images_per_s": bips, "baseline_step_ms": 1e3 * sb["median_s"],
            "baseline_step_ms_rounds": [1e3 * t for t in times["baseline"]],
            "baseline_achieved_flops": flops_baseline(cfg, base) * bips,
            "baseline_dtype": base.precision, "baseline_matmul_ceiling_flops": base_ceiling["flops_per_s"],
            "baseline_peak_mem_bytes": measured["baseline"].get("peak_mem_bytes"),
            "speedup_vs_baseline": ips / bips,
        })
        result["baseline_mfu"] = result["baseline_achieved_flops"] / base_ceiling["flops_per_s"]
    del fast, base, fns
    gc.collect()

    data = args.data if args.data is not None else (str(DEFAULT_DATA) if DEFAULT_DATA.is_dir() else "synthetic:2000")
    result["loader"] = None
    if data != "none":
        from benchmarks.loader_bench import time_loader

        log(f"timing the data loader on {data}")
        lr = time_loader(data, img_size=cfg.img_size, batch=cfg.batch, batches=args.loader_batches,
                         num_workers=args.workers, device=device, gpu_decode=args.gpu_decode, seed=args.seed)
        lr["vs_step"] = lr["images_per_s"] / ips
        result["loader"] = lr

    if cfg.name in TARGETS:
        mfu_min, speed_min = TARGETS[cfg.name]
        result["targets"] = {"mfu_min": mfu_min, "mfu_met": result["mfu"] >= mfu_min, "speedup_min": speed_min,
                             "speedup_met": None if result["speedup_vs_baseline"] is None
                             else result["speedup_vs_baseline"] >= speed_min}
    return result


def skipped_drop_path_keep(v: Variant, device: torch.device):
    """Per student block, the fraction of samples computed when the student skips dropped
    samples (FDBlock on CPU, eager); None where every sample is computed."""
    from timm.layers import DropPath

    from fdistill.speed import FDBlock

    if device.type != "cpu" or v.compiled:
        return None
    keep = [1.0 - b.drop_path1.drop_prob if isinstance(b, FDBlock) and isinstance(b.drop_path1, DropPath) else 1.0
            for b in v.distiller.student.blocks]
    return None if all(k == 1.0 for k in keep) else keep


def step_flops(distiller, *, student_visible=None, student_block_keep=None) -> dict:
    """Analytic FLOPs per image of one step of ``distiller`` (:mod:`benchmarks.flops`): FD's
    :func:`fd_step_flops`, or for a :class:`~fdistill.multi.MultiTeacherDistiller`
    :func:`fd_multi_step_flops` over all its teachers and heads."""
    from fdistill.multi.distiller import MultiTeacherDistiller

    s = vit_dims(distiller.student)
    if isinstance(distiller, MultiTeacherDistiller):
        if any(distiller.projector[n].kind != "linear" for n in distiller.names):
            raise ValueError("the FLOP model counts linear heads only")
        teachers = {n: vit_dims(tt.teacher) for n, tt in zip(distiller.names, teacher_targets(distiller))}
        return fd_multi_step_flops(teachers, s, student_visible=student_visible,
                                   student_block_keep=student_block_keep)
    return fd_step_flops(vit_dims(distiller.teacher), s, student_visible=student_visible,
                         student_block_keep=student_block_keep)


def teacher_summary(cfg: BenchConfig, v: Variant) -> List[dict]:
    """Per teacher of the config: ``name``, timm ``model``, loss ``weight``, ``embed_dim``,
    ``input_size`` and ``fwd_flops`` (analytic, per image) -- the JSON's ``teachers``."""
    entries = cfg.teachers or [None]
    out = []
    for entry, tt in zip(entries, teacher_targets(v.distiller)):
        out.append({"name": entry.name if entry else "teacher", "model": entry.model if entry else cfg.teacher,
                    "weight": entry.weight if entry else 1.0, "embed_dim": int(tt.teacher.embed_dim),
                    "input_size": list(tt.teacher_img_size), "fwd_flops": vit_forward_flops(vit_dims(tt.teacher))})
    return out


def flops_baseline(cfg: BenchConfig, base: Variant) -> int:
    """The baseline's model FLOPs per image (the full student: masked tokens are not dropped)."""
    return step_flops(base.distiller)["total"]


def print_table(r: dict) -> None:
    def gib(n):
        return "-" if n is None else f"{n / 2 ** 30:.2f} GiB"

    rows = [("", "fast", "baseline")]
    has_b = r["baseline_images_per_s"] is not None
    b = (lambda k, f: format(r[k], f) if has_b and r.get(k) is not None else "-")
    rows += [
        ("dtype", r["dtype"], r["baseline_dtype"] or "-"),
        ("images/s", f"{r['images_per_s']:.2f}", b("baseline_images_per_s", ".2f")),
        ("step ms", f"{r['step_ms']:.1f}", b("baseline_step_ms", ".1f")),
        ("peak memory", gib(r["peak_mem_bytes"]), gib(r["baseline_peak_mem_bytes"])),
        ("achieved TFLOP/s", f"{r['achieved_flops'] / 1e12:.3f}",
         f"{r['baseline_achieved_flops'] / 1e12:.3f}" if has_b else "-"),
        ("MFU", f"{100 * r['mfu']:.1f}%", f"{100 * r['baseline_mfu']:.1f}%" if has_b else "-"),
        ("HFU (work done)", f"{100 * r['hfu']:.1f}%", f"{100 * r['baseline_mfu']:.1f}%" if has_b else "-"),
    ]
    w = [max(len(row[i]) for row in rows) for i in range(3)]
    print()
    print(f"{r['config']} ({options_text(r['options'])}) on {r['device']}")
    for row in rows:
        print("  " + "  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(row)))
    if r.get("num_teachers", 1) > 1:
        print("  teachers: " + ", ".join(f"{t['name']} = {t['model']} (width {t['embed_dim']}, weight {t['weight']:g}, "
                                         f"{t['fwd_flops'] / 1e9:.2f} GFLOP fwd)" for t in r["teachers"]))
    print(f"  GFLOP/image {r['flops_per_image'] / 1e9:.2f}; matmul ceiling "
          f"{r['matmul_ceiling_flops'] / 1e12:.3f} TFLOP/s ({r['dtype']})")
    if has_b:
        print(f"  speed-up vs baseline: {r['speedup_vs_baseline']:.2f}x")
    if r.get("loader"):
        lr = r["loader"]
        verdict = "keeps up with" if lr["vs_step"] >= 1 else "is SLOWER than"
        print(f"  loader: {lr['images_per_s']:.0f} images/s with {lr['num_workers']} workers -- {verdict} the step "
              f"({lr['vs_step']:.1f}x)")
    if r.get("targets"):
        t = r["targets"]
        print(f"  target MFU >= {100 * t['mfu_min']:.0f}%: {'met' if t['mfu_met'] else 'MISSED'}" +
              ("" if t["speedup_met"] is None else
               f"; speed-up >= {t['speedup_min']}x: {'met' if t['speedup_met'] else 'MISSED'}"))
    if r["load_avg_1m"] is not None:
        print(f"  load average (1 min): {r['load_avg_1m']:.2f} at the start, {r['load_avg_1m_end']:.2f} at the end "
              f"(other jobs ~{r['others_load_est']:.2f}); matmul ceiling drift {100 * r['ceiling_drift']:+.1f}%")


def main(argv: Optional[List[str]] = None) -> dict:
    args = parse_args(argv)
    r = run(args)
    print_table(r)
    r["recorded"] = False
    if args.record:
        busy = r["device_type"] == "cpu" and r["others_load_est"] is not None and r["others_load_est"] > args.max_load
        if busy or abs(r["ceiling_drift"]) > args.max_drift:
            why = (f"other jobs' load ~{r['others_load_est']:.2f} > --max-load {args.max_load}" if busy else
                   f"the matmul ceiling moved {100 * r['ceiling_drift']:+.0f}% during the run")
            log(f"NOT recording: {why} (a busy machine gives wrong numbers); rerun when it is quiet")
        else:
            append_row(r, args.results)
            r["recorded"] = True
            log(f"appended a row to {args.results}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(r, indent=2) + "\n")
        log(f"wrote {args.json}")
    return r


if __name__ == "__main__":
    main()
