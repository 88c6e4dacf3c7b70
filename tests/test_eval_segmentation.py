"""The linear segmentation probe (``fdistill segprobe``): metrics worked by hand, data and masks
kept aligned, a probe that must reach ~100% mIoU on linearly separable tokens, folder errors, and
the command end to end."""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from fdistill.data import DataError
from fdistill.data.segmentation import (IGNORE_INDEX, SegmentationFolder, build_segmentation_dataset,
                                        segmentation_transform)
from fdistill.engine.checkpoint import list_checkpoints, load_checkpoint
from fdistill.errors import RunError
from fdistill.eval.segmentation import (SegLinearHead, confusion_matrix, seg_linear_probe, segmentation_scores,
                                        token_map)
from fdistill.diagnostics.plots import figure_png_ok
from fdistill.teachers.base import Teacher, TeacherTokens

pytestmark = pytest.mark.usefixtures("one_thread")

PALETTE = np.array([[220, 30, 30], [30, 200, 40], [40, 60, 220]], np.uint8)  # class k = colour k


def test_scores_worked_by_hand():
    # ground truth / prediction over 8 pixels, 3 classes, one ignored pixel (255)
    gt = torch.tensor([0, 0, 0, 1, 1, 2, 2, IGNORE_INDEX])
    pr = torch.tensor([0, 0, 1, 1, 2, 2, 2, 0])
    conf = confusion_matrix(pr, gt, 3)
    assert conf.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 2]]
    s = segmentation_scores(conf, ["a", "b", "c"])
    # IoU: a 2/(3+2-2)=2/3, b 1/(2+2-1)=1/3, c 2/(2+3-2)=2/3 -> mIoU 5/9; aAcc 5/7; mAcc (2/3+1/2+1)/3
    assert s["miou"] == pytest.approx(100 * 5 / 9)
    assert s["aacc"] == pytest.approx(100 * 5 / 7)
    assert s["macc"] == pytest.approx(100 * (2 / 3 + 1 / 2 + 1) / 3)
    assert s["per_class_iou"] == {"a": pytest.approx(66.6667, abs=1e-3), "b": pytest.approx(33.3333, abs=1e-3),
                                  "c": pytest.approx(66.6667, abs=1e-3)}
    # a class absent from both ground truth and prediction has no IoU and is left out of the mean
    s4 = segmentation_scores(confusion_matrix(pr, gt, 4))
    assert s4["per_class_iou"]["3"] is None and s4["miou"] == pytest.approx(s["miou"])
    # predicted but never in the ground truth: IoU 0, counted
    s5 = segmentation_scores(confusion_matrix(torch.tensor([3, 0]), torch.tensor([0, 0]), 4))
    assert s5["per_class_iou"]["3"] == 0.0 and s5["miou"] == pytest.approx(25.0)


class PatchColour(Teacher):
    """Tokens = the mean colour of each 8x8 patch (3 channels): classes by colour are linearly separable."""

    def __init__(self):
        super().__init__(nn.Identity(), name="patch-colour", embed_dim=3, patch_size=8, num_prefix_tokens=0,
                         mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), img_size=32, dynamic_img_size=True)

    def _forward_tokens(self, x):
        m = F.avg_pool2d(x, 8)  # (B, 3, gh, gw)
        return TeacherTokens(None, m.flatten(2).transpose(1, 2), tuple(m.shape[-2:]))


def test_token_map_is_row_major():
    x = torch.zeros(1, 3, 16, 32)
    x[0, 0, :8, 8:16] = 1.0  # top row, second column
    f = token_map(PatchColour(), x)
    assert f.shape == (1, 3, 2, 4) and f[0, 0, 0, 1] == 1.0 and f[0, 0].sum() == 1.0


def _cells_folder(root, split, n, seed, size=32, cell=8, zero_label=False):
    """Images of cell x cell blocks, each block one of three colours; label map = colour index
    (+1 with ``zero_label``, where 0 marks 'other' pixels: the first block of each image)."""
    rng = np.random.default_rng(seed)
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
    g = size // cell
    for i in range(n):
        cls = rng.integers(0, 3, (g, g))
        lab = np.kron(cls, np.ones((cell, cell), np.int64)).astype(np.uint8)
        img = PALETTE[lab]
        if zero_label:
            lab = lab + 1
            lab[:cell, :cell] = 0
        Image.fromarray(img).save(root / "images" / split / f"{i:03d}.png")
        Image.fromarray(lab, mode="L").save(root / "annotations" / split / f"{i:03d}.png")
    return root


