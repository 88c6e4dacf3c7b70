"""The shipped teacher (fdistill/assets/clip_mini) loads offline and reproduces from its command:
a prefix of the documented pretrain-clip run gives the same first losses and the same weights."""
import json

import pytest
import torch

from fdistill.assets import asset_path, teacher_spec
from fdistill.cli.main import main
from fdistill.teachers import create_teacher

FOLDER = asset_path("clip_mini")
SUMMARY = json.loads((FOLDER / "summary.json").read_text())


def test_the_shipped_teacher_loads_offline_with_an_8x8_token_map():
    t = create_teacher(teacher_spec("clip_mini"))
    assert t.grid_size((32, 32)) == (8, 8) and t.num_prefix_tokens == 1
    with torch.no_grad():
        tokens = t.forward_tokens(torch.rand(2, 3, 32, 32)).full()
    assert tokens.shape == (2, 65, 128) and torch.isfinite(tokens).all()
    assert t.provenance["license"] != "unknown"  # the project's own weights, licence stated in the folder


def test_the_shipped_teacher_reproduces_from_its_command(tmp_path):
    """Re-run the first steps of the documented command (same arguments, --max-steps): the losses
    and the weights after them match what the shipped run recorded (bit for bit on the machine that
    trained it; a relative 1e-5 allows another CPU's float rounding)."""
    prefix = SUMMARY["prefix"]
    argv = list(SUMMARY["command"]) + ["--max-steps", str(prefix["steps"]), "--output", str(tmp_path / "t"),
                                       "--no-progress"]
    assert argv[0] == "pretrain-clip"
    assert main(argv) == 0
    again = json.loads((tmp_path / "t" / "summary.json").read_text())["prefix"]
    assert again["loss"] == pytest.approx(prefix["loss"], rel=1e-5)
    assert again["weights"] == pytest.approx(prefix["weights"], rel=1e-5)
