"""ViTDet-style backbone and Mask R-CNN (fdistill.dense.vitdet / maskrcnn), the paper's COCO setting.

* A window covering the whole grid is global attention: the wrapped backbone then gives the plain
  timm model's patch tokens (ViT, CLIP-style ViT, BEiT with per-block or shared relative position
  bias, the FD student). The wrapper drops [CLS] as ViTDet does, so the reference runs the plain
  model with the patch tokens blind to the prefix tokens: timm's ``attn_mask`` for ViT, a -1e9
  "token -> [CLS]" entry of the relative position table for BEiT.
* Windows are local: a token is unaffected by an input patch in another window (one block), and
  the added global block mixes them.
* The simple pyramid's strides; Mask R-CNN's losses, outputs and gradient; layer-decay ids.
"""
import copy
import pickle

import pytest
import timm
import torch

from fdistill import create_student
from fdistill.dense.pyramid import DenseError
from fdistill.dense.vitdet import (SimpleFeaturePyramid, WindowedViT, window_partition, window_rel_pos_bias,
                                   window_unpartition)
from fdistill.models.loading import StudentAdapter

DIM = 32


def tiny_vit(img_size=64, **kw):
    args = dict(pretrained=False, img_size=img_size, embed_dim=DIM, depth=2, num_heads=2, num_classes=0)
    args.update(kw)
    return timm.create_model("vit_tiny_patch16_224", **args).eval()


def tiny_beit(img_size=64, **kw):
    args = dict(pretrained=False, img_size=img_size, embed_dim=DIM, depth=2, num_heads=2, num_classes=0,
                use_abs_pos_emb=False, use_rel_pos_bias=True)
    args.update(kw)
    return timm.create_model("beit_base_patch16_224", **args).eval()


def tiny_student(pos_embed="shared_rpb", depth=2, img_size=64):
    return create_student("vit_tiny", img_size=img_size, patch_size=16, embed_dim=DIM, depth=depth, num_heads=2,
                          pos_embed=pos_embed, drop_path_rate=0.0).eval()


def blind_to_cls(net):
    """Random relative position tables, with patch tokens unable to attend to [CLS] (entry -2 of
    timm's table is "token -> [CLS]"), so the plain model's patch tokens ignore [CLS]."""
    tables = [m.relative_position_bias_table for m in net.modules()
              if getattr(m, "relative_position_bias_table", None) is not None]
    assert tables
    with torch.no_grad():
        for t in tables:
            t.normal_(0, 0.5)
            t[-2] = -1e9
    return net


def as_map(tokens, grid):
    B, N, C = tokens.shape
    return tokens.transpose(1, 2).reshape(B, C, *grid)


