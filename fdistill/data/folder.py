"""Image folders, with or without class sub-folders, listed recursively.

FD needs no labels, so any folder of images is a dataset. When the root holds class
sub-folders (ImageNet's ``train/n01440764/*.JPEG`` layout) they give the labels, as in
torchvision's ``ImageFolder``; otherwise every image gets label -1.

Hand-written rather than ``torchvision.datasets.ImageFolder`` because that class does not
recurse inside a class folder's sub-folders in a deterministic, labels-optional way and,
above all, crashes on the first corrupt file of a multi-million-image dataset. Here a
corrupt or truncated file is skipped (the next valid index is substituted), counted and
its path logged; see :meth:`ImageFolderDataset.load`.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Iterable, List, Optional, Tuple

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from .errors import DataError

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".jfif")

#: how many consecutive unreadable files one ``load`` will step over before giving up
MAX_CONSECUTIVE_BAD = 64


def _is_image(name: str, extensions: Tuple[str, ...]) -> bool:
    return name.lower().endswith(extensions)


def _walk_images(root: str, extensions: Tuple[str, ...]) -> List[str]:
    """All image files under ``root`` (following sub-folders), sorted by path: deterministic
    across machines and file systems (os.walk order is not)."""
    out, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink cycle (or a second link to a folder already listed)
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        out.extend(p for p in (os.path.join(dirpath, f) for f in filenames
                               if not f.startswith(".") and _is_image(f, extensions))
                   if os.path.isfile(p))  # regular files only: a FIFO named *.jpg would block the reader
    out.sort()
    return out


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB view of any PIL mode. 16/32-bit grey images (``I;16``, ``I``: 16-bit PNG/TIFF) are
    scaled from 0..65535 to 0..255; PIL's own ``convert`` would clip them to white."""
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I;16") or im.mode == "I":
        arr = np.asarray(im, dtype=np.float32) * (255.0 / 65535.0)
        return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    if im.mode == "F":  # float images: assume [0, 1]
        arr = np.asarray(im, dtype=np.float32) * 255.0
        return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    return im.convert("RGB")


def open_rgb(path: str) -> Image.Image:
    """Open an image file fully (decoding it, so truncated files fail here) as RGB."""
    with Image.open(path) as im:
        im.load()
        return to_rgb(im)


class ImageFolderDataset(Dataset):
    """Images under ``root``, recursively; labels from class sub-folders when present.

    Args:
        root: a folder. Hidden files and folders are ignored.
        transform: applied to the PIL RGB image in ``__getitem__``.
        labels: ``True``: class sub-folders are required (the sorted top-level sub-folders
            holding images are the classes; images directly in ``root`` are an error).
            ``False``: no labels, every image is label -1. ``None`` (default): class labels
            when ``root`` holds sub-folders with images and no image of its own, else -1.
        extensions: file name endings that count as images (case-insensitive).

    Attributes:
        classes: class names (empty without labels); ``class_to_idx``.
        samples: sorted ``(path, label)`` pairs.
        bad_paths: paths found unreadable so far *in this process* (with DataLoader worker
            processes each worker has its own; the per-sample count from :meth:`load`, summed
            per batch by the loader's collate, is the reliable total).

    Raises:
        DataError: missing path, not a folder, no images.
    """

    def __init__(self, root, transform: Optional[Callable] = None, *, labels: Optional[bool] = None,
                 extensions: Iterable[str] = IMG_EXTENSIONS):
        self.root = str(root)
        self.transform = transform
        self.extensions = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
        if not os.path.exists(self.root):
            raise DataError(f"image folder {self.root!r} does not exist")
        if not os.path.isdir(self.root):
            raise DataError(f"{self.root!r} is not a folder (expected a folder of images)")
        self.classes, self.samples = self._index(labels)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.bad_paths: set = set()

    def _index(self, labels: Optional[bool]) -> Tuple[List[str], List[Tuple[str, int]]]:
        with os.scandir(self.root) as it:
            entries = sorted(it, key=lambda e: e.name)
        subdirs = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
        top_images = [e.path for e in entries if e.is_file() and not e.name.startswith(".")
                      and _is_image(e.name, self.extensions)]
        per_class = {d: _walk_images(os.path.join(self.root, d), self.extensions) for d in subdirs}
        classes = sorted(d for d, files in per_class.items() if files)
        if labels is None:
            labels = bool(classes) and not top_images
        if labels:
            if top_images:
                raise DataError(f"{self.root!r}: labels=True needs class sub-folders only, but it holds "
                                f"{len(top_images)} image(s) directly (e.g. {top_images[0]!r})")
            if not classes:
                raise DataError(f"{self.root!r}: labels=True but no class sub-folder holds images "
                                f"(extensions {', '.join(self.extensions)})")
            samples = [(p, i) for i, c in enumerate(classes) for p in per_class[c]]
            return classes, samples
        paths = sorted(top_images + [p for files in per_class.values() for p in files])
        if not paths:
            raise DataError(f"no images found under {self.root!r} (looked recursively for "
                            f"{', '.join(self.extensions)})")
        return [], [(p, -1) for p in paths]

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> Tuple[Image.Image, int, int]:
        """The PIL RGB image and label of sample ``index``, and whether the file at ``index``
        itself was unreadable (1, else 0): a corrupt or truncated file is logged
        (``logging.warning`` with its path) and the next index (cyclically) is tried instead.
        The substitution is deterministic, so it is the same in every worker and after resume.
        Summed over an epoch the flag counts every bad file once, also in a cluster of bad files
        (whose substitutes step over each other; counting the steps over-counted).

        Raises:
            DataError: :data:`MAX_CONSECUTIVE_BAD` unreadable files in a row (a broken disk or
                a folder of non-images, not the odd bad file).
        """
        n = len(self.samples)
        for skipped in range(min(n, MAX_CONSECUTIVE_BAD)):
            path, label = self.samples[(index + skipped) % n]
            try:
                return open_rgb(path), label, int(skipped > 0)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                # PIL raises OSError (truncated), UnidentifiedImageError (an OSError), ValueError,
                # SyntaxError (some corrupt headers)
                self.bad_paths.add(path)
                log.warning("skipping unreadable image %s (%s: %s)", path, type(e).__name__, e)
        raise DataError(f"{self.root!r}: {min(n, MAX_CONSECUTIVE_BAD)} unreadable images in a row from "
                        f"index {index} (last: {path!r})")

    def verify(self, progress: bool = True) -> List[str]:
        """Decode every file once (tqdm bar) and return the unreadable ones' paths (also
        logged and added to ``bad_paths``): an optional check before a long run; training
        itself skips bad files as it meets them."""
        from tqdm.auto import tqdm

        bad = []
        for path, _ in tqdm(self.samples, desc=f"verify {os.path.basename(self.root) or self.root}",
                            unit="img", disable=not progress):
            try:
                open_rgb(path)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                bad.append(path)
                self.bad_paths.add(path)
                log.warning("unreadable image %s (%s: %s)", path, type(e).__name__, e)
        return bad

    def __getitem__(self, index: int):
        """``(transform(image), label)``; an unreadable file is replaced by the next readable one
        (see :meth:`load`)."""
        img, label, _ = self.load(index)
        if self.transform is not None:
            img = self.transform(img)
        return img, label

    def __repr__(self) -> str:
        lab = f"{len(self.classes)} classes" if self.classes else "unlabelled"
        return f"ImageFolderDataset({self.root!r}, {len(self)} images, {lab})"
