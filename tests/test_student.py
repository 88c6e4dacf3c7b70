"""The FD student: position encodings, masking, MAE-style token dropping, timm compatibility."""
import math
import pytest
import timm
import torch

from fdistill import create_student
from fdistill.models import visible_index
from fdistill.models.masking import block_mask, random_mask


def _tables(model):
    return [n for n, _ in model.named_parameters() if n.endswith("relative_position_bias_table")]


def test_shared_rpb_has_exactly_one_table(tiny_student):
    assert _tables(tiny_student) == ["rel_pos_bias.relative_position_bias_table"]
    assert tiny_student.pos_embed is None


def test_rpb_and_ape_variants():
    per_layer = create_student("vit_tiny", img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, pos_embed="rpb")
    assert len(_tables(per_layer)) == 3 and per_layer.rel_pos_bias is None
    ape = create_student("vit_tiny", img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, pos_embed="ape")
    assert _tables(ape) == [] and ape.pos_embed is not None
    with pytest.raises(ValueError, match="pos_embed"):
        create_student("vit_tiny", pos_embed="rope")
    with pytest.raises(ValueError, match="unknown student arch"):
        create_student("vit_gigantic")


def test_standard_sizes():
    m = create_student("vit_base", img_size=224, patch_size=16)
    n = sum(p.numel() for p in m.parameters())
    assert 85e6 < n < 87e6  # ViT-B/16: ~86M
    assert m.grid_size == (14, 14) and m.embed_dim == 768 and len(m.blocks) == 12


@pytest.mark.parametrize("pos_embed", ["shared_rpb", "rpb", "ape"])
def test_loads_in_timm_with_identical_features(pos_embed):
    s = create_student("vit_tiny", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                       pos_embed=pos_embed).eval()
    with torch.no_grad():  # make the bias tables non-trivial
        for n, p in s.named_parameters():
            if "relative_position_bias_table" in n:
                p.normal_()
    t = timm.create_model("beit_base_patch16_224", **s.timm_model_args()).eval()
    sd = {k: v for k, v in s.state_dict().items() if k != "mask_token"}
    t.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(t.forward_features(x), s.forward_tokens(x))


def test_mask_token_replaces_masked_patches(tiny_student):
    s = tiny_student.eval()
    x = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, 3] = True
    a = s.forward_tokens(x, mask)
    x2 = x.clone()
    x2[:, :, 0:8, 24:32] = 100.0  # patch 3 (row 0, col 3) content changes ...
    b = s.forward_tokens(x2, mask)
    assert torch.allclose(a, b, atol=1e-5)  # ... but it is masked, so nothing changes
    assert not torch.allclose(s.forward_tokens(x), s.forward_tokens(x2), atol=1e-3)


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.4, 0.75])
def test_exact_masked_fraction(ratio):
    grid = (14, 14)
    k = round(ratio * 196)
    assert (random_mask(8, grid, ratio).sum(1) == k).all()
    bm = block_mask(8, grid, ratio, generator=torch.Generator().manual_seed(0))
    assert (bm.sum(1) == k).all()


def test_block_mask_is_blocky():
    """Block masks have far more masked-masked neighbours than random masks at the same ratio."""
    g = torch.Generator().manual_seed(0)
    def adjacency(m):
        m = m.view(-1, 14, 14).float()
        return float((m[:, :, 1:] * m[:, :, :-1]).sum() + (m[:, 1:] * m[:, :-1]).sum())
    assert adjacency(block_mask(16, (14, 14), 0.4, generator=g)) > 1.5 * adjacency(random_mask(16, (14, 14), 0.4))


def test_drop_masked_matches_attention_masking():
    """MAE-style dropping == the full sequence with masked tokens hidden from attention (oracle)."""
    s = create_student("vit_tiny", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                       drop_path_rate=0.0).eval()
    with torch.no_grad():
        s.rel_pos_bias.relative_position_bias_table.normal_()
    x = torch.randn(3, 3, 32, 32)
    mask = random_mask(3, (4, 4), 0.5)
    got = s.forward_tokens(x, mask, drop_masked=True)  # (B, 1+8, C)
    # oracle: full token sequence, -inf bias on masked key columns
    tok = s.patch_embed(x)
    tok = torch.cat((s.cls_token.expand(3, -1, -1), tok), 1)
    key_masked = torch.cat((torch.zeros(3, 1, dtype=torch.bool), mask), 1)
    bias = s.rel_pos_bias().unsqueeze(0).expand(3, -1, -1, -1).clone()
    bias.masked_fill_(key_masked[:, None, None, :], float("-inf"))
    for blk in s.blocks:
        tok = blk(tok, shared_rel_pos_bias=bias)
    tok = s.norm(tok)
    keep = visible_index(mask)
    want = torch.cat((tok[:, :1], torch.gather(tok[:, 1:], 1, keep.unsqueeze(-1).expand(-1, -1, tok.shape[-1]))), 1)
    assert got.shape == (3, 9, 32)
    assert torch.allclose(got, want, atol=1e-5)


