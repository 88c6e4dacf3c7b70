"""Depth data: the NYUv2 split-file layout read from a fixture written here (16-bit millimetre
PNGs -> metres exactly, 0 and beyond max_depth invalid), one clear DataError per kind of broken
input, DepthTransform keeping image and depth aligned (nearest only: no invented depths), the
synthetic scenes' depth and build_depth_dataset's specs."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from fdistill.data.depth import (DepthFolder, DepthTransform, SyntheticDepth, build_depth_dataset,
                                 synthetic_depth_map)
from fdistill.data.errors import DataError
from fdistill.data.synthetic import SyntheticShapes

#: the fixture's depth maps in millimetres; 0 = no measurement, 65535 > 10 m = beyond max_depth
MM = np.array([[0, 1000, 1234, 65535],
               [500, 2500, 9999, 10001],
               [1, 7777, 3000, 4000]], np.uint16)


def _folder(root, files="train.txt"):
    """Two samples: rgb_{i}.png (3 x 4) and depth_{i}.png (16-bit mm: MM + i)."""
    (root / "scene").mkdir(parents=True)
    lines = []
    for i in range(2):
        img = np.full((3, 4, 3), 40 * i, np.uint8)
        Image.fromarray(img).save(root / "scene" / f"rgb_{i}.png")
        Image.fromarray(np.where(MM > 0, MM + i, 0).astype(np.uint16)).save(root / "scene" / f"depth_{i}.png")
    lines = ["/scene/rgb_0.png /scene/depth_0.png 518.8579", "", "scene/rgb_1.png scene/depth_1.png"]
    (root / files).write_text("\n".join(lines) + "\n")
    return root


def test_millimetres_to_metres_exactly(tmp_path):
    root = _folder(tmp_path)
    ds = DepthFolder(root, root / "train.txt")
    assert len(ds) == 2 and ds.focals == [518.8579, None]
    assert Image.open(root / "scene" / "depth_0.png").mode == "I;16"
    img, d = ds[0]
    assert img.dtype == torch.uint8 and img.shape == (3, 3, 4)
    assert d.dtype == torch.float32 and d.shape == (1, 3, 4)
    want = np.float32([[0, 1.0, 1.234, 0],  # 0 stays invalid; 65.535 m > 10 m -> 0 (invalid)
                       [0.5, 2.5, 9.999, 0],  # 10.001 m > 10 m -> 0
                       [0.001, 7.777, 3.0, 4.0]])
    assert np.array_equal(d[0].numpy(), want)
    _, d1 = ds[1]
    assert d1[0, 0, 1] == np.float32(1.001) and d1[0, 0, 0] == 0
    # max_depth None keeps everything; a KITTI-style depth_scale of 256 divides by 256
    far = DepthFolder(root, "train.txt", max_depth=None)  # the split file relative to root
    assert far[0][1][0, 0, 3] == np.float32(65.535)
    assert DepthFolder(root, root / "train.txt", depth_scale=256.0, max_depth=None)[0][1][0, 0, 1] == 1000 / 256


def test_split_file_errors(tmp_path):
    root = _folder(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        DepthFolder(root, root / "nope.txt")
    (root / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match="lists no images"):
        DepthFolder(root, root / "empty.txt")
    for bad in ("scene/rgb_0.png", "a b c d", "scene/rgb_0.png scene/depth_0.png focal"):
        (root / "bad.txt").write_text(f"scene/rgb_1.png scene/depth_1.png\n{bad}\n")
        with pytest.raises(DataError, match=r"bad\.txt:2: malformed line"):
            DepthFolder(root, root / "bad.txt")
    (root / "missing.txt").write_text("scene/rgb_0.png scene/gone_0.png\nscene/gone_1.jpg scene/depth_1.png\n")
    with pytest.raises(DataError, match=r"2 file\(s\).*missing.*gone_0\.png.*gone_1\.jpg"):
        DepthFolder(root, root / "missing.txt")


def test_bad_depth_maps_refused_at_load(tmp_path):
    root = _folder(tmp_path)
    ds = DepthFolder(root, root / "train.txt")
    Image.fromarray(np.full((3, 4), 7, np.uint8)).save(root / "scene" / "depth_0.png")  # 8-bit
    with pytest.raises(DataError, match="16-bit.*mode L"):
        ds[0]
    Image.fromarray(np.zeros((3, 4, 3), np.uint8)).save(root / "scene" / "depth_0.png")  # RGB
    with pytest.raises(DataError, match="16-bit.*mode RGB"):
        ds[0]
    Image.fromarray(np.ones((5, 4), np.uint16)).save(root / "scene" / "depth_1.png")
    with pytest.raises(DataError, match="depth map is 4x5 but its image is 4x3"):
        ds[1]


# ----------------------------------------------------------------------------- transforms

def _coded(h, w, seed=0):
    """An image whose red channel encodes its depth (depth = red / 32 m, red 0 = invalid)."""
    rng = np.random.default_rng(seed)
    red = rng.integers(0, 256, (h, w)).astype(np.uint8)
    red[rng.random((h, w)) < 0.1] = 0
    img = np.stack([red, rng.integers(0, 256, (h, w)).astype(np.uint8), np.full((h, w), 9, np.uint8)])
    return torch.from_numpy(img), torch.from_numpy(red.astype(np.float32) / 32)[None]


def test_train_crop_and_flip_keep_image_and_depth_aligned():
    img, depth = _coded(20, 30)
    tf = pickle.loads(pickle.dumps(DepthTransform(16, train=True)))
    flipped = set()
    for seed in range(16):
        torch.manual_seed(seed)
        x, d = tf(img, depth)
        assert x.shape == (3, 16, 16) and d.shape == (1, 16, 16) and x.dtype == torch.uint8
        assert d.dtype == torch.float32
        assert torch.equal(d[0], x[0].float() / 32)  # red still encodes depth, pixel for pixel
        assert (x[2] == 9).all()
        # the output is a window of the input, mirrored or not
        src = img[0].float() / 32
        hits = {(fl, i, j) for fl in (False, True) for i in range(5) for j in range(15)
                if torch.equal((src.flip(-1) if fl else src)[i:i + 16, j:j + 16], d[0])}
        assert len(hits) == 1
        flipped.add(next(iter(hits))[0])
    assert flipped == {True, False}


def test_small_images_are_resized_up_with_nearest_depth():
    img, depth = _coded(8, 12, seed=1)
    tf = DepthTransform(16, train=True, flip=False)
    for seed in range(4):
        torch.manual_seed(seed)
        x, d = tf(img, depth)
        assert x.shape == (3, 16, 16) and d.shape == (1, 16, 16)  # 8 x 12 -> 16 x 24 (aspect kept) -> crop
        near = depth[0].repeat_interleave(2, 0).repeat_interleave(2, 1)  # exact 2x nearest
        offsets = [j for j in range(9) if torch.equal(near[:, j:j + 16], d[0])]
        assert offsets  # a window of the nearest-upsampled map: no depth between two pixels invented
        assert set(d.unique().tolist()) <= set(depth.unique().tolist())
        assert (x[2] == 9).all()
    # a non-square crop, (h, w), from a smaller image: scaled by max(12/8, 20/12)
    x, d = DepthTransform((12, 20), train=True)(img, depth)
    assert x.shape == (3, 12, 20) and d.shape == (1, 12, 20)


def test_eval_is_untouched_or_rounded_to_a_multiple():
    img, depth = _coded(20, 30, seed=2)
    x, d = DepthTransform(16, train=False)(img, depth)
    assert torch.equal(x, img) and torch.equal(d, depth)
    x, d = DepthTransform(16, train=False, multiple=8)(img, depth)
    assert x.shape == (3, 24, 32) and d.shape == (1, 24, 32)  # 20 -> 24 (2.5 rounds up), 30 -> 32
    assert set(d.unique().tolist()) <= set(depth.unique().tolist())  # nearest: zeros stay zeros
    assert (d == 0).any()


def test_jitter_changes_the_image_only():
    img, depth = _coded(16, 16, seed=3)
    torch.manual_seed(0)
    x, d = DepthTransform(16, train=True, flip=False, jitter=True)(img, depth)
    assert torch.equal(d, depth) and not torch.equal(x, img)
    with pytest.raises(DataError, match="depth map is"):
        DepthTransform(8, train=True)(img, depth[:, :4])


def test_folder_with_transform_and_pil_inputs(tmp_path):
    root = _folder(tmp_path)
    ds = DepthFolder(root, root / "train.txt", DepthTransform(3, train=True, flip=False))
    x, d = ds[0]
    assert x.shape == (3, 3, 3) and d.shape == (1, 3, 3)
    assert set(d.unique().tolist()) <= set(np.float32([0, 1.0, 1.234, 0.5, 2.5, 9.999, 0.001, 7.777, 3.0, 4.0]).tolist())


# ----------------------------------------------------------------------------- synthetic + specs

def test_synthetic_depth():
    shapes = SyntheticShapes(6, 32, seed=4)
    ds = SyntheticDepth(shapes)
    for i in range(6):
        x, d = ds[i]
        s = shapes.sample(i)
        assert x.dtype == torch.uint8 and x.shape == (3, 32, 32) and d.shape == (1, 32, 32)
        assert np.array_equal(x.permute(1, 2, 0).numpy(), np.asarray(s["image"]))
        assert np.array_equal(d[0].numpy(), s["depth"]) and np.array_equal(synthetic_depth_map(s, 32), s["depth"])
    _, near = SyntheticDepth(shapes, max_depth=5.0)[0]
    full = torch.from_numpy(shapes.depth(0))
    assert torch.equal(near[0], torch.where(full > 5.0, torch.zeros(()), full)) and (near == 0).any()


def test_build_synthetic():
    tr = build_depth_dataset("synthetic:50", "train", 32, train=True)
    va = build_depth_dataset("synthetic:50", "val", 32, train=False)
    assert len(tr) == 50 and len(va) == 10 and len(build_depth_dataset("synthetic:200", "test", 32, train=False)) == 40
    assert tr.shapes.img_size == 32 and tr.shapes.split == "train" and va.shapes.split == "val"
    assert build_depth_dataset("synthetic", "train", 32, train=True).shapes.num_samples == 2000
    other = build_depth_dataset("synthetic:50", "val", 32, train=False, seed=1)
    assert not torch.equal(va[0][0], other[0][0])
    x, d = va[0]
    assert torch.equal(d[0], torch.from_numpy(va.shapes.depth(0)))  # eval: untouched
    big = build_depth_dataset("synthetic:20", "train", 48, train=True, img_size=40)
    assert big.shapes.img_size == 40 and big[0][0].shape == (3, 48, 48)  # resized up, then cropped
    with pytest.raises(DataError, match="synthetic:N"):
        build_depth_dataset("synthetic:many", "train", 32, train=True)
    with pytest.raises(DataError, match="split must be"):
        build_depth_dataset("synthetic", "dev", 32, train=True)


def test_build_folder_specs(tmp_path):
    a = _folder(tmp_path / "a")  # train.txt
    (a / "test.txt").write_text("scene/rgb_1.png scene/depth_1.png\n")
    assert len(build_depth_dataset(str(a), "train", 3, train=True)) == 2
    assert len(build_depth_dataset(str(a), "val", 3, train=False)) == 1
    b = _folder(tmp_path / "b", files="nyu_test.txt")  # BTS's names
    assert len(build_depth_dataset(str(b), "test", 3, train=False)) == 2
    with pytest.raises(DataError, match="no split file for 'train'"):
        build_depth_dataset(str(b), "train", 3, train=True)
    ds = build_depth_dataset(str(a / "test.txt"), "val", 3, train=False)  # an explicit split file
    assert len(ds) == 1 and ds.root == a
    with pytest.raises(DataError, match="not a folder"):
        build_depth_dataset(str(tmp_path / "nowhere"), "train", 3, train=True)
