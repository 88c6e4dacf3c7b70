"""``fdistill segment`` (UPerNet fine-tuning, the paper's ADE20K benchmark): sliding-window inference
against a whole-image oracle, the joint crop keeping image and label map aligned, clear errors
before any data is read, exact resume, the command end to end on the synthetic scenes and on an
ADE20K-layout folder, ``--compare``, and pre-trained weights beating random ones."""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from fdistill.config import build_config
from fdistill.config.dense import SegmentConfig
from fdistill.data.segmentation import (IGNORE_INDEX, SegmentationCropTransform, SegmentationRescaleTransform,
                                        build_segmentation_dataset)
from fdistill.dense.pyramid import DenseError
from fdistill.dense.segment import finetune_segmentation
from fdistill.dense.sliding import sliding_window
from fdistill.diagnostics.plots import figure_png_ok

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_VIT = ("timm:vit_tiny_patch16_224", {"pretrained": False, "img_size": 64, "depth": 4})
PALETTE = np.array([[220, 30, 30], [30, 200, 40], [40, 60, 220]], np.uint8)


class PixelLogits(nn.Module):
    """Logits per pixel from that pixel alone (a 1x1 convolution): sliding windows must then give
    exactly the whole image's logits, wherever the windows fall."""

    def __init__(self, k=4):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, k, 1)

    def forward(self, x):
        return {"logits": self.conv(x)}


@pytest.mark.parametrize("size,crop,stride", [((37, 53), 16, 11), ((16, 16), 16, 16), ((10, 40), 16, 7),
                                              ((8, 8), 16, 10)])
def test_sliding_window_equals_the_whole_image_for_a_per_pixel_model(size, crop, stride):
    m = PixelLogits()
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        got = sliding_window(m, x, 4, crop, stride)
        want = m(x)["logits"]
    assert got.shape == (1, 4, *size)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_sliding_window_averages_overlaps():
    """A model whose logit is each window's own index: a pixel covered by two windows gets their mean."""

    class WindowIndex(nn.Module):
        def forward(self, x):
            n = x.shape[0]
            return {"logits": torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, *x.shape[-2:])}

    out = sliding_window(WindowIndex(), torch.zeros(1, 3, 8, 12), 1, 8, 2)
    # windows at x = 0, 2, 4 (the last aligned to the far edge: 12 - 8 = 4): columns 0-1 see window 0 only,
    # 2-3 windows 0 and 1, 4-7 all three, 8-9 windows 1 and 2, 10-11 window 2
    want = torch.tensor([0, 0, 0.5, 0.5, 1, 1, 1, 1, 1.5, 1.5, 2, 2])
    torch.testing.assert_close(out[0, 0, 3], want)


def test_training_crops_keep_image_and_labels_aligned():
    """Label k is painted in colour k; after rescale + crop + flip (photometric distortion off:
    it changes colours by design) the colour under every labelled interior pixel is still its label's."""
    rng = np.random.default_rng(0)
    lab = np.kron(rng.integers(0, 3, (6, 8)), np.ones((16, 16), np.int64))  # (96, 128), 16 px cells
    img = Image.fromarray(PALETTE[lab])
    tf = SegmentationCropTransform(64, img_scale=(96, 512), ratio_range=(0.6, 1.8), photometric=False)
    torch.manual_seed(0)
    for _ in range(8):
        x, y = tf(img, lab)
        assert x.shape == (3, 64, 64) and x.dtype == torch.uint8 and y.shape == (64, 64) and y.dtype == torch.int64
        ok = y != IGNORE_INDEX
        colour = torch.as_tensor(PALETTE)[y.clamp(max=2)]  # (64, 64, 3) the label's colour
        close = (x.permute(1, 2, 0).int() - colour.int()).abs().max(-1).values < 40
        # only the bilinear edges between cells differ (a mask flipped or cropped apart from its
        # image would agree on about a third of the pixels)
        assert close[ok].float().mean() > 0.9
        assert set(y.unique().tolist()) <= {0, 1, 2, IGNORE_INDEX}
    # evaluation: the image rescaled to fit the box, the label map left at its original size
    x, y = SegmentationRescaleTransform((48, 512))(img, lab)
    assert tuple(x.shape) == (3, 48, 64) and tuple(y.shape) == (96, 128) and torch.equal(y, torch.as_tensor(lab))


def _cfg(*overrides):
    return build_config(SegmentConfig, "configs/segment/tiny_cpu.yaml",
                        ["epochs=2", "data.batch_size=8", "figure_images=2", *overrides])


