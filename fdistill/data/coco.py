"""COCO instance detection / segmentation data (the paper's COCO Mask R-CNN benchmark).

The layout is COCO's own: a folder of images plus an *instances* JSON (``instances_train2017.json``)
with ``images`` (``id``, ``file_name``, ``height``, ``width``), ``annotations`` (``image_id``,
``category_id``, ``bbox`` ``[x, y, w, h]``, ``area``, ``iscrowd``, ``segmentation`` as polygons or
RLE) and ``categories`` (``id``, ``name``). Parsing, masks (polygons / RLE -> bitmaps) and the
evaluation ground truth are pycocotools' (:attr:`CocoDetection.coco`); this module adds:

- :class:`CocoDetection`: ``(image uint8 (3, H, W), target)`` in torchvision's detection format
  (``boxes`` float32 (N, 4) xyxy, ``labels`` int64 1..K, ``masks`` uint8 (N, H, W), ``image_id``,
  ``iscrowd``, ``area``, ``orig_size``). Category ids are mapped to contiguous labels in sorted-id
  order (COCO's 80 ids 1..90 -> 1..80, the mapping of
  :func:`fdistill.dense.coco_eval.contiguous_label_map`). Crowd regions are left out of the
  training targets (detectron2 / mmdet do the same: a crowd box is no object to regress to) unless
  ``drop_crowd=False``; evaluation reads crowd regions from ``coco`` anyway, where COCOeval ignores
  them. Degenerate boxes (w or h < 1 pixel after clipping to the image) are dropped. Images with no
  usable annotation stay (COCO has ~1% of them) unless ``skip_empty=True`` (torchvision's training
  references drop them).
  Broken input is refused at construction with one :class:`~fdistill.data.DataError` naming the
  problem: a missing or non-COCO JSON, unknown category ids, images missing from the folder, no
  annotations at all.
- :class:`DetectionTransform`: the Mask R-CNN / ViTDet multi-scale recipe on image, boxes and
  masks together (torchvision ``transforms.v2``): training resizes the shorter side to a random
  choice of ``min_size`` (480..800 step 32), the longer side capped at ``max_size`` (1333),
  keeping the aspect ratio (mmdet's ``Resize(keep_ratio=True)`` with multiple scales), then a
  horizontal flip; evaluation resizes the shorter side to one size. Boxes emptied by the transform
  are removed with their labels and masks (``SanitizeBoundingBoxes``).
- :func:`synthetic_coco`: writes :class:`~fdistill.data.SyntheticShapes` as a COCO dataset (PNG
  images + instances JSON, RLE masks of each object's visible pixels), for tests and the demo.
- :func:`detection_collate`: batches stay lists (images differ in size).
- :func:`build_detection_dataset`: what ``fdistill detect --train`` names: a COCO root
  (``{train,val}2017/`` + ``annotations/instances_{train,val}2017.json``) or ``synthetic[:N]``
  (the built-in scenes exported in that layout once, under ``cache_dir``).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .errors import DataError
from .synthetic import SHAPES, SyntheticShapes, synthetic_split_size

__all__ = ["CocoDetection", "DetectionTransform", "detection_collate", "synthetic_coco", "build_detection_dataset",
           "coco_split_paths", "TRAIN_MIN_SIZES", "DEFAULT_SYNTHETIC_TRAIN"]

#: the Mask R-CNN multi-scale training sizes (shorter side): 480, 512, ..., 800
TRAIN_MIN_SIZES = tuple(range(480, 801, 32))
DEFAULT_SYNTHETIC_TRAIN = 1000
#: a COCO root's split folders (COCO 2017's names)
SPLIT_NAMES = {"train": "train2017", "val": "val2017", "test": "val2017"}


def _quiet():
    """pycocotools prints progress ("loading annotations...", "creating index..."): swallow it."""
    return contextlib.redirect_stdout(io.StringIO())


# ----------------------------------------------------------------------------- synthetic export

def synthetic_coco(shapes: SyntheticShapes, image_dir: str | os.PathLike, json_path: str | os.PathLike) -> Path:
    """Write every sample of ``shapes`` as ``image_dir/<index:06d>.png`` and a COCO instances JSON
    at ``json_path`` (returned). One annotation per object with at least one visible pixel
    (``mask == k + 1``): ``bbox`` its tight ``[x, y, w, h]``, ``area`` its pixel count,
    ``segmentation`` the compressed RLE of those pixels, ``category_id`` = shape index + 1.
    Image ids are ``index + 1`` (COCO ids start at 1)."""
    from pycocotools import mask as mask_utils

    image_dir, json_path = Path(image_dir), Path(json_path)
    image_dir.mkdir(parents=True, exist_ok=True)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(len(shapes)):
        s = shapes.sample(i)
        name = f"{i:06d}.png"
        s["image"].save(image_dir / name)  # lossless: colours stay exact
        h, w = s["mask"].shape
        images.append({"id": i + 1, "file_name": name, "height": int(h), "width": int(w)})
        for k, label in enumerate(s["box_labels"]):
            obj = s["mask"] == k + 1  # (H, W) the object's visible pixels
            if not obj.any():
                continue  # fully occluded: nothing to detect
            ys, xs = np.nonzero(obj)
            x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
            rle = mask_utils.encode(np.asfortranarray(obj.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": int(label) + 1,
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": int(obj.sum()), "iscrowd": 0,
                                "segmentation": rle})
    categories = [{"id": c + 1, "name": name, "supercategory": "shape"} for c, name in enumerate(SHAPES)]
    # atomic, and written last: a JSON on disk means every image is there (a reader can trust it)
    from ..io import atomic_write_text

    atomic_write_text(json_path, json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return json_path


# ----------------------------------------------------------------------------- dataset

def _load_coco(ann_file: Path):
    """Read and check ``ann_file``; return a pycocotools ``COCO`` over it."""
    from pycocotools.coco import COCO

    if not ann_file.is_file():
        raise DataError(f"COCO annotation file {ann_file} does not exist")
    try:
        data = json.loads(ann_file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{ann_file}: not a readable JSON file ({e})") from e
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data, dict) or k not in data]
    if missing:
        raise DataError(f"{ann_file}: not a COCO instances file (no {', '.join(missing)}; expected the "
                        "keys images, annotations and categories, as in instances_train2017.json)")
    if not all(isinstance(data[k], list) for k in ("images", "annotations", "categories")):
        raise DataError(f"{ann_file}: images, annotations and categories must be lists")
    try:
        cat_ids = {int(c["id"]) for c in data["categories"]}
        img_ids = {int(im["id"]) for im in data["images"]}
        for im in data["images"]:
            im["file_name"], im["height"], im["width"]  # noqa: B018 - presence check
        for a in data["annotations"]:
            a["image_id"], a["category_id"], a["bbox"]  # noqa: B018
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{ann_file}: malformed COCO entry (missing or bad field {e})") from None
    if not data["categories"]:
        raise DataError(f"{ann_file}: no categories")
    if not data["annotations"]:
        raise DataError(f"{ann_file}: no annotations at all ({len(data['images'])} images); "
                        "a detection dataset needs labelled objects")
    bad_cats = sorted({int(a["category_id"]) for a in data["annotations"]} - cat_ids)
    if bad_cats:
        raise DataError(f"{ann_file}: annotations use category ids {bad_cats[:5]} that are not in categories "
                        f"(known ids: {sorted(cat_ids)[:10]}{' ...' if len(cat_ids) > 10 else ''})")
    bad_imgs = sorted({int(a["image_id"]) for a in data["annotations"]} - img_ids)
    if bad_imgs:
        raise DataError(f"{ann_file}: annotations refer to image ids {bad_imgs[:5]} that are not in images")
    coco = COCO()
    coco.dataset = data
    with _quiet():
        coco.createIndex()
    return coco


class CocoDetection(Dataset):
    """COCO-format instances (see module doc) -> ``(image uint8 (3, H, W), target)``.

    Args:
        root_images: the folder the JSON's ``file_name`` entries are relative to.
        ann_file: the instances JSON.
        transform: ``transform(image, target) -> (image, target)``, e.g. :class:`DetectionTransform`.
        skip_empty: drop images with no usable (non-crowd, non-degenerate) annotation (training).
        drop_crowd: leave ``iscrowd=1`` annotations out of the targets (default; module doc).

    Attributes: ``coco`` (pycocotools ``COCO``, the evaluation ground truth), ``ids`` (the image ids
    in dataset order), ``cat_ids`` (sorted category ids; label ``l`` is ``cat_ids[l - 1]``),
    ``classes`` (their names).
    """

    def __init__(self, root_images: str | os.PathLike, ann_file: str | os.PathLike, transform=None, *,
                 skip_empty: bool = False, drop_crowd: bool = True):
        self.root = Path(root_images).expanduser()
        self.ann_file = Path(ann_file).expanduser()
        if not self.root.is_dir():
            raise DataError(f"COCO image folder {self.root} does not exist")
        self.coco = _load_coco(self.ann_file)
        self.transform, self.drop_crowd = transform, bool(drop_crowd)
        self.cat_ids: List[int] = sorted(self.coco.getCatIds())
        self.cat_to_label: Dict[int, int] = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.classes: List[str] = [str(self.coco.cats[c]["name"]) for c in self.cat_ids]
        ids = sorted(self.coco.imgs)
        absent = [self.coco.imgs[i]["file_name"] for i in ids
                  if not (self.root / str(self.coco.imgs[i]["file_name"]).lstrip("/")).is_file()]
        if absent:
            raise DataError(f"{self.root}: {len(absent)} of the {len(ids)} images in {self.ann_file.name} are "
                            f"missing, e.g. {absent[:3]}")
        if skip_empty:
            ids = [i for i in ids if any(self._usable(a) for a in self._anns(i))]
            if not ids:
                raise DataError(f"{self.ann_file}: no image has a usable annotation (all crowd or degenerate)")
        self.ids: List[int] = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return (f"CocoDetection({str(self.root)!r}, {self.ann_file.name!r}, {len(self)} images, "
                f"{len(self.classes)} classes)")

    def _anns(self, image_id: int) -> List[dict]:
        anns = self.coco.imgToAnns.get(image_id, [])
        return [a for a in anns if not (self.drop_crowd and a.get("iscrowd", 0))]

    def _usable(self, ann: dict) -> bool:
        info = self.coco.imgs[ann["image_id"]]
        return self._xyxy(ann, info["width"], info["height"]) is not None

    @staticmethod
    def _xyxy(ann: dict, width: int, height: int) -> Optional[List[float]]:
        """COCO ``[x, y, w, h]`` -> ``[x0, y0, x1, y1]`` clipped to the image; None if w or h < 1."""
        x, y, w, h = (float(v) for v in ann["bbox"])
        x0, y0 = min(max(x, 0.0), width), min(max(y, 0.0), height)
        x1, y1 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
        return [x0, y0, x1, y1] if x1 - x0 >= 1 and y1 - y0 >= 1 else None

    def load(self, index: int) -> Tuple[torch.Tensor, Dict[str, Any]]:
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        path = self.root / str(info["file_name"]).lstrip("/")
        try:
            with Image.open(path) as im:
                img = torch.from_numpy(np.array(im.convert("RGB"), np.uint8)).permute(2, 0, 1).contiguous()
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read {path}: {e}") from e
        H, W = int(img.shape[1]), int(img.shape[2])
        if (H, W) != (int(info["height"]), int(info["width"])):
            raise DataError(f"{path}: image is {W}x{H} but {self.ann_file.name} says {info['width']}x{info['height']}")
        boxes, labels, masks, crowd, area = [], [], [], [], []
        for a in self._anns(image_id):
            box = self._xyxy(a, W, H)
            if box is None:
                continue  # degenerate
            boxes.append(box)
            labels.append(self.cat_to_label[int(a["category_id"])])
            masks.append(self.coco.annToMask(a) if a.get("segmentation") else self._box_mask(box, H, W))
            crowd.append(int(a.get("iscrowd", 0)))
            area.append(float(a.get("area", (box[2] - box[0]) * (box[3] - box[1]))))
        target = {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),  # (N, 4) xyxy
            "labels": torch.tensor(labels, dtype=torch.int64),  # (N,) 1..K
            "masks": (torch.from_numpy(np.stack(masks)).to(torch.uint8) if masks
                      else torch.zeros((0, H, W), dtype=torch.uint8)),  # (N, H, W)
            "image_id": int(image_id),
            "iscrowd": torch.tensor(crowd, dtype=torch.int64),  # (N,)
            "area": torch.tensor(area, dtype=torch.float32),  # (N,) COCO's, in original pixels
            "orig_size": (H, W),  # predictions go back to this size for COCOeval
        }
        return img, target

    def check(self, indices: Optional[Sequence[int]] = None, *, progress: bool = False) -> None:
        """Open every image's header (or those of ``indices``; no pixel is decoded) and raise the
        :class:`DataError` :meth:`load` would: a file PIL cannot open, or a size other than the
        JSON's (the annotations would not fit it). The construction has checked the JSON itself."""
        from tqdm.auto import tqdm

        for i in tqdm(range(len(self)) if indices is None else indices, desc="checking images", unit="image",
                      disable=not progress, leave=False):
            info = self.coco.imgs[self.ids[i]]
            path = self.root / str(info["file_name"]).lstrip("/")
            try:
                with Image.open(path) as im:
                    W, H = im.size
            except (OSError, ValueError) as e:
                raise DataError(f"cannot read {path}: {e}") from e
            if (H, W) != (int(info["height"]), int(info["width"])):
                raise DataError(f"{path}: image is {W}x{H} but {self.ann_file.name} says {info['width']}x{info['height']}")

    @staticmethod
    def _box_mask(box: List[float], H: int, W: int) -> np.ndarray:
        """A box-shaped mask for an annotation without a segmentation (box-only datasets)."""
        m = np.zeros((H, W), np.uint8)
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        m[y0:y1, x0:x1] = 1
        return m

    def __getitem__(self, index: int):
        img, target = self.load(index)
        return self.transform(img, target) if self.transform is not None else (img, target)


