"""benchmarks/gpu_check.sh: its CPU dry run passes and writes the full JSON summary, so the GPU
check is not broken when a GPU becomes available (it has not run on one yet)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_check

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_dry_run_writes_every_stage(tmp_path):
    out = tmp_path / "x.json"
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("OUT", None)
    p = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", "--out", str(out), "--work-dir",
                        str(tmp_path / "work")], cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert out.is_file(), p.stdout + p.stderr
    s = json.loads(out.read_text())
    stages = s["stages"]
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:], {k: v["status"] for k, v in stages.items()})
    assert s["mode"] == "dry-run" and s["ok"] and s["failed"] == []
    assert list(stages) == list(gpu_check.STAGES)
    for name, st in stages.items():
        want = gpu_check.SKIP_NO_CUDA if name in gpu_check.CUDA_ONLY and not s["cuda_available"] else "ok"
        assert st["status"] == want, (name, st["status"], st.get("log_tail"))
        assert st["seconds"] > 0

    # the CUDA tests were found and collected (they skip here)
    ct = stages["cuda_tests"]
    assert ct["tests"] and ct["failed"] == 0 and ct["passed"] + ct["skipped"] == len(ct["tests"])

    # FD under torchrun: the loss fell, checkpoints written, and the resume continued from the last one
    fd = stages["fd_bf16"]
    assert "--nproc_per_node=1" in fd["command"] and "fdistill.cli.main" in fd["command"]
    assert fd["loss_fell"] and fd["loss_last"] < fd["loss_first"]
    assert fd["last_step"] == fd["steps"] and f"ckpt_{fd['steps']:08d}.pt" in fd["checkpoints"]
    assert fd["steps_per_s"] > 0 and fd["images_per_s"] > 0 and fd["peak_rss_mib"] > 0
    rs = stages["fd_resume"]
    assert rs["continued"] and rs["resumed_from_step"] == fd["steps"] and rs["final_step"] > fd["steps"]
    assert rs["loss_after_resume"] is not None

    # fp16 ran with the loss scaler; the JPEG folder went through data.gpu_decode
    fp16 = stages["fp16_scaler"]
    assert "train.precision=fp16" in fp16["command"] and fp16["loss_scale"] > 0 and fp16["loss_last"] is not None
    dec = stages["gpu_decode"]
    assert "data.gpu_decode=true" in dec["command"] and dec["skipped_images"] == 0 and dec["images_per_s"] > 0

    # the benchmark's command lines for the GPU configs, exercised on the tiny config
    for name, (config, opts) in gpu_check.BENCH.items():
        b = stages[name]
        assert b["rc"] == 0 and "--record" in b["command"] and all(o in b["command"] for o in opts)
        assert config in b["gpu_command"] and b["config"] == "tiny" and b["images_per_s"] > 0
    assert (out.parent / "x_logs" / "fd_bf16.log").is_file()
    # a dry run never appends to the repository's results table
    assert str(REPO / "benchmarks" / "RESULTS.md") not in " ".join(stages["bench_gpu-vitb-bf16"]["command"])


def test_without_cuda_the_full_check_refuses(monkeypatch, tmp_path, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path / "x.json")]) == 2
    assert "--dry-run" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_default_out_follows_OUT(monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu_check.default_out() == tmp_path / "gpu_check.json"
    monkeypatch.delenv("OUT")
    assert gpu_check.default_out() == REPO / "runs" / "gpu_check.json"


def test_run_numbers_from_metrics_records():
    recs = [{"step": 5, "loss": 0.5, "step_time_s": 9.0, "images_per_s": 1.0},
            {"step": 10, "loss": 0.4, "step_time_s": 0.1, "images_per_s": 100.0, "nonfinite": 1},
            {"step": 15, "loss": 0.3, "step_time_s": 0.1, "images_per_s": 120.0}]
    n = gpu_check.run_numbers(recs)
    assert n["loss_first"] == 0.5 and n["loss_last"] == 0.3 and n["loss_fell"]
    assert n["steps_per_s"] == 10.0 and n["images_per_s"] == 110.0  # the first interval (start-up) left out
    assert n["nonfinite_steps"] == 1
    after = gpu_check.run_numbers(recs, after_step=10)
    assert after["records"] == 1 and after["first_step"] == 15
    assert gpu_check.run_numbers([{"step": 5, "loss": float("nan")}])["loss_fell"] is False
