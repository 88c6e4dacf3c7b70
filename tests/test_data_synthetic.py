"""SyntheticShapes: determinism, splits, balance, mask/box/caption consistency with the pixels."""
from __future__ import annotations

import math

import numpy as np
import pytest

from fdistill.data import DataError, SyntheticShapes
from fdistill.data.synthetic import COLOURS, SHAPE_FUNCS, SHAPES, ObjectSpec, SceneSpec


def _pixels(ds, i):
    return np.asarray(ds.sample(i)["image"])


def _erode(mask):
    """True where the 3x3 neighbourhood is all True (pixels fully inside the object)."""
    p = np.pad(mask, 1, constant_values=False)
    h, w = mask.shape
    out = np.ones_like(mask)
    for dy in range(3):
        for dx in range(3):
            out &= p[dy:dy + h, dx:dx + w]
    return out


def test_deterministic_per_seed_split_index():
    a, b = SyntheticShapes(50, 32, seed=3), SyntheticShapes(50, 32, seed=3)
    for i in (0, 7, 49):
        assert np.array_equal(_pixels(a, i), _pixels(b, i))
        assert a.caption(i) == b.caption(i) == a.sample(i)["caption"]
    c = SyntheticShapes(50, 32, seed=4)
    assert sum(np.array_equal(_pixels(a, i), _pixels(c, i)) for i in range(10)) == 0
    assert sum(a.caption(i) == c.caption(i) for i in range(10)) < 3
    # random access order does not matter (no hidden state)
    fresh = SyntheticShapes(50, 32, seed=3)
    _ = fresh.sample(30)
    assert np.array_equal(_pixels(fresh, 7), _pixels(a, 7))


def test_train_and_val_differ():
    tr, va = SyntheticShapes(40, 32, split="train"), SyntheticShapes(40, 32, split="val")
    tr_px = {_pixels(tr, i).tobytes() for i in range(40)}
    assert not any(_pixels(va, i).tobytes() in tr_px for i in range(40))


def test_class_balance_and_labels():
    ds = SyntheticShapes(103, 32)
    labels = [ds[i][1] for i in range(len(ds))]
    counts = np.bincount(labels, minlength=len(SHAPES))
    assert len(ds.classes) >= 10 and counts.max() - counts.min() <= 1 and counts.sum() == 103
    assert all(ds.sample(i)["attributes"]["shape"] == ds.classes[labels[i]] for i in range(20))


def test_attributes_vary_independently_of_class():
    ds = SyntheticShapes(400, 32)
    by_class = {}
    for i in range(400):
        a = ds.sample(i)["attributes"]
        by_class.setdefault(a["shape"], []).append(a)
    for attrs in by_class.values():  # every class shows many colours, textures and backgrounds
        assert len({a["colour"] for a in attrs}) >= 6
        assert len({a["texture"] for a in attrs}) == 4
        assert len({a["background"] for a in attrs}) == 4
        assert len({a["size"] for a in attrs}) == 3
    assert sum(len(a["distractors"]) > 0 for attrs in by_class.values() for a in attrs) > 100


@pytest.mark.parametrize("size", [32, 64])
def test_mask_and_boxes_consistent_with_pixels(size):
    ds = SyntheticShapes(60, size)
    checked = 0
    for i in range(60):
        s = ds.sample(i)
        img, mask, a = np.asarray(s["image"]).astype(int), s["mask"], s["attributes"]
        assert mask.dtype == np.uint8 and mask.shape == (size, size)
        ids = sorted(set(np.unique(mask).tolist()) - {0})
        assert ids == list(range(1, 2 + len(a["distractors"])))  # every object visible, nothing else
        assert len(s["boxes"]) == len(s["box_labels"]) == len(ids)
        assert s["box_labels"][0] == s["label"]
        for k, (x0, y0, x1, y1) in enumerate(s["boxes"]):
            obj = mask == k + 1
            inside = np.zeros_like(obj)
            inside[y0:y1, x0:x1] = True
            assert obj[inside].any() and not obj[~inside].any()  # box encloses the mask ...
            assert obj[y0].any() and obj[y1 - 1].any() and obj[:, x0].any() and obj[:, x1 - 1].any()  # ... tightly
        if a["texture"] == "solid":  # interior pixels carry exactly the object's colour
            core = _erode(mask == 1)
            if core.any():
                assert np.abs(img[core] - np.asarray(a["rgb"])).max() <= 1
                checked += 1
        # the main object's area matches its shape's area at its radius (mask = coverage >= 1/2)
        area = (mask == 1).sum()
        assert 0.25 * math.pi * a["radius"] ** 2 < area < math.pi * (a["radius"] + 1) ** 2
    assert checked >= 5


