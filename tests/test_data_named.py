"""Labelled datasets for evaluation: folders (split sub-folders), synthetic, torchvision names."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fdistill.data import DataError, SyntheticShapes, build_classification_dataset, eval_transform
from tests.conftest import CIFAR_MINI, need_shared


def _tree(root):
    for split, n in (("train", 3), ("val", 2)):
        for c, v in (("b_cls", 50), ("a_cls", 150)):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((6, 6, 3), v, np.uint8)).save(d / f"{i}.png")


def test_folder_with_split_subfolders_or_direct(tmp_path):
    _tree(tmp_path)
    tr = build_classification_dataset(tmp_path, "train", eval_transform(6))
    va = build_classification_dataset(tmp_path, "val", eval_transform(6))
    assert tr.classes == va.classes == ["a_cls", "b_cls"] and (len(tr), len(va)) == (6, 4)
    img, y = va[0]
    assert y == 0 and img.dtype == torch.uint8 and int(img[0, 0, 0]) == 150
    direct = build_classification_dataset(tmp_path / "val", "val")  # the split's own folder
    assert [s for s in direct.samples] == [s for s in va.samples]


def test_folder_without_classes_is_an_error(tmp_path):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "x.png")
    with pytest.raises(DataError, match="labels=True"):
        build_classification_dataset(tmp_path, "train")


def test_synthetic_splits():
    tr = build_classification_dataset("synthetic:50", "train", synthetic_img_size=16)
    va = build_classification_dataset("synthetic:50", "val", synthetic_img_size=16)
    assert isinstance(tr, SyntheticShapes) and (len(tr), len(va)) == (50, 10) and va.split == "val"
    assert tr.classes == va.classes


def test_unknown_name_and_missing_torchvision_dataset(tmp_path):
    with pytest.raises(DataError, match="unknown dataset"):
        build_classification_dataset("imagenet21k", "train")
    with pytest.raises(DataError, match="download=True"):
        build_classification_dataset("cifar10", "val", root=str(tmp_path))
    with pytest.raises(DataError, match="split"):
        build_classification_dataset("synthetic", "test")
    with pytest.raises(DataError, match="does not exist"):
        build_classification_dataset(str(tmp_path / "missing"), "train")


def test_torchvision_dataset_present_at_root(tmp_path, monkeypatch):
    """A CIFAR-10 laid out on disk the way torchvision stores it is read without download."""
    import pickle

    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
        with open(base / name, "wb") as f:
            pickle.dump({"data": data, "labels": [3, 7]}, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)  # fake batches, other checksums
    ds = build_classification_dataset(f"cifar10:{tmp_path}", "val", eval_transform(32))
    assert len(ds) == 2 and ds.classes[3] == "c3"
    img, y = ds[1]
    assert y == 7 and img.shape == (3, 32, 32) and img.dtype == torch.uint8


@need_shared(CIFAR_MINI)
@pytest.mark.realdata
def test_cifar10_mini_splits():
    tr = build_classification_dataset(CIFAR_MINI, "train", eval_transform(32))
    va = build_classification_dataset(CIFAR_MINI, "val", eval_transform(32))
    assert (len(tr), len(va)) == (5000, 1000) and len(tr.classes) == 10
    x, y = va[0]
    assert x.shape == (3, 32, 32) and y == 0
