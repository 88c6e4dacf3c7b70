"""Attention capture against independent computations, per family: timm ViT, the FD student (BEiT
attention with relative position bias), open_clip (nn.MultiheadAttention) and Hugging Face."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fdistill.diagnostics import AttentionCaptureError, capture_attention


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (conftest)


class _Recorder:
    def __init__(self):
        self.maps = {}

    def __call__(self, layer, attn):
        self.maps.setdefault(layer, []).append(attn.clone())


def _inputs_of(modules):
    """Forward pre-hooks recording each module's first input (the tokens attention sees)."""
    seen, handles = {}, []
    for i, m in enumerate(modules):
        handles.append(m.register_forward_pre_hook(lambda mod, args, i=i: seen.__setitem__(i, args[0].detach())))
    return seen, handles


def _softmax_ref(q, k, scale, bias=None):
    logits = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        logits = logits + bias
    return logits.softmax(-1)


def _heads(t, B, T, H):
    return t.reshape(B, T, H, -1).transpose(1, 2)  # (B, H, T, d)


def _check_rows(maps, T):
    for attn in maps:
        assert attn.shape[-2:] == (T, T)
        assert torch.allclose(attn.sum(-1), torch.ones(()), atol=1e-5)


def test_timm_vit_matches_manual_softmax(tiny_vit_teacher):
    t = tiny_vit_teacher
    x = torch.randn(2, 3, 32, 32)
    ref_out = t.forward_tokens(x).full()
    attns = [b.attn for b in t.model.blocks]
    fused_before = [a.fused_attn for a in attns]
    seen, handles = _inputs_of(attns)
    rec = _Recorder()
    with capture_attention(t, rec) as cap:
        out = t.forward_tokens(x).full()
    for h in handles:
        h.remove()
    assert [a.fused_attn for a in attns] == fused_before
    assert cap.families == ["timm"] and cap.num_layers == 2 and cap.layer_names[1].endswith("blocks.1.attn")
    assert torch.allclose(out, ref_out, atol=1e-5)  # capture changes no output
    for i, a in enumerate(attns):
        B, T, C = seen[i].shape
        q, k, _ = a.qkv(seen[i]).reshape(B, T, 3, a.num_heads, -1).permute(2, 0, 3, 1, 4)
        ref = _softmax_ref(q, k, a.scale)
        assert torch.allclose(rec.maps[i][0], ref, atol=1e-5)
    _check_rows([m[0] for m in rec.maps.values()], 17)


