"""Every evaluation command end to end through the CLI on tiny models and the synthetic dataset:
each writes its metrics.json; an FD student from a real (tiny) distillation run goes through all
of them; --compare prints a side-by-side table; bad input is one clear line."""
import json
from pathlib import Path

import pytest

from fdistill.cli.main import main

REPO = Path(__file__).resolve().parents[1]
TINY_DISTILL = str(REPO / "configs" / "distill" / "tiny_cpu.yaml")
FT_TINY = str(REPO / "configs" / "finetune" / "tiny_cpu.yaml")
LP_TINY = str(REPO / "configs" / "linprobe" / "tiny_cpu.yaml")
TIMM = "timm:vit_tiny_patch16_224"
TIMM_KW = json.dumps(dict(pretrained=False, img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3))
CLIP_CFG = dict(embed_dim=32, vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=32),
                text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1))
CLIP_KW = json.dumps(dict(pretrained=False, model_cfg=CLIP_CFG))
FAST = ["data.num_workers=0", "device=cpu"]


def _metrics(folder):
    m = json.loads((Path(folder) / "metrics.json").read_text())
    assert 0.0 <= m["top1"] <= 100.0 and m["config"] and m["fdistill_version"]
    return m


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
    """A real FD run (2 steps): tiny random open_clip teacher -> tiny student, on synthetic images."""
    run = tmp_path_factory.mktemp("run") / "fd"
    assert main(["distill", "--config", TINY_DISTILL, "--output", str(run), "--data", "synthetic:64",
                 "teacher.spec=open_clip:tiny", f"teacher.kwargs={json.dumps(dict(pretrained=False, model_cfg=CLIP_CFG))}",
                 "student.patch_size=8", "train.max_steps=2", "train.log_interval=1", "data.batch_size=16"]) == 0
    return run


def test_finetune_cli_writes_metrics_and_weights(tmp_path, capsys):
    out = tmp_path / "ft"
    assert main(["finetune", "--model", TIMM, "--model-kwargs", TIMM_KW, "--train", "synthetic:64",
                 "--output", str(out), "--config", FT_TINY, "max_steps=3", "data.batch_size=16", *FAST]) == 0
    m = _metrics(out)
    assert m["command"] == "finetune" and m["model"] == TIMM and m["val"] == "synthetic:64"
    assert m["steps"] == 3 and m["classifier"] == "timm" and "top5" in m  # 10 classes
    assert m["config"]["optim"]["layer_decay"] == 0.75 and m["recipe"]["batch_size"] == 16
    assert (out / "model_best.safetensors").is_file()
    table = capsys.readouterr().out
    assert "top1" in table and TIMM in table


def test_fd_student_through_every_command(clip_run, tmp_path, capsys):
    run = str(clip_run)
    # zero-shot: the student through its projector and the teacher's projection, teacher side by side
    assert main(["zeroshot", "--model", run, "--val", "synthetic:50", "--output", str(tmp_path / "zs"),
                 "--templates", "simple", *FAST]) == 0
    zs = _metrics(tmp_path / "zs")
    assert zs["student"]["model"].endswith(".pt") and zs["teacher"]["model"] == "open_clip:tiny"
    assert zs["teacher_top1"] == zs["teacher"]["top1"] and zs["templates"] == 7
    assert "teacher_top1" in capsys.readouterr().out
    # fine-tuning: rebuilt as a per-layer-RPB Beit
    assert main(["finetune", "--model", run, "--train", "synthetic:32", "--output", str(tmp_path / "ft"),
                 "--config", FT_TINY, "max_steps=2", "data.batch_size=16", *FAST]) == 0
    assert _metrics(tmp_path / "ft")["classifier"] == "beit"
    # k-NN and the fast linear probe
    assert main(["knn", "--model", run, "--train", "synthetic:40", "--output", str(tmp_path / "knn"),
                 "--k", "5,10", *FAST]) == 0
    knn = _metrics(tmp_path / "knn")
    assert knn["k"] == 5 and set(knn["by_k"]) == {"5", "10"} and knn["feature"] == "cls"
    assert main(["linprobe", "--model", run, "--train", "synthetic:40", "--output", str(tmp_path / "lp"),
                 "--config", LP_TINY, "sweep.epochs=2", "sweep.warmup_epochs=0", *FAST]) == 0
    lp = _metrics(tmp_path / "lp")
    assert lp["mode"] == "fast" and len(lp["grid"]) == 3 * 3


def test_standard_linprobe_and_zeroshot_of_a_clip_teacher(tmp_path):
    assert main(["linprobe", "--model", "open_clip:tiny", "--model-kwargs", CLIP_KW, "--train", "synthetic:40",
                 "--output", str(tmp_path / "lp"), "data.batch_size=16", "epochs=1", "warmup_epochs=0", *FAST]) == 0
    lp = _metrics(tmp_path / "lp")
    assert lp["mode"] == "standard" and lp["feature"] == "cls" and lp["steps"] == 2
    assert main(["zeroshot", "--model", "open_clip:tiny", "--model-kwargs", CLIP_KW, "--val", "synthetic:50",
                 "--output", str(tmp_path / "zs"), "--templates", "simple", *FAST]) == 0
    zs = _metrics(tmp_path / "zs")
    assert zs["num_classes"] == 10 and "teacher" not in zs


def test_compare_prints_side_by_side(clip_run, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["knn", "--compare", TIMM, str(clip_run), "--model-kwargs", TIMM_KW, "--model-kwargs", "{}",
                 "--train", "synthetic:40", "--output", str(out), *FAST]) == 0
    text = capsys.readouterr().out
    lines = [l for l in text.splitlines() if l.strip()]
    assert lines[0].split()[:3] == ["model", "top1", "top5"] and TIMM in lines[2] and str(clip_run) in lines[3]
    combined = json.loads((out / "compare.json").read_text())
    assert combined["models"] == [TIMM, str(clip_run)] and len(combined["results"]) == 2
    assert {Path(r["metrics_file"]).parent.parent for r in combined["results"]} == {out}


def test_user_errors_are_one_line(tmp_path, capsys):
    cases = [
        (["knn", "--model", TIMM, "--model-kwargs", TIMM_KW], "give the training images with --train"),
        (["knn", "--model", TIMM, "--model-kwargs", "{not json", "--train", "synthetic:20"], "not valid JSON"),
        (["knn", "--train", "synthetic:20"], "give --model"),
        (["knn", "--model", TIMM, "--model-kwargs", TIMM_KW, "--train", "synthetic:20", "k=[0]"], "positive"),
        (["finetune", "--model", TIMM, "--train", "synthetic:20", "--output", str(tmp_path), "optim.layer_dacay=0.5"],
         "did you mean 'optim.layer_decay'"),
        (["knn", "--model", TIMM, "--model-kwargs", TIMM_KW, "--train", str(tmp_path)], "no val/ sub-folder"),
        (["knn", "--model", "timm:no_such_model", "--train", "synthetic:20"], "no model named"),
        (["knn", "--compare", TIMM, TIMM, "--model-kwargs", TIMM_KW, "--train", "synthetic:20"], "once per model"),
        (["zeroshot", "--model", TIMM, "--model-kwargs", TIMM_KW, "--val", "synthetic:20", *FAST], "text tower"),
    ]
    for argv, msg in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1, (argv, err)
