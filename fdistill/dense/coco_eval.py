"""COCO box and mask AP (the paper's COCO numbers, Sec. 5: AP^box and AP^mask) through pycocotools'
``COCOeval``, the reference implementation every detection paper reports.

Only the glue is written here: detector outputs (torchvision's per-image dicts) -> COCO result
records (boxes to ``[x, y, w, h]``, contiguous labels to category ids, masks thresholded at 0.5 and
RLE-encoded), and ``COCOeval``'s twelve numbers -> the six AP numbers in percent. ``COCOeval``
prints its progress; that output is captured (:attr:`CocoEvaluator.text`), not printed.

Distributed evaluation is the caller's: each rank keeps its :attr:`CocoEvaluator.results`, gathers
them (``all_gather_object``) and merges them into one evaluator (:meth:`CocoEvaluator.merge`).
"""
from __future__ import annotations

import contextlib
import io
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

__all__ = ["AP_KEYS", "CocoEvaluator", "coco_evaluate", "contiguous_label_map"]

#: ``COCOeval.stats[0:6]``: AP at IoU .50:.95, at .50, at .75, and over small / medium / large objects
AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
IOU_TYPES = ("bbox", "segm")


def contiguous_label_map(coco_gt) -> Dict[int, int]:
    """``{label: category id}`` for a detector trained with labels 1 ... K (0 = background) on the
    categories in id order (the usual COCO 80-class mapping)."""
    return {i + 1: int(c) for i, c in enumerate(sorted(coco_gt.getCatIds()))}


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