# ----------------------------------------------------------------------------- transforms

class DetectionTransform:
    """(uint8 image (3, H, W), target) -> the same, resized (and flipped) together (module doc).

    Args:
        train: multi-scale resize + flip (True) or the single evaluation resize (False).
        min_size: shorter-side choices (training: one drawn per image) or one int; evaluation uses
            the largest choice (800 by default, Mask R-CNN's test size). ``None``: no resize here
            (flip only), for a detector that resizes its inputs itself, as torchvision's
            ``GeneralizedRCNNTransform`` does in ``fdistill detect`` (it maps predictions back
            to the original pixels, which COCOeval needs).
        max_size: cap on the longer side (1333).
        flip: horizontal flip with probability 1/2 (training only).

    Randomness is torch's (seeded per loader worker). A class, not a closure: loader workers
    pickle it. ``boxes`` and ``masks`` come back as plain tensors, ``area`` is left as given.
    """

    def __init__(self, train: bool, min_size: Optional[int | Sequence[int]] = TRAIN_MIN_SIZES,
                 max_size: Optional[int] = 1333, flip: bool = True):
        from torchvision.transforms import v2

        if min_size is None:
            sizes = None
        else:
            sizes = [int(min_size)] if isinstance(min_size, (int, np.integer)) else [int(s) for s in min_size]
            if not sizes or min(sizes) < 1:
                raise DataError(f"min_size must be a positive size or sizes, got {min_size!r}")
        self.train, self.max_size, self.flip = bool(train), max_size, bool(flip)
        self.min_size = tuple(sizes) if sizes else None
        ops = []
        if sizes and self.train:
            ops.append(v2.RandomShortestSize(list(sizes), max_size=max_size, antialias=True))
        elif sizes:
            ops.append(v2.Resize(max(sizes), max_size=max_size, antialias=True))
        if self.train and flip:
            ops.append(v2.RandomHorizontalFlip())
        self.tf = v2.Compose([*ops, v2.SanitizeBoundingBoxes(labels_getter=_labels_getter)])

    def __call__(self, image: torch.Tensor, target: Dict[str, Any]):
        from torchvision import tv_tensors

        if isinstance(image, Image.Image):
            image = torch.from_numpy(np.array(image.convert("RGB"), np.uint8)).permute(2, 0, 1)
        H, W = int(image.shape[-2]), int(image.shape[-1])
        t = dict(target)
        t["boxes"] = tv_tensors.BoundingBoxes(t["boxes"], format="XYXY", canvas_size=(H, W))
        t["masks"] = tv_tensors.Mask(t["masks"])
        img, t = self.tf(tv_tensors.Image(image), t)
        t["boxes"] = t["boxes"].as_subclass(torch.Tensor)  # (N', 4) xyxy in the new pixels
        t["masks"] = t["masks"].as_subclass(torch.Tensor)  # (N', H', W') nearest-resized
        return img.as_subclass(torch.Tensor), t

    def __repr__(self) -> str:
        return f"DetectionTransform(train={self.train}, min_size={self.min_size}, max_size={self.max_size}, " \
               f"flip={self.flip})"


