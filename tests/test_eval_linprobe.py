"""Linear probes: the fast sweep learns a linearly separable set, reports a full grid; the MAE
probe learns from a frozen model's features; LARS grouping; feature extraction and pooling."""
import numpy as np
import pytest
import torch
from PIL import Image

from fdistill import create_student
from fdistill.data import build_classification_dataset, distill_transform, eval_transform
from fdistill.eval.features import FeatureSet, extract_features, pool_tokens
from fdistill.eval.linear_probe import (LinearProbeHead, available_features, lars_param_groups, linear_probe,
                                        linear_probe_sweep)
from fdistill.models.loading import StudentAdapter
from fdistill.teachers.base import TeacherTokens


def _separable(n_per_class, seed, dim=12):
    g = torch.Generator().manual_seed(seed)
    w = torch.eye(dim)[:3] * 4.0  # class c lies along axis c
    x = torch.cat([w[c] + 0.5 * torch.randn(n_per_class, dim, generator=g) for c in range(3)])
    y = torch.arange(3).repeat_interleave(n_per_class)
    noise = torch.randn(3 * n_per_class, dim, generator=g)  # a feature carrying no label information
    return FeatureSet({"good": x, "noise": noise}, y, ["a", "b", "c"])


def test_sweep_learns_separable_features_and_reports_the_grid():
    tr, va = _separable(60, 0), _separable(20, 1)
    res = linear_probe_sweep(tr, va, lrs=[0.01, 0.1], epochs=30, batch_size=32, warmup_epochs=2, progress=False)
    assert len(res["grid"]) == 4 and {(c["feature"], c["lr"]) for c in res["grid"]} == \
        {("good", 0.01), ("good", 0.1), ("noise", 0.01), ("noise", 0.1)}
    assert res["feature"] == "good" and res["top1"] == 100.0
    noise = [c["top1"] for c in res["grid"] if c["feature"] == "noise"]
    assert max(noise) < 60.0  # 3 classes: noise features stay near chance (33%)
    assert res["best"]["top1"] == max(c["top1"] for c in res["grid"])
    with pytest.raises(ValueError, match="train features"):
        linear_probe_sweep(tr, FeatureSet({"good": va.feats["good"]}, va.labels), lrs=[0.1], progress=False)


def test_probe_head_and_lars_groups():
    h = LinearProbeHead(8, 3)
    assert not h.bn.affine and h.bn.eps == 1e-6 and h.fc.bias.abs().sum() == 0
    groups = lars_param_groups(h, weight_decay=0.1, lr_scale=2.0)
    assert [len(g["params"]) for g in groups] == [1, 1]
    assert groups[0]["always_adapt"] and groups[0]["weight_decay"] == 0.1 and groups[0]["params"][0] is h.fc.weight
    assert not groups[1]["always_adapt"] and groups[1]["weight_decay"] == 0.0
    assert all(g["lr_scale"] == 2.0 for g in groups)


def test_pooling_by_hand():
    prefix = torch.tensor([[[1.0, 2.0]]])
    patches = torch.tensor([[[0.0, 4.0], [2.0, 0.0]]])
    t = TeacherTokens(prefix, patches, (1, 2))
    assert pool_tokens(t, "cls").tolist() == [[1.0, 2.0]]
    assert pool_tokens(t, "avg").tolist() == [[1.0, 2.0]]
    assert pool_tokens(t, "cls+avg").tolist() == [[1.0, 2.0, 1.0, 2.0]]
    with pytest.raises(Exception, match="no \\[CLS\\]"):
        pool_tokens(TeacherTokens(None, patches, (1, 2)), "cls")


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("lp")
    rng = np.random.default_rng(0)
    for split, n in (("train", 48), ("val", 16)):
        for name, rgb in {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 70, 220)}.items():
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                img = np.asarray(rgb, np.float32) + rng.integers(-40, 41, (32, 32, 3))
                Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / split / name / f"{i}.png")
    return root


def _student():
    torch.manual_seed(0)
    return StudentAdapter(create_student("vit_tiny", img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2),
                          name="s")