def reference(net, x):
    """The plain timm model's patch tokens (B, C, h, w), patches not attending to prefix tokens."""
    grid = (x.shape[-2] // 16, x.shape[-1] // 16)
    P = getattr(net, "num_prefix_tokens", 1)
    with torch.no_grad():
        if hasattr(net, "rel_pos_bias") or isinstance(net, timm.models.beit.Beit):
            tok = net.forward_features(x)
        else:
            T = P + grid[0] * grid[1]
            mask = torch.zeros(1, 1, T, T)
            mask[..., P:, :P] = float("-inf")
            tok = net.forward_features(x, attn_mask=mask if P else None)
    return as_map(tok[:, P:], grid)


VITS = {
    "vit": lambda: tiny_vit(),
    "vit_no_cls": lambda: tiny_vit(class_token=False, global_pool="avg"),
    "vit_clip_style": lambda: tiny_vit(pre_norm=True),  # norm_pre, as timm's CLIP ViTs
    "vit_registers_non_square": lambda: tiny_vit(img_size=(64, 96), reg_tokens=2, no_embed_class=True),
    "beit_rpb": lambda: blind_to_cls(tiny_beit()),
    "beit_rpb_abs": lambda: blind_to_cls(tiny_beit(img_size=(64, 96), use_abs_pos_emb=True)),
    "fd_student_shared": lambda: blind_to_cls(tiny_student()),
}


@pytest.mark.parametrize("which", sorted(VITS))
def test_window_covering_the_grid_is_the_plain_model(which):
    torch.manual_seed(0)
    net = VITS[which]()
    H, W = tuple(int(s) for s in net.patch_embed.img_size)
    x = torch.randn(2, 3, H, W)
    ref = reference(net, x)
    wrapped = WindowedViT(net, window_size=14, add_global_block=False, img_size=(H, W), final_norm=True).eval()
    with torch.no_grad():
        out = wrapped(x)
    assert out.shape == (2, DIM, H // 16, W // 16)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    if which.startswith(("beit", "fd_student_shared")):  # an existing block run globally: same here
        g = WindowedViT(net, window_size=14, global_blocks=[1], add_global_block=False, img_size=(H, W),
                        final_norm=True).eval()
        with torch.no_grad():
            torch.testing.assert_close(g(x), ref, atol=1e-5, rtol=1e-5)


def test_adapters_are_unwrapped():
    torch.manual_seed(0)
    s = tiny_student("ape")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a = WindowedViT(copy.deepcopy(s), window_size=2, img_size=64).eval()
        b = WindowedViT(StudentAdapter(s, name="s"), window_size=2, img_size=64).eval()
        b.load_state_dict(a.state_dict())
        torch.testing.assert_close(a(x), b(x))


@pytest.mark.parametrize("which", ["vit", "fd_student_shared", "beit_rpb"])
def test_windows_are_local_and_the_global_block_mixes_them(which):
    torch.manual_seed(0)
    net = VITS[which]()
    net.blocks = net.blocks[:1]  # one block: a window's tokens see their window only
    x = torch.randn(1, 3, 64, 64)  # 4 x 4 grid, 2 x 2 windows of 2 x 2
    y = x.clone()
    y[..., 48:64, 48:64] += 3.0  # patch (3, 3): bottom-right window
    local = WindowedViT(copy.deepcopy(net), window_size=2, add_global_block=False, img_size=64).eval()
    glob = WindowedViT(copy.deepcopy(net), window_size=14, add_global_block=False, img_size=64).eval()
    with torch.no_grad():
        a, b = local(x), local(y)
        assert torch.equal(a[..., :2, :], b[..., :2, :]) and torch.equal(a[..., 2:, :2], b[..., 2:, :2])
        assert not torch.allclose(a[..., 2:, 2:], b[..., 2:, 2:])
        assert not torch.allclose(a, glob(x))  # windowed differs from global
        added = WindowedViT(copy.deepcopy(net), window_size=2, add_global_block=True, img_size=64).eval()
        c, d = added(x), added(y)
        assert (c - d)[..., :2, :2].abs().amax() > 0  # the added global block carries it everywhere


def test_padding_non_square_and_odd_sizes():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 7, DIM)
    t, padded = window_partition(x, (3, 3))
    assert t.shape == (2 * 2 * 3, 9, DIM) and padded == (6, 9)
    assert torch.equal(window_unpartition(t, (3, 3), padded, (5, 7)), x)
    for net in (tiny_vit(), tiny_student()):
        w = WindowedViT(net, window_size=3, img_size=(80, 112)).eval()
        with torch.no_grad():
            assert w(torch.randn(2, 3, 80, 112)).shape == (2, DIM, 5, 7)  # 5 x 7 grid, padded to 6 x 9
            assert w(torch.randn(1, 3, 70, 100)).shape == (1, DIM, 5, 7)  # not a multiple of 16: padded
            assert w(torch.randn(1, 3, 160, 192)).shape == (1, DIM, 10, 12)  # beyond img_size: offsets clamped


def test_window_bias_is_timms_without_cls():
    torch.manual_seed(0)
    attn = blind_to_cls(tiny_beit()).blocks[0].attn
    full = attn._get_rel_pos_bias()[0, :, 1:, 1:]  # timm's (nH, 16, 16) on the 4 x 4 grid
    torch.testing.assert_close(window_rel_pos_bias(attn.relative_position_bias_table, (4, 4), (4, 4)), full)
    sub = [r * 4 + c for r in range(3) for c in range(2)]  # a 3 x 2 window: the same offsets, a sub-grid
    torch.testing.assert_close(window_rel_pos_bias(attn.relative_position_bias_table, (4, 4), (3, 2)),
                               full[:, sub][:, :, sub])


def test_added_block_and_tables():
    torch.manual_seed(0)
    net = blind_to_cls(tiny_beit())
    last = copy.deepcopy(net.blocks[-1])
    w = WindowedViT(net, window_size=2, img_size=128)  # grid 8 x 8; pre-trained on 4 x 4
    assert len(w.blocks) == 3 and w.depth == 2 and w.global_blocks == [2]
    new = w.blocks[2]
    assert new is not net.blocks[-1] and type(new) is type(last)
    assert not torch.equal(new.attn.qkv.weight, last.attn.qkv.weight)
    assert torch.count_nonzero(new.attn.q_bias) == 0
    assert new.attn.relative_position_bias_table.shape == (15 * 15 + 3, 2)  # the 8 x 8 grid, zero
    assert torch.count_nonzero(new.attn.relative_position_bias_table) == 0
    assert w.blocks[0].attn.window_size == (4, 4)  # windowed blocks keep their pre-trained table

    s = blind_to_cls(tiny_student())
    shared = s.rel_pos_bias.relative_position_bias_table
    w = WindowedViT(s, window_size=2, global_blocks=[1], img_size=128)
    assert w.rel_pos_bias.relative_position_bias_table is shared  # windowed blocks share it
    g = w.blocks[1].attn.relative_position_bias_table  # global block: a copy resized to 8 x 8
    assert g.shape == (15 * 15 + 3, 2) and g is not shared
    assert w.blocks[0].attn.relative_position_bias_table is None
    assert torch.count_nonzero(w.blocks[2].attn.relative_position_bias_table) == 0
    assert w.blocks[2].gamma_1.eq(0.1).all()  # layer scale of the fresh block
    names = w.no_weight_decay()
    assert {"rel_pos_bias.relative_position_bias_table", "blocks.1.attn.relative_position_bias_table"} <= names
    with torch.no_grad():
        out = w(torch.randn(1, 3, 128, 128))
    assert out.shape == (1, DIM, 8, 8) and torch.isfinite(out).all()
    copy.deepcopy(w)  # EMA copies; checkpoints may pickle
    pickle.loads(pickle.dumps(w))


def test_tables_grow_to_the_window_and_never_shrink():
    torch.manual_seed(0)
    s = blind_to_cls(tiny_student(img_size=128))  # pre-trained on an 8 x 8 grid
    x = torch.randn(1, 3, 64, 64)
    plain = WindowedViT(copy.deepcopy(s), window_size=14, add_global_block=False, img_size=64).eval()
    w = WindowedViT(s, window_size=14, global_blocks=[1], add_global_block=False, img_size=64).eval()
    assert w.blocks[1].attn.window_size == (8, 8)  # the global copy keeps 8 x 8 for a 4 x 4 grid
    torch.testing.assert_close(w.blocks[1].attn.relative_position_bias_table, s.rel_pos_bias.relative_position_bias_table)
    with torch.no_grad():  # a 4 x 4 grid reads the same offsets of the copy as of the shared table
        torch.testing.assert_close(w(x), plain(x), atol=1e-5, rtol=1e-5)
    small = tiny_student(img_size=64)  # 4 x 4 table, window 14 on a 224 px (14 x 14) input: resized by timm
    w = WindowedViT(small, window_size=14, img_size=224)
    assert tuple(w.rel_pos_bias.window_size) == (14, 14)
    assert w.rel_pos_bias.relative_position_bias_table.shape == (27 * 27 + 3, 2)


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    s = tiny_student()
    a = WindowedViT(copy.deepcopy(s), window_size=2, img_size=64)
    b = WindowedViT(copy.deepcopy(s), window_size=2, img_size=64, grad_checkpointing=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 64, 64)
    a(x).square().sum().backward()
    b(x).square().sum().backward()
    torch.testing.assert_close(a.patch_embed.proj.weight.grad, b.patch_embed.proj.weight.grad)
    torch.testing.assert_close(a.rel_pos_bias.relative_position_bias_table.grad,
                               b.rel_pos_bias.relative_position_bias_table.grad)


def test_unusable_backbones_are_refused():
    with pytest.raises(DenseError, match="not a plain ViT"):
        WindowedViT(torch.nn.Conv2d(3, 8, 3))
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=64, window_size=2,
                             embed_dim=24, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
    with pytest.raises(DenseError, match="Swin"):
        WindowedViT(swin)
    eva = timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=56, depth=1)
    with pytest.raises(DenseError, match="EVA"):
        WindowedViT(eva)

    class PythonModel(torch.nn.Module):  # a python: adapter around a CNN
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3))

    with pytest.raises(DenseError, match="plain ViT"):
        WindowedViT(PythonModel())
    with pytest.raises(DenseError, match="global_blocks"):
        WindowedViT(tiny_vit(), global_blocks=[5])


