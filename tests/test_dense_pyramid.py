"""Multi-level features for the dense benchmarks (issue 14): BEiT's block choice, the ViT-to-pyramid
neck's shapes per stride (and its identity / max-pool levels against their oracles), Swin's own
stages, and clear errors for backbones that cannot give maps."""
import pytest
import timm
import torch
import torch.nn.functional as F

from fdistill import create_student
from fdistill.dense import DenseError, ViTPyramid, default_block_indices, intermediate_maps
from fdistill.models.loading import StudentAdapter


def test_default_blocks_are_beits():
    assert default_block_indices(12) == [3, 5, 7, 11]  # BEiT / the paper: blocks 4, 6, 8, 12 of ViT-B
    assert default_block_indices(24) == [7, 11, 15, 23]  # ViT-L: 8, 12, 16, 24
    assert default_block_indices(4) == [0, 1, 2, 3]
    idx = default_block_indices(6)
    assert idx == sorted(set(idx)) and idx[-1] == 5 and len(idx) == 4
    with pytest.raises(DenseError, match="3 blocks"):
        default_block_indices(3)


@pytest.mark.parametrize("which", ["timm_vit", "fd_student", "fd_student_adapter"])
def test_vit_pyramid_gives_strides_4_8_16_32(which):
    torch.manual_seed(0)
    if which == "timm_vit":
        net, dim = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=4), 192
    else:
        net, dim = create_student("vit_tiny", img_size=64, patch_size=16, embed_dim=32, depth=4, num_heads=2), 32
        if which == "fd_student_adapter":
            net = StudentAdapter(net, name="s")
    x = torch.randn(2, 3, 64, 64)
    maps = intermediate_maps(net, x, default_block_indices(4))
    assert [tuple(m.shape) for m in maps] == [(2, dim, 4, 4)] * 4  # every block at stride 16
    neck = ViTPyramid(dim).eval()
    outs = neck(maps)
    assert [tuple(o.shape) for o in outs] == [(2, dim, 16, 16), (2, dim, 8, 8), (2, dim, 4, 4), (2, dim, 2, 2)]
    assert [64 // o.shape[-1] for o in outs] == [4, 8, 16, 32]
    assert torch.equal(outs[2], maps[2])  # stride 16: the block's map as it is
    assert torch.equal(outs[3], F.max_pool2d(maps[3], 2))  # stride 32: 2x2 max-pool
    assert neck.out_channels == [dim] * 4


def test_swin_gives_its_own_stages():
    net = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=64, window_size=2,
                            embed_dim=24, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
    maps = intermediate_maps(net, torch.randn(1, 3, 64, 64))
    assert [tuple(m.shape[1:]) for m in maps] == [(24, 16, 16), (48, 8, 8), (96, 4, 4), (192, 2, 2)]  # strides 4..32


def test_clear_errors():
    with pytest.raises(DenseError, match="forward_intermediates"):
        intermediate_maps(torch.nn.Conv2d(3, 8, 3), torch.randn(1, 3, 8, 8))
    neck = ViTPyramid(8)
    with pytest.raises(DenseError, match="4 maps"):
        neck([torch.zeros(1, 8, 2, 2)] * 3)
    with pytest.raises(DenseError, match="one shape"):
        neck([torch.zeros(1, 8, 2, 2)] * 3 + [torch.zeros(1, 4, 2, 2)])


def test_an_open_clip_tower_gives_its_blocks():
    """open_clip's VisionTransformer follows timm's contract but returns a dict; the shipped tiny
    CLIP (fdistill/assets/clip_mini, 32 px, patch 4) gives its blocks' maps at stride 4."""
    from fdistill.models.loading import load_model

    a = load_model("open_clip:local-dir:fdistill/assets/clip_mini")
    maps = intermediate_maps(a, torch.randn(2, 3, 32, 32), [0, 1])
    assert len(maps) == 2 and all(m.shape[0] == 2 and m.shape[-2:] == (8, 8) for m in maps)


@pytest.mark.parametrize("which", ["vit", "swin"])
def test_upernet_on_a_vit_and_a_swin_gives_full_size_logits_and_trains_the_backbone(which):
    from fdistill.dense.upernet import UperNetSegmenter

    torch.manual_seed(0)
    if which == "vit":
        net = create_student("vit_tiny", img_size=64, patch_size=16, embed_dim=32, depth=4, num_heads=2)
    else:
        net = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=64, window_size=2,
                                embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
    seg = UperNetSegmenter(net, 5, img_size=(64, 64), channels=32, aux_channels=16)
    assert isinstance(seg.neck, ViTPyramid) == (which == "vit")  # Swin's stages need no neck
    x = torch.randn(2, 3, 64, 64)
    out = seg(x)
    assert out["logits"].shape == (2, 5, 64, 64) and out["aux_logits"].shape == (2, 5, 64, 64)
    target = torch.randint(0, 5, (2, 64, 64))
    loss = F.cross_entropy(out["logits"], target) + 0.4 * F.cross_entropy(out["aux_logits"], target)
    loss.backward()  # fine-tuning: the backbone learns too
    g = net.patch_embed.proj.weight.grad  # the first layer of the backbone
    assert g is not None and g.abs().sum() > 0
