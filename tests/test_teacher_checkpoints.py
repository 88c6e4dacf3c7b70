"""Every Table-1 / Table-8 teacher recipe builds its teacher from a checkpoint file in the layout
its authors publish (tiny random models written in that layout: same key names, small widths),
and a timm model whose activation differs from its weights' is refused."""
import re

import pytest
import torch

from fdistill.config import build_config
from fdistill.config.distill import DistillConfig
from fdistill.teachers import TeacherError, create_teacher

TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
TINY_SWIN = dict(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2))


def _recipe_teacher(name):
    cfg = build_config(DistillConfig, f"configs/distill/{name}.yaml")
    return cfg.teacher.spec


def _tokens(teacher, x):
    with torch.no_grad():
        return teacher.forward_tokens(x).full()


def _timm_source(arch, **kw):
    import timm

    torch.manual_seed(0)
    return timm.create_model(arch, pretrained=False, **kw).eval()


def _assert_same_tokens(teacher, reference_fn, x):
    ours, ref = _tokens(teacher, x), reference_fn(x)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("recipe, width", [("clip_vit_base_300ep", 32), ("clip_vit_large_300ep", 32)])
def test_clip_teacher_from_an_openai_layout_state_dict(tmp_path, recipe, width):
    """OpenAI's / open_clip's flat CLIP state dict (``visual.*`` + the text tower): the timm
    QuickGELU tower built from it gives open_clip's own tokens (after ln_post)."""
    from safetensors.torch import save_file

    spec = _recipe_teacher(recipe)
    assert "quickgelu" in spec
    cfg = dict(embed_dim=16, quick_gelu=True,
               vision_cfg=dict(image_size=32, patch_size=8, width=width, layers=2, head_width=16),
               text_cfg=dict(context_length=8, vocab_size=64, width=16, heads=2, layers=1))
    torch.manual_seed(0)
    ref = create_teacher("open_clip:custom", pretrained=False, model_cfg=cfg,
                         mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    sd = ref.clip_model.state_dict()
    assert "visual.class_embedding" in sd and "visual.transformer.resblocks.0.attn.in_proj_weight" in sd
    f = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(f))
    kw = dict(TINY_VIT, embed_dim=width, num_heads=width // 16)
    t = create_teacher(spec, checkpoint=str(f), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), **kw)
    x = torch.rand(2, 3, 32, 32)
    _assert_same_tokens(t, lambda im: _tokens(ref, im), x)


@pytest.mark.parametrize("recipe, arch, layout", [
    ("dino_vit_base_300ep", "vit_base_patch16_224", "flat"),          # dino_vitbase16_pretrain.pth
    ("deit_vit_base_300ep", "deit_base_patch16_224", "model+head"),   # deit_base_patch16_224-b5f2ef4d.pth
    ("mae_vit_base_300ep", "vit_base_patch16_224", "model"),          # mae_pretrain_vit_base.pth
])
def test_vit_teachers_from_their_published_layouts(tmp_path, recipe, arch, layout):
    spec = _recipe_teacher(recipe)
    src = _timm_source(arch, num_classes=10 if layout == "model+head" else 0, **TINY_VIT)
    sd = src.state_dict()
    if layout != "model+head":
        assert not any(k.startswith("head.") for k in sd)
    obj = sd if layout == "flat" else {"model": sd, "epoch": 299}
    f = tmp_path / "teacher.pth"
    torch.save(obj, f)
    t = create_teacher(spec, checkpoint=str(f), **TINY_VIT)  # the recipe's spec, its default 1000-class head
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = src.forward_features(x)  # forward_tokens takes normalised images, as forward_features
    torch.testing.assert_close(_tokens(t, x), ref, rtol=1e-5, atol=1e-5)


def _original_swin_layout(sd):
    """timm Swin keys -> Microsoft's original layout (a stage's PatchMerging at its end)."""
    out = {}
    for k, v in sd.items():
        if k.startswith("head."):
            continue
        k = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
        out[k] = v
    return out


def test_esvit_swin_teacher_from_its_published_checkpoint(tmp_path):
    """EsViT (DINO code base): ``{"student", "teacher"}`` of a MultiCropWrapper -- ``backbone.*`` in
    the original Swin layout plus a DINO projection ``head.*`` -- read from the ``teacher`` entry."""
    cfg = build_config(DistillConfig, "configs/distill/esvit_swin_base_300ep.yaml")
    spec = cfg.teacher.spec
    src = _timm_source(spec[5:].split(".")[0], num_classes=0, **TINY_SWIN)
    orig = _original_swin_layout(src.state_dict())
    assert "layers.0.downsample.reduction.weight" in orig  # original layout: stage 0 downsamples at its end
    wrapper = {f"backbone.{k}": v for k, v in orig.items()}
    wrapper.update({"head.mlp.0.weight": torch.randn(8, 128), "head.last_layer.weight_g": torch.randn(16, 1)})
    student = {k: v + 1 for k, v in wrapper.items()}
    f = tmp_path / "checkpoint_best.pth"
    torch.save({"student": student, "teacher": wrapper, "epoch": 299}, f)
    kwargs = {k: v for k, v in cfg.teacher.kwargs.items() if k not in ("checkpoint", "window_size")}
    assert kwargs == {"num_classes": 0, "checkpoint_key": "teacher"}  # the recipe's own reading of the file
    t = create_teacher(spec, checkpoint=str(f), **kwargs, **TINY_SWIN)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = src.forward_features(x).flatten(1, 2)  # NHWC -> (B, N, C)
    torch.testing.assert_close(_tokens(t, x), ref, rtol=1e-5, atol=1e-5)
    # a key the file does not have is named, with the ones it has
    with pytest.raises(TeacherError, match="no 'ema' entry"):
        create_teacher(spec, checkpoint=str(f), **dict(kwargs, checkpoint_key="ema"), **TINY_SWIN)


