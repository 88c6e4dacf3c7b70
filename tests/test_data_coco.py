"""COCO detection data: synthetic export -> CocoDetection round trip against SyntheticShapes'
own masks and boxes, pycocotools reading the JSON, contiguous labels, crowd / degenerate / empty
handling, one clear DataError per kind of broken input, and DetectionTransform keeping image,
boxes and masks aligned."""
from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest
import torch

from fdistill.data.coco import CocoDetection, DetectionTransform, detection_collate, synthetic_coco
from fdistill.data.errors import DataError
from fdistill.data.synthetic import SHAPES, SyntheticShapes


@pytest.fixture
def exported(tmp_path):
    shapes = SyntheticShapes(12, 32, seed=1)
    ann = synthetic_coco(shapes, tmp_path / "images", tmp_path / "ann" / "instances.json")
    return shapes, tmp_path / "images", ann


def _rewrite(ann, edit):
    data = json.loads(ann.read_text())
    edit(data)
    ann.write_text(json.dumps(data))
    return data


def test_round_trip_equals_the_samples(exported):
    shapes, images, ann = exported
    ds = CocoDetection(images, ann)
    assert len(ds) == 12 and ds.classes == list(SHAPES) and ds.cat_ids == list(range(1, 11))
    total = 0
    for i in range(12):
        s = shapes.sample(i)
        img, t = ds[i]
        assert img.dtype == torch.uint8 and img.shape == (3, 32, 32)
        assert np.array_equal(img.permute(1, 2, 0).numpy(), np.asarray(s["image"]))  # PNG: lossless
        assert t["image_id"] == i + 1 and t["orig_size"] == (32, 32)
        n = len(s["boxes"])
        assert t["boxes"].dtype == torch.float32 and t["boxes"].shape == (n, 4)
        assert t["boxes"].tolist() == [[float(v) for v in b] for b in s["boxes"]]  # xyxy, x1/y1 exclusive
        assert t["labels"].dtype == torch.int64 and t["labels"].tolist() == [c + 1 for c in s["box_labels"]]
        assert t["masks"].dtype == torch.uint8 and t["masks"].shape == (n, 32, 32)
        for k in range(n):
            assert np.array_equal(t["masks"][k].numpy(), (s["mask"] == k + 1).astype(np.uint8))
            assert float(t["area"][k]) == (s["mask"] == k + 1).sum()
        assert t["iscrowd"].tolist() == [0] * n
        total += n
    assert len(ds.coco.getAnnIds()) == total


def test_pycocotools_loads_the_export(exported):
    from pycocotools.coco import COCO

    shapes, _, ann = exported
    coco = COCO(str(ann))
    assert sorted(coco.getImgIds()) == list(range(1, 13))
    assert [coco.cats[c]["name"] for c in sorted(coco.getCatIds())] == list(SHAPES)
    s = shapes.sample(3)
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[4]))
    assert len(anns) == len(s["boxes"])
    for k, a in enumerate(anns):
        x0, y0, x1, y1 = s["boxes"][k]
        assert a["bbox"] == [x0, y0, x1 - x0, y1 - y0] and a["iscrowd"] == 0
        assert np.array_equal(coco.annToMask(a), (s["mask"] == k + 1).astype(np.uint8))
        assert a["category_id"] == s["box_labels"][k] + 1


class _Occluded(SyntheticShapes):
    """Object 2 (when there is one) covered entirely by the main object."""

    def sample(self, index):
        s = super().sample(index)
        s["mask"] = np.where(s["mask"] == 2, 1, s["mask"]).astype(np.uint8)
        return s


def test_fully_occluded_objects_are_skipped(tmp_path):
    shapes = _Occluded(20, 32, seed=0)
    ann = synthetic_coco(shapes, tmp_path / "im", tmp_path / "a.json")
    data = json.loads(ann.read_text())
    visible = sum(len(np.setdiff1d(np.unique(shapes.sample(i)["mask"]), [0])) for i in range(20))
    objects = sum(len(shapes.sample(i)["boxes"]) for i in range(20))
    assert visible < objects  # some objects were hidden
    assert len(data["annotations"]) == visible