def test_simple_feature_pyramid_strides():
    fpn = SimpleFeaturePyramid(DIM, out_channels=24).eval()
    x = torch.randn(2, DIM, 8, 10)  # 128 x 160 at stride 16
    out = fpn(x)
    assert list(out) == ["0", "1", "2", "3", "pool"] and fpn.out_channels == 24
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "0": (2, 24, 32, 40), "1": (2, 24, 16, 20), "2": (2, 24, 8, 10), "3": (2, 24, 4, 5), "pool": (2, 24, 2, 3)}
    assert [128 // v.shape[-2] for v in out.values()] == [4, 8, 16, 32, 64]
    with pytest.raises(DenseError, match="scale 3"):
        SimpleFeaturePyramid(DIM, scales=(3.0,))


# -- Mask R-CNN --------------------------------------------------------------------------------
def _data():
    torch.manual_seed(0)
    images = [torch.rand(3, 128, 160), torch.rand(3, 128, 160)]
    targets = []
    for boxes, labels in (([[10, 20, 80, 90]], [1]), ([[30, 30, 120, 100], [90, 10, 150, 60]], [2, 1])):
        b = torch.tensor(boxes, dtype=torch.float32)
        m = torch.zeros(len(boxes), 128, 160, dtype=torch.uint8)
        for j, (x0, y0, x1, y1) in enumerate(boxes):
            m[j, y0:y1, x0:x1] = 1
        targets.append({"boxes": b, "labels": torch.tensor(labels), "masks": m})
    return images, targets


@pytest.mark.parametrize("which", ["vit", "fd_student_adapter"])
def test_maskrcnn_trains_and_predicts(which):
    from torchvision.models.detection import MaskRCNN

    from fdistill.dense.maskrcnn import build_maskrcnn

    torch.manual_seed(0)
    if which == "vit":
        backbone = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, embed_dim=64, depth=2,
                                     num_heads=2, num_classes=0)
        mean = backbone.pretrained_cfg["mean"]
    else:
        backbone = StudentAdapter(tiny_student(), name="s")  # frozen, as load_model gives it
        mean = backbone.mean
    small = dict(rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=64, rpn_pre_nms_top_n_test=200,
                 rpn_post_nms_top_n_test=32, box_batch_size_per_image=32, box_detections_per_img=10, out_channels=32)  # CPU time
    model = build_maskrcnn(backbone, 2, window_size=4, min_size=128, max_size=160, **small)
    assert isinstance(model, MaskRCNN) and model.roi_heads.detections_per_img == 10
    assert tuple(model.transform.image_mean) == pytest.approx(tuple(mean))
    images, targets = _data()
    model.train()
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    g = model.backbone.body.patch_embed.proj.weight.grad
    assert g is not None and g.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        out = model(images)
    for o in out:
        n = o["boxes"].shape[0]
        assert o["boxes"].shape == (n, 4) and o["labels"].shape == o["scores"].shape == (n,)
        assert o["masks"].shape == (n, 1, 128, 160)
        assert n == 0 or int(o["labels"].max()) <= 2


