"""COCO AP through pycocotools (fdistill.dense.coco_eval) on hand-made cases whose AP is worked out
by hand: COCO's AP is the mean over 10 IoU thresholds of the 101-point interpolated precision
(recall thresholds 0, 0.01, ..., 1; at each, the best precision at that recall or more; 0 past the
highest recall reached). With predicted boxes equal to ground-truth boxes (IoU 1) or disjoint from
all of them (IoU 0), every IoU threshold gives the same curve, so AP = AP50 = AP75."""
import contextlib
import io
import math

import numpy as np
import pytest
import torch

pytest.importorskip("pycocotools")
from pycocotools import mask as mask_util  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402

from fdistill.dense.coco_eval import AP_KEYS, CocoEvaluator, coco_evaluate, contiguous_label_map  # noqa: E402

H, W = 200, 240
# (image, category, xyxy): large (100 x 100 > 96^2), medium (50 x 50), small (20 x 20) objects
GT = [
    (1, 1, (10, 10, 110, 110)),
    (1, 2, (150, 20, 200, 70)),
    (2, 1, (20, 120, 40, 140)),
    (2, 1, (100, 50, 200, 150)),
]
CATS = {1: 7, 2: 9}  # contiguous label -> COCO category id (ids need not be contiguous)


def rect_mask(box, h=H, w=W):
    m = np.zeros((h, w), dtype=np.uint8)
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = 1
    return m


