"""``fdistill depth`` (DPT depth fine-tuning, the paper's NYUv2 benchmark): the command end to end on
the synthetic scenes and on a NYUv2-layout folder written here, exact resume, ``--compare``, a
crop the backbone cannot take refused before any data is read, and fine-tuning that learns (far
below the error of predicting the training mean)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from fdistill.config import build_config
from fdistill.config.dense import DepthConfig
from fdistill.dense.pyramid import DenseError
from fdistill.diagnostics.plots import figure_png_ok

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ("timm:vit_tiny_patch16_224", {"pretrained": False, "img_size": 32, "patch_size": 4, "depth": 4,
                                      "embed_dim": 48, "num_heads": 2})


def _cfg(*overrides):
    return build_config(DepthConfig, "configs/depth/tiny_cpu.yaml",
                        ["epochs=2", "data.batch_size=8", "figure_images=2", *overrides])


def _data(cfg, spec="synthetic:48"):
    from fdistill.data.depth import build_depth_dataset

    d = cfg.data
    return (build_depth_dataset(spec, "train", d.crop_size, train=True, max_depth=d.max_depth),
            build_depth_dataset(spec, "val", d.crop_size, train=False, max_depth=d.max_depth))


def _adapter():
    from fdistill.models.loading import load_model

    torch.manual_seed(0)
    return load_model(TINY[0], **TINY[1])


def test_a_crop_the_backbone_cannot_take_is_refused_before_any_data(tmp_path):
    from fdistill.dense.depth import finetune_depth

    class Exploding:
        def __len__(self):
            raise AssertionError("data was read")

    with pytest.raises(DenseError, match="patches"):
        finetune_depth(_adapter(), Exploding(), Exploding(), _cfg("data.crop_size=30"), output_dir=tmp_path)


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path):
    from safetensors.torch import load_file

    from fdistill.dense.depth import finetune_depth

    cfg = _cfg("ckpt_interval=2")
    tr, va = _data(cfg)
    full = finetune_depth(_adapter(), tr, va, cfg, output_dir=tmp_path / "full", progress=False)
    assert full["steps"] == 12 and np.isfinite(full["rmse"])
    part = finetune_depth(_adapter(), tr, va, cfg, output_dir=tmp_path / "part", progress=False,
                          on_step=lambda s: s == 7)
    assert part["stopped_early"] and part["steps"] == 7
    finetune_depth(_adapter(), tr, va, cfg, output_dir=tmp_path / "part", progress=False)
    a, b = load_file(tmp_path / "full" / "model_last.safetensors"), load_file(tmp_path / "part" / "model_last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _nyu_folder(root, n_train=16, n_test=4, size=(24, 32)):
    """The BTS / GLPDepth layout: split files of `rgb depth focal` lines, 16-bit depth PNGs in mm.
    Depth is a function of the image (1 m + 8 m x red), so it can be learnt."""
    rng = np.random.default_rng(0)
    h, w = size
    for split, n in (("train", n_train), ("test", n_test)):
        lines = []
        for i in range(n):
            (root / split).mkdir(parents=True, exist_ok=True)
            red = rng.uniform(0, 1, (h // 8, w // 8)).repeat(8, 0).repeat(8, 1)
            img = np.stack([red * 255, np.full_like(red, 90), 255 - red * 255], -1).astype(np.uint8)
            mm = ((1.0 + 8.0 * red) * 1000).astype(np.uint16)
            mm[0, 0] = 0  # an invalid pixel
            Image.fromarray(img).save(root / split / f"rgb_{i:04d}.jpg", quality=95)
            Image.fromarray(mm).save(root / split / f"sync_depth_{i:04d}.png")
            lines.append(f"/{split}/rgb_{i:04d}.jpg /{split}/sync_depth_{i:04d}.png 518.8579")
        (root / f"nyu_{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def test_the_command_on_a_nyuv2_layout_folder_and_compare(tmp_path, capsys):
    from fdistill.eval.commands import compare

    root = _nyu_folder(tmp_path / "nyu")
    cfg = _cfg("data.crop_size=24")
    spec, kw = TINY
    res = compare("depth", cfg, models=[spec, spec], model_kwargs=[kw, dict(kw, depth=5)], train=str(root),
                  output=str(tmp_path / "runs"))
    assert "rmse" in capsys.readouterr().out
    saved = json.loads((tmp_path / "runs" / "compare.json").read_text())
    one = saved["results"][0]
    assert one["command"] == "depth" and one["val_images"] == 4 and one["train_images"] == 16
    assert 0 < one["rmse"] < 10 and 0 <= one["d1"] <= 1
    out = tmp_path / "runs" / "0_timm_vit_tiny_patch16_224"
    for f in ("model_best.safetensors", "model_last.safetensors", "log.jsonl", "metrics.json"):
        assert (out / f).is_file(), f
    assert figure_png_ok(out / "predictions.png") and figure_png_ok(out / "curves.png")
    assert res["table"] == saved["table"]


def test_bad_depth_data_gets_one_clear_error(tmp_path):
    from fdistill.data import DataError
    from fdistill.data.depth import build_depth_dataset

    root = _nyu_folder(tmp_path / "nyu", n_train=2, n_test=1)
    with pytest.raises(DataError, match="no split file"):
        build_depth_dataset(str(tmp_path), "train", 24, train=True)
    (root / "nyu_test.txt").write_text("")
    with pytest.raises(DataError, match="lists no images"):
        build_depth_dataset(str(root), "val", 24, train=False)
    (root / "nyu_test.txt").write_text("/test/rgb_0000.jpg /test/nope.png 518\n")
    with pytest.raises(DataError, match="missing"):
        build_depth_dataset(str(root), "val", 24, train=False)
    ds = build_depth_dataset(str(root), "train", 24, train=False)
    x, d = ds[0]
    assert x.dtype == torch.uint8 and d.shape == (1, 24, 32) and d[0, 0, 0] == 0  # mm -> m; 0 = invalid
    assert 1.0 <= float(d[0, 1:, 1:].min()) and float(d.max()) <= 9.0
    Image.fromarray(np.zeros((24, 32), np.uint8)).save(root / "train" / "sync_depth_0000.png")  # 8-bit
    with pytest.raises(DataError, match="16-bit"):
        ds[0]
    Image.fromarray(np.zeros((20, 32), np.uint16)).save(root / "train" / "sync_depth_0001.png")
    with pytest.raises(DataError, match="depth map is 32x20 but its image is 32x24"):
        ds[1]


@pytest.mark.slow
def test_fine_tuning_learns_depth_on_the_synthetic_scenes(tmp_path):
    """After a short fine-tune the RMSE is well below that of the best constant prediction (the
    validation set's mean depth), which a network that learnt nothing would at best reach."""
    from fdistill.dense.depth import finetune_depth

    cfg = _cfg("epochs=6", "data.batch_size=16", "figure_images=0", "optim.lr=2e-3")
    tr, va = _data(cfg, "synthetic:400")
    res = finetune_depth(_adapter(), tr, va, cfg, output_dir=tmp_path, progress=False)
    gts = torch.cat([va[i][1].flatten() for i in range(len(va))])
    gts = gts[(gts > cfg.data.min_depth) & (gts <= cfg.data.max_depth)]
    constant = float(((gts - gts.mean()) ** 2).mean().sqrt())
    assert res["rmse"] < 0.6 * constant, (res["rmse"], constant)


def test_bad_depth_maps_fail_before_the_first_step(tmp_path):
    """An 8-bit or wrongly sized depth map anywhere in the split files is found by the check
    before training (headers only), not when the loader reaches it."""
    from fdistill.data import DataError
    from fdistill.data.depth import build_depth_dataset
    from fdistill.dense.depth import finetune_depth

    root = _nyu_folder(tmp_path / "nyu", n_train=8, n_test=2)
    Image.fromarray(np.zeros((24, 32), np.uint8)).save(root / "train" / "sync_depth_0006.png")  # 8-bit, near the end
    cfg = _cfg("data.crop_size=24", "data.batch_size=4")
    tr = build_depth_dataset(str(root), "train", 24, train=True)
    va = build_depth_dataset(str(root), "val", 24, train=False)
    with pytest.raises(DataError, match="sync_depth_0006.png: a depth map must be a 16-bit"):
        finetune_depth(_adapter(), tr, va, cfg, output_dir=tmp_path / "run", progress=False,
                       on_step=lambda s: pytest.fail("training started"))
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())
    Image.fromarray(np.zeros((20, 32), np.uint16)).save(root / "test" / "sync_depth_0001.png")
    with pytest.raises(DataError, match="depth map is 32x20 but its image is 32x24"):
        va.check()


@pytest.mark.slow
def test_pretrained_weights_beat_random_ones(tmp_path):
    """The project's CLIP (fdistill/assets/clip_mini) fine-tuned inside DPT against the same network
    from random weights, one recipe (docs/evaluate.md's command). Measured 2026-12-02, seed 0: RMSE
    0.31 m pre-trained vs 0.40 m random (abs rel 0.061 vs 0.082, delta1 0.946 vs 0.911)."""
    from fdistill.assets import teacher_spec
    from fdistill.dense.commands import run_depth

    cfg = build_config(DepthConfig, "configs/depth/tiny_cpu.yaml", ["figure_images=0"])
    rmse = {pre: run_depth(cfg, model=teacher_spec("clip_mini"), model_kwargs={"pretrained": pre},
                           train="synthetic:400", output=str(tmp_path / str(pre)), echo=False)["rmse"]
            for pre in (True, False)}
    assert rmse[True] < 0.9 * rmse[False], rmse
