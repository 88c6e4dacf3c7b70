"""Fine-tuning: a tiny model learns a procedural task far above chance; outputs and weights;
exact resume after a stop; refused recipe changes; mixup + EMA; non-finite losses; bad data."""
import json

import pytest
import torch

from fdistill import create_student
from fdistill.data import DataError, build_classification_dataset, eval_transform
from fdistill.engine.checkpoint import list_checkpoints, load_checkpoint
from fdistill.engine.errors import RunError
from fdistill.eval.classifier import load_classifier
from fdistill.eval.data import train_transform
from fdistill.eval.finetune import evaluate_classifier, finetune
from fdistill.models.loading import StudentAdapter
from tests.conftest import COLOURS, make_colour_patches



@pytest.fixture(scope="module")
def colour_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("colours")
    make_colour_patches(root / "train", 64, 0)
    make_colour_patches(root / "val", 16, 1)
    return root


def _adapter():
    torch.manual_seed(0)
    s = create_student("vit_tiny", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    return StudentAdapter(s, name="tiny-student")


def _datasets(root, adapter):
    tf = train_transform(32, mean=adapter.mean, std=adapter.std, auto_augment=None, re_prob=0.0, color_jitter=0.0)
    return (build_classification_dataset(root, "train", tf), build_classification_dataset(root, "val", eval_transform(32)))


RECIPE = dict(epochs=3, warmup_epochs=0.3, batch_size=32, num_workers=0, lr=3e-3, warmup_lr=1e-5, min_lr=1e-5,
              layer_decay=0.75, drop_path_rate=0.0, mixup=None, label_smoothing=0.1, progress=False)


def test_finetune_learns_far_above_chance_and_writes_outputs(colour_data, tmp_path):
    a = _adapter()
    tr, va = _datasets(colour_data, a)
    m = finetune(a, tr, va, output_dir=tmp_path, resume=None, **RECIPE)
    assert m["top1"] > 3 * 25.0  # 4 classes: chance is 25%
    assert m["steps"] == 3 * (256 // 32) and m["epochs_done"] == 3 and m["classifier"] == "beit"
    assert "top5" not in m["last"]  # 4 classes: top-5 would be 100% by construction
    for f in ("classifier.json", "model_best.safetensors", "model_last.safetensors", "metrics.jsonl"):
        assert (tmp_path / f).is_file(), f
    # the engine's one checkpoint format, the newest keep_last (2) kept: the last two epochs' ends
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt_00000016.pt", "ckpt_00000024.pt"]
    assert load_checkpoint(list_checkpoints(tmp_path)[-1], task="finetune")["progress"]["step"] == 24
    log = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]
    assert m["top1"] == max(r["model"]["top1"] for r in log) and m["last"] == log[-1]["model"]
    # the saved best classifier reproduces the best accuracy
    c = load_classifier(tmp_path)
    assert c.classes == sorted(COLOURS)
    loader = torch.utils.data.DataLoader(va, batch_size=64)
    again = evaluate_classifier(c.model, loader, mean=c.mean, std=c.std, device=torch.device("cpu"))
    assert again["top1"] == pytest.approx(m["top1"])


def test_stop_and_resume_is_exact(colour_data, tmp_path):
    a = _adapter()
    tr, va = _datasets(colour_data, a)
    recipe = dict(RECIPE, epochs=2)
    full = finetune(a, tr, va, output_dir=tmp_path / "a", resume=None, **recipe)
    ref = load_classifier(tmp_path / "a", which="last").model.state_dict()

    b = _adapter()
    part = finetune(b, tr, va, output_dir=tmp_path / "b", resume=None, on_step=lambda s: s == 11, **recipe)
    assert part["stopped_early"] and part["steps"] == 11  # mid-epoch 2
    rest = finetune(_adapter(), tr, va, output_dir=tmp_path / "b", resume="auto", **recipe)
    assert rest["steps"] == full["steps"] and not rest["stopped_early"]
    got = load_classifier(tmp_path / "b", which="last").model.state_dict()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    assert rest["top1"] == full["top1"] and rest["last"] == full["last"]
    # a finished run resumed again trains nothing and reports the same
    again = finetune(_adapter(), tr, va, output_dir=tmp_path / "b", resume="auto", **recipe)
    assert again["steps"] == full["steps"] and again["top1"] == full["top1"]


def test_a_second_finetune_in_the_same_folder_is_refused_and_loses_nothing(colour_data, tmp_path):
    """Issue 13 item 8 for fine-tuning: a run in progress holds the output folder; a second one
    is refused before it touches anything (it used to start over, deleting log.jsonl and weights)."""
    from fdistill.engine.lock import RunLock

    a = _adapter()
    tr, va = _datasets(colour_data, a)
    finetune(a, tr, va, output_dir=tmp_path, resume=None, on_step=lambda s: s == 2, **RECIPE)
    files = lambda: {p.name: p.stat().st_mtime_ns for p in tmp_path.rglob("*")  # noqa: E731
                     if p.is_file() and p.name != ".fdistill.lock"}
    before = files()
    with RunLock(tmp_path):
        with pytest.raises(RunError, match=r"another fdistill run \(pid \d+\) is using"):
            finetune(_adapter(), tr, va, output_dir=tmp_path, resume=None, **RECIPE)
    assert files() == before
    assert finetune(_adapter(), tr, va, output_dir=tmp_path, resume="auto", **dict(RECIPE, epochs=1))["steps"] == 8


def test_resume_refuses_another_recipe(colour_data, tmp_path):
    a = _adapter()
    tr, va = _datasets(colour_data, a)
    finetune(a, tr, va, output_dir=tmp_path, resume=None, on_step=lambda s: s == 2, **RECIPE)
    with pytest.raises(RunError, match="another recipe"):
        finetune(_adapter(), tr, va, output_dir=tmp_path, resume="auto", **dict(RECIPE, lr=1e-3))
    # epochs may change on resume (the schedule follows)
    m = finetune(_adapter(), tr, va, output_dir=tmp_path, resume="auto", **dict(RECIPE, epochs=1))
    assert m["steps"] == 8
    with pytest.raises(RunError, match="not found"):
        finetune(_adapter(), tr, va, output_dir=tmp_path, resume=str(tmp_path / "nope.pt"), **RECIPE)


def test_mixup_and_ema(colour_data, tmp_path):
    a = _adapter()
    tr, va = _datasets(colour_data, a)
    recipe = dict(RECIPE, epochs=1, mixup=dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5,
                                               mode="batch"), ema_decay=0.9)
    m = finetune(a, tr, va, output_dir=tmp_path, resume=None, **recipe)
    assert m["ema_last"] is not None and 0.0 <= m["ema_last"]["top1"] <= 100.0
    assert m["best_weights"] in ("model", "ema")
    with pytest.raises(DataError, match="even batch"):
        finetune(_adapter(), tr, va, output_dir=tmp_path / "odd", resume=None, **dict(recipe, batch_size=31))


