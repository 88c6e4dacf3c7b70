"""A 2-process ``torchrun`` (gloo, CPU) run equals the 1-process run at the same global batch.

Same data (rank r takes every 2nd sample of the epoch order, so the 2 x 4 images of a step are
the 1 x 8 images of the other run), no drop path, no masking: DDP's averaged gradient is the
single process's gradient up to float rounding, so the weights after 6 AdamW steps agree to
1e-5 (measured: 1.5e-8) and the logged losses to 1e-5 relative.
"""
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from fdistill.config import build_config
from fdistill.config.distill import DistillConfig
from fdistill.engine import distill, load_checkpoint
from fdistill.engine.checkpoint import list_checkpoints
from tests.conftest import torchrun_prefix

REPO = Path(__file__).resolve().parents[1]

CONFIG = """
teacher:
  spec: timm:vit_tiny_patch16_224
  kwargs: {pretrained: false, img_size: 16, patch_size: 4, depth: 1, embed_dim: 48, num_heads: 2}
student: {arch: vit_tiny, img_size: 16, patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2, drop_path_rate: 0.0}
data: {path: "synthetic:48", batch_size: 8, num_workers: 0}
optim: {base_lr: 0.02, warmup_epochs: 0.5, min_lr: 1.0e-4}
train: {epochs: 2, precision: fp32, device: cpu, log_interval: 1, ckpt_interval: 100}
"""


_torchrun = torchrun_prefix  # (other tests import it from here)


@pytest.mark.slow
def test_two_process_gloo_run_matches_one_process(tmp_path):
    cfg_file = tmp_path / "ddp.yaml"
    cfg_file.write_text(CONFIG)
    two = tmp_path / "two"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = _torchrun() + ["--standalone", "--nproc_per_node=2", "-m", "fdistill.cli.main", "distill",
                         "--config", str(cfg_file), "--output", str(two), "data.batch_size=4", "train.max_steps=6"]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    one = tmp_path / "one"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        distill(build_config(DistillConfig, cfg_file, [f"train.output={one}", "train.max_steps=6"]))
    finally:
        torch.set_num_threads(n)

    a, b = load_checkpoint(list_checkpoints(one)[-1]), load_checkpoint(list_checkpoints(two)[-1])
    assert b["progress"]["world_size"] == 2 and b["progress"]["total_batch"] == a["progress"]["total_batch"] == 8
    assert len(b["rng"]["per_rank"]) == 2  # every rank's generators are saved
    assert not torch.equal(b["rng"]["per_rank"][0]["torch"], b["rng"]["per_rank"][1]["torch"])
    diff = max((b["model"][p][k] - v).abs().max().item() for p in ("student", "projector")
               for k, v in a["model"][p].items())
    print(f"max |w_2proc - w_1proc| = {diff:.3g}")
    for part in ("student", "projector"):
        for k, v in a["model"][part].items():
            torch.testing.assert_close(b["model"][part][k], v, rtol=0, atol=1e-5, msg=f"{part}.{k}")
    la = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lb] == [1, 2, 3, 4, 5, 6]  # rank 0 alone writes
    for ra, rb in zip(la, lb):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5)  # losses reduced over ranks
        assert rb["lr"] == pytest.approx(ra["lr"], rel=1e-12)
