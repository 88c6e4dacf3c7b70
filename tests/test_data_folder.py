"""Image folders: recursive deterministic listing, labels, bad files skipped+counted+logged, errors."""
from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from fdistill.data import DataError, ImageFolderDataset, build_distill_dataset, build_distill_loader
from tests.conftest import CIFAR_MINI, need_shared


def _img(path, value, size=(12, 10), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size[1], size[0], 3), value, np.uint8)
    Image.fromarray(arr).save(path, format=fmt)
    return path


@pytest.fixture
def class_tree(tmp_path):
    root = tmp_path / "data"
    _img(root / "cat" / "a.jpg", 10)
    _img(root / "cat" / "deep" / "nested" / "b.PNG", 20)  # recursive, case-insensitive extension
    _img(root / "dog" / "c.png", 30)
    _img(root / "dog" / "d.webp", 40)
    (root / "dog" / "notes.txt").write_text("not an image")
    _img(root / ".hidden" / "e.png", 50)  # hidden folders ignored
    (root / "empty_class").mkdir()  # no images -> not a class
    return root


def test_class_subfolders_give_sorted_labels(class_tree):
    ds = ImageFolderDataset(class_tree)
    assert ds.classes == ["cat", "dog"]
    rel = [(p.split("data/")[1], y) for p, y in ds.samples]
    assert rel == [("cat/a.jpg", 0), ("cat/deep/nested/b.PNG", 0), ("dog/c.png", 1), ("dog/d.webp", 1)]
    img, label = ds[3]
    assert label == 1 and img.mode == "RGB" and img.size == (12, 10)


def test_labels_false_gives_minus_one_and_same_files(class_tree):
    ds = ImageFolderDataset(class_tree, labels=False)
    assert ds.classes == [] and len(ds) == 4
    assert all(y == -1 for _, y in ds.samples)
    assert [p for p, _ in ds.samples] == sorted(p for p, _ in ImageFolderDataset(class_tree).samples)


def test_flat_folder_without_classes(tmp_path):
    for i in (3, 1, 2):
        _img(tmp_path / f"{i}.png", i)
    _img(tmp_path / "sub" / "4.jpg", 4)  # images at the top AND in a sub-folder -> unlabelled, all listed
    ds = ImageFolderDataset(tmp_path)
    assert ds.classes == [] and [p.rsplit("/", 1)[1] for p, _ in ds.samples] == ["1.png", "2.png", "3.png", "4.jpg"]
    with pytest.raises(DataError, match="directly"):
        ImageFolderDataset(tmp_path, labels=True)
    assert np.asarray(ds[1][0])[0, 0, 0] == 2


def test_listing_is_deterministic(class_tree):
    assert ImageFolderDataset(class_tree).samples == ImageFolderDataset(class_tree).samples


