"""Library log noise stays out of the terminal (issue 12): open_clip's root-logger INFO lines go
to the run's run.log, fdistill's own lines and everyone's warnings to the terminal."""
import logging
import os
import subprocess
import sys
from pathlib import Path

from fdistill.logs import TerminalFilter, run_log_file

REPO = Path(__file__).resolve().parents[1]


def _record(name, level):
    return logging.LogRecord(name, level, __file__, 1, "msg", None, None)


def test_terminal_filter_rule():
    f = TerminalFilter()
    assert f.filter(_record("fdistill.engine.distill", logging.INFO))
    assert f.filter(_record("fdistill", logging.DEBUG))
    assert not f.filter(_record("root", logging.INFO))          # open_clip's logging.info(...)
    assert not f.filter(_record("timm.models", logging.INFO))
    assert not f.filter(_record("fdistillery", logging.INFO))   # a prefix is not a package
    assert f.filter(_record("timm.scheduler", logging.WARNING))


def test_run_log_file_gets_third_party_info_while_the_run_lasts(tmp_path):
    root = logging.getLogger()
    level = root.level
    with run_log_file(tmp_path):
        logging.getLogger("open_clip_like").info("Parsing model identifier x")
        logging.info("Final image preprocessing configuration set")
    logging.info("after the run")
    text = (tmp_path / "run.log").read_text()
    assert "Parsing model identifier x" in text and "Final image preprocessing" in text
    assert "after the run" not in text and root.level == level  # detached, level restored
    with run_log_file(tmp_path / "absent", enabled=False):  # other ranks: no file
        logging.info("x")
    assert not (tmp_path / "absent").exists()


def test_the_cli_keeps_open_clip_info_off_the_terminal(tmp_path):
    out = tmp_path / "fd"
    asset = REPO / "fdistill" / "assets" / "clip_mini"
    cmd = [sys.executable, "-m", "fdistill.cli.main", "distill", "--config", "configs/demo/distill.yaml",
           "--output", str(out), "student.patch_size=4", f"teacher.spec=open_clip:local-dir:{asset}",
           "train.max_steps=1", "data.batch_size=8", "data.path=synthetic:16", "train.cpu_threads=1"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    term = proc.stdout + proc.stderr
    assert "creation process complete" not in term and "preprocessing configuration" not in term
    assert "done: step 1/1" in term  # fdistill's own lines still show
    log = (out / "run.log").read_text()
    assert "creation process complete" in log  # open_clip's INFO line, kept in the run's file
