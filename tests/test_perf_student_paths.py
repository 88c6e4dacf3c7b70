"""The student's CPU speed paths keep timm's values: FDBlock (drop path skips the dropped
samples) against timm's BEiT Block from the same random draws, and FDAttention's kernel choice
(explicit path for a trainable bias on CPU, fused SDPA otherwise)."""
import collections
import copy

import pytest
import torch
from timm.models.beit import Attention, Block
from torch.utils._python_dispatch import TorchDispatchMode

from fdistill import create_student
from fdistill.models.masking import random_mask
from fdistill.models.student import sdpa_ready_bias
from fdistill.speed import FDAttention, FDBlock


class OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()
        self.count = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func.overloadpacket))
        self.count[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def plain(student):
    s = copy.deepcopy(student)
    for blk in s.blocks:
        blk.__class__ = Block
        blk.attn.__class__ = Attention
    return s


def run(student, x, seed, **kw):
    torch.manual_seed(seed)
    out = student.forward_tokens(x, **kw)
    out.pow(2).mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("ckpt", [False, True])
def test_fdblock_equals_timm_block_with_the_same_draws(ckpt):
    s = create_student("vit_tiny", img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2,
                       drop_path_rate=0.6, grad_checkpointing=ckpt).train()
    assert all(type(b) is FDBlock and type(b.attn) is FDAttention for b in s.blocks)
    ref = plain(s)
    x = torch.randn(8, 3, 32, 32)
    rows = []
    s.blocks[3].mlp.register_forward_hook(lambda m, a, o: rows.append(a[0].shape[0]))
    for seed in range(3):
        got, g_got = run(s, x, seed)
        want, g_want = run(ref, x, seed)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert g_got.keys() == g_want.keys()
        for n in g_want:
            torch.testing.assert_close(g_got[n], g_want[n], rtol=1e-4, atol=1e-6, msg=n)
        s.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
    assert min(rows) < 8  # the last block's MLP really ran on the kept samples only


def test_fdblock_with_dropped_masked_tokens_per_sample_bias():
    s = create_student("vit_tiny", img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2,
                       drop_path_rate=0.6).train()
    with torch.no_grad():
        s.rel_pos_bias.relative_position_bias_table.normal_()
    ref = plain(s)
    x = torch.randn(6, 3, 32, 32)
    mask = random_mask(6, (4, 4), 0.5)
    got, g_got = run(s, x, 7, mask=mask, drop_masked=True, num_visible=8)
    want, g_want = run(ref, x, 7, mask=mask, drop_masked=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for n in g_want:
        torch.testing.assert_close(g_got[n], g_want[n], rtol=1e-4, atol=1e-6, msg=n)


def test_fdblock_is_timms_block_in_eval_and_without_drop_path():
    s = create_student("vit_tiny", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                       drop_path_rate=0.0).train()
    ref = plain(s)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(s.forward_tokens(x), ref.forward_tokens(x))
    s2 = create_student("vit_tiny", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                        drop_path_rate=0.5).eval()
    assert torch.equal(s2.forward_tokens(x), plain(s2).eval().forward_tokens(x))


def test_attention_path_choice_on_cpu():
    s = create_student("vit_tiny", img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                       drop_path_rate=0.0)
    x = torch.randn(2, 3, 32, 32)
    with OpNames() as w:  # training, trainable bias: explicit softmax, not SDPA's math fallback
        s.forward_tokens(x).sum().backward()
    assert "aten._softmax" in w.ops and "aten._safe_softmax" not in w.ops
    with torch.no_grad(), OpNames() as w:  # evaluation: the 4-d bias takes the fused CPU kernel
        out = s.forward_tokens(x)
    assert "aten._scaled_dot_product_flash_attention_for_cpu" in w.ops
    assert s.blocks[0].attn.fused_attn  # restored after the explicit call
    torch.testing.assert_close(out, plain(s).forward_tokens(x).detach(), rtol=1e-5, atol=1e-6)
    s.blocks[0].attn.fused_attn = False  # a user's choice (e.g. attention capture) is kept
    with torch.no_grad(), OpNames() as w:
        s.forward_tokens(x)
    assert "aten._softmax" in w.ops and not s.blocks[0].attn.fused_attn


def test_sdpa_ready_bias_is_aligned_in_autocast_dtype():
    bias = torch.randn(1, 3, 17, 17, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        b = sdpa_ready_bias(bias)
    assert b.dtype == torch.bfloat16 and b.shape == (1, 3, 17, 17)
    assert b.stride(-2) % 16 == 0 and b.stride(-1) == 1
    assert torch.equal(b, bias.detach().to(torch.bfloat16))
    b.float().sum().backward()  # the gradient reaches the table through the pad/slice
    assert torch.equal(bias.grad, torch.ones_like(bias))
    c = sdpa_ready_bias(torch.randn(2, 3, 32, 32))  # already aligned: unchanged
    assert c.stride(-2) == 32 and c.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_student_attention_uses_the_memory_efficient_kernel_without_per_block_padding():
    """The trainable bias goes to SDPA's memory-efficient kernel (it returns the bias gradient), not
    the math path, and is padded once per forward, not in every block."""
    s = create_student("vit_small", img_size=224, patch_size=16, depth=4, drop_path_rate=0.1).cuda().train()
    x = torch.randn(8, 3, 224, 224, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16), OpNames() as w:
        out = s.forward_tokens(x)
    out.float().pow(2).mean().backward()
    assert "aten._scaled_dot_product_efficient_attention" in w.ops
    assert "aten._scaled_dot_product_attention_math" not in w.ops
    assert s.rel_pos_bias.relative_position_bias_table.grad is not None
    with torch.autocast("cuda", dtype=torch.bfloat16), OpNames() as w:
        s.forward_tokens(x)
    # our one pad per forward; SDPA's own per-block padding of an unaligned bias would add 4 more
    assert w.count["aten.constant_pad_nd"] == 1
