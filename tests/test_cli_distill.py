"""``fdistill distill | info | validate-config | export`` from the command line."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch

from fdistill.cli.main import main
from fdistill.engine import load_checkpoint
from fdistill.engine.checkpoint import list_checkpoints

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "distill" / "tiny_cpu.yaml")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (conftest)


def test_help_lists_the_run_subcommands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("distill", "info", "validate-config", "export"):
        assert cmd in out


def test_tiny_cpu_recipe_runs_and_exports(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["distill", "--config", TINY, "--output", str(out), "train.max_steps=4", "train.log_interval=2",
                 "train.ckpt_interval=2"]) == 0
    assert (out / "config.yaml").is_file()
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [2, 4]
    assert {"step", "epoch", "loss", "lr", "images_per_s"} <= recs[0].keys()
    assert [p.name for p in list_checkpoints(out)] == ["ckpt_00000002.pt", "ckpt_00000004.pt"]
    assert "done: step 4/4" in capsys.readouterr().out

    assert main(["export", str(out), "--format", "timm"]) == 0
    assert "local-dir:" in capsys.readouterr().out
    model = timm.create_model(f"local-dir:{out / 'export_timm'}", pretrained=True).eval()
    from fdistill.models.loading import load_model

    student = load_model(out)  # the run's newest checkpoint through fdistill
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(student.normalize(x)), student(student.normalize(x)),
                                   rtol=0, atol=1e-6)
    assert main(["export", str(out), "--format", "safetensors"]) == 0
    assert (out / "export_safetensors" / "student.safetensors").is_file()


def test_data_flag_and_overrides_reach_the_config(tmp_path):
    out = tmp_path / "run"
    assert main(["distill", "--config", TINY, "--output", str(out), "--data", "synthetic:64", "train.max_steps=1",
                 "data.batch_size=16"]) == 0
    cfg = load_checkpoint(list_checkpoints(out)[-1])["config"]
    assert cfg["data"]["path"] == "synthetic:64" and cfg["data"]["batch_size"] == 16
    assert cfg["train"]["output"] == str(out)


def test_user_errors_are_one_line(tmp_path, capsys):
    assert main(["distill", "--config", TINY, "--output", str(tmp_path / "r"), "optim.base_rl=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'optim.base_rl'" in err and "did you mean 'optim.base_lr'" in err
    assert "Traceback" not in err
    assert main(["validate-config", TINY, "train.epochs=many"]) == 2
    assert "train.epochs: expected a number, got 'many'" in capsys.readouterr().err
    assert main(["validate-config", TINY, "train.precision=fp64"]) == 2
    assert "did you mean 'fp16'" in capsys.readouterr().err
    assert main(["validate-config", TINY, "studnet.depth=2"]) == 2
    assert "did you mean 'student'" in capsys.readouterr().err
    assert main(["validate-config", TINY, "data.path=/no/such/folder"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["validate-config", TINY, "teacher.spec=timm:no_such_net"]) == 2
    assert "timm has no model" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "missing")]) == 2


def test_validate_config_and_info(capsys):
    assert main(["validate-config", TINY, "--print"]) == 0
    out = capsys.readouterr().out
    assert "valid distill recipe" in out and "teacher:" in out and "base_lr: 0.0015" in out
    # evaluation recipes too, their kind read from the folder
    assert main(["validate-config", str(REPO / "configs" / "segprobe" / "ade20k_linear.yaml"), "epochs=2"]) == 0
    assert "valid segprobe recipe" in capsys.readouterr().out
    assert main(["validate-config", str(REPO / "configs" / "linprobe" / "mae.yaml"), "sweep.epochs=0"]) == 2
    assert "sweep.epochs" in capsys.readouterr().err
    assert main(["info", "--config", TINY]) == 0
    out = capsys.readouterr().out
    assert "grids match" in out and "FLOPs" in out and "params" in out and "global batch" in out


@pytest.mark.slow
def test_sigterm_to_a_real_process_checkpoints_then_resumes(tmp_path):
    """The cluster pre-emption path: SIGTERM -> checkpoint at the next step -> exit 0 -> resume."""
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "fdistill.cli.main", "distill", "--config", TINY, "--output", str(out),
           "train.epochs=1000", "train.ckpt_interval=100000", "train.log_interval=2"]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        metrics = out / "metrics.jsonl"
        while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "the run did not start logging"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    assert "stopped by SIGTERM" in output
    ckpts = list_checkpoints(out)
    assert len(ckpts) == 1
    stopped_at = load_checkpoint(ckpts[0])["progress"]["step"]
    assert stopped_at >= 4
    # run the same command again (with a near stop): it continues from that checkpoint
    assert main(["distill", "--config", TINY, "--output", str(out), "train.epochs=1000", "train.ckpt_interval=100000",
                 "train.log_interval=2", f"train.max_steps={stopped_at + 2}"]) == 0
    last = load_checkpoint(list_checkpoints(out)[-1])
    assert last["progress"]["step"] == stopped_at + 2
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == stopped_at + 2
