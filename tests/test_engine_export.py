"""Exported students load in timm (and fdistill) with the student's own features."""
import json

import pytest
import timm
import torch
from safetensors.torch import load_file

from fdistill.config import build_config
from fdistill.config.distill import DistillConfig
from fdistill.engine import RunError, distill, load_checkpoint
from fdistill.engine.checkpoint import latest_valid_checkpoint
from fdistill.engine.export import export_student, verify_timm_export
from fdistill.models import create_student


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (conftest)


def _run(out, *extra):
    base = ["teacher.spec=timm:vit_tiny_patch16_224",
            "teacher.kwargs={pretrained: false, img_size: 32, patch_size: 8, depth: 1, embed_dim: 48, num_heads: 2}",
            "student.arch=vit_tiny", "student.img_size=32", "student.patch_size=8", "student.embed_dim=32",
            "student.depth=2", "student.num_heads=2", "data.path=synthetic:16", "data.batch_size=8",
            "data.num_workers=0", "train.max_steps=2", "train.precision=fp32", "train.device=cpu",
            f"train.output={out}"]
    distill(build_config(DistillConfig, None, base + list(extra)))
    return out


def _student_of(run_dir):
    ckpt = load_checkpoint(latest_valid_checkpoint(run_dir))
    s = create_student(**{**ckpt["student_args"], "drop_path_rate": 0.0})
    s.load_state_dict(ckpt["model"]["student"])
    return s.eval(), ckpt


@pytest.mark.parametrize("pos_embed", ["shared_rpb", "ape"])
def test_timm_export_reproduces_student_features(tmp_path, pos_embed):
    run = _run(tmp_path / "run", f"student.pos_embed={pos_embed}", "distill.mask_ratio=0.25")
    out = export_student(run, format="timm")
    assert out == run / "export_timm"
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    student, _ = _student_of(run)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = student.forward_tokens(x)
        got = model.forward_features(x)
    assert got.shape == ref.shape == (3, 1 + 16, 32)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"].startswith("beit") and cfg["pretrained_cfg"]["mean"] == [0.485, 0.456, 0.406]
    assert cfg["model_args"]["embed_dim"] == 32 and cfg["pretrained_cfg"]["tag"] == "fdistill"
    assert "mask_token" not in load_file(str(out / "model.safetensors"))
    # and fdistill's own loader treats it as a timm model
    from fdistill.models.loading import load_model

    m = load_model(out)
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref, rtol=0, atol=1e-6)


def test_safetensors_export_round_trip(tmp_path):
    run = _run(tmp_path / "run")
    out = export_student(run / "checkpoints" / "ckpt_00000002.pt", format="safetensors", output=tmp_path / "st")
    student, ckpt = _student_of(run)
    sd = load_file(str(out / "student.safetensors"))
    assert sd.keys() == ckpt["model"]["student"].keys() and "mask_token" in sd
    assert all(torch.equal(sd[k], ckpt["model"]["student"][k]) for k in sd)
    proj = load_file(str(out / "projector.safetensors"))
    assert torch.equal(proj["weight"], ckpt["model"]["projector"]["weight"])
    info = json.loads((out / "fdistill_export.json").read_text())
    assert info["student_args"] == ckpt["student_args"] and info["step"] == 2
    assert info["teacher"]["spec"] == "timm:vit_tiny_patch16_224" and info["grid_size"] == [4, 4]
    rebuilt = create_student(**info["student_args"])
    rebuilt.load_state_dict(sd)  # the JSON is enough to rebuild it


def test_timm_student_exports_as_itself(tmp_path):
    run = _run(tmp_path / "run", "student.arch=timm:swin_tiny_patch4_window7_224",
               "student.kwargs={img_size: 32, window_size: 4, embed_dim: 16, depths: [1, 1], num_heads: [1, 2]}")
    out = export_student(run, format="timm")
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    ckpt = load_checkpoint(latest_valid_checkpoint(run))
    ref = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=0, img_size=32,
                            window_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2]).eval()
    ref.load_state_dict({k[len("model."):]: v for k, v in ckpt["model"]["student"].items()})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), ref.forward_features(x), rtol=0, atol=1e-6)


def test_export_replaces_old_export_but_not_other_folders(tmp_path):
    run = _run(tmp_path / "run")
    out = export_student(run, format="timm")
    (out / "stale.txt").write_text("from an older export")
    export_student(run, format="timm")
    assert not (out / "stale.txt").exists()
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "data.csv").write_text("1,2")
    with pytest.raises(RunError, match="not an fdistill/timm export"):
        export_student(run, format="timm", output=precious)
    assert (precious / "data.csv").read_text() == "1,2"
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary folders left


def test_verify_catches_an_export_that_differs(tmp_path):
    run = _run(tmp_path / "run")
    out = export_student(run, format="timm")
    other = create_student("vit_tiny", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2).eval()
    with pytest.raises(RunError, match="does not reproduce"):
        verify_timm_export(out, other)


def test_export_errors_are_clear(tmp_path):
    with pytest.raises(RunError, match="no run folder or checkpoint"):
        export_student(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match="no valid checkpoint"):
        export_student(tmp_path / "empty")
    with pytest.raises(RunError, match="unknown export format"):
        export_student(tmp_path / "empty", format="onnx")


def test_export_refuses_non_finite_weights(tmp_path):
    """A run whose student went non-finite (e.g. a bad lr) must not be exported as a usable model."""
    from fdistill.engine.checkpoint import save_checkpoint

    run_dir = _run(tmp_path / "run")
    ck_path = latest_valid_checkpoint(run_dir)
    ck = load_checkpoint(ck_path)
    key = next(k for k, v in ck["model"]["student"].items() if v.is_floating_point() and v.ndim == 2)
    ck["model"]["student"][key][0, 0] = float("nan")
    save_checkpoint(ck_path, ck)
    with pytest.raises(RunError, match=r"1 student tensors hold NaN/inf"):
        export_student(run_dir, format="timm")
    assert not (run_dir / "export_timm").exists()
