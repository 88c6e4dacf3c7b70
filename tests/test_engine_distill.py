"""The distillation loop end to end on tiny models: outputs, exact resume, pre-emption,
corrupt checkpoints, incompatible configs, non-finite losses, accumulation, precisions."""
import json
import math
import os
import signal

import pytest
import torch

from fdistill.config import ConfigError, build_config
from fdistill.config.distill import DistillConfig
from fdistill.engine import RunError, distill, load_checkpoint
from fdistill.engine.checkpoint import list_checkpoints
from tests.conftest import write_random_images


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (conftest)


def tiny_cfg(out, *overrides):
    """A run of 4 steps per epoch: 32 synthetic 16 px images, batch 8, tiny teacher and student."""
    base = [
        "teacher.spec=timm:vit_tiny_patch16_224",
        "teacher.kwargs={pretrained: false, img_size: 16, patch_size: 4, depth: 1, embed_dim: 48, num_heads: 2}",
        "student.arch=vit_tiny", "student.img_size=16", "student.patch_size=4", "student.embed_dim=32",
        "student.depth=2", "student.num_heads=2", "student.drop_path_rate=0.0",
        "data.path=synthetic:32", "data.batch_size=8", "data.num_workers=0",
        "optim.base_lr=0.02", "optim.warmup_epochs=0.5", "optim.min_lr=1e-4",
        "train.epochs=3", "train.precision=fp32", "train.device=cpu", "train.log_interval=2",
        "train.ckpt_interval=100", f"train.output={out}",
    ]
    return build_config(DistillConfig, None, base + list(overrides))


def test_max_steps_zero_writes_the_initialised_student(tmp_path):
    """train.max_steps=0 is FD for 0 epochs: the checkpoint holds the student exactly as seeded
    initialisation built it (the from-scratch baseline of docs/evidence.md), and a rerun is a no-op."""
    from fdistill.engine.builders import build_distiller

    out = tmp_path / "scratch"
    r = distill(tiny_cfg(out, "train.max_steps=0", "train.seed=1"))
    assert r.complete and r.step == 0 and r.total_steps == 0
    assert [p.name for p in list_checkpoints(out)] == ["ckpt_00000000.pt"]
    ck = load_checkpoint(out / "checkpoints" / "ckpt_00000000.pt")
    assert ck["progress"]["step"] == 0 and ck["progress"]["samples"] == 0
    from fdistill.engine.rng import seed_everything

    seed_everything(1)  # what the run does before building the models
    fresh = build_distiller(tiny_cfg(out, "train.seed=1"), device=torch.device("cpu"), precision="fp32")
    want = fresh.student.state_dict()
    assert ck["model"]["student"].keys() == want.keys()
    assert all(torch.equal(ck["model"]["student"][k], want[k]) for k in want)
    seed_everything(2)
    other = build_distiller(tiny_cfg(out, "train.seed=2"), device=torch.device("cpu"), precision="fp32")
    assert not torch.equal(other.student.state_dict()["blocks.0.attn.qkv.weight"],
                           want["blocks.0.attn.qkv.weight"])  # the seed matters: the oracle is not vacuous
    r2 = distill(tiny_cfg(out, "train.max_steps=0", "train.seed=1"))  # --resume auto: nothing to do
    assert r2.step == 0 and [p.name for p in list_checkpoints(out)] == ["ckpt_00000000.pt"]
    with pytest.raises(ConfigError, match="max_steps must be >= 0"):
        tiny_cfg(out, "train.max_steps=-1")


def final_state(run_dir):
    ckpt = load_checkpoint(list_checkpoints(run_dir)[-1])
    return ckpt


def assert_same_training_state(a, b):
    for part in ("student", "projector"):
        sa, sb = a["model"][part], b["model"][part]
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{part}.{k} differs"
    oa, ob = a["optimizer"]["state"], b["optimizer"]["state"]
    assert oa.keys() == ob.keys()
    for i in oa:
        for k in oa[i]:
            assert torch.equal(oa[i][k], ob[i][k]), f"optimizer state {i}.{k} differs"