def test_a_checkpoint_of_another_architecture_names_the_keys(tmp_path):
    src = _timm_source("vit_base_patch16_224", num_classes=0, **dict(TINY_VIT, depth=3))
    f = tmp_path / "deeper.pth"
    torch.save(src.state_dict(), f)
    with pytest.raises(TeacherError, match=r"unexpected \d+ keys \(e\.g\. \['blocks\.2\."):
        create_teacher("timm:vit_base_patch16_224", checkpoint=str(f), **TINY_VIT)


def test_openai_clip_weights_in_a_gelu_model_are_refused(tmp_path):
    """timm's plain ``vit_*_clip_224.openai`` builds GELU; OpenAI trained with QuickGELU."""
    from fdistill.models.inspection import layer_types

    src = _timm_source("vit_base_patch16_clip_224", num_classes=0, **TINY_VIT)
    f = tmp_path / "clip_tower.pth"
    torch.save(src.state_dict(), f)
    with pytest.raises(TeacherError, match="use timm:vit_base_patch16_clip_quickgelu_224.openai"):
        create_teacher("timm:vit_base_patch16_clip_224.openai", checkpoint=str(f), **TINY_VIT)
    t = create_teacher("timm:vit_base_patch16_clip_224.openai", checkpoint=str(f), allow_activation_mismatch=True,
                       **TINY_VIT)
    assert set(layer_types(t.model, "activation")) == {"GELU"}
    q = create_teacher("timm:vit_base_patch16_clip_quickgelu_224.openai", checkpoint=str(f), **TINY_VIT)
    assert set(layer_types(q.model, "activation")) == {"QuickGELU"}
    # the same weights give other tokens under the other activation: the check is not cosmetic
    x = torch.rand(2, 3, 32, 32)
    assert not torch.allclose(_tokens(t, x), _tokens(q, x), atol=1e-4)


# -- fdistill info on every Table-1 recipe, its teacher read from a file of the published layout --------
def _write_layout(tmp_path, recipe):
    """(checkpoint file, tiny teacher kwargs) for ``recipe``'s teacher, in its authors' layout."""
    if recipe.startswith("clip"):
        from safetensors.torch import save_file

        patch = 14 if "large" in recipe else 16
        cfg = dict(embed_dim=16, quick_gelu=True,
                   vision_cfg=dict(image_size=224, patch_size=patch, width=32, layers=1, head_width=16),
                   text_cfg=dict(context_length=8, vocab_size=64, width=16, heads=2, layers=1))
        ref = create_teacher("open_clip:custom", pretrained=False, model_cfg=cfg)
        f = tmp_path / "clip.safetensors"
        save_file({k: v.contiguous() for k, v in ref.clip_model.state_dict().items()}, str(f))
        return f, dict(embed_dim=32, depth=1, num_heads=2)
    if recipe.startswith("esvit"):
        kw = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2))
        src = _timm_source("swin_base_patch4_window7_224", num_classes=0, window_size=14, **kw)
        f = tmp_path / "checkpoint_best.pth"
        torch.save({"teacher": {f"backbone.{k}": v for k, v in _original_swin_layout(src.state_dict()).items()}}, f)
        return f, kw
    arch = "deit_base_patch16_224" if recipe.startswith("deit") else "vit_base_patch16_224"
    kw = dict(embed_dim=32, depth=1, num_heads=2)
    src = _timm_source(arch, num_classes=0, **kw)
    f = tmp_path / "teacher.pth"
    torch.save({"model": src.state_dict()}, f)
    return f, kw


@pytest.mark.parametrize("recipe, act, norm", [
    ("clip_vit_base_300ep", "QuickGELU", "LayerNorm"), ("clip_vit_large_300ep", "QuickGELU", "LayerNorm"),
    ("dino_vit_base_300ep", "GELU", "LayerNorm"), ("deit_vit_base_300ep", "GELU", "LayerNorm"),
    ("mae_vit_base_300ep", "GELU", "LayerNorm"), ("esvit_swin_base_300ep", "GELU", "LayerNorm"),
])
def test_info_on_each_table1_recipe_names_activation_norm_grid_alignment_and_licence(tmp_path, recipe, act, norm):
    from fdistill.engine.info import describe_run

    f, kw = _write_layout(tmp_path, recipe)
    base = build_config(DistillConfig, f"configs/distill/{recipe}.yaml")
    kwargs = {k: v for k, v in base.teacher.kwargs.items() if k != "checkpoint"}
    kwargs.update(kw, checkpoint=str(f))
    if base.student.arch.startswith("timm:"):  # the SwinV2 student, tiny
        student = ["student.kwargs={window_size: 14, embed_dim: 16, depths: [1, 1, 1, 1], num_heads: [1, 1, 2, 2]}"]
    else:
        student = ["student.depth=1", "student.embed_dim=32", "student.num_heads=2"]
    import yaml

    teacher = f"teacher.kwargs={yaml.safe_dump(kwargs, default_flow_style=True).strip()}"
    cfg = build_config(DistillConfig, f"configs/distill/{recipe}.yaml",
                       [teacher, "train.device=cpu", "train.precision=fp32"] + student)
    text = describe_run(cfg, processes=(16,))
    assert act in text and norm in text, text
    assert "QuickGELU" not in text or act == "QuickGELU"
    grid = "7x7" if recipe.startswith("esvit") else ("16x16" if "large" in recipe else "14x14")
    assert grid in text, text
    assert "licen" in text.lower() and "weights" in text.lower()
    assert "align" in text.lower()
