"""benchmarks/bench_masking.py runs end to end (a few steps; the study itself is 300) and reports
what its table says: token counts of each variant, speeds relative to full input."""
import sys

import pytest
import torch

from conftest import CIFAR_MINI, REPO, RESNET_WEIGHTS, need_shared

sys.path.insert(0, str(REPO))
from benchmarks import bench_masking  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@need_shared(CIFAR_MINI / "train", CIFAR_MINI / "val", RESNET_WEIGHTS / "resnet56.safetensors")
def test_masking_study_runs(tmp_path):
    out = tmp_path / "m.json"
    r = bench_masking.main(["--steps", "3", "--batch", "8", "--width", "32", "--depth", "1", "--threads", "1",
                            "--json", str(out)])
    rows = r["results"]
    assert [x["student_tokens"] for x in rows] == [65, 65, 33, 17]  # 8x8 patches + [CLS]; 50%, 75% dropped
    assert rows[0]["speed_vs_full"] == 1.0 and rows[0]["loss_vs_full"] == 1.0
    for x in rows:
        assert x["speed_vs_full"] == pytest.approx(rows[0]["step_ms"] / x["step_ms"])
        assert 0 < x["heldout_loss_end"] < 10 and x["heldout_loss_start"] == rows[0]["heldout_loss_start"]
    assert out.exists() and "| mask 0.5, dropped | 33 |" in bench_masking.markdown(r)