def test_run_writes_config_metrics_checkpoint(tmp_path):
    out = tmp_path / "run"
    r = distill(tiny_cfg(out, "train.max_steps=6", "train.ckpt_interval=4"))
    assert r.complete and r.step == 6 and r.total_steps == 6 and r.stopped_by is None
    assert (out / "config.yaml").is_file()
    saved = build_config(DistillConfig, out / "config.yaml")  # the resolved config round-trips
    assert saved.train.max_steps == 6 and saved.student.embed_dim == 32
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r_["step"] for r_ in recs] == [2, 4, 6]
    for rec in recs:
        for key in ("step", "epoch", "loss", "lr", "images_per_s", "loss_prefix", "loss_patch", "grad_norm",
                    "nonfinite", "skipped_images"):
            assert key in rec
        assert math.isfinite(rec["loss"]) and rec["images_per_s"] > 0 and rec["nonfinite"] == 0
    assert recs[1]["epoch"] == 1.0  # 4 steps per epoch
    # checkpoints at the interval and at the end, with the documented contract
    names = [p.name for p in list_checkpoints(out)]
    assert names == ["ckpt_00000004.pt", "ckpt_00000006.pt"]
    ck = load_checkpoint(out / "checkpoints" / "ckpt_00000006.pt")
    assert ck["format"] == "fdistill-checkpoint" and ck["version"] == 1
    assert ck["progress"]["step"] == 6 and ck["progress"]["epoch"] == 1 and ck["progress"]["samples"] == 48
    assert ck["progress"]["samples_in_epoch"] == 16
    assert ck["teacher"]["spec"] == "timm:vit_tiny_patch16_224" and ck["teacher"]["embed_dim"] == 48
    assert ck["student_args"]["embed_dim"] == 32
    assert len(ck["rng"]["per_rank"]) == 1
    # loadable by the evaluation side
    from fdistill.models.loading import load_model

    m = load_model(out)
    assert m.embed_dim == 32 and m.projector.out_features == 48


