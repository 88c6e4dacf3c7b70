"""Windowed attention (timm Swin / Swin V2): capture against a manual softmax, and attention
distance against a brute-force oracle worked in image coordinates (shifted windows included)."""
import json
import math

import pytest
import torch

from fdistill.diagnostics import AttentionCaptureError, WindowGeometry, capture_attention
from fdistill.diagnostics.commands import DataOptions, ModelRef, measure_attention, run_attention_distance, \
    run_attention_maps
from fdistill.diagnostics.models import load_diagnostic_model
from fdistill.diagnostics.plots import figure_png_ok

pytestmark = pytest.mark.usefixtures("one_thread")

# 32 px input, patch 4 -> stage 0: 8x8 tokens in 4x4 windows (block 1 shifted by 2), stage 1: 4x4
# tokens = one 4x4 window (timm turns the shift off when the window covers the stage)
SWIN = ("timm:swin_tiny_patch4_window7_224", dict(pretrained=False, img_size=32, window_size=4, embed_dim=16,
                                                  depths=(2, 2), num_heads=(1, 2)))
SWINV2 = ("timm:swinv2_tiny_window8_256", dict(pretrained=False, img_size=32, window_size=4, embed_dim=16,
                                               depths=(2, 2), num_heads=(1, 2)))


def _window_attentions(model):
    return [m for n, m in model.named_modules() if type(m).__name__ == "WindowAttention"]


def test_swin_capture_matches_manual_softmax_with_bias_and_shift_mask():
    from fdistill import create_teacher

    t = create_teacher(SWIN[0], **SWIN[1])
    attns = _window_attentions(t.model)
    fused_before = [a.fused_attn for a in attns]
    seen, handles = {}, []
    for i, a in enumerate(attns):  # the window tokens and shift mask each attention module receives
        handles.append(a.register_forward_pre_hook(
            lambda mod, args, kwargs, i=i: seen.__setitem__(i, (args[0], kwargs.get("mask"))), with_kwargs=True))
    maps = {}
    x = torch.randn(2, 3, 32, 32)
    ref_out = t.forward_tokens(x).full()
    with capture_attention(t, lambda i, a: maps.__setitem__(i, a.clone())) as cap:
        out = t.forward_tokens(x).full()
    for h in handles:
        h.remove()
    assert [a.fused_attn for a in attns] == fused_before
    assert torch.allclose(out, ref_out, atol=1e-5)
    assert cap.families == ["timm"] and cap.num_layers == 4
    stage0, stage1 = WindowGeometry((4, 4), (8, 8)), WindowGeometry((4, 4), (4, 4))
    assert [cap.window(i) for i in range(4)] == [stage0, stage0, stage1, stage1]
    assert [tuple(maps[i].shape) for i in range(4)] == [(8, 1, 16, 16)] * 2 + [(2, 2, 16, 16)] * 2
    assert seen[1][1] is not None and seen[0][1] is None  # block 1 is the shifted one
    for i, a in enumerate(attns):
        xw, mask = seen[i]
        Bw, N, _ = xw.shape
        q, k, _ = a.qkv(xw).reshape(Bw, N, 3, a.num_heads, -1).permute(2, 0, 3, 1, 4)
        logits = (q * a.scale) @ k.transpose(-2, -1) + a._get_rel_pos_bias()
        if mask is not None:  # (windows, N, N), image-major batch of windows
            logits = (logits.view(-1, mask.shape[0], a.num_heads, N, N) + mask[None, :, None]).view(Bw, -1, N, N)
        assert torch.allclose(maps[i], logits.softmax(-1), atol=1e-5)


def test_window_geometry_mismatch_is_an_error():
    from fdistill import create_teacher

    t = create_teacher(SWIN[0], **SWIN[1])
    t.model.layers[0].blocks[0].attn.window_size = (2, 8)  # lies about its window: 16 tokens either way...
    t.model.layers[0].blocks[1].attn.window_size = (3, 3)  # ...but not here
    with pytest.raises(AttentionCaptureError, match="attends over 16 tokens but its window is 3x3"):
        with capture_attention(t, lambda i, a: None):
            t.forward_tokens(torch.randn(1, 3, 32, 32))


def _uniform_within_regions(model):
    """Zero what makes attention logits differ: q and k (cosine attention of zero vectors is 0) and
    the position biases (V2: a constant 16 * sigmoid(0)); only the shift mask remains."""
    for a in _window_attentions(model):
        a.qkv.weight.data.zero_()
        for name in ("q_bias", "k_bias"):
            if getattr(a, name, None) is not None:
                getattr(a, name).data.zero_()
        if getattr(a.qkv, "bias", None) is not None:
            a.qkv.bias.data.zero_()
        if hasattr(a, "relative_position_bias_table"):
            a.relative_position_bias_table.data.zero_()
        if hasattr(a, "cpb_mlp"):
            for p in a.cpb_mlp.parameters():
                p.data.zero_()


