"""Layer-wise lr decay: every parameter group's lr scale is decay ** (L + 1 - layer id), with the
embeddings at 0, block i at i + 1 and the head (with the final norms) at L + 1; the scheduler
applies it; block discovery across families; drop path set on an existing model."""
import pytest
import torch
import torch.nn as nn

from fdistill.eval.layer_decay import find_blocks, layer_ids, param_groups_layer_decay, set_drop_path


def _expected_id(name: str, L: int) -> int:
    # the formula of the brief / BEiT / official FD optimizer.py, written out per name
    if name.startswith(("cls_token", "pos_embed", "patch_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    assert name.startswith(("norm", "fc_norm", "head")), name
    return L + 1


@pytest.mark.parametrize("pool", ["avg", "token"])
def test_beit_groups_match_formula(pool):
    from timm.models.beit import Beit

    L, decay = 3, 0.6
    m = Beit(img_size=32, patch_size=8, embed_dim=32, depth=L, num_heads=2, num_classes=5, global_pool=pool,
             use_abs_pos_emb=True, use_rel_pos_bias=True)
    groups = param_groups_layer_decay(m, layer_decay=decay, weight_decay=0.05)
    name_of = {id(p): n for n, p in m.named_parameters()}
    seen = set()
    for g in groups:
        for p in g["params"]:
            n = name_of[id(p)]
            seen.add(n)
            assert g["lr_scale"] == pytest.approx(decay ** (L + 1 - _expected_id(n, L))), n
            # no weight decay for 1-d tensors, the tokens and the relative-position tables
            no_wd = p.ndim <= 1 or n in ("cls_token", "pos_embed") or "relative_position_bias_table" in n
            assert g["weight_decay"] == (0.0 if no_wd else 0.05), n
    assert seen == {n for n, _ in m.named_parameters()}
    scales = sorted({g["lr_scale"] for g in groups})
    assert scales == pytest.approx(sorted(decay ** k for k in range(L + 2)))  # all L + 2 layers present


def test_timm_vit_token_pool_puts_norm_with_head():
    # timm's own matcher gives the final norm of a [CLS]-pooled ViT its own group below the head;
    # the formula puts norm and head together at L + 1
    import timm

    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                          embed_dim=48, num_heads=3, num_classes=4)
    ids, L = layer_ids(m)
    assert L == 2 and ids["norm.weight"] == 3 and ids["head.weight"] == 3 and ids["cls_token"] == 0
    groups = param_groups_layer_decay(m, layer_decay=0.5, weight_decay=0.05)
    name_of = {id(p): n for n, p in m.named_parameters()}
    by_name = {name_of[id(p)]: g["lr_scale"] for g in groups for p in g["params"]}
    assert by_name["norm.weight"] == by_name["head.weight"] == 1.0
    assert by_name["blocks.1.mlp.fc1.weight"] == 0.5 and by_name["blocks.0.attn.qkv.weight"] == 0.25
    assert by_name["patch_embed.proj.weight"] == 0.125


def test_scheduler_applies_the_scales():
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler
    from timm.models.beit import Beit

    m = Beit(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3)
    opt = create_optimizer_v2(param_groups_layer_decay(m, layer_decay=0.5, weight_decay=0.05), opt="adamw", lr=1e-3)
    sched = CosineLRScheduler(opt, t_initial=10, warmup_t=0, t_in_epochs=False)
    sched.step_update(0)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(1e-3 * g["lr_scale"])
        assert g["lr_scale"] == pytest.approx(0.5 ** (3 - g["layer_id"]))


class _OpenClipLike(nn.Module):
    """open_clip's VisionTransformer naming: own parameters (class_embedding, positional_embedding,
    proj) registered before the blocks."""

    def __init__(self):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(8))
        self.positional_embedding = nn.Parameter(torch.zeros(5, 8))
        self.proj = nn.Parameter(torch.zeros(8, 4))
        self.conv1 = nn.Conv2d(3, 8, 4, 4, bias=False)
        self.ln_pre = nn.LayerNorm(8)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])
        self.ln_post = nn.LayerNorm(8)


class _HFLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.embeddings = nn.Module()
        self.embeddings.patch_embedding = nn.Conv2d(3, 8, 4, 4)
        self.pre_layrnorm = nn.LayerNorm(8)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList([nn.Linear(8, 8) for _ in range(2)])
        self.post_layernorm = nn.LayerNorm(8)


def test_layer_ids_of_other_families():
    ids, L = layer_ids(_OpenClipLike())
    assert L == 3
    assert ids["class_embedding"] == ids["positional_embedding"] == ids["conv1.weight"] == ids["ln_pre.weight"] == 0
    assert ids["transformer.resblocks.2.weight"] == 3 and ids["transformer.resblocks.0.bias"] == 1
    assert ids["proj"] == ids["ln_post.weight"] == 4  # registered first, still the head
    ids, L = layer_ids(_HFLike())
    assert L == 2 and ids["embeddings.patch_embedding.weight"] == 0 and ids["pre_layrnorm.weight"] == 0
    assert ids["encoder.layers.1.weight"] == 2 and ids["post_layernorm.bias"] == 3


def test_resnet_stages_are_flattened_in_order():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import cifar_resnet

    m = cifar_resnet.resnet20()
    blocks = find_blocks(m)
    assert blocks == [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)]
    ids, L = layer_ids(m)
    assert L == 9 and ids["conv1.weight"] == 0 and ids["layer2.0.conv1.weight"] == 4 and ids["linear.bias"] == 10


def test_set_drop_path_linear_rule():
    import timm
    from timm.layers import DropPath

    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=3,
                          embed_dim=48, num_heads=3, drop_path_rate=0.0)
    assert set_drop_path(m, 0.2) == 3
    rates = [b.drop_path1.drop_prob if isinstance(b.drop_path1, DropPath) else 0.0 for b in m.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2])
    assert set_drop_path(_HFLike(), 0.2) == 0  # no slots: nothing to set


def test_set_drop_path_on_open_clip_blocks():
    """open_clip blocks have no drop-path slot: one is added after ls_1/ls_2 (keys unchanged). At
    rate 1.0 the last block's residual branches are dropped in training (block(x) == x), kept in
    eval, and a deepcopy (EMA) in eval mode is unaffected by the original's training mode."""
    import copy

    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    vt = VisionTransformer(image_size=16, patch_size=4, width=32, layers=3, heads=2, mlp_ratio=2.0, output_dim=16)
    keys = list(vt.state_dict())
    assert set_drop_path(vt, 1.0) == 3
    assert list(vt.state_dict()) == keys  # the fine-tuned weights load back into open_clip
    last = vt.transformer.resblocks[-1]
    x = torch.randn(2, 17, 32)
    vt.train()
    assert torch.equal(last(x), x)  # p = 1.0 on the last block: both branches dropped
    first = vt.transformer.resblocks[0]  # p = 0 on the first block: untouched
    vt.eval()
    ref = first(x)
    vt.train()
    assert torch.allclose(first(x), ref)
    ema = copy.deepcopy(vt).eval()
    assert not torch.equal(ema.transformer.resblocks[-1](x), x)  # eval: no drop, even with vt in train
    assert set_drop_path(vt, 0.0) == 3 and len(last.ls_1._forward_hooks) == 1  # re-set: one hook, not two
    vt.train()
    out_train = last(x)
    vt.eval()
    assert torch.allclose(out_train, last(x))  # rate 0: training forward == eval forward