def test_extract_features_and_last_blocks(colour_data):
    a = _student()
    ds = build_classification_dataset(colour_data, "val", eval_transform(32))
    fs = extract_features(a, torch.utils.data.DataLoader(ds, batch_size=20), features=["cls", "avg", "last2"],
                          progress=False)
    assert len(fs) == 48 and fs.classes == ["blue", "green", "red"]
    assert fs.feats["cls"].shape == (48, 32) and fs.feats["last2"].shape == (48, 64)
    # the last block's [CLS] (through the final norm) is the model's own [CLS] output
    assert torch.allclose(fs.feats["last2"][:, 32:], fs.feats["cls"], atol=1e-5)
    assert available_features(a, ["auto", "cls", "avg"]) == ["cls", "avg"]


def test_mae_linear_probe_on_a_frozen_random_model(colour_data):
    # colour is linearly readable even from a random ViT's features
    a = _student()
    tr = build_classification_dataset(colour_data, "train", distill_transform(32, scale=(0.5, 1.0)))
    va = build_classification_dataset(colour_data, "val", eval_transform(32))
    before = {k: v.clone() for k, v in a.state_dict().items()}
    # MAE's own peak lr (0.1 x 16384 / 256): LARS moves a weight by ~lr x 0.001 of its norm per step
    res = linear_probe(a, tr, va, feature="auto", epochs=30, warmup_epochs=3, lr=6.4, batch_size=32, num_workers=0,
                       progress=False)
    assert res["feature"] == "cls" and res["top1"] > 80.0  # 3 classes: chance is 33%
    assert res["steps"] == 30 * (144 // 32)
    assert all(torch.equal(before[k], v) for k, v in a.state_dict().items())  # the model stayed frozen


def test_available_features_skip_what_a_model_lacks(tiny_vit_teacher):
    from fdistill import create_teacher
    from tests.conftest import REPO

    assert available_features(tiny_vit_teacher, ["auto", "last2", "last4"]) == ["cls", "last2"]  # 2 blocks
    cnn = create_teacher(f"python:{REPO / 'examples' / 'cifar_resnet.py'}:resnet20", pretrained=False, img_size=32,
                         feature_method="forward_features")
    assert available_features(cnn, ["auto", "cls", "cls+avg", "avg", "last4"]) == ["avg", "last4"]  # 9 blocks
    with pytest.raises(Exception, match="none of the features"):
        available_features(cnn, ["cls"])


def test_mae_linear_probe_stops_and_resumes_exactly(colour_data, tmp_path):
    """The probe runs on the training engine: a stop mid-run (as SIGTERM) checkpoints the head,
    LARS state, RNG and sampler position, and the resumed probe ends with the same head and
    accuracy as one that never stopped; another model in the same folder is refused."""
    from fdistill.engine.checkpoint import list_checkpoints, load_checkpoint
    from fdistill.engine.errors import RunError

    tr = build_classification_dataset(colour_data, "train", distill_transform(32, scale=(0.5, 1.0)))
    va = build_classification_dataset(colour_data, "val", eval_transform(32))
    kw = dict(feature="auto", epochs=4, warmup_epochs=1, lr=6.4, batch_size=32, num_workers=0, progress=False)
    full = linear_probe(_student(), tr, va, output_dir=tmp_path / "a", **kw)
    part = linear_probe(_student(), tr, va, output_dir=tmp_path / "b", on_step=lambda s: s == 6, **kw)
    assert part["stopped_early"] and part["steps"] == 6
    rest = linear_probe(_student(), tr, va, output_dir=tmp_path / "b", **kw)
    assert rest["steps"] == full["steps"] == 16 and rest["top1"] == full["top1"]
    head = lambda d: load_checkpoint(list_checkpoints(d)[-1], task="linprobe")["model"]["model"]  # noqa: E731
    ref, got = head(tmp_path / "a"), head(tmp_path / "b")
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    other = _student()
    other.name = "another-model"
    with pytest.raises(RunError, match="another recipe"):
        linear_probe(other, tr, va, output_dir=tmp_path / "b", **kw)
