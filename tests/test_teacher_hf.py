"""``hf:`` teachers against transformers' own forward, on tiny models saved with save_pretrained."""
import time

import pytest
import torch
from transformers import (CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, Dinov2Config, Dinov2Model,
                          Dinov2WithRegistersConfig, Dinov2WithRegistersModel, SiglipVisionConfig, SiglipVisionModel,
                          ViTConfig, ViTModel)

from fdistill import FeatureDistiller, create_teacher
from fdistill.teachers import TeacherError
from tests.conftest import tiny_hf_clip_folder

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
             patch_size=8)
FAMILIES = {
    # name: (config, model, prefix tokens, mean when no preprocessor config, last_hidden_state already normed)
    "clip": (CLIPVisionConfig, CLIPVisionModel, 1, (0.48145466, 0.4578275, 0.40821073), False),
    "dinov2": (Dinov2Config, Dinov2Model, 1, (0.485, 0.456, 0.406), True),
    "vit": (ViTConfig, ViTModel, 1, (0.5, 0.5, 0.5), True),
    "siglip": (SiglipVisionConfig, SiglipVisionModel, 0, (0.5, 0.5, 0.5), True),
}


def save_tiny(tmp_path, family, **cfg):
    C, M = FAMILIES[family][:2]
    model = M(C(**{**SMALL, **cfg})).eval()
    folder = tmp_path / family
    model.save_pretrained(folder)
    return model, folder


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tokens_match_the_library_forward(tmp_path, family):
    _, _, P, mean, normed = FAMILIES[family]
    ref, folder = save_tiny(tmp_path, family)
    t = create_teacher(f"hf:{folder}")
    x = torch.randn(2, 3, 32, 32)
    out = t.forward_tokens(x)
    lib = ref(pixel_values=x, output_hidden_states=True)
    assert out.grid == (4, 4) and out.patches.shape == (2, 16, 32) and t.num_prefix_tokens == P
    assert (out.prefix is None) == (P == 0)
    assert t.embed_dim == 32 and t.patch_size == 8 and t.img_size == (32, 32) and t.mean == mean
    assert t.tokens_normed == normed
    # after the final norm: CLIP normalises only its pooled [CLS]; the others return normed tokens
    after = lib.last_hidden_state if normed else ref.post_layernorm(lib.last_hidden_state)
    assert torch.allclose(out.full(), after, atol=1e-5)
    # before it: the last block's output, i.e. transformers' hidden_states[-1]
    before = create_teacher(f"hf:{folder}", after_norm=False).forward_tokens(x)
    assert torch.allclose(before.full(), lib.hidden_states[-1], atol=1e-5)
    assert not torch.allclose(before.full(), out.full(), atol=1e-3)


def test_register_tokens_are_prefix(tmp_path):
    model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**SMALL, num_register_tokens=4)).eval()
    model.save_pretrained(tmp_path / "reg")
    t = create_teacher(f"hf:{tmp_path / 'reg'}")
    x = torch.randn(1, 3, 32, 32)
    out = t.forward_tokens(x)
    assert t.num_prefix_tokens == 5 and out.prefix.shape == (1, 5, 32) and out.grid == (4, 4)
    assert torch.allclose(out.full(), model(pixel_values=x).last_hidden_state, atol=1e-5)


@pytest.mark.parametrize("family", ["clip", "vit", "dinov2"])
def test_other_input_sizes_interpolate_positions(tmp_path, family):
    ref, folder = save_tiny(tmp_path, family)
    t = create_teacher(f"hf:{folder}")
    assert t.dynamic_img_size and t.grid_size(48) == (6, 6)
    x = torch.randn(1, 3, 48, 48)
    kw = {} if family == "dinov2" else dict(interpolate_pos_encoding=True)
    lib = ref(pixel_values=x, **kw).last_hidden_state
    lib = ref.post_layernorm(lib) if family == "clip" else lib
    assert torch.allclose(t.forward_tokens(x).full(), lib, atol=1e-5)


