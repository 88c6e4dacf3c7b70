"""``fdistill diagnose resolution`` (issue 15): the centred feature similarity across input sizes,
checked against models whose answer is known, and the command end to end."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from fdistill.cli.main import main
from fdistill.diagnostics.plots import figure_png_ok
from fdistill.diagnostics.resolution import resolution_similarity
from fdistill.teachers.base import Teacher, TeacherTokens

pytestmark = pytest.mark.usefixtures("one_thread")

CLIP_MINI = Path(__file__).resolve().parents[1] / "fdistill" / "assets" / "clip_mini"


class _Probe(Teacher):
    """A 'model' of known behaviour at every size: ``mode='colour'`` gives each patch the image's
    mean colour (identical at every size, up to the resize), ``mode='noise'`` fresh random
    features at every call (unrelated across sizes)."""

    def __init__(self, mode: str):
        super().__init__(nn.Identity(), name=mode, embed_dim=3, patch_size=4, num_prefix_tokens=0,
                         mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), img_size=32, dynamic_img_size=True)
        self.mode = mode

    def _forward_tokens(self, x):
        B, _, H, W = x.shape
        grid = (H // 4, W // 4)
        if self.mode == "colour":
            patches = x.mean((2, 3))[:, None, :].expand(B, grid[0] * grid[1], 3)
        else:
            patches = torch.randn(B, grid[0] * grid[1], 3)
        return TeacherTokens(None, patches, grid)


def _batches(n=16, size=64):
    g = torch.Generator().manual_seed(0)
    return [((torch.rand(n, 3, size, size, generator=g) * 255).to(torch.uint8), torch.zeros(n))]


def test_a_size_invariant_model_scores_one_and_an_unrelated_one_zero():
    inv = resolution_similarity(_Probe("colour"), _batches(), [16, 48, 64], device=torch.device("cpu"))
    assert inv["sizes"] == [16, 32, 48, 64] and inv["reference_px"] == [32, 32] and inv["num_images"] == 16
    assert inv["patch_cosine"][1] == pytest.approx(1.0, abs=1e-6)  # the reference against itself
    assert min(inv["patch_cosine"]) > 0.98 and min(inv["summary_cosine"]) > 0.98
    torch.manual_seed(0)
    noise = resolution_similarity(_Probe("noise"), _batches(), [16, 48, 64], device=torch.device("cpu"))
    assert noise["patch_cosine"][1] == pytest.approx(1.0, abs=1e-6)
    others = [c for s, c in zip(noise["sizes"], noise["patch_cosine"]) if s != 32]
    assert max(abs(c) for c in others) < 0.25  # independent features: centred cosine ~ 0


def test_the_command_on_a_run_and_a_fixed_size_model(tmp_path, capsys):
    from fdistill.config import build_config
    from fdistill.config.distill import DistillConfig
    from fdistill.engine import distill

    run = tmp_path / "run"
    cfg = build_config(DistillConfig, None, [
        "teacher.spec=timm:vit_tiny_patch16_224",
        "teacher.kwargs={pretrained: false, img_size: 16, patch_size: 4, depth: 1, embed_dim: 48, num_heads: 2}",
        "student.arch=vit_tiny", "student.img_size=16", "student.patch_size=4", "student.embed_dim=32",
        "student.depth=1", "student.num_heads=2", "data.path=synthetic:16", "data.batch_size=8",
        "data.num_workers=0", "train.max_steps=1", "train.device=cpu", "train.precision=fp32", f"train.output={run}"])
    distill(cfg)
    out = tmp_path / "diag"
    rc = main(["diagnose", "resolution", "--model", str(run), "--label", "student",
               "--model", f"open_clip:local-dir:{CLIP_MINI}", "--label", "fixed",  # a 32 px CLIP, fixed size
               "--sizes", "8,24", "--data", "synthetic:8", "--images", "8", "--out", str(out), "--no-progress"])
    assert rc == 0
    js = json.loads((out / "resolution.json").read_text())
    (m,) = js["models"]
    assert m["label"] == "student" and m["sizes"] == [8, 16, 24]
    assert m["patch_cosine"][1] == pytest.approx(1.0, abs=1e-5) and all(-1 <= c <= 1 for c in m["patch_cosine"])
    assert [s["label"] for s in js["skipped"]] == ["fixed"] and "inputs only" in js["skipped"][0]["reason"]
    assert figure_png_ok(out / "resolution.png")
    text = capsys.readouterr().out
    assert "student: 8 px" in text and "fixed: skipped" in text
