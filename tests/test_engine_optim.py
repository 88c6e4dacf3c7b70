"""AdamW groups (what gets no weight decay), the fused skip flag, lr scaling, the schedule."""
import math

import pytest
import torch

from fdistill import FeatureDistiller, create_student
from fdistill.config import build_config
from fdistill.config.distill import DistillConfig, resolve_lr
from fdistill.engine.optim import create_adamw
from fdistill.speed import fused_skip_supported
from fdistill.engine.schedule import create_warmup_cosine


def _groups_by_name(model, opt):
    ids = {id(p): n for n, p in model.named_parameters()}
    return {g["weight_decay"]: sorted(ids[id(p)] for p in g["params"]) for g in opt.param_groups}


def test_weight_decay_groups_follow_the_official_optimizer(tiny_vit_teacher):
    """Official ``get_pretrain_param_groups``: no decay on 1-d tensors, ``.bias`` and the ViT's
    ``no_weight_decay()`` ({pos_embed, cls_token}); everything else, the 2-d shared
    relative-position-bias table included, decays."""
    student = create_student("vit_tiny", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                             pos_embed="shared_rpb")
    d = FeatureDistiller(tiny_vit_teacher, student)
    opt = create_adamw(d.branch, lr=1e-3, weight_decay=0.05)
    groups = _groups_by_name(d.branch, opt)
    no_wd, wd = groups[0.0], groups[0.05]
    assert "student.cls_token" in no_wd and "student.mask_token" in no_wd
    assert "student.rel_pos_bias.relative_position_bias_table" in wd  # 2-d and not named: decayed (official)
    assert "projector.bias" in no_wd and "student.norm.weight" in no_wd
    assert "student.blocks.0.gamma_1" in no_wd  # layer scale: 1-d
    assert all(n.endswith((".bias", "q_bias", "v_bias")) or "norm" in n or "gamma" in n
               or n.endswith(("cls_token", "mask_token")) for n in no_wd)
    # every matrix of the blocks, patch embedding, projector and the bias table decays
    assert set(wd) == {n for n, p in d.branch.named_parameters() if p.ndim >= 2} - set(no_wd)
    assert "projector.weight" in wd and "student.blocks.1.attn.qkv.weight" in wd
    assert "student.patch_embed.proj.weight" in wd
    assert not any(n.startswith("teacher") for n in no_wd + wd)


@pytest.mark.parametrize("pos_embed, table", [("shared_rpb", "student.rel_pos_bias.relative_position_bias_table"),
                                              ("rpb", "student.blocks.1.attn.relative_position_bias_table")])
def test_rel_pos_bias_tables_can_be_exempted_from_weight_decay(tiny_vit_teacher, pos_embed, table):
    student = create_student("vit_tiny", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                             pos_embed=pos_embed)
    d = FeatureDistiller(tiny_vit_teacher, student)
    official = _groups_by_name(d.branch, create_adamw(d.branch, lr=1e-3, weight_decay=0.05))
    exempt = _groups_by_name(d.branch, create_adamw(d.branch, lr=1e-3, weight_decay=0.05, decay_rel_pos_bias=False))
    assert table in official[0.05] and table in exempt[0.0]
    # nothing else moves between the groups
    assert set(official[0.05]) - set(exempt[0.05]) == {n for n in official[0.05] if "relative_position_bias_table" in n}
    assert set(exempt[0.0]) - set(official[0.0]) == set(official[0.05]) - set(exempt[0.05])


def test_absolute_position_embedding_gets_no_decay(tiny_vit_teacher):
    student = create_student("vit_tiny", img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, pos_embed="ape")
    opt = create_adamw(student, lr=1e-3, weight_decay=0.1)
    assert "pos_embed" in _groups_by_name(student, opt)[0.0]


def test_fused_adamw_skips_on_the_device_flag():
    p = torch.nn.Parameter(torch.randn(8, 8))
    opt = create_adamw(torch.nn.ParameterList([p]), lr=0.1, weight_decay=0.05)
    assert opt.defaults["fused"] and fused_skip_supported(opt)
    p.grad = torch.randn(8, 8)
    opt.step()
    before = (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()})
    p.grad = torch.full((8, 8), float("nan"))
    opt.found_inf, opt.grad_scale = torch.tensor(1.0), None
    opt.step()
    assert torch.equal(p.detach(), before[0])
    assert all(torch.equal(opt.state[p][k], v) for k, v in before[1].items())
    p.grad = torch.randn(8, 8)
    opt.found_inf = torch.tensor(0.0)
    opt.step()
    assert not torch.equal(p.detach(), before[0]) and int(opt.state[p]["step"]) == 2


def test_lr_linear_scaling_rule():
    cfg = build_config(DistillConfig, "configs/distill/clip_vit_base_300ep.yaml")
    # official: 16 GPUs x 128 = 2048 images per step -> 3e-4 * 4
    assert resolve_lr(cfg.optim, 2048) == pytest.approx((1.2e-3, 2e-6, 2e-5))
    assert resolve_lr(cfg.optim, 1024) == pytest.approx((6e-4, 1e-6, 1e-5))
    cfg = build_config(DistillConfig, "configs/distill/clip_vit_base_300ep.yaml", ["optim.lr=1e-3"])
    assert resolve_lr(cfg.optim, 2048) == (1e-3, 5e-7, 5e-6)  # absolute: taken as given


def test_warmup_cosine_golden_values():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=123.0)
    sched = create_warmup_cosine(opt, peak_lr=1.0, total_steps=10, warmup_steps=4, warmup_lr=0.2, min_lr=0.1)
    got = []
    for s in range(12):
        sched.step_update(s)
        got.append(opt.param_groups[0]["lr"])
    # worked out by hand: warm-up 0.2 -> 1.0 over 4 steps, then 0.1 + 0.9 * (1 + cos(pi * t / 6)) / 2
    expect = [0.2, 0.4, 0.6, 0.8, 1.0, 0.1 + 0.45 * (1 + math.sqrt(3) / 2), 0.1 + 0.45 * 1.5, 0.55,
              0.1 + 0.45 * 0.5, 0.1 + 0.45 * (1 - math.sqrt(3) / 2), 0.1, 0.1]
    assert got == pytest.approx(expect, abs=1e-12)
