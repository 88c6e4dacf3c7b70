"""timm teachers against timm's own forward: ViT, Swin (NHWC) and a CNN (NCHW)."""
import pytest
import timm
import torch

from fdistill import create_teacher
from fdistill.teachers import TeacherError


def test_vit_tokens_match_forward_features():
    t = create_teacher("timm:vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2).eval()
    ref.load_state_dict(t.model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    out = t.forward_tokens(x)
    full = ref.forward_features(x)
    assert out.prefix.shape == (2, 1, 192) and out.patches.shape == (2, 16, 192) and out.grid == (4, 4)
    assert torch.allclose(torch.cat((out.prefix, out.patches), 1), full, atol=1e-6)
    assert t.patch_size == 8 and t.num_prefix_tokens == 1 and t.embed_dim == 192
    assert t.mean == tuple(ref.pretrained_cfg["mean"])


def test_vit_before_norm():
    t = create_teacher("timm:vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                       after_norm=False)
    m = t.model
    x = torch.randn(2, 3, 32, 32)
    h = m._pos_embed(m.patch_embed(x))
    h = m.blocks(m.norm_pre(h))  # no final norm
    out = t.forward_tokens(x)
    assert torch.allclose(torch.cat((out.prefix, out.patches), 1), h, atol=1e-5)
    t.after_norm = True
    normed = t.forward_tokens(x)
    assert torch.allclose(torch.cat((normed.prefix, normed.patches), 1), m.norm(h), atol=1e-5)


def test_register_tokens_are_prefix():
    t = create_teacher("timm:vit_small_patch14_reg4_dinov2", pretrained=False, img_size=28, depth=1)
    out = t.forward_tokens(torch.randn(1, 3, 28, 28))
    assert t.num_prefix_tokens == 5 and out.prefix.shape[1] == 5 and out.grid == (2, 2)


def test_swin_nhwc_map_becomes_tokens():
    kw = dict(img_size=64, window_size=2, depths=(1, 1, 1, 1), embed_dim=16, num_heads=(1, 2, 2, 4))
    t = create_teacher("timm:swin_tiny_patch4_window7_224", pretrained=False, **kw)
    x = torch.randn(2, 3, 64, 64)
    fmap = t.model.forward_features(x)  # (B, H, W, C)
    out = t.forward_tokens(x)
    assert out.prefix is None and out.grid == (2, 2) and t.patch_size == 32
    assert torch.equal(out.patches, fmap.reshape(2, 4, -1))
    assert out.patches[0, 1].equal(fmap[0, 0, 1])  # row-major


def test_cnn_nchw_map_becomes_tokens():
    t = create_teacher("timm:resnet18", pretrained=False)
    x = torch.randn(1, 3, 64, 64)
    fmap = t.model.forward_features(x)  # (B, C, H, W)
    out = t.forward_tokens(x)
    assert out.grid == (2, 2) and t.num_prefix_tokens == 0 and t.embed_dim == 512
    assert torch.equal(out.patches[0, 3], fmap[0, :, 1, 1])


def test_teacher_stays_frozen():
    t = create_teacher("timm:resnet18", pretrained=False)
    t.train()
    assert not t.training and not t.model.training
    assert all(not p.requires_grad for p in t.parameters())
    out = t.forward_tokens(torch.randn(1, 3, 64, 64))
    assert not out.patches.requires_grad


def test_unknown_specs_give_clear_errors():
    with pytest.raises(TeacherError, match="unknown teacher source"):
        create_teacher("torchhub:resnet50")
    with pytest.raises(TeacherError, match="must look like"):
        create_teacher("resnet50")
    with pytest.raises(TeacherError, match="no model named"):
        create_teacher("timm:not_a_model_xyz", pretrained=False)
    with pytest.raises(TeacherError, match="not found"):
        create_teacher("timm:resnet18", checkpoint="/nonexistent/w.safetensors")


def test_local_checkpoint_loads(tmp_path):
    from safetensors.torch import save_file

    src = timm.create_model("resnet18", pretrained=False)
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    t = create_teacher("timm:resnet18", checkpoint=str(tmp_path / "w.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), t.model.state_dict().values()))


def test_non_finite_teacher_weights_are_refused_at_load(tmp_path):
    """Issue 13 (low): NaN weights used to pass, and distillation later stopped with a message
    blaming the learning rate. A checkpoint with one NaN is refused when the teacher is built."""
    import timm
    from safetensors.torch import save_file

    from fdistill.teachers import TeacherError, create_teacher

    kw = dict(pretrained=False, img_size=16, patch_size=4, depth=1, embed_dim=48, num_heads=2)
    sd = timm.create_model("vit_tiny_patch16_224", **kw).state_dict()
    ok = tmp_path / "ok.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, ok)
    create_teacher("timm:vit_tiny_patch16_224", checkpoint=str(ok), **kw)  # finite: accepted
    sd["blocks.0.mlp.fc1.weight"][3, 5] = float("nan")
    bad = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, bad)
    with pytest.raises(TeacherError, match=r"non-finite values .* 1 tensor\(s\), e\.g\. .*blocks\.0\.mlp\.fc1\.weight"):
        create_teacher("timm:vit_tiny_patch16_224", checkpoint=str(bad), **kw)
