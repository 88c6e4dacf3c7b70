"""The one backbone interface and the one classifier over it (issue 12): every model fdistill
loads is a ``fdistill.Backbone`` with timm's ``forward_features`` / ``forward_head``; a teacher is
a backbone used frozen; ``Classifier`` is the only head-over-a-backbone module."""
import ast
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import fdistill
from fdistill import create_student, create_teacher
from fdistill.backbone import Backbone, TokenMap
from fdistill.eval.classifier import AdapterClassifier, Classifier, build_classifier
from fdistill.eval.features import pool_tokens
from fdistill.models.loading import StudentAdapter, StudentBackbone, load_model
from fdistill.teachers import Teacher, TeacherTokens

PKG = Path(fdistill.__file__).resolve().parent


def _vit():
    return create_teacher("timm:vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                          embed_dim=48, num_heads=2)


GRID = """
import torch.nn as nn

class Grid(nn.Module):
    # (B, 3, 32, 32) -> (B, 16, 8, 8): a backbone without prefix tokens
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 4, stride=4)

    def forward(self, x):
        return self.conv(x)

def build():
    return Grid()
"""


def _cnn(tmp_path):
    f = tmp_path / "grid.py"
    f.write_text(GRID)
    return create_teacher(f"python:{f}:build", img_size=32)


def test_the_old_names_are_the_one_classes():
    assert Teacher is Backbone and TeacherTokens is TokenMap
    assert StudentAdapter is StudentBackbone and AdapterClassifier is Classifier
    assert fdistill.Backbone is Backbone and fdistill.load_model is load_model


def test_timm_contract_matches_timm_itself():
    t = _vit()
    x = t.normalize(torch.rand(3, 3, 32, 32))
    tok = t.forward_tokens(x)
    feats = t.forward_features(x)  # (B, 1 + 16, C)
    assert feats.shape == (3, 17, 48) and torch.equal(feats, tok.full()) and torch.equal(t(x), feats)
    # oracle: the same timm network with no classifier and [CLS] pooling pools the same way
    m = t.model
    m.reset_classifier(0, "token")
    assert t.global_pool == "token"
    torch.testing.assert_close(t.forward_head(feats), m.forward_head(m.forward_features(x)), rtol=0, atol=0)
    assert torch.equal(t.forward_head(feats, pre_logits=True), tok.prefix[:, 0])


def test_backbone_without_prefix_pools_the_mean_patch(tmp_path):
    c = _cnn(tmp_path)
    assert c.num_prefix_tokens == 0 and c.global_pool == "avg"
    x = torch.rand(2, 3, 32, 32)
    feats = c.forward_features(x)  # (B, 8*8, 16)
    want = c.model.conv(x).flatten(2).mean(dim=2)  # by hand: the mean over the 8x8 map
    torch.testing.assert_close(c.forward_head(feats), want, rtol=1e-6, atol=1e-6)


def test_a_backbone_is_frozen_unless_asked():
    t = _vit()
    assert t.frozen and not any(p.requires_grad for p in t.parameters())
    t.train()
    assert not t.training  # a frozen backbone stays in eval mode
    t.unfreeze().train()
    assert t.training and all(p.requires_grad for p in t.parameters())
    t.freeze()
    assert t.frozen and not t.training and not any(p.requires_grad for p in t.parameters())


@pytest.mark.parametrize("pool", ["avg", "token"])
def test_classifier_follows_timms_contract(pool):
    t = _vit()
    clf = Classifier(t, 5, pool).eval()
    with torch.no_grad():
        clf.head.weight.normal_()
    x = t.normalize(torch.rand(2, 3, 32, 32))
    tok = t.forward_tokens(x)
    # by hand: avg = LayerNorm(mean of the patch tokens), token = the [CLS] token as is
    f = nn.functional.layer_norm(tok.patches.mean(1), (48,), clf.fc_norm.weight, clf.fc_norm.bias, 1e-6) \
        if pool == "avg" else tok.prefix[:, 0]
    torch.testing.assert_close(clf.forward_head(clf.forward_features(x), pre_logits=True), f, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(clf(x), clf.head(f), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(clf(x), clf.forward_head(clf.forward_features(x)), rtol=0, atol=0)
    assert isinstance(clf.fc_norm, nn.LayerNorm if pool == "avg" else nn.Identity)
    assert sorted({k.split(".")[0] for k in clf.state_dict()}) == (["backbone", "fc_norm", "head"] if pool == "avg"
                                                                  else ["backbone", "head"])


def test_classifier_with_a_given_head_and_no_norm(tmp_path):
    """The loss landscape's construction: the fitted head on the raw pooled feature."""
    c = _cnn(tmp_path)
    head = nn.Linear(16, 3)
    clf = Classifier(c, 3, "avg", fc_norm=False, head=head)
    assert clf.head is head and isinstance(clf.fc_norm, nn.Identity)
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(clf(x), head(pool_tokens(c.forward_tokens(x), "avg")), rtol=0, atol=0)
    with pytest.raises(fdistill.teachers.TeacherError, match="no prefix token"):
        Classifier(c, 3, "token")


def test_landscape_head_is_the_classifier(tmp_path):
    from fdistill.diagnostics.classifier import linear_probe_classifier

    c = _cnn(tmp_path)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.rand(8, 3, 32, 32, generator=g), torch.arange(8) % 2) for _ in range(2)]
    clf, acc = linear_probe_classifier(c, batches, 2, device="cpu", progress=False)
    assert isinstance(clf, Classifier) and clf.backbone is c and 0.0 <= acc <= 1.0
    x = batches[0][0]
    torch.testing.assert_close(clf(x), clf.head(pool_tokens(c.forward_tokens(x), "avg")), rtol=0, atol=0)


def test_every_loaded_model_is_a_backbone(tmp_path):
    s = create_student("vit_tiny", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    b = StudentBackbone(s, name="student")
    assert isinstance(b, Backbone) and b.global_pool == "token"
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(b.forward_features(x), s.forward_tokens(x))
    model, spec = build_classifier(_vit(), 4, global_pool="avg")  # timm: the timm network itself
    assert spec["kind"] == "timm" and not isinstance(model, Classifier)


def test_no_second_head_over_a_backbone():
    """The wrappers issue 12 folds are gone: no module defines them again."""
    gone = {"ImageClassifier", "BackboneWithHead"}
    aliases = {"AdapterClassifier": "Classifier", "StudentAdapter": "StudentBackbone", "Teacher": "Backbone"}
    found = []
    for f in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ClassDef) and (node.name in gone or node.name in aliases):
                found.append(f"{f.relative_to(PKG)}:{node.name}")
    assert found == []