def test_training_crops_keep_image_and_mask_aligned():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    lab = np.kron(rng.integers(0, 3, (8, 8)), np.ones((8, 8), np.int64))  # 64x64, 8 px blocks
    img = Image.fromarray(PALETTE[lab])
    tf = segmentation_transform(48, train=True, scale=(0.3, 1.0))
    for _ in range(10):  # random crops, scales and flips
        x, m = tf(img, lab)
        assert x.shape == (3, 48, 48) and x.dtype == torch.uint8 and m.shape == (48, 48) and m.dtype == torch.int64
        colour = ((x.permute(1, 2, 0).float()[:, :, None] - torch.tensor(PALETTE).float()) ** 2).sum(-1).argmin(-1)
        # away from block edges (the mask's 5x5 neighbourhood is one class) the colour must give the label
        mf = m[None, None].float()
        interior = (F.max_pool2d(mf, 5, 1, 2) == -F.max_pool2d(-mf, 5, 1, 2))[0, 0]
        assert interior.float().mean() > 0.3 and torch.equal(colour[interior], m[interior])


def test_probe_is_near_perfect_on_separable_tokens(tmp_path):
    # 16 px colour cells, 8 px tokens: only pixels near a cell edge can be wrong (bilinearly
    # upsampled logits switch class where the two tokens' margins balance, not exactly at the edge)
    root = _cells_folder(tmp_path / "cells", "training", 48, 0, cell=16)
    _cells_folder(root, "validation", 12, 1, cell=16)
    (root / "classes.txt").write_text("red\ngreen\nblue\n")
    tr = build_segmentation_dataset(str(root), "train", 32, train=True, scale=(0.6, 1.0))
    va = build_segmentation_dataset(str(root), "val", 32, train=False)
    assert tr.classes == ["red", "green", "blue"] and len(tr) == 48 and len(va) == 12
    res = seg_linear_probe(PatchColour(), tr, va, epochs=20, lr=0.05, warmup_epochs=1, batch_size=16,
                           num_workers=0, progress=False)
    assert res["miou"] > 95.0 and res["aacc"] > 97.0, res
    assert res["steps"] == 20 * 3 and res["curve"][-1]["train_loss"] < res["curve"][0]["train_loss"]


def test_reduce_zero_label_and_folder_errors(tmp_path):
    root = _cells_folder(tmp_path / "ade", "training", 2, 0, zero_label=True)
    ds = SegmentationFolder(root, "train", num_classes=3, reduce_zero_label=True)
    _, m = ds.load(0)
    raw = np.array(Image.open(root / "annotations" / "training" / "000.png"))
    assert (m[:8, :8] == IGNORE_INDEX).all() and (m[8:] == raw[8:].astype(np.int64) - 1).all()
    with pytest.raises(DataError, match="outside 0..2.*reduce_zero_label"):
        SegmentationFolder(root, "train", num_classes=3).load(0)  # label 3 without the reduction
    with pytest.raises(DataError, match="give num_classes"):
        SegmentationFolder(root, "train")
    with pytest.raises(DataError, match="no images/val or images/validation"):
        SegmentationFolder(root, "val", num_classes=3)
    (root / "annotations" / "training" / "001.png").unlink()
    with pytest.raises(DataError, match="no label map for 1 image"):
        SegmentationFolder(root, "train", num_classes=3)
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(root / "annotations" / "training" / "001.png")
    with pytest.raises(DataError, match="label map is 16x16 but its image is 32x32"):
        SegmentationFolder(root, "train", num_classes=3).load(1)
    with pytest.raises(DataError, match="not a folder"):
        build_segmentation_dataset(str(tmp_path / "nope"), "train", 32, train=True)


def test_synthetic_masks_are_the_shape_classes():
    import pickle

    ds = build_segmentation_dataset("synthetic:20", "train", 32, train=False)
    assert ds.classes[0] == "background" and len(ds.classes) == 11
    copy = pickle.loads(pickle.dumps(ds))  # loader workers under any start method
    assert all(torch.equal(a, b) for a, b in zip(copy[3], ds[3]))
    for i in range(5):
        s = ds.shapes.sample(i)
        _, m = ds.load(i)
        assert (m[s["mask"] == 1] == 1 + s["label"]).all() and (m[s["mask"] == 0] == 0).all()
        for k, c in enumerate(s["box_labels"][1:], start=2):
            assert (m[s["mask"] == k] == 1 + c).all()


