"""The benchmark's analytic FLOP formula: hand-computed golden values and an independent
count by ``torch.utils.flop_counter.FlopCounterMode`` (forward, and a whole FD step)."""
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import REPO

sys.path.insert(0, str(REPO))
from benchmarks.flops import ViTDims, fd_step_flops, vit_dims, vit_forward_flops  # noqa: E402
from benchmarks.variants import use_explicit_attention  # noqa: E402

from fdistill import FeatureDistiller, create_student  # noqa: E402
from fdistill.models.masking import random_mask  # noqa: E402


def counted(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def test_golden_values_of_standard_vits():
    # ViT-S/16 at 224: N = 196 patches, T = 197 tokens, C = 384, 12 blocks
    #   patch embedding 2 * 196 * (3 * 16 * 16) * 384             =   115,605,504
    #   one block 24 * 197 * 384^2 + 4 * 197^2 * 384
    #           = 697,171,968 + 59,610,624                         =   756,782,592
    #   total 115,605,504 + 12 * 756,782,592                       = 9,196,996,608  (timm: 4.6 GMACs)
    s = ViTDims(embed_dim=384, attn_dim=384, mlp_hidden=1536, depth=12, patch_size=16, in_chans=3,
                num_prefix_tokens=1, num_patches=196)
    assert vit_forward_flops(s) == 9_196_996_608
    # ViT-B/16: 2*196*768*768 + 12*(24*197*768^2 + 4*197^2*768) = 231,211,008 + 12 * 2,907,909,120
    b = ViTDims(embed_dim=768, attn_dim=768, mlp_hidden=3072, depth=12, patch_size=16, in_chans=3,
                num_prefix_tokens=1, num_patches=196)
    assert vit_forward_flops(b) == 35_126_120_448  # timm: 17.6 GMACs
    # one FD step ViT-S -> ViT-S: teacher fwd + student 3x fwd - patch-embed input grad + projector
    # 9,196,996,608 * 4 - 115,605,504 + 3 * 2 * 197 * 384 * 384
    #   = 36,787,986,432 - 115,605,504 + 174,292,992 = 36,846,673,920
    assert fd_step_flops(s, s)["total"] == 36_846_673_920


def test_dims_read_from_models(tiny_vit_teacher, tiny_student):
    t = vit_dims(tiny_vit_teacher)
    assert (t.embed_dim, t.attn_dim, t.mlp_hidden, t.depth, t.patch_size, t.num_prefix_tokens, t.num_patches) == \
        (48, 48, 192, 2, 8, 1, 16)
    s = vit_dims(tiny_student)
    assert (s.embed_dim, s.depth, s.num_patches, s.num_prefix_tokens) == (32, 2, 16, 1)
    with pytest.raises(ValueError, match="not a ViT"):
        vit_dims(torch.nn.Linear(2, 2))


def test_forward_formula_matches_flop_counter(tiny_vit_teacher, tiny_student):
    # explicit attention: the counter sees the two attention matmuls as bmm (it has no formula
    # for the CPU flash kernel)
    use_explicit_attention(tiny_vit_teacher)
    use_explicit_attention(tiny_student)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert counted(lambda: tiny_vit_teacher.forward_tokens(x)) == 3 * vit_forward_flops(vit_dims(tiny_vit_teacher))
        assert counted(lambda: tiny_student.forward_tokens(x)) == 3 * vit_forward_flops(vit_dims(tiny_student))
        mask = random_mask(3, (4, 4), 0.75)  # 4 visible patches of 16
        got = counted(lambda: tiny_student.forward_tokens(x, mask, drop_masked=True))
    assert got == 3 * vit_forward_flops(vit_dims(tiny_student), encoder_patches=4)
    assert got < vit_forward_flops(vit_dims(tiny_student)) * 3 / 2  # compute falls with the ratio


@pytest.mark.parametrize("drop", [False, True])
def test_step_formula_matches_flop_counter(tiny_vit_teacher, drop):
    # no drop path: model FLOPs count every sample (on CPU the student skips dropped ones)
    student = create_student("vit_tiny", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                             drop_path_rate=0.0)
    d = FeatureDistiller(tiny_vit_teacher, student, mask_ratio=0.5 if drop else 0.0, drop_masked=drop).train()
    use_explicit_attention(d)
    x = torch.rand(4, 3, 32, 32)
    got = counted(lambda: d(x)["loss"].backward())
    want = fd_step_flops(vit_dims(d.teacher), vit_dims(d.student), student_visible=8 if drop else None)
    assert got == 4 * want["total"]
    assert want["total"] == want["teacher_fwd"] + want["student_fwd"] + want["student_bwd"] + want["projector"]


def test_block_keep_scales_the_block_work():
    d = ViTDims(embed_dim=64, attn_dim=64, mlp_hidden=256, depth=4, patch_size=8, in_chans=3,
                num_prefix_tokens=1, num_patches=16)
    full = vit_forward_flops(d)
    patch = 2 * 16 * 3 * 64 * 64
    assert vit_forward_flops(d, block_keep=[1.0] * 4) == full
    assert vit_forward_flops(d, block_keep=[0.0] * 4) == patch
    assert vit_forward_flops(d, block_keep=[1.0, 1.0, 0.5, 0.5]) == pytest.approx(patch + 0.75 * (full - patch))
    with pytest.raises(ValueError, match="4 blocks"):
        vit_forward_flops(d, block_keep=[1.0])
