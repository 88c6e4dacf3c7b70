"""load_model: runs/checkpoints of the FD ViT and of a timm (Swin) student, exports, bad paths."""
import pytest
import torch

from fdistill import create_student
from fdistill.engine.checkpoint import save_checkpoint
from fdistill.models.loading import StudentAdapter, load_model
from fdistill.models.projector import TokenProjector
from fdistill.models.timm_student import create_timm_student
from fdistill.teachers import TeacherError


def _ckpt(student, args, teacher_dim=24):
    proj = TokenProjector(student.embed_dim, teacher_dim)
    return {"format": "fdistill-checkpoint", "version": 1, "config": {}, "student_args": args,
            "model": {"student": student.state_dict(), "projector": proj.state_dict()},
            "teacher": {"spec": "timm:x", "kwargs": {}, "embed_dim": teacher_dim, "num_prefix_tokens": 1},
            "progress": {"epoch": 0, "step": 1}}


def test_fd_vit_run_roundtrip(tmp_path):
    args = dict(arch="vit_tiny", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, drop_path_rate=0.1)
    s = create_student(**args).eval()
    save_checkpoint(tmp_path / "run" / "checkpoints" / "ckpt_00000005.pt", _ckpt(s, args))
    m = load_model(tmp_path / "run")
    assert isinstance(m, StudentAdapter) and m.projector.out_features == 24
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # as the frozen adapter runs (with autograd on CPU takes another attention kernel)
        ref = s.forward_tokens(x)
    assert torch.equal(m(x), ref)
    assert m.teacher_info["spec"] == "timm:x"


def test_timm_student_run_roundtrip(tmp_path):
    kw = dict(window_size=2, depths=[1, 1, 1, 1], embed_dim=16, num_heads=[1, 2, 2, 4])
    args = dict(arch="timm:swin_tiny_patch4_window7_224", img_size=64, drop_path_rate=0.0,
                grad_checkpointing=False, kwargs=kw)
    s = create_timm_student("swin_tiny_patch4_window7_224", img_size=64, **kw).eval()
    save_checkpoint(tmp_path / "run" / "checkpoints" / "ckpt_00000001.pt", _ckpt(s, args))
    m = load_model(tmp_path / "run")
    x = torch.randn(1, 3, 64, 64)
    out = m.forward_tokens(x)
    assert out.grid == (2, 2) and torch.allclose(out.full(), s.forward_tokens(x))


def test_bad_model_specs(tmp_path):
    with pytest.raises(TeacherError, match="neither an existing path"):
        load_model("no_such_thing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TeacherError, match="no valid fdistill checkpoint"):
        load_model(tmp_path / "empty")
    with pytest.raises(TeacherError, match="takes no keyword"):
        load_model(tmp_path / "empty", weights="x")
