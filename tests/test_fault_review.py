"""The fault-injection review program (benchmarks/fault_review.py) runs and judges cases the way
its docstring says; its full run (about 10 min) is recorded in benchmarks/RESULTS.md."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_review_lists_both_families_and_judges_a_case(tmp_path):
    from benchmarks import fault_review

    assert len(fault_review.FAULTS) >= 20 and len(fault_review.BAD_INPUTS) >= 25
    out = tmp_path / "review.json"
    p = subprocess.run([sys.executable, "-m", "benchmarks.fault_review", "--only", "YAML syntax error", "--json",
                        str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["summary"]["bad_inputs_tried"] == res["summary"]["bad_inputs_handled"] == 1
    assert res["summary"]["faults_tried"] == 0
    assert res["cases"][0]["detail"].startswith("fdistill distill: error: cannot parse YAML")


def test_clear_error_is_judged_strictly():
    from benchmarks.fault_review import clear_error

    ok = subprocess.CompletedProcess([], 2, "", "warn\nfdistill distill: error: a thing is wrong\n  detail\n")
    assert clear_error(ok, "distill", "thing")[0]
    assert not clear_error(ok, "distill", "absent word")[0]
    crash = subprocess.CompletedProcess([], 1, "", "Traceback (most recent call last):\nKeyError: 'x'\n")
    assert not clear_error(crash, "distill")[0]
    wrong_rc = subprocess.CompletedProcess([], 0, "", "fdistill distill: error: x\n")
    assert not clear_error(wrong_rc, "distill")[0]
