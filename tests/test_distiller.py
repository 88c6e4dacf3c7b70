"""FeatureDistiller: the frozen teacher, identical pixels, grid alignment, [CLS] targets."""
import pytest
import torch

from fdistill import FeatureDistiller, create_student, create_teacher
from fdistill.distiller import normalize_images
from fdistill.teachers import TeacherError


def _step(d, x, steps=3):
    opt = torch.optim.AdamW(d.trainable_parameters(), lr=1e-2)
    for _ in range(steps):
        out = d(x)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    return out


def test_teacher_frozen_through_training(tiny_vit_teacher, tiny_student):
    d = FeatureDistiller(tiny_vit_teacher, tiny_student)
    before = {k: v.clone() for k, v in d.teacher.state_dict().items()}
    d.train()
    assert not d.teacher.training and not d.teacher.model.training
    assert all(not m.training for m in d.teacher.modules())
    assert d.student.training
    teacher_ids = {id(p) for p in d.teacher.parameters()}
    assert not teacher_ids & {id(p) for p in d.trainable_parameters()}
    student_before = d.student.blocks[0].attn.qkv.weight.clone()
    _step(d, torch.rand(4, 3, 32, 32))
    after = d.teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not p.requires_grad and p.grad is None for p in d.teacher.parameters())
    assert not d.teacher.training
    assert not torch.equal(student_before, d.student.blocks[0].attn.qkv.weight)


def test_teacher_and_student_get_identical_pixels(tiny_student):
    teacher = create_teacher("timm:vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1,
                             embed_dim=24, num_heads=2, mean=(0.48145466, 0.4578275, 0.40821073),
                             std=(0.26862954, 0.26130258, 0.27577711))
    assert teacher.mean != tiny_student.mean  # CLIP statistics vs ImageNet's
    seen = {}
    teacher.model.patch_embed.register_forward_pre_hook(lambda m, a: seen.__setitem__("t", a[0].clone()))
    tiny_student.patch_embed.register_forward_pre_hook(lambda m, a: seen.__setitem__("s", a[0].clone()))
    d = FeatureDistiller(teacher, tiny_student)
    x = torch.rand(2, 3, 32, 32)
    d(x)
    t_pix = seen["t"] * torch.tensor(teacher.std).view(1, 3, 1, 1) + torch.tensor(teacher.mean).view(1, 3, 1, 1)
    s_pix = seen["s"] * torch.tensor(tiny_student.std).view(1, 3, 1, 1) + torch.tensor(tiny_student.mean).view(1, 3, 1, 1)
    assert torch.allclose(t_pix, x, atol=1e-5) and torch.allclose(s_pix, x, atol=1e-5)
    assert torch.allclose(seen["t"], normalize_images(x, teacher.mean, teacher.std), atol=1e-6)


def test_loss_matches_manual_computation(tiny_vit_teacher, tiny_student):
    from fdistill.losses import feature_distill_loss

    d = FeatureDistiller(tiny_vit_teacher, tiny_student, cls_weight=10.0).eval()
    x = torch.rand(2, 3, 32, 32)
    target = tiny_vit_teacher(normalize_images(x, tiny_vit_teacher.mean, tiny_vit_teacher.std))
    pred = d.projector(tiny_student.forward_tokens(normalize_images(x, tiny_student.mean, tiny_student.std)))
    assert torch.allclose(d(x)["loss"], feature_distill_loss(pred, target, cls_weight=10.0), atol=1e-6)
    assert torch.allclose(d((x * 255).round().to(torch.uint8))["loss"],
                          d((x * 255).round() / 255)["loss"], atol=1e-6)


def test_grid_alignment_resize_and_interpolate(tiny_student):
    # teacher patch 4 at 32 px -> 8x8 grid; student 4x4 -> teacher gets a 16x16 input
    t = create_teacher("timm:vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=1,
                       embed_dim=24, num_heads=2)
    d = FeatureDistiller(t, tiny_student)
    assert d.align == "resize" and d.teacher_img_size == (16, 16)
    assert d.teacher_targets(torch.rand(2, 3, 32, 32)).shape == (2, 17, 24)
    d2 = FeatureDistiller(t, tiny_student, align="interpolate")
    assert d2.align == "interpolate" and d2.teacher_img_size == (32, 32)
    # interpolating a constant map gives the same constant
    x = torch.rand(2, 3, 32, 32)
    out = t.forward_tokens(normalize_images(x, t.mean, t.std))
    tgt = d2.teacher_targets(x)
    assert tgt.shape == (2, 17, 24)
    assert torch.allclose(tgt[:, 1:].mean(1), out.patches.mean(1), atol=0.3)
    with pytest.raises(TeacherError, match="align"):
        FeatureDistiller(t, tiny_student, align="none")


