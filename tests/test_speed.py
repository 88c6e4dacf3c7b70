"""The one switch of ``fdistill.speed`` and its guards: on (default), students get the CPU paths
and fused AdamW skips on the device flag; off, everything is the libraries' own; a timm BEiT that
is not what the paths were written for is refused with an error naming the switch. (That the
paths keep timm's values: tests/test_perf_student_paths.py; that fused AdamW skips on the flag:
tests/test_engine_optim.py.)"""
import os
import subprocess
import sys

import pytest
import torch
from timm.models.beit import Attention, Block

from fdistill import create_student
from fdistill.engine.optim import create_adamw
from fdistill.engine.step import TrainStep
from fdistill import speed


@pytest.fixture
def speed_off():
    speed.set_enabled(False)
    try:
        yield
    finally:
        speed.set_enabled(True)


def _student():
    torch.manual_seed(0)
    return create_student("vit_tiny", img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                          drop_path_rate=0.2)


def test_on_by_default_students_get_the_cpu_paths_and_the_step_skips_on_the_device():
    assert speed.enabled()
    s = _student()
    assert [type(b) for b in s.blocks] == [speed.FDBlock] * 2
    assert [type(b.attn) for b in s.blocks] == [speed.FDAttention] * 2
    step = TrainStep(torch.nn.Linear(2, 1), create_adamw(torch.nn.Linear(2, 1), lr=0.1))
    assert step.device_skip


def test_off_everything_is_the_libraries_own(speed_off):
    s = _student()
    assert [type(b) for b in s.blocks] == [Block] * 2 and [type(b.attn) for b in s.blocks] == [Attention] * 2
    lin = torch.nn.Linear(2, 1)
    opt = create_adamw(lin, lr=0.1)
    assert opt.defaults["fused"] and not speed.fused_skip_supported(opt)
    assert not TrainStep(lin, opt).device_skip
    # the allocator setting is per process (and this one already has it): a fresh process with the switch off
    env = dict(os.environ, FDISTILL_SPEED_PATHS="0")
    out = subprocess.run([sys.executable, "-c", "from fdistill import speed; print(speed.enabled(), "
                          "speed.tune_cpu_allocator())"], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "False"], out.stderr[-2000:]


def test_the_switch_keeps_the_values_of_a_training_step(speed_off):
    """One step of the same student on the same batch, with and without the paths: the same
    drop-path draws, so the same loss and weights up to the attention kernels' rounding."""
    x = torch.rand(4, 3, 16, 16)

    def one_step():
        s = _student().train()
        opt = create_adamw(s, lr=1e-3)
        torch.manual_seed(1)
        loss = s.forward_tokens(x).pow(2).mean()
        loss.backward()
        opt.step()
        return loss.item(), s.state_dict()

    off_loss, off_w = one_step()
    speed.set_enabled(True)
    on_loss, on_w = one_step()
    assert on_loss == pytest.approx(off_loss, rel=1e-5)
    for k, v in off_w.items():
        torch.testing.assert_close(on_w[k], v, rtol=1e-4, atol=1e-6, msg=k)


def test_a_changed_timm_block_is_refused_loudly():
    s = _student()
    speed.check_timm_beit(s.blocks[0])  # the installed timm is what the paths were written for

    class Overridden(Block):  # a subclass may override forward: the paths would skip its changes
        pass

    blk = s.blocks[1]
    blk.__class__ = Overridden
    with pytest.raises(RuntimeError, match=r"block is .*Overridden.*FDISTILL_SPEED_PATHS=0"):
        speed.check_timm_beit(blk)
    speed.set_enabled(False)
    try:
        plain = _student()  # timm's blocks as they are
    finally:
        speed.set_enabled(True)
    del plain.blocks[1].gamma_1
    with pytest.raises(RuntimeError, match=r"no block\.gamma_1"):
        speed.apply_student_speed_paths(plain)
    assert [type(b) for b in plain.blocks] == [Block] * 2  # every block checked before any is changed