def test_shapes_fit_the_unit_disk_and_differ():
    g = np.linspace(-1.1, 1.1, 221, dtype=np.float32)
    u, v = np.meshgrid(g, g)
    masks = {}
    for name, f in SHAPE_FUNCS.items():
        m = f(u, v)
        assert m.any() and (np.hypot(u[m], v[m]) <= 1.0 + 1e-3).all(), name
        masks[name] = m
    names = list(masks)
    for i, p in enumerate(names):  # no two classes are the same silhouette
        for q in names[i + 1:]:
            iou = (masks[p] & masks[q]).sum() / (masks[p] | masks[q]).sum()
            assert iou < 0.9, (p, q, iou)


def test_caption_mentions_class_colour_and_texture():
    ds = SyntheticShapes(50, 32)
    words = {"striped": "striped", "dotted": "dotted", "checkered": "checkered"}
    for i in range(50):
        s = ds.sample(i)
        a, cap = s["attributes"], s["caption"]
        assert a["shape"] in cap and a["colour"] in cap and a["size"] in cap and a["position"] in cap
        if a["texture"] in words:
            assert words[a["texture"]] in cap
        assert a["background"] in cap.lower()


def test_caption_golden():
    """A hand-built scene renders the caption this exact way."""
    ds = SyntheticShapes(1, 32)
    obj = ObjectSpec("triangle", 6.0, 6.0, 6.0, 0.0, "red", COLOURS["red"], "striped", 3.0, 0.0)
    sc = SceneSpec(32, 2, obj, [], "noisy", ((0, 0, 0), (0, 0, 0)), 0.0, 4.0, 0, template=0)
    assert ds._caption(sc) == "a small red striped triangle in the top left on a noisy background"


def test_transform_and_errors():
    ds = SyntheticShapes(5, 32, transform=lambda im: np.asarray(im).shape)
    assert ds[0] == ((32, 32, 3), 0)
    with pytest.raises(IndexError):
        ds.sample(5)
    with pytest.raises(DataError):
        SyntheticShapes(10, 32, split="test")
    with pytest.raises(DataError):
        SyntheticShapes(0, 32)


def test_colour_statistics_do_not_predict_the_class():
    """Only shape carries the label: a linear model on colour histograms stays near chance (10%)."""
    ds_tr, ds_va = SyntheticShapes(2000, 32, split="train"), SyntheticShapes(500, 32, split="val")

    def feats(ds):
        x = np.stack([np.asarray(ds.load(i)[0]) for i in range(len(ds))]) // 64  # 4 levels per channel
        idx = (x[..., 0] * 16 + x[..., 1] * 4 + x[..., 2]).reshape(len(ds), -1)
        h = np.stack([np.bincount(r, minlength=64) for r in idx]) / idx.shape[1]
        return np.concatenate([h, np.ones((len(ds), 1))], 1), np.arange(len(ds)) % 10

    xtr, ytr = feats(ds_tr)
    xva, yva = feats(ds_va)
    onehot = np.eye(10)[ytr]
    w = np.linalg.solve(xtr.T @ xtr + 1e-2 * np.eye(xtr.shape[1]), xtr.T @ onehot)  # ridge regression
    train_acc = ((xtr @ w).argmax(1) == ytr).mean()
    val_acc = ((xva @ w).argmax(1) == yva).mean()
    assert val_acc < 0.17, val_acc
    assert train_acc < 0.3  # not even memorisable from colour


# ----------------------------------------------------------------------------- depth (added with the depth benchmark)

#: sha256 of image + mask bytes + repr((boxes, box_labels, caption, label)), recorded with the renderer
#: as it was *before* depth was added: adding depth must not move a single pixel, box or word
_GOLDEN = {
    (32, 0, "train", 0): "6e411fe2724499f13539b13d5ae4fe73202763fbb58655e0231df76d0bb8be5c",
    (32, 0, "train", 7): "f005c4775e3369878f617593e80b36f77e69f199d65844f82429047a9018fb0c",
    (32, 0, "train", 13): "0abbd98e4f46d3b8caace47cb608ae93d7e2d21e08517eb350204059bd2b73b4",
    (64, 3, "val", 0): "0ba5f1a1f6cae70c91be7a6ce9bf4b46f247c0b5efa7496926dcc99645a39e92",
    (64, 3, "val", 7): "6e42b98d825d1e07d779da88340b6ee66bfb8b50c684c13145f8416b2ab85ea1",
    (64, 3, "val", 13): "092282d67958c218cbe847b9bead2568c5bf0b5b84b0f0949e52dd44376b217e",
}