def test_fd_student_includes_relative_position_bias(tiny_student):
    s = tiny_student.eval()
    with torch.no_grad():  # make the bias matter
        s.rel_pos_bias.relative_position_bias_table.normal_(0, 2.0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref_out = s.forward_tokens(x)
        bias = s.rel_pos_bias()  # (H, T, T)
    attns = [b.attn for b in s.blocks]
    seen, handles = _inputs_of(attns)
    rec = _Recorder()
    with torch.no_grad(), capture_attention(s, rec) as cap:
        out = s.forward_tokens(x)
    for h in handles:
        h.remove()
    assert torch.allclose(out, ref_out, atol=1e-5)
    assert cap.num_layers == 2
    for i, a in enumerate(attns):
        B, T, C = seen[i].shape
        qkv_bias = torch.cat((a.q_bias, a.k_bias, a.v_bias))
        q, k, _ = F.linear(seen[i], a.qkv.weight, qkv_bias).reshape(B, T, 3, a.num_heads, -1).permute(2, 0, 3, 1, 4)
        with_bias = _softmax_ref(q, k, a.scale, bias)
        without = _softmax_ref(q, k, a.scale)
        assert torch.allclose(rec.maps[i][0], with_bias, atol=1e-5)
        assert not torch.allclose(rec.maps[i][0], without, atol=1e-3)


def _tiny_open_clip():
    from open_clip.model import CLIP

    return CLIP(embed_dim=16, vision_cfg=dict(layers=2, width=32, head_width=16, patch_size=8, image_size=32),
                text_cfg=dict(context_length=8, vocab_size=50, width=32, heads=2, layers=1)).eval()


def test_open_clip_multihead_attention():
    m = _tiny_open_clip()
    x = torch.randn(2, 3, 32, 32)
    mhas = [b.attn for b in m.visual.transformer.resblocks]
    seen, handles = _inputs_of(mhas)
    rec = _Recorder()
    with torch.no_grad():
        ref_out = m.encode_image(x)
        with capture_attention(m, rec, name="tiny open_clip") as cap:
            out = m.encode_image(x)
    for h in handles:
        h.remove()
    assert cap.families == ["torch.nn.MultiheadAttention"]
    assert torch.allclose(out, ref_out, atol=1e-5)
    assert cap.num_layers == 2  # the text tower did not run: only the visual layers are numbered
    for i, mha in enumerate(mhas):
        xin = seen[i]
        if not mha.batch_first:
            xin = xin.transpose(0, 1)
        B, T, C = xin.shape
        q, k, _ = F.linear(xin, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
        H = mha.num_heads
        ref = _softmax_ref(_heads(q, B, T, H), _heads(k, B, T, H), (C // H) ** -0.5)
        assert torch.allclose(rec.maps[i][0], ref, atol=1e-5)
    # hooks are gone: the module again returns no weights when asked for none
    blk = m.visual.transformer.resblocks[0]
    t = torch.randn(2, 17, 32)
    assert blk.attn(t, t, t, need_weights=False)[1] is None


def _tiny_hf(kind):
    if kind == "vit":
        from transformers import ViTConfig, ViTModel

        cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        image_size=32, patch_size=8)
        return ViTModel(cfg, add_pooling_layer=False).eval()
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                           image_size=32, patch_size=8)
    return CLIPVisionModel(cfg).eval()


@pytest.mark.parametrize("kind", ["vit", "clip"])
def test_hugging_face_matches_output_attentions(kind):
    m = _tiny_hf(kind)
    impl = m.config._attn_implementation
    x = torch.randn(2, 3, 32, 32)
    rec = _Recorder()
    with torch.no_grad():
        ref_out = m(pixel_values=x).last_hidden_state
        with capture_attention(m, rec, name=f"hf {kind}") as cap:
            out = m(pixel_values=x).last_hidden_state
        assert m.config._attn_implementation == impl  # restored
        m.set_attn_implementation("eager")
        ref = m(pixel_values=x, output_attentions=True).attentions
    assert cap.families == ["hf"] and cap.num_layers == len(ref)
    assert torch.allclose(out, ref_out, atol=1e-5)
    for i, r in enumerate(ref):
        assert torch.allclose(rec.maps[i][0], r, atol=1e-6)
    _check_rows([m[0] for m in rec.maps.values()], 17)


def test_streaming_one_layer_at_a_time(tiny_vit_teacher):
    """The callback sees each layer as it is computed: layer 0 before layer 1 runs."""
    order = []
    t = tiny_vit_teacher
    hook = t.model.blocks[1].register_forward_pre_hook(lambda *a: order.append("block1 starts"))
    with capture_attention(t, lambda i, a: order.append(i)):
        t.forward_tokens(torch.randn(1, 3, 32, 32))
        t.forward_tokens(torch.randn(1, 3, 32, 32))
    hook.remove()
    assert order == [0, "block1 starts", 1, 0, "block1 starts", 1]


def test_cnn_is_an_error_naming_the_model():
    from fdistill import create_teacher

    cnn = create_teacher("timm:resnet18", pretrained=False)
    with pytest.raises(AttentionCaptureError, match="timm:resnet18.*no attention"):
        with capture_attention(cnn, lambda i, a: None):
            pass


def test_unknown_attention_module_is_an_error():
    class MyAttention(nn.Module):
        def forward(self, x):
            return x

    net = nn.Sequential(MyAttention())
    with pytest.raises(AttentionCaptureError, match="MyAttention"):
        with capture_attention(net, lambda i, a: None, name="custom"):
            pass


def test_nothing_captured_is_an_error(tiny_vit_teacher):
    fused = [b.attn.fused_attn for b in tiny_vit_teacher.model.blocks]
    with pytest.raises(AttentionCaptureError, match="none of its attention modules"):
        with capture_attention(tiny_vit_teacher, lambda i, a: None):
            pass  # the model never runs
    # restored after the error, hooks removed
    assert [b.attn.fused_attn for b in tiny_vit_teacher.model.blocks] == fused
    assert not any(b.attn.attn_drop._forward_hooks for b in tiny_vit_teacher.model.blocks)


def test_windowed_attention_rejected_when_tokens_given(tiny_vit_teacher):
    with pytest.raises(AttentionCaptureError, match="attends over 17 tokens"):
        with capture_attention(tiny_vit_teacher, lambda i, a: None, expected_tokens=50):
            tiny_vit_teacher.forward_tokens(torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("name,kw,prefix", [
    ("eva02_tiny_patch14_224", dict(img_size=28, depth=2), 1),  # EvaAttention with rotary embeddings
    ("vit_small_patch14_reg4_dinov2", dict(img_size=28, depth=2), 5),  # [CLS] + 4 registers
])
def test_other_timm_families(name, kw, prefix):
    from fdistill import create_teacher

    t = create_teacher(f"timm:{name}", pretrained=False, **kw)
    x = torch.randn(2, 3, 28, 28)
    ref = t.forward_tokens(x).full()
    rec = _Recorder()
    with capture_attention(t, rec, expected_tokens=prefix + 4) as cap:
        out = t.forward_tokens(x).full()
    assert cap.families == ["timm"] and cap.num_layers == 2
    assert torch.allclose(out, ref, atol=1e-5)
    _check_rows([m[0] for m in rec.maps.values()], prefix + 4)
