"""Multi-resolution training (issue 15, RADIO v2.5): the student at other input sizes, the
per-step size schedule, the loss of a step at another size, and exact resume."""
import os
import signal

import pytest
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models.beit import gen_relative_position_index

from fdistill import create_student, create_teacher
from fdistill.config import ConfigError
from fdistill.engine import distill, load_checkpoint
from fdistill.engine.checkpoint import list_checkpoints
from fdistill.losses import feature_distill_loss
from fdistill.models.student import clipped_relative_position_index
from fdistill.multi.distiller import MultiTeacherDistiller, TeacherSpec
from fdistill.multi.resolution import ResolutionSchedule
from test_multi_distiller import _multi_cfg

pytestmark = pytest.mark.usefixtures("one_thread")


def _student(**kw):
    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, drop_path_rate=0.0)
    return create_student("vit_tiny", **{**args, **kw})


@pytest.mark.parametrize("window", [(4, 4), (3, 5)])
def test_the_index_at_the_tables_own_grid_is_timms(window):
    assert torch.equal(clipped_relative_position_index(window, window), gen_relative_position_index(window))


def test_a_smaller_grid_reads_the_sub_table_and_a_larger_one_clips_the_offsets():
    s = _student(img_size=16)  # 4x4 table
    with torch.no_grad():
        s.rel_pos_bias.relative_position_bias_table.normal_()  # timm starts it at zero
    base = s.rel_pos_bias_at((4, 4))  # (H, 17, 17)
    assert torch.equal(base, s.rel_pos_bias())
    small = s.rel_pos_bias_at((2, 2))  # (H, 5, 5): the top-left 2x2 patches of the 4x4 grid
    keep = torch.tensor([0, 1, 2, 5, 6])  # [CLS], (0,0), (0,1), (1,0), (1,1) in the 4x4 grid
    assert torch.equal(small, base[:, keep][:, :, keep])
    big = s.rel_pos_bias_at((6, 6))  # (H, 37, 37)
    assert big.shape == (2, 37, 37)
    # token (0,0) -> (0,5): offset -5 clipped to -3, the base pair (0,0) -> (0,3)
    assert torch.equal(big[:, 1, 1 + 5], base[:, 1, 1 + 3])
    # (5,5) -> (0,0): offset (+5, +5) -> (+3, +3), the base pair (3,3) -> (0,0)
    assert torch.equal(big[:, 1 + 35, 1], base[:, 1 + 15, 1])
    assert torch.equal(big[:, 0, 0], base[:, 0, 0]) and torch.equal(big[:, 0, 7], base[:, 0, 3])  # [CLS] rows


def test_the_student_runs_at_other_sizes_and_its_table_learns_there():
    s = _student()
    x = torch.randn(2, 3, 32, 32)
    assert s.forward_tokens(x).shape == (2, 65, 32)
    for hw, n in (((16, 16), 16), ((48, 48), 144), ((24, 40), 60)):
        out = s.forward_tokens(torch.randn(2, 3, *hw))
        assert out.shape == (2, 1 + n, 32)
    s.forward_tokens(torch.randn(2, 3, 48, 48)).square().mean().backward()
    assert s.rel_pos_bias.relative_position_bias_table.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="multiple of the patch size"):
        s.forward_tokens(torch.randn(1, 3, 30, 30))
    with pytest.raises(ValueError, match="shared_rpb"):
        _student(pos_embed="rpb").forward_tokens(torch.randn(1, 3, 48, 48))


def test_an_absolute_position_embedding_is_resampled_like_timms():
    s = _student(pos_embed="ape").eval()
    with torch.no_grad():
        s.pos_embed.normal_()
    ref = resample_abs_pos_embed(s.pos_embed, new_size=[12, 12], old_size=[8, 8], num_prefix_tokens=1)
    assert torch.equal(s.pos_embed_at((12, 12)), ref)
    assert s.forward_tokens(torch.randn(1, 3, 48, 48)).shape == (1, 145, 32)