def test_contiguous_labels_for_sparse_category_ids(exported):
    _, images, ann = exported

    def edit(d):  # category ids 1..10 -> 5, 10, ..., 50 (reversed names order stays by id)
        for c in d["categories"]:
            c["id"] *= 5
        for a in d["annotations"]:
            a["category_id"] *= 5

    data = _rewrite(ann, edit)
    ds = CocoDetection(images, ann)
    assert ds.cat_ids == list(range(5, 51, 5)) and ds.classes == list(SHAPES)
    _, t = ds[0]
    cats = [a["category_id"] for a in data["annotations"] if a["image_id"] == 1]
    assert t["labels"].tolist() == [c // 5 for c in cats]
    assert [ds.cat_ids[l - 1] for l in t["labels"].tolist()] == cats


def test_crowd_degenerate_and_empty_images(exported):
    shapes, images, ann = exported
    counts = [len(shapes.sample(i)["boxes"]) for i in range(12)]
    assert counts[0] == 1 and counts[2] == 3 and counts[4] == 4  # seed 1's scenes
    shutil.copy(images / "000000.png", images / "empty.png")

    def first(d, image_id):
        return next(a for a in d["annotations"] if a["image_id"] == image_id)

    def edit(d):
        first(d, 1)["iscrowd"] = 1  # image 1's only object
        first(d, 3)["iscrowd"] = 1  # one of image 3's three
        first(d, 5)["bbox"] = [3.0, 4.0, 0.5, 10.0]  # one of image 5's four: degenerate (w < 1)
        d["images"].append({"id": 99, "file_name": "empty.png", "height": 32, "width": 32})

    _rewrite(ann, edit)
    ds = CocoDetection(images, ann)
    assert len(ds) == 13 and ds.ids[-1] == 99  # images without annotations are kept by default
    assert len(ds[0][1]["boxes"]) == 0 and len(ds[2][1]["boxes"]) == 2  # crowd left out of the targets
    assert len(ds[4][1]["boxes"]) == 3  # degenerate box dropped
    assert ds[2][1]["labels"].tolist() == [c + 1 for c in shapes.sample(2)["box_labels"][1:]]
    _, t = ds[12]
    assert t["image_id"] == 99 and t["boxes"].shape == (0, 4) and t["masks"].shape == (0, 32, 32)
    assert t["labels"].shape == (0,) and t["labels"].dtype == torch.int64
    keep = CocoDetection(images, ann, drop_crowd=False)
    assert keep[2][1]["iscrowd"].tolist() == [1, 0, 0] and keep[0][1]["iscrowd"].tolist() == [1]
    # skip_empty (training) drops the unannotated image and the one whose only object is a crowd
    kept = CocoDetection(images, ann, skip_empty=True)
    assert kept.ids == [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    assert CocoDetection(images, ann, skip_empty=True, drop_crowd=False).ids == list(range(1, 13))


def test_missing_annotation_file(tmp_path):
    (tmp_path / "im").mkdir()
    with pytest.raises(DataError, match="does not exist"):
        CocoDetection(tmp_path / "im", tmp_path / "nope.json")


@pytest.mark.parametrize("content, message", [
    ('{"images": [], "annotations": []}', "not a COCO instances file.*no categories"),
    ('[1, 2, 3]', "not a COCO instances file"),
    ('{"images": [', "not a readable JSON"),
])
def test_not_coco(tmp_path, content, message):
    (tmp_path / "im").mkdir()
    (tmp_path / "a.json").write_text(content)
    with pytest.raises(DataError, match=message):
        CocoDetection(tmp_path / "im", tmp_path / "a.json")


def test_unknown_category_ids(exported):
    _, images, ann = exported
    _rewrite(ann, lambda d: d["annotations"][0].update(category_id=77))
    with pytest.raises(DataError, match=r"category ids \[77\] that are not in categories"):
        CocoDetection(images, ann)


def test_images_missing_from_the_folder(exported):
    _, images, ann = exported
    (images / "000003.png").unlink()
    (images / "000007.png").unlink()
    with pytest.raises(DataError, match=r"2 of the 12 images .* missing.*000003\.png.*000007\.png"):
        CocoDetection(images, ann)


def test_no_annotations_at_all(exported):
    _, images, ann = exported
    _rewrite(ann, lambda d: d.update(annotations=[]))
    with pytest.raises(DataError, match="no annotations at all"):
        CocoDetection(images, ann)


def test_image_size_disagreeing_with_the_json(exported):
    _, images, ann = exported
    _rewrite(ann, lambda d: d["images"][0].update(width=40))
    ds = CocoDetection(images, ann)
    with pytest.raises(DataError, match="image is 32x32 but"):
        ds[0]


# ----------------------------------------------------------------------------- transforms

RED = (255, 0, 0)


def _scene(h=32, w=40):
    """Black image with a red L-shaped object (not left-right symmetric), its mask and box."""
    mask = np.zeros((h, w), np.uint8)
    mask[6:22, 5:10] = 1
    mask[17:22, 5:25] = 1
    img = np.zeros((h, w, 3), np.uint8)
    img[mask == 1] = RED
    target = {"boxes": torch.tensor([[5.0, 6.0, 25.0, 22.0]]), "labels": torch.tensor([3]),
              "masks": torch.from_numpy(mask)[None], "iscrowd": torch.tensor([0]), "area": torch.tensor([float(mask.sum())]),
              "image_id": 1}
    return torch.from_numpy(img).permute(2, 0, 1).contiguous(), target


def _mask_box(m):
    ys, xs = np.nonzero(m)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_detection_transform_keeps_boxes_and_masks_on_the_object():
    img, t = _scene()
    tf = pickle.loads(pickle.dumps(DetectionTransform(True, min_size=(64, 96), max_size=1000)))
    flips = set()
    for seed in range(12):
        torch.manual_seed(seed)
        out, o = tf(img, t)
        H, W = out.shape[-2:]
        f = H / 32
        assert f in (2, 3) and W == 40 * f and out.dtype == torch.uint8
        m = o["masks"][0].numpy()
        assert o["masks"].shape == (1, H, W) and o["labels"].tolist() == [3]
        box = o["boxes"][0].tolist()
        assert box == pytest.approx(_mask_box(m))  # integer factors: the box is the mask's box exactly
        assert m.sum() == t["area"].item() * f * f  # nearest: every object pixel became f x f
        px = out.permute(1, 2, 0).numpy().astype(int)
        inner = m.astype(bool)
        inner[1:] &= inner[:-1].copy(); inner[:-1] &= inner[1:].copy()  # away from vertical edges
        inner[:, 1:] &= inner[:, :-1].copy(); inner[:, :-1] &= inner[:, 1:].copy()
        assert (np.abs(px[inner] - RED) <= 2).all()  # the mask still covers the red pixels
        far = np.ones_like(inner)
        ys, xs = np.nonzero(m)
        far[max(0, ys.min() - 2):ys.max() + 3, max(0, xs.min() - 2):xs.max() + 3] = False
        assert (px[far] == 0).all()  # and nothing red outside the box
        flips.add(bool(m[int(18 * f), int(6 * f)] == 0))  # the L's vertical bar is on the left unless flipped
    assert flips == {True, False}


def test_detection_transform_non_integer_scale_and_max_size():
    img, t = _scene(32, 64)
    out, o = DetectionTransform(True, min_size=64, max_size=100, flip=False)(img, t)
    assert out.shape == (3, 50, 100)  # shorter side 64 would make the longer 128 > 100: capped
    assert o["boxes"][0].tolist() == pytest.approx([x * 50 / 32 for x in (5, 6, 25, 22)])
    mb = _mask_box(o["masks"][0].numpy())
    assert all(abs(a - b) <= 1 for a, b in zip(mb, o["boxes"][0].tolist()))
    ev = DetectionTransform(False, min_size=(48, 64), max_size=1333)
    a, b = ev(img, t), ev(img, t)
    assert a[0].shape == (3, 64, 128) and torch.equal(a[0], b[0])  # the largest size, deterministic
    assert DetectionTransform(False)(img, t)[0].shape == (3, 666, 1333)  # 800 x 1600 capped at 1333


def test_detection_transform_drops_emptied_boxes_with_their_fields():
    img, t = _scene()
    t = dict(t)
    t["boxes"] = torch.tensor([[5.0, 6.0, 25.0, 22.0], [30.0, 3.0, 30.0, 9.0]])  # second: zero width
    t["labels"], t["iscrowd"], t["area"] = torch.tensor([3, 4]), torch.tensor([0, 1]), torch.tensor([5.0, 0.0])
    t["masks"] = torch.cat([t["masks"], torch.zeros_like(t["masks"])])
    _, o = DetectionTransform(False, min_size=32)(img, t)
    assert o["boxes"].shape == (1, 4) and o["labels"].tolist() == [3] and o["iscrowd"].tolist() == [0]
    assert o["area"].tolist() == [5.0] and o["masks"].shape == (1, 32, 40)
    assert o["image_id"] == 1


def test_transform_through_the_dataset_and_collate(exported):
    _, images, ann = exported
    ds = CocoDetection(images, ann, DetectionTransform(True, min_size=(64,), max_size=1333))
    batch = [ds[0], ds[1]]
    imgs, targets = detection_collate(batch)
    assert isinstance(imgs, list) and isinstance(targets, list) and len(imgs) == 2
    assert imgs[0].shape == (3, 64, 64) and targets[1]["masks"].shape[-2:] == (64, 64)
    for t in targets:
        for k, box in enumerate(t["boxes"].tolist()):
            assert box == pytest.approx(_mask_box(t["masks"][k].numpy()))


def test_detection_transform_without_resize_only_flips():
    """min_size=None (fdistill detect: the detector resizes): sizes kept, a flip mirrors image,
    boxes and masks together; evaluation returns the input unchanged."""
    img, t = _scene()
    tf = DetectionTransform(True, min_size=None)
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        out, o = tf(img, t)
        assert out.shape == img.shape and o["masks"].shape == t["masks"].shape
        flipped = not torch.equal(out, img)
        seen.add(flipped)
        if flipped:
            assert torch.equal(out, img.flip(-1)) and torch.equal(o["masks"], t["masks"].flip(-1))
            assert o["boxes"][0].tolist() == [40 - 25.0, 6.0, 40 - 5.0, 22.0]
        else:
            assert torch.equal(o["boxes"], t["boxes"]) and torch.equal(o["masks"], t["masks"])
    assert seen == {True, False}
    out, o = DetectionTransform(False, min_size=None)(img, t)
    assert torch.equal(out, img) and torch.equal(o["boxes"], t["boxes"]) and torch.equal(o["masks"], t["masks"])
