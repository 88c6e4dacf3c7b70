"""Labelled datasets for the evaluation suite (linear probes, k-NN, fine-tuning).

``build_classification_dataset(path_or_name, split, transform)`` gives a dataset of
``(transform(PIL RGB image), label)`` with a ``classes`` list, from:

- an image folder with class sub-folders: ``path/<split>`` when that folder exists (the
  ImageNet / cifar10-jpg-mini layout ``root/train/<class>/...``, ``root/val/<class>/...``),
  else ``path`` itself (give the train and val folders separately);
- ``synthetic`` / ``synthetic:N``: :class:`SyntheticShapes`, N training images (default
  10000) and N // 5 validation images, from disjoint random streams;
- a torchvision dataset by name (``cifar10``, ``cifar100``, ``stl10``, ``svhn``, ``mnist``,
  ``fashion_mnist``, ``flowers102``, ``food101``, ``dtd``, ``pets``), optionally
  ``name:ROOT``; read from ``ROOT`` (default ``$FDISTILL_DATA_ROOT`` or
  ``~/.cache/fdistill/datasets``) and downloaded there only with ``download=True``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

from PIL import Image
from torch.utils.data import Dataset

from .errors import DataError
from .folder import ImageFolderDataset
from .synthetic import SyntheticShapes

SPLITS = ("train", "val")

#: name -> (torchvision class name, how the split is passed: "train" (bool) or a split map)
TORCHVISION_DATASETS: Dict[str, Tuple[str, object]] = {
    "cifar10": ("CIFAR10", "train"),
    "cifar100": ("CIFAR100", "train"),
    "mnist": ("MNIST", "train"),
    "fashion_mnist": ("FashionMNIST", "train"),
    "stl10": ("STL10", {"train": "train", "val": "test"}),
    "svhn": ("SVHN", {"train": "train", "val": "test"}),
    "flowers102": ("Flowers102", {"train": "train", "val": "test"}),
    "food101": ("Food101", {"train": "train", "val": "test"}),
    "dtd": ("DTD", {"train": "train", "val": "test"}),
    "pets": ("OxfordIIITPet", {"train": "trainval", "val": "test"}),
}
DEFAULT_SYNTHETIC_TRAIN = 10_000


def default_data_root() -> Path:
    return Path(os.environ.get("FDISTILL_DATA_ROOT", Path.home() / ".cache" / "fdistill" / "datasets")).expanduser()


class TorchvisionClassification(Dataset):
    """A torchvision classification dataset as RGB PIL -> ``transform`` with a ``classes`` list."""

    def __init__(self, ds: Dataset, name: str, transform: Optional[Callable]):
        self.ds, self.name, self.transform = ds, name, transform
        classes = getattr(ds, "classes", None)
        if not classes:
            labels = getattr(ds, "labels", None) or getattr(ds, "_labels", None)
            n = int(max(labels)) + 1 if labels is not None and len(labels) else 0
            classes = [str(i) for i in range(n)]
        self.classes = list(classes)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int):
        img, label = self.ds[index]
        if not isinstance(img, Image.Image):
            img = Image.fromarray(img)
        img = img.convert("RGB")
        if self.transform is not None:
            img = self.transform(img)
        return img, int(label)

    def __repr__(self) -> str:
        return f"TorchvisionClassification({self.name}, {len(self)} images, {len(self.classes)} classes)"


def _torchvision(name: str, split: str, transform, root: Optional[str], download: bool) -> Dataset:
    import torchvision.datasets as tvd

    cls_name, split_arg = TORCHVISION_DATASETS[name]
    root_path = Path(root).expanduser() if root else default_data_root()
    kw = {"train": split == "train"} if split_arg == "train" else {"split": split_arg[split]}
    try:
        ds = getattr(tvd, cls_name)(str(root_path), download=download, **kw)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
        if download:
            raise DataError(f"could not download {name} to {root_path}: {e}") from None
        raise DataError(f"{name} is not present under {root_path}; pass download=True (CLI: --download) to fetch "
                        f"it there, or give the folder that holds it as '{name}:ROOT'") from None
    except OSError as e:
        raise DataError(f"{name} under {root_path}: {e}") from None
    return TorchvisionClassification(ds, name, transform)


def build_classification_dataset(path_or_name, split: str, transform: Optional[Callable] = None, *,
                                 download: bool = False, root: Optional[str] = None, synthetic_img_size: int = 32,
                                 seed: int = 0) -> Dataset:
    """A labelled dataset ``(transform(image), label)`` with ``.classes`` (see module doc).

    Args:
        path_or_name: folder, ``synthetic[:N]``, or a torchvision name (``name[:ROOT]``).
        split: ``train`` or ``val`` (``val`` is the test split of datasets without one).
        transform: PIL RGB -> tensor (e.g. :func:`~fdistill.data.transforms.eval_transform`).
        download: allow torchvision to download into the data root.
        root: torchvision data root (overrides ``name:ROOT`` and the default).
        synthetic_img_size, seed: for ``synthetic``.

    Raises:
        DataError: unknown name, missing folder, folder without class sub-folders, dataset
            absent and ``download`` off.
    """
    if split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}, got {split!r}")
    spec = os.fspath(path_or_name)
    name, _, arg = spec.partition(":")
    if name == "synthetic":
        try:
            n_train = int(arg) if arg else DEFAULT_SYNTHETIC_TRAIN
        except ValueError:
            raise DataError(f"bad dataset {spec!r}: expected 'synthetic' or 'synthetic:N'") from None
        n = n_train if split == "train" else max(len(SyntheticShapes.classes), n_train // 5)
        return SyntheticShapes(n, synthetic_img_size, seed=seed, split=split, transform=transform)
    if name.lower() in TORCHVISION_DATASETS and not Path(spec).exists():
        return _torchvision(name.lower(), split, transform, root or (arg or None), download)
    path = Path(spec).expanduser()
    if not path.exists():
        if os.sep not in spec:
            known = ", ".join(["synthetic[:N]"] + sorted(TORCHVISION_DATASETS))
            raise DataError(f"unknown dataset {spec!r}: give an image folder with class sub-folders or one of {known}")
        raise DataError(f"data path {spec!r} does not exist")
    folder = path / split if (path / split).is_dir() else path
    return ImageFolderDataset(folder, transform, labels=True)