class CocoEvaluator:
    """Accumulate detections over batches, then ``summarize()`` -> ``{iou_type: {AP, AP50, ...}}``.

    ``results``: one record per image ``{"image_id", "bbox": [...], "segm": [...]}`` holding COCO
    result dicts (masks already RLE-encoded, so records are small and picklable);
    :meth:`merge` adds other ranks' lists (an image seen twice -- a distributed sampler pads the
    last batch -- counts once)."""

    def __init__(self, coco_gt, label_to_cat_id: Mapping[int, int] | Sequence[int],
                 iou_types: Sequence[str] = IOU_TYPES):
        bad = [t for t in iou_types if t not in IOU_TYPES]
        if bad:
            raise ValueError(f"unknown iou_types {bad}; expected some of {IOU_TYPES}")
        self.coco_gt = coco_gt
        self.label_to_cat_id = label_to_cat_id
        self.iou_types = tuple(iou_types)
        self.results: List[Dict[str, Any]] = []
        self.text = ""  # COCOeval's printed summary, per IoU type

    def _cat(self, label: int) -> int:
        try:
            return int(self.label_to_cat_id[int(label)])
        except (KeyError, IndexError):
            raise ValueError(f"label {int(label)} has no COCO category in label_to_cat_id") from None

    def _record(self, pred: Mapping[str, Any]) -> Dict[str, Any]:
        """One image's prediction dict -> its record of COCO result dicts."""
        image_id = int(pred["image_id"])
        if image_id not in self.coco_gt.imgs:
            raise ValueError(f"image_id {image_id} is not in the ground truth")
        boxes = _np(pred.get("boxes", np.zeros((0, 4)))).reshape(-1, 4).astype(np.float64)  # (N, 4) xyxy
        scores = _np(pred.get("scores", np.zeros(0))).reshape(-1).astype(np.float64)
        labels = _np(pred.get("labels", np.zeros(0))).reshape(-1)
        if not len(boxes) == len(scores) == len(labels):
            raise ValueError(f"image {image_id}: {len(boxes)} boxes, {len(scores)} scores, {len(labels)} labels")
        cats = [self._cat(l) for l in labels]
        rec: Dict[str, Any] = {"image_id": image_id, "bbox": [], "segm": []}
        if "bbox" in self.iou_types:
            xywh = boxes.copy()
            xywh[:, 2:] -= xywh[:, :2]
            rec["bbox"] = [{"image_id": image_id, "category_id": c, "bbox": [float(v) for v in b], "score": float(s)}
                           for c, b, s in zip(cats, xywh, scores)]
        if "segm" in self.iou_types:
            rec["segm"] = self._masks(pred, image_id, cats, scores)
        return rec

    def _masks(self, pred, image_id: int, cats: List[int], scores: np.ndarray) -> List[dict]:
        from pycocotools import mask as mask_util

        if len(cats) == 0:
            return []
        if "masks" not in pred:
            raise ValueError(f"image {image_id}: segm evaluation needs 'masks'")
        masks = _np(pred["masks"])
        if masks.ndim == 4:  # (N, 1, H, W) probabilities (torchvision's Mask R-CNN)
            masks = masks[:, 0]
        info = self.coco_gt.imgs[image_id]
        if masks.shape != (len(cats), info["height"], info["width"]):
            raise ValueError(f"image {image_id}: masks of shape {masks.shape}, expected "
                             f"({len(cats)}, {info['height']}, {info['width']}) (original image size)")
        binary = np.asfortranarray((masks > 0.5).astype(np.uint8).transpose(1, 2, 0))  # (H, W, N)
        rles = mask_util.encode(binary)
        out = []
        for c, s, rle in zip(cats, scores, rles):
            rle["counts"] = rle["counts"].decode("ascii")  # str, so the records are JSON-able
            out.append({"image_id": image_id, "category_id": c, "segmentation": rle, "score": float(s)})
        return out

    def update(self, predictions: Sequence[Mapping[str, Any]]) -> "CocoEvaluator":
        """Add per-image dicts ``{image_id, boxes (N, 4) xyxy in original image pixels, scores (N,),
        labels (N,) contiguous, masks (N, 1, H, W) probabilities or (N, H, W) binary}``."""
        self.results.extend(self._record(p) for p in predictions)
        return self

    def merge(self, lists: Sequence[Sequence[Dict[str, Any]]]) -> "CocoEvaluator":
        """Add the ``results`` lists of other evaluators (e.g. gathered from every rank)."""
        for lst in lists:
            self.results.extend(lst)
        return self

    def summarize(self, img_ids: Optional[Sequence[int]] = None) -> Dict[str, Dict[str, float]]:
        """``{iou_type: {AP, AP50, AP75, APs, APm, APl}}`` in percent over the images seen (or
        ``img_ids``). No detections at all: AP 0. A range with no ground truth (e.g. no small
        objects): NaN (pycocotools' -1)."""
        from pycocotools.cocoeval import COCOeval

        seen: Dict[int, Dict[str, Any]] = {}
        for rec in self.results:
            seen.setdefault(int(rec["image_id"]), rec)  # duplicates from sampler padding count once
        ids = sorted(seen) if img_ids is None else sorted(int(i) for i in img_ids)
        out: Dict[str, Dict[str, float]] = {}
        texts = []
        for iou_type in self.iou_types:
            dets = [d for i in ids if i in seen for d in seen[i][iou_type]]
            if not dets or not ids:
                out[iou_type] = {k: 0.0 for k in AP_KEYS}
                texts.append(f"{iou_type}: no detections, AP 0")
                continue
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                coco_dt = self.coco_gt.loadRes(dets)
                ev = COCOeval(self.coco_gt, coco_dt, iouType=iou_type)
                ev.params.imgIds = ids
                ev.evaluate()
                ev.accumulate()
                ev.summarize()
            texts.append(f"{iou_type}:\n{buf.getvalue()}")
            out[iou_type] = {k: (float(v) * 100.0 if v >= 0 else math.nan) for k, v in zip(AP_KEYS, ev.stats[:6])}
        self.text = "\n".join(texts)
        return out


def coco_evaluate(coco_gt, predictions: Sequence[Mapping[str, Any]],
                  label_to_cat_id: Mapping[int, int] | Sequence[int],
                  iou_types: Sequence[str] = IOU_TYPES) -> Dict[str, Dict[str, float]]:
    """COCO AP of ``predictions`` (per-image dicts, see :meth:`CocoEvaluator.update`) against
    ``coco_gt`` (a ``pycocotools.coco.COCO``): ``{"bbox": {"AP", "AP50", "AP75", "APs", "APm",
    "APl"}, "segm": {...}}`` in percent. ``label_to_cat_id[label]`` is a label's COCO category id
    (:func:`contiguous_label_map` for labels 1 ... K)."""
    return CocoEvaluator(coco_gt, label_to_cat_id, iou_types).update(predictions).summarize()