class _NaNImages(torch.utils.data.Dataset):
    classes = ["a", "b"]

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return torch.full((3, 32, 32), float("nan")), i % 2


def test_non_finite_loss_stops_with_a_clear_error(tmp_path):
    """The engine's policy (the same as distillation's): non-finite steps are skipped, and
    ``max_nonfinite`` in a row stop the run with an error; the weights are never updated."""
    with pytest.raises(RunError, match=r"3 optimizer steps in a row had a non-finite loss .*stopped at step 3"):
        finetune(_adapter(), _NaNImages(), _NaNImages(), output_dir=tmp_path, resume=None,
                 **dict(RECIPE, batch_size=4, log_interval=1, max_nonfinite=3))
    recs = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite_streak"] for r in recs] == [1, 2]  # step 3 raised before its record
    # the epoch-end checkpoint of step 2 holds the initial weights: no NaN reached them
    ck = load_checkpoint(list_checkpoints(tmp_path)[-1], task="finetune")
    assert ck["progress"]["step"] == 2
    assert all(torch.isfinite(v).all() for v in ck["model"]["model"].values() if v.is_floating_point())


def test_bad_datasets(colour_data, tmp_path):
    a = _adapter()
    tr, _ = _datasets(colour_data, a)
    with pytest.raises(DataError, match="classes differ"):
        finetune(a, tr, _NaNImages(), output_dir=tmp_path, resume=None, **RECIPE)
    with pytest.raises(DataError, match="fewer than one global batch"):
        finetune(a, tr, tr, output_dir=tmp_path, resume=None, **dict(RECIPE, batch_size=512))