def make_gt(gt=GT):
    anns = []
    for k, (img, label, box) in enumerate(gt):
        x0, y0, x1, y1 = box
        rle = mask_util.encode(np.asfortranarray(rect_mask(box)))
        rle["counts"] = rle["counts"].decode("ascii")
        anns.append({"id": k + 1, "image_id": img, "category_id": CATS[label], "iscrowd": 0,
                     "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "segmentation": rle})
    coco = COCO()
    coco.dataset = {"images": [{"id": i, "height": H, "width": W} for i in (1, 2)],
                    "categories": [{"id": c, "name": f"c{c}"} for c in CATS.values()], "annotations": anns}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def preds(dets, images=(1, 2), binary=False):
    """dets: (image, label, xyxy, score) -> per-image dicts as torchvision's Mask R-CNN gives them
    (masks (N, 1, H, W) probabilities: 0.9 inside the box, 0.1 outside; or (N, H, W) binary)."""
    out = []
    for img in images:
        mine = [d for d in dets if d[0] == img]
        masks = np.stack([rect_mask(d[2]) for d in mine]) if mine else np.zeros((0, H, W), np.uint8)
        if not binary:
            masks = (0.1 + 0.8 * masks.astype(np.float32))[:, None]
        out.append({"image_id": img,
                    "boxes": torch.tensor([d[2] for d in mine], dtype=torch.float32).reshape(-1, 4),
                    "scores": torch.tensor([d[3] for d in mine], dtype=torch.float32),
                    "labels": torch.tensor([d[1] for d in mine], dtype=torch.int64),
                    "masks": torch.from_numpy(masks) if not binary else masks.astype(bool)})
    return out


def interpolated_ap(recall, precision):
    """The 101-point interpolated AP worked out from a hand-made (recall, precision) list (scores
    descending): precision made monotone from the right, read at each recall threshold."""
    prec = list(precision)
    for i in range(len(prec) - 2, -1, -1):
        prec[i] = max(prec[i], prec[i + 1])
    total = 0.0
    for r in np.linspace(0, 1, 101):
        hits = [p for rc, p in zip(recall, prec) if rc >= r - 1e-12]
        total += hits[0] if hits else 0.0
    return 100.0 * total / 101


def test_perfect_predictions_give_100_for_boxes_and_masks():
    coco = make_gt()
    dets = [(img, label, box, 1.0) for img, label, box in GT]
    res = coco_evaluate(coco, preds(dets), CATS)
    for t in ("bbox", "segm"):
        assert set(res[t]) == set(AP_KEYS)
        for k in AP_KEYS:  # every size range has ground truth: small, medium, large
            assert res[t][k] == pytest.approx(100.0, abs=1e-6), (t, k)
    # (N, H, W) binary masks and a list label map give the same
    res2 = coco_evaluate(coco, preds(dets, binary=True), [None, 7, 9], iou_types=("segm",))
    assert list(res2) == ["segm"] and res2["segm"]["AP"] == pytest.approx(100.0, abs=1e-6)


def test_missed_box_caps_recall():
    """Category 7 only: image 1 perfect (1 box), image 2 finds one of its two boxes. Recall stops
    at 2/3 with precision 1, so the recall thresholds 0 ... 0.66 (67 of 101) score 1: AP = 67/101."""
    gt = [g for g in GT if g[1] == 1]  # 3 boxes of category 7
    coco = make_gt(gt)
    dets = [(1, 1, gt[0][2], 0.9), (2, 1, gt[2][2], 0.8)]  # the small box of image 2 is missed
    res = coco_evaluate(coco, preds(dets), CATS)
    expect = 100.0 * 67 / 101
    assert interpolated_ap([1 / 3, 2 / 3], [1.0, 1.0]) == pytest.approx(expect)
    for t in ("bbox", "segm"):
        assert res[t]["AP"] == pytest.approx(expect, abs=1e-6)
        assert res[t]["AP50"] == pytest.approx(expect, abs=1e-6)
        assert res[t]["AP75"] == pytest.approx(expect, abs=1e-6)
        assert res[t]["APl"] == pytest.approx(100.0, abs=1e-6)  # both large boxes found
        assert res[t]["APs"] == pytest.approx(0.0, abs=1e-6)  # the one small box missed
        assert math.isnan(res[t]["APm"])  # no medium ground truth for this category


def test_false_positive_above_a_true_positive():
    """Category 7 (3 boxes), detections by score: TP, FP, TP, TP. Recall 1/3, 1/3, 2/3, 1;
    precision 1, 1/2, 2/3, 3/4 -> interpolated 1, 3/4, 3/4, 3/4: thresholds 0 ... 0.33 (34) at 1,
    0.34 ... 1 (67) at 3/4, AP = (34 + 67 * 0.75) / 101."""
    gt = [g for g in GT if g[1] == 1]
    coco = make_gt(gt)
    fp = (150, 150, 230, 195)  # overlaps no box of image 1
    dets = [(1, 1, gt[0][2], 0.9), (1, 1, fp, 0.8), (2, 1, gt[1][2], 0.7), (2, 1, gt[2][2], 0.6)]
    expect = 100.0 * (34 + 67 * 0.75) / 101
    assert interpolated_ap([1 / 3, 1 / 3, 2 / 3, 1.0], [1.0, 0.5, 2 / 3, 0.75]) == pytest.approx(expect)
    res = coco_evaluate(coco, preds(dets), CATS)
    for t in ("bbox", "segm"):
        for k in ("AP", "AP50", "AP75"):
            assert res[t][k] == pytest.approx(expect, abs=1e-6), (t, k)


def test_two_categories_average():
    """Category 7 perfect (AP 100), category 9's only box missed (AP 0): AP = 50."""
    coco = make_gt()
    dets = [(img, label, box, 1.0) for img, label, box in GT if label == 1]
    res = coco_evaluate(coco, preds(dets), CATS, iou_types=("bbox",))
    assert res["bbox"]["AP"] == pytest.approx(50.0, abs=1e-6)


def test_no_predictions_give_zero_not_a_crash(capsys):
    coco = make_gt()
    for p in ([], preds([])):  # nothing at all; images with no detections
        res = coco_evaluate(coco, p, CATS)
        assert res == {t: {k: 0.0 for k in AP_KEYS} for t in ("bbox", "segm")}
    coco_evaluate(coco, preds([(1, 1, GT[0][2], 1.0)]), CATS)
    assert capsys.readouterr().out == ""  # COCOeval's prints are captured


def test_evaluator_accumulates_and_merges():
    """Two 'ranks' each see one image (and rank 1 repeats rank 0's, as a padded sampler does):
    merged, the result is that of one evaluation over both images."""
    coco = make_gt()
    dets = [(img, label, box, 1.0) for img, label, box in GT]
    p = preds(dets)
    r0 = CocoEvaluator(coco, CATS).update(p[:1])
    r1 = CocoEvaluator(coco, CATS).update(p[1:]).update(p[:1])
    r0.merge([r1.results])
    assert r0.summarize() == coco_evaluate(coco, p, CATS)
    assert "Average Precision" in r0.text
    # evaluated on image 1 only, image 2's boxes do not count
    assert CocoEvaluator(coco, CATS, ("bbox",)).update(p[:1]).summarize()["bbox"]["AP"] == pytest.approx(100.0)


def test_bad_inputs_are_clear():
    coco = make_gt()
    p = preds([(1, 1, GT[0][2], 1.0)])
    with pytest.raises(ValueError, match="label 1 has no COCO category"):
        coco_evaluate(coco, p, {2: 9})
    with pytest.raises(ValueError, match="not in the ground truth"):
        coco_evaluate(coco, [dict(p[0], image_id=99)], CATS)
    p[0]["masks"] = p[0]["masks"][..., :100]
    with pytest.raises(ValueError, match="original image size"):
        coco_evaluate(coco, p, CATS)
    assert contiguous_label_map(coco) == {1: 7, 2: 9}