def test_layer_decay_ids_through_the_detector():
    from fdistill.dense.maskrcnn import build_maskrcnn
    from fdistill.eval.layer_decay import find_blocks, layer_ids, param_groups_layer_decay

    depth = 3
    model = build_maskrcnn(tiny_student(depth=depth), 2, window_size=4, min_size=128, max_size=160)
    blocks = find_blocks(model)
    assert blocks == [f"backbone.body.blocks.{i}" for i in range(depth + 1)]  # + the added global block
    ids, L = layer_ids(model)
    assert L == depth + 1
    for name, lid in ids.items():
        if name.startswith(("backbone.body.patch_embed", "backbone.body.rel_pos_bias", "backbone.body.pos_embed")):
            assert lid == 0, name
        elif name.startswith("backbone.body.blocks."):
            assert lid == int(name.split(".")[3]) + 1, name  # block i -> i + 1, added block -> depth + 1
        else:
            assert name.startswith(("backbone.fpn", "rpn", "roi_heads")) and lid == depth + 2, name
    groups = param_groups_layer_decay(model, layer_decay=0.5, weight_decay=0.05)
    by_id = {}
    for g in groups:
        by_id.setdefault(g["layer_id"], set()).add(g["lr_scale"])
    assert by_id == {i: {0.5 ** (depth + 2 - i)} for i in range(depth + 3)}
    nwd = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(model.backbone.body.rel_pos_bias.relative_position_bias_table) in nwd  # model.no_weight_decay()
    assert id(model.backbone.body.blocks[depth].attn.qkv.weight) not in nwd