def test_step_interval_checkpoints_bound_what_a_crash_loses(colour_data, tmp_path):
    """Issue 13 (low): fine-tuning checkpointed only at epoch ends. With ckpt_interval=3 a crash
    at step 5 (mid-epoch 1 of 8 steps) resumes from step 3, and the result equals the
    uninterrupted run."""
    recipe = dict(RECIPE, epochs=2)
    a = _adapter()
    tr, va = _datasets(colour_data, a)
    full = finetune(a, tr, va, output_dir=tmp_path / "a", resume=None, **recipe)

    def crash(step):
        if step == 5:
            raise KeyboardInterrupt("simulated crash")  # not a graceful stop: no checkpoint written now
        return False

    with pytest.raises(KeyboardInterrupt):
        finetune(_adapter(), tr, va, output_dir=tmp_path / "b", resume=None, ckpt_interval=3, on_step=crash, **recipe)
    ck = load_checkpoint(list_checkpoints(tmp_path / "b")[-1], task="finetune")
    assert ck["progress"]["step"] == 3 and (ck["progress"]["epoch"], ck["progress"]["step_in_epoch"]) == (0, 3)
    rest = finetune(_adapter(), tr, va, output_dir=tmp_path / "b", resume="auto", ckpt_interval=3, **recipe)
    assert rest["steps"] == full["steps"] and rest["last"] == full["last"]
    ref = load_classifier(tmp_path / "a", which="last").model.state_dict()
    got = load_classifier(tmp_path / "b", which="last").model.state_dict()
    assert all(torch.equal(ref[k], got[k]) for k in ref)


class _SignalAt(torch.utils.data.Dataset):
    """A dataset that SIGTERMs its own process while producing sample ``at`` (after that sample's
    random augmentation has drawn from the global generators): a pre-emption in mid-batch."""

    def __init__(self, ds, at):
        self.ds, self.at, self.calls, self.classes = ds, at, 0, ds.classes

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        item = self.ds[i]
        self.calls += 1
        if self.calls == self.at:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGTERM)
        return item


def test_a_signal_in_the_middle_of_a_batch_still_resumes_exactly(colour_data, tmp_path):
    """In-process loading draws the augmentations from the global generators; a stop inside a
    batch's loading used to checkpoint them half-advanced, so the resumed run augmented that
    batch differently (found by benchmarks/fault_review.py: SIGTERM, resume)."""
    recipe = dict(RECIPE, epochs=2)
    a = _adapter()
    tr, va = _datasets(colour_data, a)
    finetune(a, tr, va, output_dir=tmp_path / "a", resume=None, **recipe)
    part = finetune(_adapter(), _SignalAt(tr, at=32 * 5 + 7), va, output_dir=tmp_path / "b", resume=None, **recipe)
    assert part["stopped_early"] and part["steps"] == 5  # stopped while loading step 6's batch
    finetune(_adapter(), tr, va, output_dir=tmp_path / "b", resume="auto", **recipe)
    ref = load_classifier(tmp_path / "a", which="last").model.state_dict()
    got = load_classifier(tmp_path / "b", which="last").model.state_dict()
    assert all(torch.equal(ref[k], got[k]) for k in ref)
