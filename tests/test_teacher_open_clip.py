"""``open_clip:`` teachers against open_clip's own forward, on tiny randomly initialised models."""
import json
import time

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from fdistill import FeatureDistiller, create_teacher
from fdistill.teachers import TeacherError
from fdistill.teachers.open_clip_teacher import resolve_tag
from fdistill.weights import WeightsError

TINY = dict(embed_dim=32, vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=32),
            text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1))
OPENAI_MEAN, OPENAI_STD = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD


def tiny(**kw):
    return create_teacher("open_clip:tiny", model_cfg=TINY, pretrained=False, **kw)


def test_vit_tokens_match_open_clip_forward():
    t = tiny()
    v = t.model
    x = torch.randn(2, 3, 32, 32)
    out = t.forward_tokens(x)
    assert out.prefix.shape == (2, 1, 64) and out.patches.shape == (2, 16, 64) and out.grid == (4, 4)
    v.output_tokens = True  # open_clip's own forward: (pooled @ proj, ln_post(tokens)[:, 1:])
    pooled, tokens = v(x)
    v.output_tokens = False
    assert torch.allclose(out.patches, tokens, atol=1e-6)
    assert torch.allclose(out.prefix[:, 0] @ v.proj, pooled, atol=1e-6)  # [CLS] after ln_post
    assert t.embed_dim == 64 and t.patch_size == 8 and t.num_prefix_tokens == 1 and t.img_size == (32, 32)
    assert t.mean == tuple(OPENAI_MEAN) and t.std == tuple(OPENAI_STD)


def test_before_norm_is_the_last_block_output():
    t = tiny(after_norm=False)
    v = t.model
    x = torch.randn(2, 3, 32, 32)
    h = v.transformer(v._embeds(x))  # (B, 1+N, C): no ln_post
    out = t.forward_tokens(x)
    assert torch.allclose(out.full(), h, atol=1e-5)
    t.after_norm = True
    assert torch.allclose(t.forward_tokens(x).full(), v.ln_post(h), atol=1e-5)


def test_frozen_and_fixed_size():
    t = tiny()
    t.train()
    assert not t.training and not t.model.training and not t.clip_model.training
    assert all(not p.requires_grad for p in t.clip_model.parameters())
    assert not t.dynamic_img_size and t.grid_size() == (4, 4)
    with pytest.raises(TeacherError, match="32x32 inputs only"):
        t.forward_tokens(torch.randn(1, 3, 48, 48))


def test_clip_model_rides_along_for_zero_shot():
    t = tiny()
    x = torch.randn(3, 3, 32, 32)
    emb = t.encode_image(x)
    assert emb.shape == (3, 32)
    assert torch.allclose(t.embed_tokens(t.forward_tokens(x)), emb, atol=1e-5)  # tokens -> CLIP space
    txt = t.encode_text(["a photo of a cat", "a photo of a dog"], normalize=True)
    ref = t.clip_model.encode_text(open_clip.SimpleTokenizer(context_length=16)(["a photo of a cat",
                                                                                  "a photo of a dog"]), normalize=True)
    assert txt.shape == (2, 32) and torch.allclose(txt, ref, atol=1e-6)
    # the adapter's parameters are the visual tower's only; .to() still moves the text tower
    keys = set(t.state_dict())
    assert keys and all(k.startswith("model.") for k in keys) and not any("token_embedding" in k for k in keys)
    assert sum(p.numel() for p in t.parameters()) == sum(p.numel() for p in t.clip_model.visual.parameters())
    t.to(torch.float64)
    assert t.clip_model.token_embedding.weight.dtype == torch.float64 and t.model.proj.dtype == torch.float64