def test_preprocessor_config_gives_mean_std(tmp_path):
    _, folder = save_tiny(tmp_path, "vit")
    CLIPImageProcessor(image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6]).save_pretrained(folder)
    t = create_teacher(f"hf:{folder}")
    assert t.mean == (0.1, 0.2, 0.3) and t.std == (0.4, 0.5, 0.6)
    t = create_teacher(f"hf:{folder}", mean=(0.0,) * 3, std=(1.0,) * 3)
    assert t.mean == (0.0,) * 3


def test_frozen_and_random_init(tmp_path):
    ref, folder = save_tiny(tmp_path, "dinov2")
    t = create_teacher(f"hf:{folder}")
    t.train()
    assert not t.training and not t.model.training and all(not p.requires_grad for p in t.parameters())
    assert all(torch.equal(a, b) for a, b in zip(t.model.state_dict().values(), ref.state_dict().values()))
    r = create_teacher(f"hf:{folder}", pretrained=False)
    assert not torch.equal(r.model.embeddings.cls_token, ref.embeddings.cls_token)


def test_full_clip_model_keeps_text_tower_for_zero_shot(tmp_path):
    model, tok, folder = tiny_hf_clip_folder(tmp_path, "clip-full")
    t = create_teacher(f"hf:{folder}")
    x = torch.randn(2, 3, 32, 32)
    out = t.forward_tokens(x)
    vis = model.vision_model(pixel_values=x).last_hidden_state
    assert torch.allclose(out.full(), model.vision_model.post_layernorm(vis), atol=1e-5)
    img = t.encode_image(x)
    lib = model.get_image_features(pixel_values=x)
    lib = getattr(lib, "pooler_output", lib)
    assert img.shape == (2, 12) and torch.allclose(img, lib, atol=1e-5)
    assert torch.allclose(t.embed_tokens(out), img, atol=1e-5)  # tokens -> CLIP space
    texts = ["a photo of a cat", "a dog"]
    enc = tok(texts, padding="max_length", max_length=24, return_tensors="pt")
    ref = model.get_text_features(input_ids=enc.input_ids, attention_mask=enc.attention_mask)
    ref = getattr(ref, "pooler_output", ref)
    assert torch.allclose(t.encode_text(texts), ref, atol=1e-5)
    # only the vision tower is the adapter's; the text tower follows .to()
    assert all(k.startswith("model.") for k in t.state_dict()) and not any("text" in k for k in t.state_dict())
    t.to(torch.float64)
    assert t.clip_model.text_model.embeddings.token_embedding.weight.dtype == torch.float64


def test_vision_only_model_has_no_text_tower(tmp_path):
    _, folder = save_tiny(tmp_path, "clip")
    t = create_teacher(f"hf:{folder}")
    assert t.clip_model is None
    with pytest.raises(TeacherError, match="no text tower"):
        t.encode_text(["a cat"])


def test_missing_models_give_one_clear_error_fast(tmp_path, monkeypatch):
    import fdistill.teachers.offline as offline
    from huggingface_hub import constants

    # let prefer_offline_when_unreachable() run for real, and undo whatever it switches on
    monkeypatch.setattr(offline, "_HUB_CHECKED", False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", constants.HF_HUB_OFFLINE)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if constants.HF_HUB_OFFLINE else "0")
    t0 = time.perf_counter()
    with pytest.raises(TeacherError) as e:
        create_teacher("hf:fdistill-tests/no-such-model-xyz", cache_dir=str(tmp_path / "cache"))
    assert time.perf_counter() - t0 < 10
    msg = str(e.value)
    assert "hf:fdistill-tests/no-such-model-xyz" in msg and "hf:/path/to/folder" in msg and "\n" not in msg
    with pytest.raises(TeacherError, match="folder not found"):
        create_teacher(f"hf:{tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TeacherError, match="no usable config.json"):
        create_teacher(f"hf:{tmp_path / 'empty'}")


def test_distills_into_a_student(tmp_path, tiny_student):
    _, folder = save_tiny(tmp_path, "siglip")
    t = create_teacher(f"hf:{folder}")  # no [CLS]: the student's [CLS] learns the average patch token
    d = FeatureDistiller(t, tiny_student, cls_target="gap")
    out = d(torch.rand(2, 3, 32, 32))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and all(p.grad is None for p in t.parameters())