def test_fixed_size_teacher_cannot_resize(tiny_student):
    # a ViT without dynamic input size: 8x8 grid at 32 px, the student needs 4x4
    t = create_teacher("timm:vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=1,
                       embed_dim=24, num_heads=2, dynamic_img_size=False)
    with pytest.raises(TeacherError, match="resiz"):
        FeatureDistiller(t, tiny_student, align="resize")
    d = FeatureDistiller(t, tiny_student)
    assert d.align == "interpolate" and d.teacher_img_size == (32, 32)
    assert torch.isfinite(d(torch.rand(2, 3, 32, 32))["loss"])
    # a CNN (stride 32) is fully convolutional: resized to 128 px its grid is the student's 4x4
    cnn = create_teacher("timm:resnet18", pretrained=False)
    dc = FeatureDistiller(cnn, tiny_student, cls_target="gap")
    assert dc.align == "resize" and dc.teacher_img_size == (128, 128)


def test_cls_targets_for_patch_only_teacher(tiny_student):
    cnn = create_teacher("timm:resnet18", pretrained=False)
    d = FeatureDistiller(cnn, tiny_student)  # auto -> no prefix target
    assert d.cls_target == "none"
    x = torch.rand(2, 3, 32, 32)
    tgt = d.teacher_targets(x)
    assert tgt.shape[1] == 16
    assert float(d(x)["loss_prefix"]) == 0.0
    dg = FeatureDistiller(cnn, tiny_student, cls_target="gap")
    tg = dg.teacher_targets(x)
    assert torch.allclose(tg[:, 0], tg[:, 1:].mean(1), atol=1e-6)
    with pytest.raises(TeacherError, match="prefix"):
        FeatureDistiller(cnn, tiny_student, cls_target="teacher")


def test_masking_options(tiny_vit_teacher, tiny_student):
    d = FeatureDistiller(tiny_vit_teacher, tiny_student, mask_ratio=0.5)
    out = d(torch.rand(2, 3, 32, 32))
    assert float(out["mask_fraction"]) == 0.5
    dm = FeatureDistiller(tiny_vit_teacher, tiny_student, mask_ratio=0.5, drop_masked=True)
    assert torch.isfinite(_step(dm, torch.rand(2, 3, 32, 32))["loss"])
    # mask_teacher: masked patches reach the teacher as the mean colour (0 after normalisation)
    seen = {}
    tiny_vit_teacher.model.patch_embed.register_forward_pre_hook(lambda m, a: seen.__setitem__("t", a[0]))
    dt = FeatureDistiller(tiny_vit_teacher, tiny_student, mask_ratio=0.5, mask_teacher=True)
    x = torch.rand(1, 3, 32, 32)
    torch.manual_seed(3)
    dt(x)
    torch.manual_seed(3)
    mask = dt.make_mask(1, "cpu").view(4, 4)
    blocks = seen["t"][0].abs().sum(0).view(4, 8, 4, 8).sum((1, 3))  # per-patch abs sum
    assert torch.equal(blocks == 0, mask)
    with pytest.raises(ValueError):
        FeatureDistiller(tiny_vit_teacher, tiny_student, mask_ratio=1.0)


def test_drop_path_only_in_student(tiny_vit_teacher):
    student = create_student("vit_tiny", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, drop_path_rate=0.3)
    d = FeatureDistiller(tiny_vit_teacher, student).train()
    x = torch.rand(2, 3, 32, 32)
    t1, t2 = d.teacher_targets(x), d.teacher_targets(x)
    assert torch.equal(t1, t2)  # the teacher never drops
    assert any(getattr(b.drop_path1, "drop_prob", 0) > 0 for b in student.blocks)


def test_loss_falls_on_fixed_batch(tiny_vit_teacher, tiny_student):
    d = FeatureDistiller(tiny_vit_teacher, tiny_student)
    x = torch.rand(8, 3, 32, 32)
    first = float(d(x)["loss"].detach())
    last = float(_step(d, x, steps=40)["loss"].detach())
    assert last < 0.5 * first