def test_corrupt_and_truncated_files_skipped_counted_logged(tmp_path, caplog):
    _img(tmp_path / "a0.png", 10)
    (tmp_path / "a1.jpg").write_bytes(b"this is not a jpeg at all")
    good = _img(tmp_path / "a2_src.jpg", 77, size=(64, 64))
    data = good.read_bytes()
    (tmp_path / "a2.jpg").write_bytes(data[: len(data) // 2])  # truncated JPEG
    good.rename(tmp_path / "a3.jpg")
    ds = ImageFolderDataset(tmp_path)
    assert len(ds) == 4  # listing does not open files
    with caplog.at_level(logging.WARNING):
        img, label, skipped = ds.load(1)
    assert skipped == 1 and img.size == (64, 64)  # a1 bad (a2 stepped over too) -> a3
    assert np.abs(np.asarray(img).astype(int) - 77).max() <= 2
    text = caplog.text
    assert "a1.jpg" in text and "a2.jpg" in text
    assert ds.bad_paths == {str(tmp_path / "a1.jpg"), str(tmp_path / "a2.jpg")}
    # __getitem__ substitutes too; a readable index skips nothing
    assert ds.load(0)[2] == 0 and ds[2][0].size == (64, 64)
    # over the epoch every bad file counts once: 2 (stepping over a cluster counted a1 twice: 3)
    assert sum(ds.load(i)[2] for i in range(len(ds))) == 2


def test_bad_files_counted_per_batch_through_workers(tmp_path):
    for i in range(8):
        _img(tmp_path / f"{i}.png", i * 10, size=(16, 16))
    (tmp_path / "3.png").write_bytes(b"garbage")
    (tmp_path / "6.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    ds = build_distill_dataset(tmp_path, img_size=8)
    for workers in (0, 2):
        loader = build_distill_loader(ds, batch_size=4, num_workers=workers, shuffle=False)
        batches = list(loader)
        assert sum(b["skipped"] for b in batches) == 2
        assert [b["skipped"] for b in batches] == [1, 1]  # index 3 in batch 0, index 6 in batch 1


def test_all_bad_raises(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.jpg").write_bytes(b"nope")
    ds = ImageFolderDataset(tmp_path)
    with pytest.raises(DataError, match="unreadable"):
        ds.load(0)


def test_errors_before_compute(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ImageFolderDataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        ImageFolderDataset(tmp_path / "empty")
    (tmp_path / "texts" / "x").mkdir(parents=True)
    (tmp_path / "texts" / "x" / "a.txt").write_text("hi")
    with pytest.raises(DataError, match="no images"):
        ImageFolderDataset(tmp_path / "texts")
    f = _img(tmp_path / "one.png", 1)
    with pytest.raises(DataError, match="not a folder"):
        ImageFolderDataset(f)
    with pytest.raises(DataError, match="labels=True"):
        ImageFolderDataset(tmp_path / "texts", labels=True)
    with pytest.raises(DataError, match="does not exist"):
        build_distill_dataset(str(tmp_path / "nope"), img_size=8)
    with pytest.raises(DataError, match="unknown dataset"):
        build_distill_dataset("imagenet_please", img_size=8)


@need_shared(CIFAR_MINI)
@pytest.mark.realdata
def test_cifar10_mini_listing():
    train = ImageFolderDataset(CIFAR_MINI / "train")
    val = ImageFolderDataset(CIFAR_MINI / "val")
    assert len(train) == 5000 and len(val) == 1000
    assert train.classes == val.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                            "horse", "ship", "truck"]
    counts = np.bincount([y for _, y in train.samples])
    assert counts.tolist() == [500] * 10
    img, y = val[999]
    assert y == 9 and img.size == (32, 32)


def test_verify_lists_bad_files(tmp_path):
    _img(tmp_path / "a.png", 1)
    (tmp_path / "b.png").write_bytes(b"bad")
    ds = ImageFolderDataset(tmp_path)
    assert ds.verify(progress=False) == [str(tmp_path / "b.png")]


def test_modes_become_rgb(tmp_path):
    grey16 = (np.arange(16 * 16).reshape(16, 16) * 256).astype(np.uint16)  # 0 .. 65280
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    Image.fromarray(np.full((4, 4, 4), 200, np.uint8)).save(tmp_path / "rgba.png")
    Image.fromarray(np.full((4, 4), 90, np.uint8)).save(tmp_path / "grey.jpg")
    ds = ImageFolderDataset(tmp_path)
    imgs = {p.rsplit("/", 1)[1]: ds.load(i)[0] for i, (p, _) in enumerate(ds.samples)}
    assert all(im.mode == "RGB" for im in imgs.values())
    g = np.asarray(imgs["g16.png"])[..., 0].astype(int)
    assert np.abs(g - np.round(grey16.astype(float) * 255 / 65535)).max() <= 1  # scaled, not clipped to white
    assert np.asarray(imgs["rgba.png"])[0, 0].tolist() == [200, 200, 200]


def test_symlink_cycle_terminates(tmp_path):
    _img(tmp_path / "a" / "x.png", 1)
    (tmp_path / "a" / "loop").symlink_to(tmp_path / "a")
    ds = ImageFolderDataset(tmp_path, labels=False)
    assert [p.rsplit("/", 1)[1] for p, _ in ds.samples] == ["x.png"]


def test_a_fifo_named_like_an_image_is_not_listed(tmp_path):
    """Opening a FIFO blocks until a writer appears: the loader hung forever on one named x.jpg."""
    import os

    (tmp_path / "cat").mkdir()
    _img(tmp_path / "cat" / "a.png", 10)
    os.mkfifo(tmp_path / "cat" / "b.jpg")
    ds = ImageFolderDataset(str(tmp_path), labels=True)
    assert [os.path.basename(p) for p, _ in ds.samples] == ["a.png"]