def _labels_getter(inputs) -> Tuple[torch.Tensor, ...]:
    """What ``SanitizeBoundingBoxes`` filters with the boxes (masks it finds itself)."""
    target = inputs[1]
    return tuple(target[k] for k in ("labels", "iscrowd", "area") if k in target)


def detection_collate(batch):
    """``[(image, target), ...]`` -> ``(list of images, list of targets)`` (sizes differ)."""
    images, targets = [], []
    for img, t in batch:
        images.append(img)
        targets.append(t)
    return images, targets


# ----------------------------------------------------------------------------- builder

def coco_split_paths(root: str | os.PathLike, split: str) -> Tuple[Path, Path]:
    """``(image folder, instances JSON)`` of ``split`` in a COCO root: ``val2017/`` and
    ``annotations/instances_val2017.json`` (``test`` reads val: COCO's test-dev has no public labels)."""
    if split not in SPLIT_NAMES:
        raise DataError(f"split must be one of {sorted(SPLIT_NAMES)}, got {split!r}")
    root, name = Path(root).expanduser(), SPLIT_NAMES[split]
    return root / name, root / "annotations" / f"instances_{name}.json"


def build_detection_dataset(spec: str, split: str, *, train: bool, flip: bool = True, seed: int = 0,
                            cache_dir: Optional[str | os.PathLike] = None, transform=None) -> CocoDetection:
    """The detection dataset ``spec`` names (module doc), flip-augmented for training (the detector
    resizes its inputs itself). ``synthetic[:N]``: N training scenes and ``max(10, N // 5)``
    validation ones of seed ``seed`` (32 px), written once as a COCO root under ``cache_dir``
    (reused when already there). Training drops images without a usable object, evaluation keeps
    every image."""
    sizes = synthetic_split_size(spec, split, DEFAULT_SYNTHETIC_TRAIN)
    if sizes is not None:
        if cache_dir is None:
            raise DataError("synthetic detection data is written as a COCO folder first: give cache_dir")
        n_train, n = sizes
        root = Path(cache_dir) / f"synthetic_coco_{n_train}_seed{seed}"
        images, ann = coco_split_paths(root, split)
        if not ann.is_file():
            synthetic_coco(SyntheticShapes(n, 32, seed=seed, split="train" if split == "train" else "val"), images, ann)
        spec = str(root)
    elif not Path(str(spec)).expanduser().is_dir():
        raise DataError(f"detection data {spec!r}: not a folder (COCO layout) nor 'synthetic[:N]'")
    images, ann = coco_split_paths(spec, split)
    if not ann.is_file():
        raise DataError(f"{spec}: no {ann.relative_to(Path(spec).expanduser())} (a COCO root holds "
                        f"{SPLIT_NAMES[split]}/ and annotations/instances_{SPLIT_NAMES[split]}.json)")
    tf = transform if transform is not None else DetectionTransform(train, min_size=None, flip=flip)
    return CocoDetection(images, ann, tf, skip_empty=train)
