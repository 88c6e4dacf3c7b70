"""Resume on another number of processes at the same global batch (pre-emption, new allocation).

A run of global batch 8 (36 synthetic images: 4 steps of 8 per epoch, 4 images left out of
every epoch, 2 epochs) is interrupted and resumed with another split of the 8: 2 processes x 4
-> 1 x 8, 1 x 8 -> 2 x 4 (``torchrun``, gloo, CPU), 1 x 8 -> 1 x 4 x 2 accumulation steps. The
``on_batch`` hook records the dataset indices each rank takes at each step: every step of the
stitched run must take the same *set* of samples as an uninterrupted 1 x 8 run (so every epoch
the same set, the 4 left-out images included), the resumed part must start at the right step and
train to finite losses. Weights are not compared: the reduction order and the re-derived
drop-path generators differ by design. A different global batch is refused, naming both; tar
shards refuse another ``data.num_workers`` mid-epoch (0 and 1 are the same stream and pass).
"""
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fdistill.config import build_config
from fdistill.config.distill import DistillConfig
from fdistill.data.shards import check_resume_layout
from fdistill.data import DataError
from fdistill.engine import RunError, distill, load_checkpoint
from fdistill.engine.checkpoint import list_checkpoints

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
N, G, SPE = 36, 8, 4  # images, global batch, steps per epoch (2 epochs: 8 steps)

CONFIG = f"""
teacher:
  spec: timm:vit_tiny_patch16_224
  kwargs: {{pretrained: false, img_size: 16, patch_size: 4, depth: 1, embed_dim: 48, num_heads: 2}}
student: {{arch: vit_tiny, img_size: 16, patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2, drop_path_rate: 0.1}}
data: {{path: "synthetic:{N}", batch_size: 8, num_workers: 0}}
optim: {{base_lr: 0.02, warmup_epochs: 0.5, min_lr: 1.0e-4}}
train: {{epochs: 2, precision: fp32, device: cpu, cpu_threads: 1, log_interval: 1, ckpt_interval: 100}}
"""

# run under torchrun: the same distill() call, each rank tracing its batches to rank<r>.jsonl
LAUNCHER = """
import json, os, sys
from fdistill.config import build_config
from fdistill.config.distill import DistillConfig
from fdistill.engine import distill
cfg_file, trace, *overrides = sys.argv[1:]
f = open(os.path.join(trace, "rank%s.jsonl" % os.environ.get("RANK", "0")), "a")
def on_batch(step, batch):
    f.write(json.dumps({"step": step, "indices": batch["indices"].tolist()}) + "\\n")
distill(build_config(DistillConfig, cfg_file, overrides), on_batch=on_batch)
f.close()
"""


@pytest.fixture
def cfg_file(tmp_path):
    p = tmp_path / "tiny.yaml"
    p.write_text(CONFIG)
    return p


def run_here(cfg_file, out, trace, *overrides, **kw):
    """One process, in this one; ``trace[step]`` collects the step's indices."""
    def on_batch(step, batch):
        trace[step] += batch["indices"].tolist()
    cfg = build_config(DistillConfig, cfg_file, [f"train.output={out}", *overrides])
    return distill(cfg, on_batch=on_batch, **kw)