def test_segprobe_command_compares_two_models(tmp_path, capsys):
    from fdistill.cli.main import main

    vit = '{"pretrained": false, "img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 24, "num_heads": 2}'
    rc = main(["segprobe", "--compare", "timm:vit_tiny_patch16_224", "timm:vit_tiny_patch16_224",
               "--model-kwargs", vit, "--model-kwargs", vit, "--train", "synthetic:40", "--output", str(tmp_path),
               "--device", "cpu", "data.img_size=32", "data.batch_size=8", "data.num_workers=0", "epochs=2",
               "max_steps=3"])
    assert rc == 0
    combined = json.loads((tmp_path / "compare.json").read_text())
    assert len(combined["results"]) == 2 and "miou" in capsys.readouterr().out
    for r in combined["results"]:
        on_disk = json.loads((tmp_path / r["metrics_file"].split("/")[-2] / "metrics.json").read_text())
        assert on_disk["command"] == "segprobe" and on_disk["steps"] == 3 and on_disk["num_classes"] == 11
        assert 0.0 <= on_disk["miou"] <= 100.0 and 0.0 <= on_disk["aacc"] <= 100.0
        assert figure_png_ok(on_disk["figure"]) and on_disk["figure"].endswith("predictions.png")
    # seeded: the same random model and the same head twice
    assert combined["results"][0]["miou"] == pytest.approx(combined["results"][1]["miou"])


def test_recipe_is_checked_before_any_work():
    from fdistill.config import ConfigError, build_config
    from fdistill.config.finetune import SegprobeConfig

    with pytest.raises(ConfigError, match="scale must be"):
        build_config(SegprobeConfig, None, ["scale=[0.9, 0.5]"])
    with pytest.raises(ConfigError, match="num_classes must be >= 2"):
        build_config(SegprobeConfig, None, ["num_classes=1"])
    with pytest.raises(ConfigError, match="did you mean 'reduce_zero_label'"):
        build_config(SegprobeConfig, None, ["reduce_zero_labels=true"])