def test_weight_files_load_safely(tmp_path):
    src = tiny()
    sd = src.clip_model.state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "w.bin")
    x = torch.randn(1, 3, 32, 32)
    ref = src.forward_tokens(x).full()
    for f in ("w.safetensors", "w.bin"):
        t = create_teacher(f"open_clip:tiny/{tmp_path / f}", model_cfg=TINY)  # file in the spec
        assert all(torch.equal(v, sd[k]) for k, v in t.clip_model.state_dict().items())
        assert torch.equal(t.forward_tokens(x).full(), ref)
    t = create_teacher("open_clip:tiny", model_cfg=TINY, checkpoint=str(tmp_path / "w.safetensors"))
    assert torch.equal(t.forward_tokens(x).full(), ref)
    # larger input: open_clip's own position-embedding resampling applies on load
    big = create_teacher("open_clip:tiny", model_cfg=TINY, checkpoint=str(tmp_path / "w.safetensors"), img_size=48)
    assert big.grid_size() == (6, 6) and big.img_size == (48, 48)
    assert torch.equal(big.model.class_embedding, src.model.class_embedding)

    bad = {k: v for k, v in sd.items() if k != "visual.proj"}
    save_file({k: v.contiguous() for k, v in bad.items()}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(WeightsError, match=r"missing \(1\): \['visual.proj'\]"):
        create_teacher("open_clip:tiny", model_cfg=TINY, checkpoint=str(tmp_path / "bad.safetensors"))


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_arbitrary_pickles_are_refused(tmp_path):
    torch.save({"visual.proj": _Evil()}, tmp_path / "evil.bin")
    with pytest.raises(WeightsError, match="weights_only"):
        create_teacher("open_clip:tiny", model_cfg=TINY, checkpoint=str(tmp_path / "evil.bin"))


def test_local_dir_and_json_config(tmp_path):
    src = tiny()
    folder = tmp_path / "clip"
    folder.mkdir()
    pp = dict(mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    (folder / "open_clip_config.json").write_text(json.dumps(dict(model_cfg=TINY, preprocess_cfg=pp)))
    save_file({k: v.contiguous() for k, v in src.clip_model.state_dict().items()},
              str(folder / "open_clip_model.safetensors"))
    x = torch.randn(1, 3, 32, 32)
    t = create_teacher(f"open_clip:local-dir:{folder}")
    assert t.mean == (0.5,) * 3 and t.std == (0.25,) * 3
    assert torch.equal(t.forward_tokens(x).full(), src.forward_tokens(x).full())
    t = create_teacher("open_clip:tiny", model_cfg=str(folder / "open_clip_config.json"), pretrained=False)
    assert t.mean == (0.5,) * 3 and t.grid_size() == (4, 4)


def test_modified_resnet_gives_its_last_map():
    cfg = dict(TINY, vision_cfg=dict(image_size=64, layers=(1, 1, 1, 1), width=8, head_width=8))
    t = create_teacher("open_clip:tiny-rn", model_cfg=cfg, pretrained=False)
    v = t.model
    x = torch.randn(2, 3, 64, 64)
    fmap = v.layer4(v.layer3(v.layer2(v.layer1(v.stem(x)))))  # (B, 256, 2, 2)
    out = t.forward_tokens(x)
    assert out.prefix is None and out.grid == (2, 2) and t.embed_dim == 256 and t.patch_size == 32
    assert torch.equal(out.patches[1, 2], fmap[1, :, 1, 0])
    assert t.dynamic_img_size and t.grid_size(96) == (3, 3)


def test_timm_trunk_tower_reads_like_a_timm_teacher():
    cfg = dict(TINY, vision_cfg=dict(image_size=160, timm_model_name="test_vit", timm_model_pretrained=False,
                                     timm_pool="token", timm_proj="linear"))
    t = create_teacher("open_clip:tiny-timm", model_cfg=cfg, pretrained=False)
    trunk = t.model.trunk
    x = torch.randn(1, 3, 160, 160)
    full = trunk.forward_features(x)  # (B, 1+100, C) after the trunk's norm
    out = t.forward_tokens(x)
    assert out.grid == (10, 10) and t.num_prefix_tokens == 1 and t.patch_size == 16
    assert torch.equal(out.full(), full)
    assert set(t.state_dict()) == {f"model.{k}" for k in t.clip_model.visual.state_dict()}


def test_attention_pooled_tower_has_no_after_norm_tokens():
    cfg = dict(TINY, vision_cfg=dict(TINY["vision_cfg"], attentional_pool=True, attn_pooler_queries=4,
                                     attn_pooler_heads=2))
    with pytest.raises(TeacherError, match="after_norm=False"):
        create_teacher("open_clip:coca-ish", model_cfg=cfg, pretrained=False)
    t = create_teacher("open_clip:coca-ish", model_cfg=cfg, pretrained=False, after_norm=False)
    assert t.forward_tokens(torch.randn(1, 3, 32, 32)).patches.shape == (1, 16, 64)


def test_pretrained_tags():
    cfg, kw = resolve_tag("ViT-B-16", "openai", "open_clip:ViT-B-16/openai")
    assert kw["force_quick_gelu"] is True  # OpenAI weights were trained with QuickGELU
    cfg, kw = resolve_tag("ViT-B-16", "laion2b_s34b_b88k", "spec")
    assert "force_quick_gelu" not in kw
    with pytest.raises(TeacherError, match=r"unknown pretrained tag 'nope' for ViT-B-16 \(known: \[.*'openai'"):
        create_teacher("open_clip:ViT-B-16/nope")
    with pytest.raises(TeacherError, match="name the pretrained weights.*'openai'"):
        create_teacher("open_clip:ViT-B-16")
    with pytest.raises(TeacherError, match="no architecture 'ViT-B-17'; did you mean"):
        create_teacher("open_clip:ViT-B-17/openai")
    with pytest.raises(TeacherError, match="weight file not found"):
        create_teacher("open_clip:ViT-B-16//nonexistent/w.safetensors")


def test_offline_gives_one_clear_error_fast(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # never download in tests, whatever the network
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(TeacherError) as e:
        create_teacher("open_clip:ViT-B-16/openai", cache_dir="/nonexistent-cache-dir")
    assert time.perf_counter() - t0 < 5
    msg = str(e.value)
    assert "open_clip:ViT-B-16/openai" in msg and "checkpoint=PATH" in msg and "\n" not in msg


def test_distills_into_a_student(tiny_student):
    t = tiny()
    d = FeatureDistiller(t, tiny_student)  # 4x4 grids on both sides
    out = d(torch.rand(2, 3, 32, 32))
    out["loss"].backward()
    assert d.align == "none" and torch.isfinite(out["loss"])
    assert all(p.grad is None for p in t.clip_model.parameters())