def test_lr_follows_warmup_cosine_and_linear_scaling(tmp_path):
    out = tmp_path / "run"
    distill(tiny_cfg(out, "train.log_interval=1", "train.max_steps=12"))
    lrs = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    peak, warm, floor = 0.02 * 8 / 512, 5e-7 * 8 / 512, 1e-4 * 8 / 512  # scaled by total batch / 512
    W, T = 2, 12  # warm-up 0.5 epoch = 2 steps; 3 epochs x 4 steps
    expect = [warm + s * (peak - warm) / W if s < W else
              floor + (peak - floor) * (1 + math.cos(math.pi * (s - W) / (T - W))) / 2 for s in range(T)]
    assert lrs == pytest.approx(expect, rel=1e-9)


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path, workers):
    """Stop mid-epoch (step 6 of 4-step epochs), resume, finish: bitwise equal weights and optimizer
    state, with drop path and input masking drawing random numbers all along."""
    extra = ["student.drop_path_rate=0.2", "distill.mask_ratio=0.5", f"data.num_workers={workers}",
             "train.max_steps=10"]
    a = tmp_path / "a"
    distill(tiny_cfg(a, *extra))
    b = tmp_path / "b"
    r1 = distill(tiny_cfg(b, *extra[:-1], "train.max_steps=6"))
    assert r1.step == 6
    r2 = distill(tiny_cfg(b, *extra))  # --resume auto, max_steps may change
    assert r2.step == 10
    assert_same_training_state(final_state(a), final_state(b))
    # the resumed run rewrote nothing twice: one metrics record per logged step
    steps = [json.loads(line)["step"] for line in (b / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8, 10]


def test_sigterm_checkpoints_and_the_run_resumes(tmp_path):
    out = tmp_path / "run"
    extra = ["student.drop_path_rate=0.1", "distill.mask_ratio=0.25", "train.max_steps=9"]

    def preempt(step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # a real signal, through the installed handler

    r = distill(tiny_cfg(out, *extra), on_step=preempt)
    assert r.stopped_by == "SIGTERM" and r.step == 3
    assert [p.name for p in list_checkpoints(out)] == ["ckpt_00000003.pt"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler removed after the run
    r = distill(tiny_cfg(out, *extra))
    assert r.step == 9 and r.complete and r.stopped_by is None
    ref = tmp_path / "ref"
    distill(tiny_cfg(ref, *extra))
    assert_same_training_state(final_state(ref), final_state(out))


def test_corrupt_newest_checkpoint_falls_back_to_previous(tmp_path, caplog):
    out = tmp_path / "run"
    distill(tiny_cfg(out, "train.max_steps=4", "train.ckpt_interval=2"))
    newest = out / "checkpoints" / "ckpt_00000004.pt"
    data = bytearray(newest.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(64)  # silent corruption inside a tensor record (not a truncation)
    newest.write_bytes(bytes(data))
    with pytest.raises(RunError, match="corrupt"):
        load_checkpoint(newest)
    ref = tmp_path / "ref"
    distill(tiny_cfg(ref, "train.max_steps=6"))
    with caplog.at_level("WARNING"):
        r = distill(tiny_cfg(out, "train.max_steps=6", "train.ckpt_interval=2"))
    assert "skipping unusable checkpoint" in caplog.text and "ckpt_00000004.pt" in caplog.text
    assert r.step == 6
    assert_same_training_state(final_state(ref), final_state(out))  # redone from step 2, same result


def test_truncated_checkpoint_is_refused_clearly(tmp_path):
    out = tmp_path / "run"
    distill(tiny_cfg(out, "train.max_steps=2"))
    p = list_checkpoints(out)[-1]
    p.write_bytes(p.read_bytes()[:-1000])
    with pytest.raises(RunError, match="truncated or corrupt"):
        load_checkpoint(p)
    with pytest.raises(RunError, match="no valid checkpoint"):
        distill(tiny_cfg(out, "train.max_steps=4"), resume=str(out))


def test_resume_auto_stops_when_checkpoints_exist_but_none_loads(tmp_path):
    """It used to start again from step 0 (and prune the broken files away as it went)."""
    out = tmp_path / "run"
    distill(tiny_cfg(out, "train.max_steps=4", "train.ckpt_interval=2"))
    for p in list_checkpoints(out):
        p.write_bytes(p.read_bytes()[:-1000])  # every checkpoint truncated
    with pytest.raises(RunError, match=r"holds 2 checkpoint\(s\) and none loads:\n  ckpt_00000002.pt: .*truncated"):
        distill(tiny_cfg(out, "train.max_steps=6"))
    assert len(list_checkpoints(out)) == 2  # nothing deleted, nothing written
    assert all(p.stat().st_size > 0 for p in list_checkpoints(out))


def test_incompatible_config_is_refused_listing_keys(tmp_path):
    out = tmp_path / "run"
    distill(tiny_cfg(out, "train.max_steps=2"))
    with pytest.raises(RunError) as e:
        distill(tiny_cfg(out, "train.max_steps=4", "optim.base_lr=0.5", "student.depth=3"))
    msg = str(e.value)
    assert "optim.base_lr: 0.02 != 0.5" in msg and "student.depth: 2 != 3" in msg
    assert "train.max_steps" not in msg
    # logging, length and output keys may change
    r = distill(tiny_cfg(out, "train.max_steps=4", "train.log_interval=1", "train.epochs=4"))
    assert r.step == 4


def test_resume_none_refuses_a_folder_with_checkpoints(tmp_path):
    out = tmp_path / "run"
    distill(tiny_cfg(out, "train.max_steps=2"))
    with pytest.raises(RunError, match="already holds checkpoints"):
        distill(tiny_cfg(out, "train.max_steps=2"), resume="none")


def test_resume_from_explicit_checkpoint(tmp_path):
    a = tmp_path / "a"
    distill(tiny_cfg(a, "train.max_steps=4", "train.ckpt_interval=2"))
    b = tmp_path / "b"
    r = distill(tiny_cfg(b, "train.max_steps=4"), resume=str(a / "checkpoints" / "ckpt_00000002.pt"))
    assert r.step == 4
    assert_same_training_state(final_state(a), final_state(b))


def _nan_after(monkeypatch, bad_calls):
    """Make FeatureDistiller.forward return a NaN loss on the given (0-based) call numbers."""
    from fdistill.distiller import FeatureDistiller

    orig = FeatureDistiller.forward
    calls = {"n": 0}

    def forward(self, images):
        out = orig(self, images)
        i = calls["n"]
        calls["n"] += 1
        if bad_calls(i):
            out = dict(out, loss=out["loss"] * float("nan"))
        return out

    monkeypatch.setattr(FeatureDistiller, "forward", forward)


def test_nonfinite_step_is_skipped_and_counted(tmp_path, monkeypatch):
    ref = tmp_path / "ref"
    distill(tiny_cfg(ref, "train.max_steps=2"))
    _nan_after(monkeypatch, lambda i: i == 2)  # the third step's loss is NaN
    out = tmp_path / "run"
    distill(tiny_cfg(out, "train.max_steps=3", "train.log_interval=1"))
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite"] for r in recs] == [0, 0, 1]
    assert math.isnan(recs[2]["loss"]) and recs[2]["nonfinite_streak"] == 1
    # the skipped step changed neither the weights nor AdamW's moments (nor its step count)
    a, b = final_state(ref), final_state(out)
    assert_same_training_state(a, b)
    assert all(int(s["step"]) == 2 for s in b["optimizer"]["state"].values())


def test_too_many_nonfinite_in_a_row_stops_with_last_good_checkpoint(tmp_path, monkeypatch):
    _nan_after(monkeypatch, lambda i: i >= 3)
    out = tmp_path / "run"
    with pytest.raises(RunError, match="4 optimizer steps in a row"):
        distill(tiny_cfg(out, "train.max_steps=12", "train.max_nonfinite=4", "train.ckpt_interval=2",
                         "train.log_interval=1"))
    names = [p.name for p in list_checkpoints(out)]
    assert names[-1] == "ckpt_00000006.pt"  # written during the streak: still the step-3 weights
    good = load_checkpoint(out / "checkpoints" / "ckpt_00000002.pt")
    assert good["progress"]["step"] == 2
    last = load_checkpoint(out / "checkpoints" / "ckpt_00000006.pt")
    assert all(int(s["step"]) == 3 for s in last["optimizer"]["state"].values())


def test_the_nonfinite_limit_stops_exactly_at_k_steps_between_log_lines(tmp_path, monkeypatch):
    """Issue 13 (low): with K = 4 and a log line every 10 steps the run went on until the log
    line; it now stops at the K-th non-finite step in a row: steps 4-7 are NaN -> stop at 7."""
    _nan_after(monkeypatch, lambda i: i >= 3)
    with pytest.raises(RunError, match=r"4 optimizer steps in a row .* stopped at step 7\."):
        distill(tiny_cfg(tmp_path / "run", "train.max_steps=12", "train.max_nonfinite=4", "train.log_interval=10"))


def test_gradient_accumulation_matches_the_big_batch(tmp_path):
    """2 micro-batches of 4 = 1 batch of 8 (same images, same global batch, same lr)."""
    a, b = tmp_path / "a", tmp_path / "b"
    distill(tiny_cfg(a, "train.max_steps=3"))
    distill(tiny_cfg(b, "train.max_steps=3", "data.batch_size=4", "optim.accum_steps=2"))
    sa, sb = final_state(a)["model"]["student"], final_state(b)["model"]["student"]
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-4, atol=1e-6)
    assert final_state(b)["progress"]["total_batch"] == 8


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_precisions_train_on_cpu(tmp_path, precision):
    """The GPU code paths (bf16 autocast; fp16 with a loss scaler) run and learn on CPU."""
    out = tmp_path / precision
    r = distill(tiny_cfg(out, f"train.precision={precision}", "train.max_steps=4", "train.log_interval=1",
                         "optim.warmup_epochs=0"))
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert r.step == 4 and all(math.isfinite(x["loss"]) for x in recs)
    ck = final_state(out)
    if precision == "fp16":
        assert ck["scaler"]["scale"] > 0
    assert any(int(s["step"]) == 4 for s in ck["optimizer"]["state"].values())


def test_compile_failure_falls_back_to_eager(tmp_path, monkeypatch, caplog):
    def broken_compile(model, *a, **k):
        def f(*args, **kw):
            raise RuntimeError("no compiler here")
        return f

    monkeypatch.setattr(torch, "compile", broken_compile)
    with caplog.at_level("WARNING"):
        r = distill(tiny_cfg(tmp_path / "run", "train.compile=true", "train.max_steps=2"))
    assert r.step == 2 and "torch.compile failed" in caplog.text


def test_timm_student_trains_and_refuses_masking(tmp_path):
    swin = ["student.arch=timm:swin_tiny_patch4_window7_224",
            "student.kwargs={img_size: 32, window_size: 4, embed_dim: 16, depths: [1, 1], num_heads: [1, 2]}",
            "student.img_size=32", "data.img_size=32",
            "teacher.kwargs={pretrained: false, img_size: 32, patch_size: 8, depth: 1, embed_dim: 48, num_heads: 2}"]
    r = distill(tiny_cfg(tmp_path / "swin", *swin, "train.max_steps=2"))
    assert r.step == 2
    with pytest.raises(ConfigError, match="mask"):
        tiny_cfg(tmp_path / "x", *swin, "distill.mask_ratio=0.5")


def test_cpu_threads_apply_during_the_run_only(tmp_path):
    torch.set_num_threads(2)
    seen = []
    distill(tiny_cfg(tmp_path / "run", "train.cpu_threads=1", "train.max_steps=1"),
            on_step=lambda s: seen.append(torch.get_num_threads()))
    assert seen == [1] and torch.get_num_threads() == 2


def _jpeg_folder(root):
    """33 random images (JPEGs, some PNG and greyscale) and one corrupt .jpg."""
    write_random_images(root, n=33)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    return root


def test_gpu_decode_run_equals_the_cpu_loader_run(tmp_path):
    """data.gpu_decode: the same samples, crops and flips as the CPU loader; without CUDA the
    fallback decodes with the same decoder, so the runs end with equal weights; the corrupt file
    is skipped and counted in both."""
    data = _jpeg_folder(tmp_path / "jpgs")
    common = (f"data.path={data}", "train.max_steps=5")
    a = distill(tiny_cfg(tmp_path / "cpu", *common))
    b = distill(tiny_cfg(tmp_path / "dev", *common, "data.gpu_decode=true"))
    assert a.step == b.step == 5
    assert_same_training_state(final_state(a.run_dir), final_state(b.run_dir))
    recs = [[json.loads(line) for line in (r.run_dir / "metrics.jsonl").read_text().splitlines()] for r in (a, b)]
    assert [r["loss"] for r in recs[0] if "loss" in r] == [r["loss"] for r in recs[1] if "loss" in r]
    skipped = [sum(r.get("skipped_images", 0) for r in rs) for rs in recs]
    assert skipped[0] == skipped[1] == 1  # the broken file, drawn once in these 40 samples


def test_gpu_decode_needs_an_image_folder(tmp_path):
    with pytest.raises(ConfigError, match="gpu_decode needs an image folder"):
        distill(tiny_cfg(tmp_path / "run", "data.gpu_decode=true"))  # synthetic data


def test_a_second_run_in_the_same_folder_is_refused_and_loses_nothing(tmp_path):
    """A second run used to delete the first one's in-flight checkpoint; now it stops at once."""
    import subprocess
    import sys

    from fdistill.engine.lock import RunLock

    out = tmp_path / "run"
    distill(tiny_cfg(out, "train.max_steps=2"))
    before = sorted(p.name for p in out.rglob("*"))
    with RunLock(out):  # a run in progress holds the folder
        with pytest.raises(RunError, match=r"another fdistill run \(pid \d+\) is using"):
            distill(tiny_cfg(out, "train.max_steps=4"))
    assert sorted(p.name for p in out.rglob("*")) == before
    # a holder that dies (kill -9) leaves no stale lock
    code = ("import os, sys, time; from fdistill.engine.lock import RunLock; l = RunLock(sys.argv[1]).__enter__(); "
            "print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(RunError, match="another fdistill run"):
        distill(tiny_cfg(out, "train.max_steps=4"))
    holder.kill()
    holder.wait()
    assert distill(tiny_cfg(out, "train.max_steps=4")).step == 4


def test_retention_after_an_older_resume_keeps_what_the_run_wrote(tmp_path):
    """Issue 13 item 6: resumed from an older checkpoint, the run pruned by step number and
    deleted the checkpoint it had just written (keeping a later one of the abandoned branch),
    then reported a file that no longer existed. Later checkpoints are now set aside, and what
    the run wrote last is never deleted."""
    out = tmp_path / "run"
    distill(tiny_cfg(out, "train.max_steps=8", "train.ckpt_interval=4", "train.keep_last=2"))
    assert [p.name for p in list_checkpoints(out)] == ["ckpt_00000004.pt", "ckpt_00000008.pt"]
    old = out / "checkpoints" / "ckpt_00000004.pt"
    r = distill(tiny_cfg(out, "train.max_steps=6", "train.ckpt_interval=4", "train.keep_last=1"), resume=str(old))
    assert r.step == 6 and r.checkpoint.is_file()
    assert [p.name for p in list_checkpoints(out)] == ["ckpt_00000006.pt"]
    aside = out / "checkpoints" / "abandoned-after-00000004"
    assert sorted(p.name for p in aside.iterdir()) == ["ckpt_00000008.pt"]  # kept for inspection
    # the next --resume auto continues this run (step 6), not the abandoned branch (step 8)
    r2 = distill(tiny_cfg(out, "train.max_steps=7", "train.ckpt_interval=4", "train.keep_last=1"))
    assert r2.step == 7 and load_checkpoint(r2.checkpoint)["progress"]["step"] == 7


def test_fallback_over_a_corrupt_newest_checkpoint_sets_it_aside(tmp_path):
    out = tmp_path / "run"
    distill(tiny_cfg(out, "train.max_steps=8", "train.ckpt_interval=4", "train.keep_last=2"))
    newest = out / "checkpoints" / "ckpt_00000008.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated
    r = distill(tiny_cfg(out, "train.max_steps=6", "train.ckpt_interval=4", "train.keep_last=1"))
    assert r.step == 6 and [p.name for p in list_checkpoints(out)] == ["ckpt_00000006.pt"]
    assert (out / "checkpoints" / "abandoned-after-00000004" / "ckpt_00000008.pt").is_file()


def test_a_stop_during_a_data_stall_is_honoured_at_once(tmp_path, monkeypatch):
    """Issue 13 item 4: a stop requested while the loop waits for data (a stalled file system)
    used to wait for the data. Now the wait is abandoned: the run checkpoints at the current step
    within seconds, and resuming gives the uninterrupted run's weights."""
    import importlib
    import time

    loop = importlib.import_module("fdistill.engine.trainer")  # the loop of every command, distillation included

    ref = tmp_path / "ref"
    distill(tiny_cfg(ref, "train.max_steps=6"))
    real_take, calls = loop._take, []

    def stalling_take(batches, n):
        calls.append(1)
        if len(calls) == 4:  # fetching the 4th step's batch: the signal comes during a long stall
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(120)
        return real_take(batches, n)

    monkeypatch.setattr(loop, "_take", stalling_take)
    out = tmp_path / "run"
    t0 = time.perf_counter()
    r = distill(tiny_cfg(out, "train.max_steps=6"))
    assert time.perf_counter() - t0 < 60  # not the 120 s stall
    assert r.stopped_by == "SIGTERM" and r.step == 3
    assert load_checkpoint(r.checkpoint)["progress"]["step"] == 3
    monkeypatch.setattr(loop, "_take", real_take)
    assert distill(tiny_cfg(out, "train.max_steps=6")).step == 6
    assert_same_training_state(final_state(out), final_state(ref))