def run_two(tmp_path, cfg_file, out, trace, *overrides):
    """Two gloo processes under torchrun; their indices are added to ``trace[step]``."""
    launcher, tdir = tmp_path / "launch.py", tmp_path / f"trace_{out.name}"
    launcher.write_text(LAUNCHER)
    tdir.mkdir()
    exe = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    cmd = ([exe] if exe else [sys.executable, "-m", "torch.distributed.run"]) + [
        "--standalone", "--nproc_per_node=2", str(launcher), str(cfg_file), str(tdir), f"train.output={out}",
        *overrides]
    proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    per_rank = []
    for r in range(2):
        steps = defaultdict(list)
        for line in (tdir / f"rank{r}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            steps[rec["step"]] += rec["indices"]
        per_rank.append(steps)
    for s in per_rank[0]:  # the ranks split each step's samples, disjointly
        assert not set(per_rank[0][s]) & set(per_rank[1][s])
        trace[s] += per_rank[0][s] + per_rank[1][s]
    return per_rank


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: 1 process x 8, both epochs."""
    tmp = tmp_path_factory.mktemp("ref")
    (tmp / "tiny.yaml").write_text(CONFIG)
    trace = defaultdict(list)
    r = run_here(tmp / "tiny.yaml", tmp / "run", trace)
    assert r.step == 2 * SPE
    return {s: sorted(v) for s, v in trace.items()}


def check_stitched(trace, reference, run_dir):
    assert sorted(trace) == list(range(1, 2 * SPE + 1))
    for s in trace:  # the same samples at every global step (set; the order inside a step is the split's)
        assert sorted(trace[s]) == reference[s], f"step {s}"
    for e in range(2):  # so the same set per epoch, which is not the whole dataset
        seen = sorted(i for s in range(e * SPE + 1, (e + 1) * SPE + 1) for i in trace[s])
        assert len(seen) == len(set(seen)) == SPE * G < N
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 2 * SPE + 1))  # each step logged once: no step redone
    assert all(math.isfinite(r["loss"]) for r in recs)
    last = load_checkpoint(list_checkpoints(run_dir)[-1])
    assert last["progress"]["step"] == 2 * SPE and last["progress"]["total_batch"] == G
    return last


@pytest.mark.slow
def test_two_processes_resumed_on_one_with_double_batch(tmp_path, cfg_file, reference):
    out, trace = tmp_path / "run", defaultdict(list)
    run_two(tmp_path, cfg_file, out, trace, "data.batch_size=4", "train.max_steps=6")  # stop mid epoch 1
    ck = load_checkpoint(list_checkpoints(out)[-1])
    assert ck["progress"]["world_size"] == 2 and ck["progress"]["samples_in_epoch"] == 2 * G  # global, not per rank
    first = len(trace)
    later = defaultdict(list)
    r = run_here(cfg_file, out, later, "data.batch_size=8")
    assert first == 6 and min(later) == 7 and r.step == 2 * SPE
    for s, v in later.items():
        trace[s] += v
    last = check_stitched(trace, reference, out)
    assert last["progress"]["world_size"] == 1 and len(last["rng"]["per_rank"]) == 1


@pytest.mark.slow
def test_one_process_resumed_on_two_with_half_batch(tmp_path, cfg_file, reference):
    out, trace = tmp_path / "run", defaultdict(list)
    run_here(cfg_file, out, trace, "train.max_steps=3")  # stop mid epoch 0
    per_rank = run_two(tmp_path, cfg_file, out, trace, "data.batch_size=4")
    assert min(per_rank[0]) == min(per_rank[1]) == 4  # both ranks continued at step 4
    assert all(len(per_rank[r][s]) == 4 for r in range(2) for s in per_rank[r])
    last = check_stitched(trace, reference, out)
    assert last["progress"]["world_size"] == 2 and len(last["rng"]["per_rank"]) == 2


def test_same_world_size_other_split_and_a_different_global_batch_is_refused(tmp_path, cfg_file, reference):
    out, trace = tmp_path / "run", defaultdict(list)
    run_here(cfg_file, out, trace, "train.max_steps=5")  # into epoch 1
    with pytest.raises(RunError) as e:  # 4 x 1 x 1 = 4 != 8 x 1 x 1
        run_here(cfg_file, out, trace, "data.batch_size=4")
    msg = str(e.value)
    assert "global batch of 8" in msg and "global batch is 4" in msg and "data.batch_size=8" in msg, msg
    assert [p.name for p in list_checkpoints(out)] == ["ckpt_00000005.pt"]  # nothing ran
    with pytest.raises(RunError, match="global batch of 8.*global batch is 16"):
        run_here(cfg_file, out, trace, "optim.accum_steps=2")
    r = run_here(cfg_file, out, trace, "data.batch_size=4", "optim.accum_steps=2")  # 4 x 1 x 2 = 8
    assert r.step == 2 * SPE and all(len(v) == G for v in trace.values())
    check_stitched(trace, reference, out)


# -- tar shards: the stream depends on the worker split -------------------------------------------
def _write_shards(root, n_shards=4, per_shard=6):
    n = 0
    for k in range(n_shards):
        with tarfile.open(root / f"s-{k:06d}.tar", "w") as tf:
            for _ in range(per_shard):
                buf = io.BytesIO()
                Image.fromarray(np.random.default_rng(n).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, "PNG")
                for name, data in ((f"{n:06d}.png", buf.getvalue()), (f"{n:06d}.cls", str(n).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
                n += 1
    return str(root / ("s-{000000..%06d}.tar" % (n_shards - 1)))


def test_shard_resume_with_other_num_workers_is_refused_mid_epoch(tmp_path, cfg_file):
    pytest.importorskip("webdataset")
    pattern = _write_shards(tmp_path)  # 24 samples: 6 steps of 4 per epoch
    shard = [f"data.path={pattern}", "data.samples_per_epoch=24", "data.batch_size=4"]

    def labels(trace):
        return lambda step, batch: trace[step].extend(batch["labels"].tolist())

    ref = defaultdict(list)
    distill(build_config(DistillConfig, cfg_file, [f"train.output={tmp_path / 'ref'}", *shard, "train.max_steps=4"]),
            on_batch=labels(ref))
    out, trace = tmp_path / "run", defaultdict(list)
    cfg = lambda *o: build_config(DistillConfig, cfg_file, [f"train.output={out}", *shard, *o])  # noqa: E731
    distill(cfg("train.max_steps=2"), on_batch=labels(trace))
    with pytest.raises(RunError, match=r"tar-shard data in the middle of epoch 0 .*data\.num_workers.*1 in the "
                                       r"checkpoint, 2 now.*Resume with data\.num_workers=0"):
        distill(cfg("train.max_steps=4", "data.num_workers=2"))
    # one worker reads the same single stream as the main process: accepted, and exact
    distill(cfg("train.max_steps=4", "data.num_workers=1"), on_batch=labels(trace))
    assert dict(trace) == dict(ref)


def test_shard_layout_check_rules():
    a = {"world_size": 2, "num_workers": 4, "batch_size": 8}
    check_resume_layout(a, {"world_size": 1, "num_workers": 0, "batch_size": 16}, samples_in_epoch=0)  # epoch start
    check_resume_layout({**a, "num_workers": 0}, {**a, "num_workers": 1}, samples_in_epoch=64)
    with pytest.raises(DataError, match=r"processes: 2 in the checkpoint, 1 now.*data\.batch_size: 8 in the "
                                        r"checkpoint, 16 now.*Resume with 2 process\(es\), data\.batch_size=8"):
        check_resume_layout(a, {**a, "world_size": 1, "batch_size": 16}, samples_in_epoch=64)


def test_sampler_global_positions_and_re_split():
    from fdistill.data import ResumableDistributedSampler
    from fdistill.data.sampler import split_position

    n, b = 37, 3
    glob = ResumableDistributedSampler(n, seed=4).global_order(2)
    for w in (1, 2, 3):
        ranks = [ResumableDistributedSampler(n, num_replicas=w, rank=r, seed=4) for r in range(w)]
        for s in ranks:
            s.set_epoch(2)
        assert ranks[0].global_order()[:min(n, ranks[0].total_size)] == glob[:min(n, ranks[0].total_size)]
        for k in range(0, ranks[0].num_samples - b + 1, b):  # k samples taken per rank = positions [0, k*w)
            taken = [i for s in ranks for i in s.epoch_indices()[k:k + b]]
            assert sorted(taken) == sorted(glob[k * w:(k + b) * w])
        # a state written under 2 ranks re-splits under w ranks
        st = {"epoch": 2, "start": 9, "seed": 4, "global_start": 18, "num_replicas": 2}
        ranks[0].load_state_dict(st)
        assert ranks[0].start == 18 // w and ranks[0].global_start == 18
    assert split_position(24, 2, 4) == 12
    with pytest.raises(ValueError, match="whole number of batches"):
        split_position(20, 2, 4)