def test_existing_outputs_unchanged_by_depth():
    import hashlib

    for (size, seed, split, i), want in _GOLDEN.items():
        s = SyntheticShapes(20, size, seed=seed, split=split).sample(i)
        blob = (np.asarray(s["image"]).tobytes() + s["mask"].tobytes()
                + repr((s["boxes"], s["box_labels"], s["caption"], s["label"])).encode())
        assert hashlib.sha256(blob).hexdigest() == want, (size, seed, split, i)


def test_depth_deterministic_and_in_range():
    a, b = SyntheticShapes(30, 32, seed=5), SyntheticShapes(30, 32, seed=5)
    for i in (0, 11, 29):
        d = a.sample(i)["depth"]
        assert d.dtype == np.float32 and d.shape == (32, 32)
        assert np.array_equal(d, b.depth(i)) and np.array_equal(d, a.depth(i))
        assert 1.3 < d.min() and d.max() <= 8.0
    c = SyntheticShapes(30, 32, seed=6)
    assert not np.array_equal(a.depth(3), c.depth(3))


def test_ground_plane_golden():
    """Inverse depth linear in the row: 8 m (1/8) at the top, 2 m (1/2) at the bottom. With 17 rows
    the middle row (t = 1/2) has inverse depth 1/8 + (1/2)(3/8) = 5/16, i.e. 3.2 m."""
    g = SyntheticShapes(1, 17).ground_depth()
    assert g.dtype == np.float32 and g[0] == 8.0 and g[16] == 2.0 and g[8] == np.float32(3.2)
    assert (np.diff(g) < 0).all()  # strictly nearer row by row going down


def test_object_depths_golden():
    """A hand-built scene: a distractor (cy 26, r 3) drawn first, the main object (cy 10, r 4) last.
    On 32 rows the ground at row y is 31 / (0.125 * 31 + 0.375 y). The main object's row below is
    int(10 + 4) + 1 = 15: ground 31 / 9.5, x 0.95 = 3.1 m; the distractor's row 30: 31 / 15.125 x 0.95.
    The main object is drawn later, so it is pulled to 0.9 x the distractor's depth."""
    ds = SyntheticShapes(1, 32)
    mk = lambda cx, cy, r: ObjectSpec("square", cx, cy, r, 0.0, "red", COLOURS["red"], "solid", 3.0, 0.0)
    alone = SceneSpec(32, 1, mk(16.0, 10.0, 4.0), [], "plain", ((0, 0, 0), (0, 0, 0)), 0.0, 4.0, 0, template=0)
    assert ds.object_depths(alone) == pytest.approx([3.1], rel=1e-6)
    dist = 0.95 * 31 / 15.125
    sc = SceneSpec(32, 1, mk(16.0, 10.0, 4.0), [mk(8.0, 26.0, 3.0)], "plain", ((0, 0, 0), (0, 0, 0)), 0.0, 4.0, 0,
                   template=0)
    assert ds.object_depths(sc) == pytest.approx([0.9 * dist, dist], rel=1e-6)
    _, mask = ds.render(sc)
    depth = ds.render_depth(sc, mask)
    assert np.allclose(depth[mask == 1], 0.9 * dist) and np.allclose(depth[mask == 2], dist)
    rows = np.nonzero(mask == 0)[0]
    assert np.array_equal(depth[mask == 0], ds.ground_depth()[rows])


def _dilate(mask):
    p = np.pad(mask, 1, constant_values=False)
    h, w = mask.shape
    out = np.zeros_like(mask)
    for dy in range(3):
        for dx in range(3):
            out |= p[dy:dy + h, dx:dx + w]
    return out


@pytest.mark.parametrize("size", [16, 32, 64])
def test_depth_follows_mask_and_drawing_order(size):
    ds = SyntheticShapes(80, size, seed=2)
    multi = 0
    for i in range(80):
        s = ds.sample(i)
        d, mask = s["depth"], s["mask"]
        ground = ds.ground_depth()
        bg = mask == 0
        ys = np.nonzero(bg)[0]
        assert np.array_equal(d[bg], ground[ys])  # background = the ground plane, row by row
        n = 1 + len(s["attributes"]["distractors"])
        per_object = []
        for k in range(1, n + 1):
            obj = mask == k
            vals = np.unique(d[obj])
            assert len(vals) == 1  # one depth per object
            per_object.append(float(vals[0]))
            # nearer than the ground it covers and than every background pixel around it
            rows = np.nonzero(obj)[0]
            assert (vals[0] < ground[rows]).all()
            ring = _dilate(obj) & bg
            assert (vals[0] < d[ring]).all()
        # drawing order: distractors 2, 3, ... first, then the main object (1): each later one nearer
        drawn = per_object[1:] + per_object[:1]
        assert all(later < earlier for j, later in enumerate(drawn) for earlier in drawn[:j])
        assert per_object[0] == min(per_object)
        multi += n > 1
    assert multi > 10
