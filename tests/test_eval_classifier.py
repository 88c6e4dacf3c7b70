"""Classifiers for fine-tuning: the FD student becomes a per-layer-RPB timm Beit with identical
token outputs; timm and generic adapters get heads; a saved classifier rebuilds with the same
logits (load_classifier)."""
from pathlib import Path

import pytest
import torch

from fdistill import create_student, create_teacher
from fdistill.eval.classifier import (AdapterClassifier, beit_from_student, build_classifier, load_classifier,
                                      save_classifier_spec)
from fdistill.models.loading import StudentAdapter
from fdistill.weights import WeightsError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _student(pos_embed):
    s = create_student("vit_tiny", img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, pos_embed=pos_embed)
    with torch.no_grad():  # a random, non-zero bias table so that copying it wrongly would show
        for n, p in s.named_parameters():
            if "relative_position_bias_table" in n:
                p.normal_()
    return s.eval()


@pytest.mark.parametrize("pos_embed", ["shared_rpb", "rpb", "ape"])
def test_shared_to_per_layer_bias_keeps_token_outputs(pos_embed):
    s = _student(pos_embed)
    x = torch.randn(3, 3, 32, 32)
    ref = s.forward_tokens(x)  # (B, 1+N, C) after the student's final norm
    m, args = beit_from_student(s, num_classes=7, global_pool="avg", drop_path_rate=0.2)
    m.eval()
    assert args["use_rel_pos_bias"] and not args["use_shared_rel_pos_bias"] and m.rel_pos_bias is None
    # mean pooling: the final norm is an identity, the blocks' output must equal the student's pre-norm map
    assert torch.allclose(s.norm(m.forward_features(x)), ref, atol=1e-6)
    if pos_embed == "shared_rpb":
        for blk in m.blocks:
            assert torch.equal(blk.attn.relative_position_bias_table, s.rel_pos_bias.relative_position_bias_table)
    # [CLS] pooling keeps the student's final norm: forward_features is the student's token map
    mt, _ = beit_from_student(s, num_classes=7, global_pool="token", drop_path_rate=0.0)
    assert torch.allclose(mt.eval().forward_features(x), ref, atol=1e-6)
    # the head starts tiny and the logits have the right shape
    assert m(x).shape == (3, 7) and m.head.weight.abs().max() < 1e-3
    # drop path follows the recipe (linear up to the rate in the last block)
    assert m.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)


def test_beit_kwargs_rebuild_the_network():
    from timm.models.beit import Beit

    m, args = beit_from_student(_student("shared_rpb"), num_classes=4)
    again = Beit(**args)
    again.load_state_dict(m.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(again.eval()(x), m.eval()(x))


def _save(model, spec, classes, out: Path):
    from fdistill.weights import save_model_weights

    save_classifier_spec(spec, classes, out)
    save_model_weights(model, out / "model_best.safetensors")


def test_load_classifier_round_trip_student_and_timm(tmp_path, tiny_vit_teacher):
    x = torch.randn(2, 3, 32, 32)
    for name, adapter, source in [
        ("student", StudentAdapter(_student("shared_rpb"), name="s"), None),
        ("timm", tiny_vit_teacher, {"spec": "timm:vit_tiny_patch16_224",
                                    "kwargs": dict(pretrained=False, img_size=32, patch_size=8, depth=2,
                                                   embed_dim=48, num_heads=3)}),
        # without the loading kwargs: timm's own record of the model's arguments rebuilds it
        ("timm_no_source", create_teacher("timm:vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                                          depth=2, embed_dim=48, num_heads=3), None),
    ]:
        model, spec = build_classifier(adapter, 3, global_pool="avg", drop_path_rate=0.1, source=source)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))  # "trained" weights
        _save(model, spec, ["a", "b", "c"], tmp_path / name)
        loaded = load_classifier(tmp_path / name)
        assert loaded.classes == ["a", "b", "c"] and loaded.img_size == (32, 32)
        assert loaded.mean == tuple(adapter.mean) and loaded.std == tuple(adapter.std)
        assert torch.allclose(loaded.model(x), model.eval()(x), atol=1e-6), name
        assert spec["kind"] == ("beit" if name == "student" else "timm")
        assert isinstance(loaded.model, type(model))


def test_generic_adapter_classifier(tmp_path):
    kwargs = dict(pretrained=False, img_size=32, feature_method="forward_features")
    spec_str = f"python:{EXAMPLES / 'cifar_resnet.py'}:resnet20"
    adapter = create_teacher(spec_str, **kwargs)
    model, spec = build_classifier(adapter, 5, global_pool="avg", drop_path_rate=0.0,
                                   source={"spec": spec_str, "kwargs": kwargs})
    assert isinstance(model, AdapterClassifier) and spec["kind"] == "adapter"
    assert all(p.requires_grad for p in model.parameters())
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 5)
    with pytest.raises(Exception, match="no prefix token"):
        build_classifier(create_teacher(spec_str, **kwargs), 5, global_pool="token")
    _save(model.eval(), spec, list("abcde"), tmp_path / "g")
    from fdistill.teachers.trust import UntrustedSpecError

    with pytest.raises(UntrustedSpecError):  # a recorded python: spec runs code: only when trusted
        load_classifier(tmp_path / "g")
    loaded = load_classifier(tmp_path / "g", trust_recorded_spec=True)
    assert torch.allclose(loaded.model(x), model(x), atol=1e-6)


def test_load_classifier_errors(tmp_path):
    with pytest.raises(WeightsError, match="no classifier.json"):
        load_classifier(tmp_path)
    save_classifier_spec({"kind": "beit", "num_classes": 2, "global_pool": "avg", "mean": [0] * 3, "std": [1] * 3,
                          "img_size": [32, 32], "args": {}}, ["a", "b"], tmp_path)
    with pytest.raises(WeightsError, match="model_best.safetensors or model_last"):
        load_classifier(tmp_path)


def test_timm_backbone_student_is_fine_tuned_as_timm(tmp_path):
    # an FD student that is a timm backbone (student.arch: timm:<model>, e.g. a Swin) keeps its architecture
    from fdistill.models.timm_student import create_timm_student

    s = create_timm_student("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3)
    adapter = StudentAdapter(s, name="timm-student")
    model, spec = build_classifier(adapter, 4, global_pool="avg", drop_path_rate=0.1)
    assert spec["kind"] == "timm" and spec["name"] == "vit_tiny_patch16_224" and model is s.timm_model()
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 4)
    _save(model.eval(), spec, list("abcd"), tmp_path)
    assert torch.allclose(load_classifier(tmp_path).model(x), model(x), atol=1e-6)
