"""Shipped recipes by name (issue 12): ``--config NAME`` from any folder, ``fdistill recipes``."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fdistill.config import ConfigError
from fdistill.config.recipes import list_recipes, recipes_dir, resolve_recipe

REPO = Path(__file__).resolve().parents[1]


def test_recipes_live_in_the_package_and_configs_points_there():
    root = recipes_dir()
    assert root == REPO / "fdistill" / "recipes"
    assert (REPO / "configs").resolve() == root.resolve()  # the documented paths still work
    names = {(r["kind"], r["name"]) for r in list_recipes()}
    assert names == {(p.parent.name, p.stem) for p in root.glob("*/*.yaml")}
    assert ("distill", "clip_vit_base_300ep") in names and ("finetune", "vit_base") in names
    assert all(r["about"] for r in list_recipes())  # every recipe says what it is in its first comment


def test_resolve_by_kind_name_and_path(tmp_path):
    root = recipes_dir()
    assert resolve_recipe("vit_base", "finetune") == root / "finetune" / "vit_base.yaml"
    assert resolve_recipe("tiny_cpu.yaml", "distill") == root / "distill" / "tiny_cpu.yaml"
    assert resolve_recipe("demo/distill") == root / "demo" / "distill.yaml"
    assert resolve_recipe("clip_vit_base_300ep") == root / "distill" / "clip_vit_base_300ep.yaml"  # unique name
    own = tmp_path / "vit_base"  # an existing file wins over a shipped name
    own.write_text("epochs: 1\n")
    assert resolve_recipe(str(own), "finetune") == own
    assert resolve_recipe(None, "finetune") is None
    with pytest.raises(ConfigError, match=r"several shipped recipes .*distill/tiny_cpu.*finetune/tiny_cpu"):
        resolve_recipe("tiny_cpu")
    with pytest.raises(ConfigError, match=r"no shipped finetune recipe .*did you mean vit_base"):
        resolve_recipe("vit_bsae", "finetune")


def test_cli_takes_names_from_any_folder(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = lambda *a: subprocess.run([sys.executable, "-m", "fdistill.cli.main", *a], cwd=tmp_path,  # noqa: E731
                                    capture_output=True, text=True, timeout=120, env=env)
    r = run("validate-config", "distill/clip_vit_base_300ep")
    assert r.returncode == 0 and "valid distill recipe" in r.stdout, r.stderr
    r = run("validate-config", "vit_base", "--schema", "finetune")
    assert r.returncode == 0 and "valid finetune recipe" in r.stdout, r.stderr
    r = run("recipes", "finetune")
    assert r.returncode == 0 and "finetune/vit_base " in r.stdout
    assert all(line.startswith("finetune/") for line in r.stdout.splitlines())
    r = run("finetune", "--config", "no_such_recipe", "--model", "timm:x", "--train", "synthetic:8")
    assert r.returncode == 2 and "fdistill recipes finetune" in r.stderr