def test_the_schedule_is_a_function_of_the_step_and_survives_a_state_dict():
    sched = ResolutionSchedule(32, [16, 48], 0.25, seed=0)
    sizes = [sched.size_at(k) for k in range(4000)]
    other = sum(s != 32 for s in sizes) / len(sizes)
    assert abs(other - 0.25) < 0.03  # binomial sd ~0.007
    assert abs(sizes.count(16) - sizes.count(48)) < 0.1 * (sizes.count(16) + sizes.count(48))
    assert sizes == [ResolutionSchedule(32, [16, 48], 0.25, seed=0).size_at(k) for k in range(4000)]
    assert sizes != [ResolutionSchedule(32, [16, 48], 0.25, seed=1).size_at(k) for k in range(4000)]
    assert {ResolutionSchedule(32, [16], 1.0).size_at(k) for k in range(50)} == {16}
    assert {ResolutionSchedule(32, [16], 0.0).size_at(k) for k in range(50)} == {32}
    drawn = [sched.next_size()[0] for _ in range(7)]
    assert drawn == sizes[:7] and int(sched.step) == 7
    resumed = ResolutionSchedule(32, [16, 48], 0.25, seed=0)
    resumed.load_state_dict(sched.state_dict())
    assert [resumed.next_size()[0] for _ in range(5)] == sizes[7:12]
    with pytest.raises(ValueError, match="other size"):
        ResolutionSchedule(32, [], 0.5)


def _vit_teacher():
    torch.manual_seed(1)
    return create_teacher("timm:vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=1,
                          embed_dim=48, num_heads=2)


def test_a_step_at_another_size_is_fds_loss_on_that_grid():
    """Every step at 48 px: the student sees the view resized to 48 (12x12 tokens), the teacher
    its own 32 px (8x8 tokens), its map resampled to 12x12; the loss is FD's on that grid."""
    teacher = _vit_teacher()
    m = MultiTeacherDistiller([TeacherSpec("vit", teacher)], _student(), resolutions=[48], resolution_fraction=1.0)
    x = torch.rand(2, 3, 32, 32)
    out = m(x)
    assert float(out["resolution_px"]) == 48.0
    with torch.no_grad():
        x48 = F.interpolate(x, size=(48, 48), mode="bicubic", align_corners=False, antialias=True)
        tokens = m.student.forward_tokens(m._normalize(x48))  # (B, 145, 32)
        t = teacher.forward_tokens(m.targets["vit"]._normalize(x))  # 8x8 at the teacher's size
        fmap = t.patches.transpose(1, 2).reshape(2, 48, 8, 8)
        patches = F.interpolate(fmap, size=(12, 12), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
        target = torch.cat((t.prefix[:, :1], patches), dim=1)  # (B, 145, 48)
        ref = feature_distill_loss(m.projector["vit"](tokens), target, num_prefix_tokens=1)
    assert tokens.shape == (2, 145, 32)
    torch.testing.assert_close(out["loss"], ref, rtol=1e-6, atol=1e-7)
    m.eval()
    assert "resolution_px" not in m(x)  # evaluation: the student's own size
    assert int(m.resolution.step) == 1  # only training steps advance the schedule


def _cfg(out, *overrides):
    """test_multi_distiller's tiny multi-teacher run with one teacher and two other sizes."""
    return _multi_cfg(out, "teachers=[{name: vit, spec: 'timm:vit_tiny_patch16_224', kwargs: {pretrained: false, "
                      "img_size: 16, patch_size: 4, depth: 1, embed_dim: 48, num_heads: 2}}]",
                      "multi.resolutions=[8, 24]", "multi.resolution_fraction=0.5", *overrides)


def test_multi_resolution_runs_resume_exactly(tmp_path):
    ref = tmp_path / "ref"
    r = distill(_cfg(ref))
    assert r.step == 8 and r.complete
    a = load_checkpoint(list_checkpoints(ref)[-1])
    assert int(a["model"]["resolution"]["step"]) == 8
    out = tmp_path / "run"

    def preempt(step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    assert distill(_cfg(out), on_step=preempt).step == 3
    assert distill(_cfg(out)).complete
    b = load_checkpoint(list_checkpoints(out)[-1])
    for part in ("student", "projector", "resolution"):
        for k in a["model"][part]:
            assert torch.equal(a["model"][part][k], b["model"][part][k]), f"{part}.{k}"


def test_resolutions_the_student_cannot_take_are_refused_before_training(tmp_path):
    with pytest.raises(ConfigError, match="needs multi.resolutions"):
        _cfg(tmp_path, "multi.resolutions=[]")
    with pytest.raises(ConfigError, match="resolution_fraction"):
        _cfg(tmp_path, "multi.resolution_fraction=1.5")
    with pytest.raises(ConfigError, match="multiple of the patch size"):
        distill(_cfg(tmp_path, "multi.resolutions=[10]"))
