"""Crafted artifacts: a spec recorded in a checkpoint or a classifier.json that would run code is
refused unless the user says to trust it (a marker file shows the code did not run)."""
import json

import pytest
import torch

from fdistill.cli.main import main
from fdistill.engine.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from fdistill.teachers.trust import UntrustedSpecError, check_recorded_spec, runs_code, trust_recorded_specs

pytestmark = pytest.mark.usefixtures("one_thread")


def _crafted_spec(marker):
    # what an attacker would record: python:<module>:<callable> with shell arguments
    return "python:subprocess:run", {"args": ["touch", str(marker)]}


def test_what_runs_code():
    assert runs_code("python:my_model.py:build")
    assert runs_code("hf:someone/model", {"trust_remote_code": True})
    assert runs_code("timm:vit_tiny_patch16_224") is None
    assert runs_code("open_clip:ViT-B-16/openai") is None
    assert runs_code("hf:facebook/dinov2-base", {"revision": "main"}) is None
    with pytest.raises(UntrustedSpecError, match="--trust-recorded-spec"):
        check_recorded_spec("python:x.py:f", {}, where="a file")
    check_recorded_spec("python:x.py:f", {}, where="a file", trusted=True)
    with trust_recorded_specs():
        check_recorded_spec("python:x.py:f", {}, where="a file")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "tiny"
    assert main(["distill", "--config", "configs/distill/tiny_cpu.yaml", "--output", str(out),
                 "train.max_steps=2", "data.path=synthetic:128"]) == 0
    return out


def test_a_crafted_checkpoint_teacher_is_not_executed_by_zeroshot(tiny_run, tmp_path, capsys):
    marker = tmp_path / "pwned"
    ck_path = list_checkpoints(tiny_run)[-1]
    ck = load_checkpoint(ck_path)
    spec, kwargs = _crafted_spec(marker)
    ck["teacher"]["spec"], ck["teacher"]["kwargs"] = spec, kwargs
    save_checkpoint(ck_path, ck)
    rc = main(["zeroshot", "--model", str(tiny_run), "--val", "synthetic:20", "--output", str(tmp_path / "zs")])
    err = capsys.readouterr().err
    assert rc == 2 and "--trust-recorded-spec" in err and "python:subprocess:run" in err
    assert not marker.exists()


def test_a_crafted_classifier_json_is_not_executed(tmp_path, capsys):
    from safetensors.torch import save_file

    from fdistill.eval.classifier import CLASSIFIER_FORMAT, load_classifier

    marker = tmp_path / "pwned"
    spec, kwargs = _crafted_spec(marker)
    folder = tmp_path / "ft"
    folder.mkdir()
    (folder / "classifier.json").write_text(json.dumps({
        "format": CLASSIFIER_FORMAT, "kind": "adapter", "num_classes": 2, "global_pool": "avg", "classes": ["a", "b"],
        "mean": [0.5] * 3, "std": [0.5] * 3, "img_size": [32, 32], "source": {"spec": spec, "kwargs": kwargs}}))
    save_file({"w": torch.zeros(1)}, str(folder / "model_best.safetensors"))
    with pytest.raises(UntrustedSpecError, match="classifier.json records the model spec 'python:subprocess:run'"):
        load_classifier(folder)
    assert not marker.exists()
    rc = main(["diagnose", "attention-distance", "--model", str(folder), "--data", "synthetic:8", "--images", "4",
               "--out", str(tmp_path / "diag")])
    assert rc == 2 and "--trust-recorded-spec" in capsys.readouterr().err
    assert not marker.exists()