def test_drop_path_active_in_train_only(tiny_student):
    s = create_student("vit_tiny", img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, drop_path_rate=0.5)
    x = torch.randn(4, 3, 32, 32)
    s.train()
    assert not torch.allclose(s.forward_tokens(x), s.forward_tokens(x))
    s.eval()
    assert torch.equal(s.forward_tokens(x), s.forward_tokens(x))


def test_grad_checkpointing_same_result():
    s = create_student("vit_tiny", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, drop_path_rate=0.0)
    x = torch.randn(2, 3, 32, 32)
    a = s.forward_tokens(x)
    a.sum().backward()
    g = s.blocks[0].attn.qkv.weight.grad.clone()
    s.zero_grad()
    s.set_grad_checkpointing(True)
    b = s.forward_tokens(x)
    b.sum().backward()
    assert torch.allclose(a, b) and torch.allclose(g, s.blocks[0].attn.qkv.weight.grad, atol=1e-6)


# -- the official initialisation ---------------------------------------------------------------------
#: std of a normal truncated at plus/minus one std, in units of that std: sqrt(1 - 2 phi(1) / (2 Phi(1) - 1))
TRUNC1_STD = math.sqrt(1 - 2 * (math.exp(-0.5) / math.sqrt(2 * math.pi)) / math.erf(1 / math.sqrt(2)))


def test_official_init_matches_the_official_scheme_per_parameter_group():
    """Official FD student (``VisionTransformerForFD``): Linear and patch-embedding weights normal(0,
    0.02) truncated at +-0.02, ``attn.proj`` / ``mlp.fc2`` then divided by sqrt(2 * layer); biases 0,
    LayerNorm 1/0, [CLS] the same truncated normal, RPB table and q/v biases 0, layer scale 0.1."""
    torch.manual_seed(0)
    s = create_student("vit_tiny", img_size=64, patch_size=8, depth=3, init_values=0.1)
    assert abs(TRUNC1_STD - 0.5396) < 1e-3
    for name, p in s.named_parameters():
        w = p.detach()
        if name.endswith(".weight") and w.ndim >= 2:  # Linear and Conv2d
            layer = int(name.split(".")[1]) + 1 if name.startswith("blocks.") else None
            rescaled = name.endswith(("attn.proj.weight", "mlp.fc2.weight"))
            bound = 0.02 / math.sqrt(2 * layer) if rescaled else 0.02
            assert w.abs().max() <= bound + 1e-7, name
            assert abs(w.mean()) < 0.05 * bound, name
            assert w.std() == pytest.approx(bound * TRUNC1_STD, rel=0.06), name
        elif name.endswith(("gamma_1", "gamma_2")):
            assert torch.all(w == 0.1), name
        elif "norm" in name and name.endswith(".weight"):
            assert torch.all(w == 1), name
        elif name.endswith((".bias", "q_bias", "v_bias", "relative_position_bias_table")):
            assert torch.all(w == 0), name
        elif name in ("cls_token", "mask_token"):
            assert w.abs().max() <= 0.02 and w.abs().max() > 0.01, name
        else:
            raise AssertionError(f"parameter {name} not covered by the official scheme")


def test_timm_init_is_kept_on_request_and_differs_where_the_official_one_does():
    torch.manual_seed(0)
    timm_init = create_student("vit_tiny", img_size=64, patch_size=8, depth=2, init="timm")
    pe = timm_init.patch_embed.proj.weight.detach()
    assert pe.abs().max() > 0.02  # PyTorch's Kaiming-uniform conv init, bound 1/sqrt(3*8*8) = 0.072
    assert timm_init.blocks[0].attn.qkv.weight.detach().abs().max() > 0.02  # untruncated normal(0, 0.02)
    with pytest.raises(ValueError, match="unknown init"):
        create_student("vit_tiny", init="xavier")