def _data(cfg, spec="synthetic:48", **kw):
    d = cfg.data
    tr = build_segmentation_dataset(spec, "train", d.crop_size, train=True, transform=SegmentationCropTransform(
        d.crop_size, img_scale=d.img_scale, ratio_range=d.ratio_range), **kw)
    va = build_segmentation_dataset(spec, "val", d.crop_size, train=False,
                                    transform=SegmentationRescaleTransform(d.img_scale), **kw)
    return tr, va


def _adapter():
    from fdistill.models.loading import load_model

    torch.manual_seed(0)
    return load_model(TINY_VIT[0], **TINY_VIT[1])


def test_a_crop_the_backbone_cannot_take_is_refused_before_any_data(tmp_path):
    cfg = _cfg("data.crop_size=60", "data.slide_stride=30")

    class Exploding:
        classes, ignore_index = ["a", "b"], 255

        def __len__(self):
            raise AssertionError("data was read")

    with pytest.raises(DenseError, match="not a whole number of 16x16 patches"):
        finetune_segmentation(_adapter(), Exploding(), Exploding(), cfg, output_dir=tmp_path)


def test_a_backbone_without_intermediate_maps_is_refused(tmp_path):
    from fdistill.teachers.base import Teacher, TeacherTokens

    class Flat(Teacher):
        def __init__(self):
            super().__init__(nn.Conv2d(3, 8, 16, 16), name="flat", embed_dim=8, patch_size=16, num_prefix_tokens=0,
                             mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                             img_size=64, dynamic_img_size=True)

        def _forward_tokens(self, x):
            m = self.model(x)
            return TeacherTokens(None, m.flatten(2).transpose(1, 2), tuple(m.shape[-2:]))

    cfg = _cfg()
    tr, va = _data(cfg)
    with pytest.raises(DenseError, match="forward_intermediates"):
        finetune_segmentation(Flat(), tr, va, cfg, output_dir=tmp_path)


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path):
    from safetensors.torch import load_file

    cfg = _cfg("epochs=2", "ckpt_interval=3")
    tr, va = _data(cfg)
    full = finetune_segmentation(_adapter(), tr, va, cfg, output_dir=tmp_path / "full", progress=False)
    assert full["steps"] == 12 and not full["stopped_early"]  # 48 images / 8 x 2 epochs
    part = finetune_segmentation(_adapter(), tr, va, cfg, output_dir=tmp_path / "part", progress=False,
                                 on_step=lambda s: s == 5)  # stops mid-epoch 1
    assert part["stopped_early"] and part["steps"] == 5
    again = finetune_segmentation(_adapter(), tr, va, cfg, output_dir=tmp_path / "part", progress=False)
    assert again["steps"] == 12
    a, b = load_file(tmp_path / "full" / "model_last.safetensors"), load_file(tmp_path / "part" / "model_last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert again["miou"] == full["miou"]
    # a resume with another recipe is refused, naming the difference
    from fdistill.engine.errors import RunError

    with pytest.raises(RunError, match="optim.lr"):
        finetune_segmentation(_adapter(), tr, va, _cfg("epochs=2", "ckpt_interval=3", "optim.lr=0.01"),
                              output_dir=tmp_path / "part", progress=False)


def _ade_folder(root, n_train=24, n_val=6):
    """ADEChallengeData2016's layout: images/{training,validation}/*.jpg, annotations/.../*.png with
    label 0 = "other" (ignored with reduce_zero_label) and 1..3 = the colour's class."""
    rng = np.random.default_rng(0)
    for split, n in (("training", n_train), ("validation", n_val)):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            h, w = (40, 56) if i % 2 else (48, 40)  # sizes differ, as ADE20K's
            cls = rng.integers(0, 3, (h // 8, w // 8))
            lab = np.kron(cls, np.ones((8, 8), np.int64)).astype(np.uint8)
            Image.fromarray(PALETTE[lab]).save(root / "images" / split / f"ADE_{i:04d}.jpg", quality=95)
            ann = lab + 1
            ann[:8, :8] = 0
            Image.fromarray(ann, mode="L").save(root / "annotations" / split / f"ADE_{i:04d}.png")
    (root / "classes.txt").write_text("red\ngreen\nblue\n")
    return root


def test_the_command_on_an_ade20k_layout_folder(tmp_path):
    from fdistill.dense.commands import run_segment

    root = _ade_folder(tmp_path / "ade")
    cfg = _cfg("reduce_zero_label=true", "data.img_scale=[64,256]")
    out = tmp_path / "run"
    res = run_segment(cfg, model=TINY_VIT[0], model_kwargs=TINY_VIT[1], train=str(root), output=str(out), echo=False)
    assert res["num_classes"] == 3 and res["val_images"] == 6 and res["steps"] == 6
    assert 0 <= res["miou"] <= 100 and set(res["per_class_iou"]) == {"red", "green", "blue"}
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["command"] == "segment" and saved["miou"] == res["miou"]
    for f in ("model_best.safetensors", "model_last.safetensors", "log.jsonl", "metrics.jsonl"):
        assert (out / f).is_file(), f
    assert figure_png_ok(out / "predictions.png") and figure_png_ok(out / "curves.png")
    assert len((out / "log.jsonl").read_text().splitlines()) == 2  # one line per evaluation (every epoch)


def test_compare_writes_the_side_by_side_table(tmp_path, capsys):
    from fdistill.eval.commands import compare

    cfg = _cfg("epochs=1")
    spec, kw = TINY_VIT
    res = compare("segment", cfg, models=[spec, spec], model_kwargs=[kw, dict(kw, depth=5)], train="synthetic:48",
                  output=str(tmp_path))
    table = capsys.readouterr().out
    assert "miou" in table and table.count("timm:vit_tiny_patch16_224") == 2
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert [r["model_kwargs"]["depth"] for r in saved["results"]] == [4, 5]
    assert all((tmp_path / f"{i}_timm_vit_tiny_patch16_224" / "metrics.json").is_file() for i in (0, 1))
    assert res["table"] == saved["table"]


@pytest.mark.slow
def test_pretrained_weights_beat_random_ones_by_a_wide_margin(tmp_path):
    """The project's own CLIP (fdistill/assets/clip_mini, trained on the synthetic shapes) fine-tuned
    inside UPerNet against the same network from random weights, one recipe for both."""
    from fdistill.assets import teacher_spec
    from fdistill.dense.commands import run_segment

    cfg = build_config(SegmentConfig, "configs/segment/tiny_cpu.yaml",
                       ["data.crop_size=32", "data.img_scale=[32,128]", "data.slide_stride=32",
                        "data.ratio_range=[0.75,1.5]", "optim.lr=2e-3", "epochs=6", "figure_images=0"])
    spec = teacher_spec("clip_mini")
    scores = {pre: run_segment(cfg, model=spec, model_kwargs={"pretrained": pre}, train="synthetic:400",
                               output=str(tmp_path / str(pre)), echo=False)["miou"] for pre in (True, False)}
    assert scores[True] > scores[False] + 5.0, scores


def test_labels_outside_the_classes_fail_before_the_first_step(tmp_path):
    """A label map with a class id beyond classes.txt (here in the validation split) is found by
    the check before training, naming the file and the values."""
    from fdistill.data import DataError

    root = _ade_folder(tmp_path / "ade", n_train=8, n_val=3)
    bad = np.full((48, 40), 2, np.uint8)
    bad[3, 3] = 9  # classes 1..3 (+ 0 "other")
    Image.fromarray(bad, mode="L").save(root / "annotations" / "validation" / "ADE_0002.png")
    cfg = _cfg("reduce_zero_label=true", "data.img_scale=[64,256]")
    kw = dict(reduce_zero_label=True)
    tr = build_segmentation_dataset(str(root), "train", 64, train=True,
                                    transform=SegmentationCropTransform(64, img_scale=(64, 256)), **kw)
    va = build_segmentation_dataset(str(root), "val", 64, train=False,
                                    transform=SegmentationRescaleTransform((64, 256)), **kw)
    with pytest.raises(DataError, match=r"ADE_0002.png: labels \[8\] outside 0..2"):
        finetune_segmentation(_adapter(), tr, va, cfg, output_dir=tmp_path / "run", progress=False,
                              on_step=lambda s: pytest.fail("training started"))


def test_one_image_per_process_is_refused_before_any_data(tmp_path):
    """UPerNet's pyramid pooling has batch norm over 1x1 maps: batch 1 cannot train (torch's error
    would come from deep inside the first forward)."""
    from fdistill.data import DataError

    class Exploding:
        classes, ignore_index = ["a", "b"], 255

        def __len__(self):
            raise AssertionError("data was read")

    with pytest.raises(DataError, match="at least 2 images per process"):
        finetune_segmentation(_adapter(), Exploding(), Exploding(), _cfg("data.batch_size=1"), output_dir=tmp_path)
