"""benchmarks/bench_dense.py runs and reports sane numbers (the numbers themselves are recorded
in benchmarks/RESULTS.md, never asserted here)."""
import json
import math

import pytest

from benchmarks.bench_dense import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("task", ["segment", "depth", "detect"])
def test_bench_dense_tiny(task, tmp_path):
    out = tmp_path / "r.json"
    assert main(["--task", task, "--rounds", "1", "--batch", "2", "--json", str(out)]) == 0
    (r,) = json.loads(out.read_text())
    assert r["task"] == task and r["batch"] == 2 and r["recipe"] == "tiny_cpu"
    assert math.isfinite(r["step_s"]) and r["step_s"] > 0 and r["images_per_s"] == pytest.approx(2 / r["step_s"])
    assert r["peak_bytes"] > r["params_m"] * 1e6 * 4  # at least the fp32 weights are live
    assert r["torch"] and r["device"]
