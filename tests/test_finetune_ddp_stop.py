"""``fdistill finetune`` under a 2-process ``torchrun`` (gloo, CPU) when a stop signal reaches one
rank only (issue 13, item 3). Before the fix that rank left the loop on its own, the other sat in
allreduce, gloo failed with "Connection closed by peer" and the pre-emption checkpoint was lost.
Now the ranks agree on the stop (``any_rank``) at every step: both stop at the same step, rank 0
writes the checkpoint, the command exits 0."""
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.test_engine_ddp import _torchrun

REPO = Path(__file__).resolve().parents[1]


def _rank_pids(parent: int):
    """{RANK: pid} of torchrun's worker processes (read from /proc)."""
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid != parent:
                continue
            env = dict(kv.split("=", 1) for kv in (d / "environ").read_bytes().decode(errors="replace").split("\0")
                       if "=" in kv)
        except (OSError, ValueError, IndexError):
            continue
        if "RANK" in env:
            found[int(env["RANK"])] = int(d.name)
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc to find the ranks")
def test_a_signal_to_one_rank_stops_both_with_a_checkpoint(tmp_path):
    out = tmp_path / "ft"
    cmd = _torchrun() + ["--standalone", "--nproc_per_node=2", "-m", "fdistill.cli.main", "finetune",
                         "--config", "configs/finetune/tiny_cpu.yaml", "--model", "timm:vit_tiny_patch16_224",
                         "--model-kwargs", '{"pretrained": false, "img_size": 32, "patch_size": 8, "depth": 1, '
                                           '"embed_dim": 32, "num_heads": 2}',
                         "--train", "synthetic:256", "--output", str(out), "epochs=200", "data.batch_size=16",
                         "device=cpu"]
    log_path = tmp_path / "log.txt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            t0 = time.time()  # the first epoch's checkpoint: both ranks are in the loop
            while not list(out.glob("checkpoints/ckpt_*.pt")):
                assert proc.poll() is None and time.time() - t0 < 240, log_path.read_text()[-3000:]
                time.sleep(0.2)
            ranks = _rank_pids(proc.pid)
            assert sorted(ranks) == [0, 1], ranks
            os.kill(ranks[1], signal.SIGUSR1)  # one rank only, as a per-node signal can
            rc = proc.wait(timeout=180)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log_path.read_text()
    assert rc == 0, text[-3000:]
    assert "Connection closed by peer" not in text
    ck = torch.load(sorted(out.glob("checkpoints/ckpt_*.pt"))[-1], map_location="cpu", weights_only=True)
    steps_per_epoch = 256 // (16 * 2)
    assert 0 < ck["progress"]["step"] < 200 * steps_per_epoch  # stopped early, at a step both ranks reached
    assert len(ck["rng"]["per_rank"]) == 2  # both ranks took part in the checkpoint (a collective)