def _oracle_distance_px(res: int, window: int, shift: int, px: float) -> float:
    """Mean over tokens of the mean distance (pixels, image coordinates) to the other tokens that
    share its window and its shift region, the way Swin groups them: roll the image by -shift,
    cut windows, and in shifted blocks split the rolled grid at -window and -shift into regions."""
    def region(c):  # timm's slices (0, -window), (-window, -shift), (-shift, None) of the rolled grid
        return 0 if c < res - window else (1 if c < res - shift else 2)

    groups = {}
    for y in range(res):
        for x in range(res):
            ry, rx = (y - shift) % res, (x - shift) % res
            key = (ry // window, rx // window) + ((region(ry), region(rx)) if shift else ())
            groups.setdefault(key, []).append((y, x))
    total, n = 0.0, 0
    for members in groups.values():
        for q in members:
            others = [k for k in members if k != q]
            total += sum(math.dist(q, k) for k in others) / len(others) * px
            n += 1
    return total / n


@pytest.mark.parametrize("spec", [SWIN, SWINV2], ids=["swin", "swinv2"])
def test_window_distance_matches_brute_force_oracle(spec):
    dm = load_diagnostic_model(spec[0], kwargs=spec[1])
    _uniform_within_regions(dm.module)
    batches = [(torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8), torch.zeros(3))]
    st = measure_attention(dm, batches, progress=False)
    want = [_oracle_distance_px(8, 4, 0, 4), _oracle_distance_px(8, 4, 2, 4),
            _oracle_distance_px(4, 4, 0, 8), _oracle_distance_px(4, 4, 0, 8)]
    # by hand: a 4x4 window, uniform over the 15 others: 2.14195 steps (4 px: 8.5678; 8 px: 17.1356)
    assert want[0] == pytest.approx(8.5678, abs=1e-3) and want[2] == pytest.approx(17.1356, abs=1e-3)
    assert want[1] < want[0]  # shift regions are smaller than windows
    got = [d.tolist() for d in st["distance"]]
    assert [len(h) for h in got] == [1, 1, 2, 2]
    for g, w in zip(got, want):
        assert g == pytest.approx([w] * len(g), rel=1e-4)
    assert [g["patch_px"] for g in st["geometry"]] == [4, 4, 8, 8]
    assert all(g["windowed"] and g["num_prefix_tokens"] == 0 for g in st["geometry"])
    for a in st["maps"].values():  # one window's mean map, rows still distributions
        assert a.shape == (16, 16) and torch.allclose(a.sum(-1), torch.ones(16), atol=1e-5)


def test_swin_and_vit_side_by_side_files(tmp_path):
    vit = ModelRef("timm:vit_tiny_patch16_224", dict(pretrained=False, img_size=32, patch_size=8, depth=2,
                                                     embed_dim=24, num_heads=3), "vit")
    refs = [ModelRef(*SWIN, label="swin"), vit]
    data = DataOptions("synthetic:16", images=6, batch_size=3)
    js = run_attention_distance(refs, data, tmp_path, progress=False)
    on_disk = json.loads((tmp_path / "attention_distance.json").read_text())
    assert on_disk["models"] == json.loads(json.dumps(js["models"]))
    swin, v = on_disk["models"]
    assert (swin["heads"], swin["heads_per_layer"], swin["windowed"]) == (None, [1, 1, 2, 2], True)
    assert (swin["layer_patch_px"], swin["layer_window"]) == ([4, 4, 8, 8], [[4, 4]] * 4)
    assert (v["heads"], v["heads_per_layer"], v["windowed"], v["layer_window"]) == (3, [3, 3], False, [None, None])
    assert [len(r) for r in swin["distance_px"]] == [1, 1, 2, 2]
    assert swin["layer_mean_px"][2] == pytest.approx(sum(swin["distance_px"][2]) / 2)
    # nothing beyond a window's reach: the 4x4 window's farthest pair is 3*sqrt(2) steps
    assert all(0 < d <= 3 * math.sqrt(2) * px for r, px in zip(swin["distance_px"], swin["layer_patch_px"]) for d in r)
    assert figure_png_ok(tmp_path / "attention_distance.png")

    mj = run_attention_maps(refs, data, tmp_path / "maps", layers=[1, 2], progress=False)
    sw = mj["models"][0]["summary"]
    assert [(r["layer"], r["tokens"], r["windowed"], r["num_prefix_tokens"]) for r in sw] == \
        [(1, 16, True, 0), (2, 16, True, 0)]
    assert [(r["tokens"], r["windowed"], r["num_prefix_tokens"]) for r in mj["models"][1]["summary"]] == \
        [(17, False, 1)] * 2
    assert figure_png_ok(tmp_path / "maps" / "attention_maps.png")