def test_all_ignored_batches_train_nothing_and_nan_inputs_stop_the_probe(tmp_path):
    root = _cells_folder(tmp_path / "cells", "training", 8, 0, zero_label=True)
    for f in (root / "annotations" / "training").iterdir():  # every pixel "other": ignored
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(f)
    _cells_folder(root, "validation", 4, 1, zero_label=True)
    kw = dict(num_classes=3, reduce_zero_label=True)
    tr = build_segmentation_dataset(str(root), "train", 32, train=True, **kw)
    va = build_segmentation_dataset(str(root), "val", 32, train=False, **kw)
    res = seg_linear_probe(PatchColour(), tr, va, epochs=2, batch_size=4, num_workers=0, progress=False)
    assert res["train_loss"] == 0.0 and res["steps"] == 4  # no labelled pixel: loss 0, no NaN

    class NaNTokens(PatchColour):
        def _forward_tokens(self, x):
            t = super()._forward_tokens(x)
            return TeacherTokens(None, t.patches * float("nan"), t.grid)

    # the engine's policy (the same as fine-tuning's and distillation's): a non-finite step is
    # skipped, max_nonfinite in a row stop the probe with an error; the head is never updated
    tr = build_segmentation_dataset(str(_cells_folder(tmp_path / "ok", "training", 8, 2)), "train", 32, train=True,
                                    num_classes=3)
    with pytest.raises(RunError, match=r"3 optimizer steps in a row had a non-finite loss .*stopped at step 3"):
        seg_linear_probe(NaNTokens(), tr, tr, epochs=2, batch_size=4, num_workers=0, progress=False,
                         max_nonfinite=3, output_dir=tmp_path / "nan")
    ck = load_checkpoint(list_checkpoints(tmp_path / "nan")[-1], task="segprobe")
    assert ck["progress"]["step"] == 2  # the end of epoch 1
    saved = ck["model"]["model"]
    # no update was applied: one AdamW step on these NaN gradients would make every weight NaN
    params = [k for k, _ in SegLinearHead(3, 3).named_parameters()]
    assert len(params) == 4 and all(bool(torch.isfinite(saved[k]).all()) for k in params)
    # and the skipped steps left BatchNorm's running statistics as they were before (the forward
    # updates them before the step is known to be non-finite; the step puts them back)
    fresh = SegLinearHead(3, 3).state_dict()
    stats = [k for k in fresh if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(stats) == 3 and all(torch.equal(saved[k], fresh[k]) for k in stats)


def test_probe_stops_and_resumes_exactly(tmp_path):
    """On the training engine: a probe stopped mid-epoch (as by SIGTERM) checkpoints the head,
    AdamW state, RNG and sampler position; resumed, it ends with the same head, confusion
    matrix and loss curve as a probe that never stopped; another recipe is refused."""
    root = _cells_folder(tmp_path / "cells", "training", 24, 0, cell=16)
    _cells_folder(root, "validation", 6, 1, cell=16)
    (root / "classes.txt").write_text("red\ngreen\nblue\n")
    tr = build_segmentation_dataset(str(root), "train", 32, train=True, scale=(0.6, 1.0))
    va = build_segmentation_dataset(str(root), "val", 32, train=False)
    kw = dict(epochs=3, lr=0.05, warmup_epochs=1, batch_size=8, num_workers=0, progress=False)
    full = seg_linear_probe(PatchColour(), tr, va, output_dir=tmp_path / "a", **kw)
    part = seg_linear_probe(PatchColour(), tr, va, output_dir=tmp_path / "b", on_step=lambda s: s == 4, **kw)
    assert part["stopped_early"] and part["steps"] == 4 and "miou" not in part  # stopped before the scoring
    rest = seg_linear_probe(PatchColour(), tr, va, output_dir=tmp_path / "b", **kw)
    assert rest["steps"] == full["steps"] == 9 and not rest["stopped_early"]
    assert rest["miou"] == full["miou"] and rest["per_class_iou"] == full["per_class_iou"]
    head = lambda d: load_checkpoint(list_checkpoints(d)[-1], task="segprobe")["model"]["model"]  # noqa: E731
    ref, got = head(tmp_path / "a"), head(tmp_path / "b")
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)  # BatchNorm statistics too
    last = load_checkpoint(list_checkpoints(tmp_path / "b")[-1], task="segprobe")["history"][-1]
    assert last["step"] == 9 and last["miou"] == full["miou"]  # the scores are in the run's history too
    assert [c["step"] for c in full["curve"]] == [3, 6, 9] and [c["step"] for c in rest["curve"]] == [3, 4, 6, 9]
    assert rest["train_loss"] == pytest.approx(full["train_loss"], rel=1e-9)  # the same steps' losses, regrouped
    with pytest.raises(RunError, match="another recipe"):
        seg_linear_probe(PatchColour(), tr, va, output_dir=tmp_path / "b", **dict(kw, lr=0.01))


def test_a_fixed_size_model_and_a_bigger_recipe_fail_before_any_data_is_read(tmp_path):
    from fdistill.config import build_config
    from fdistill.config.finetune import SegprobeConfig
    from fdistill.eval.commands import run_segprobe
    from fdistill.teachers import TeacherError

    cfg = build_config(SegprobeConfig, None, ["data.img_size=64", "device=cpu"])
    kw = dict(pretrained=False, img_size=32, patch_size=8, depth=1, embed_dim=24, num_heads=2, dynamic_img_size=False)
    with pytest.raises(TeacherError, match=r"takes 32x32 inputs only, but the recipe asks for 64; set data.img_size=32"):
        run_segprobe(cfg, model="timm:vit_tiny_patch16_224", model_kwargs=kw, train=str(tmp_path / "absent"),
                     echo=False)


def test_prediction_figure_colours_classes_apart_and_ignored_pixels_black(tmp_path):
    from fdistill.eval.segmentation_figure import class_palette, plot_segmentation_examples

    for k in (3, 11, 150):
        pal = class_palette(k)
        assert pal.shape == (k + 1, 3) and (pal[-1] == 0).all()
        assert len({tuple(np.round(c, 4)) for c in pal[:-1]}) == k  # every class its own colour
    img = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    mask = torch.zeros(2, 8, 8, dtype=torch.long)
    mask[:, :2] = IGNORE_INDEX
    out = plot_segmentation_examples(img, mask, mask.clone(), ["a", "b"], tmp_path / "f.png", title="t")
    assert out == tmp_path / "f.png" and figure_png_ok(out) and not list(tmp_path.glob("*.tmp*"))
