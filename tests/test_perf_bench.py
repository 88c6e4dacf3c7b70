"""benchmarks/bench_distill.py end to end on the tiny config (seconds): valid JSON whose numbers
agree with each other, the results row, the busy-machine guard; and its measuring tools."""
import json
import math
import statistics
import subprocess
import sys

import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO))
from benchmarks import bench_distill  # noqa: E402
from benchmarks.flops import fd_step_flops, vit_dims  # noqa: E402
from benchmarks.measure import live_tensor_bytes, matmul_ceiling, peak_step_memory  # noqa: E402

REQUIRED = ("device", "config", "images_per_s", "step_ms", "peak_mem_bytes", "flops_per_image", "mfu",
            "baseline_images_per_s", "speedup_vs_baseline", "versions", "dtype", "batch", "matmul_ceiling_flops")


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_tiny_run_writes_consistent_json_and_a_results_row(tmp_path):
    out, table = tmp_path / "r.json", tmp_path / "RESULTS.md"
    bench_distill.main(["--config", "tiny", "--baseline", "--rounds", "2", "--warmup", "1", "--threads", "1",
                        "--data", "synthetic:64", "--loader-batches", "3", "--workers", "0", "--json", str(out),
                        "--record", "--results", str(table), "--max-load", "1e9", "--max-drift", "1e9"])
    r = json.loads(out.read_text())
    assert all(k in r for k in REQUIRED)
    assert r["config"] == "tiny" and r["batch"] == 4 and r["dtype"] == "fp32" and r["device_type"] == "cpu"
    assert r["images_per_s"] == pytest.approx(4 / (r["step_ms"] / 1e3))
    assert r["step_ms"] == pytest.approx(statistics.median(r["step_ms_rounds"]))
    assert r["speedup_vs_baseline"] == pytest.approx(r["images_per_s"] / r["baseline_images_per_s"])
    assert r["mfu"] == pytest.approx(r["flops_per_image"] * r["images_per_s"] / r["matmul_ceiling_flops"])
    assert 0 < r["mfu"] < 1.5 and r["hfu"] <= r["mfu"]
    assert r["peak_mem_bytes"] > 0 and r["baseline_peak_mem_bytes"] > 0
    # the tiny models' analytic FLOPs (teacher 48-wide, student 32-wide, 2 blocks, 16 patches)
    from benchmarks.configs import get_config
    from benchmarks.variants import Options, build_fast

    v = build_fast(get_config("tiny"), Options(), torch.device("cpu"))
    assert r["flops_per_image"] == fd_step_flops(vit_dims(v.distiller.teacher), vit_dims(v.distiller.student))["total"]
    assert r["loader"]["images_per_s"] > 0 and r["loader"]["data"] == "synthetic:64"
    assert r["recorded"] is True
    rows = [ln for ln in table.read_text().splitlines() if ln.startswith("| 20")]
    assert len(rows) == 1 and "| tiny |" in rows[0] and rows[0].count("|") == 17


def test_busy_machine_is_not_recorded(tmp_path):
    table = tmp_path / "RESULTS.md"
    r = bench_distill.main(["--config", "tiny", "--rounds", "1", "--warmup", "1", "--threads", "1", "--data", "none",
                            "--no-memory", "--record", "--results", str(table), "--max-load", "-1"])
    assert r["recorded"] is False and not table.exists()
    assert r["baseline_images_per_s"] is None and r["speedup_vs_baseline"] is None and r["loader"] is None


def test_script_runs_as_a_program_and_rejects_bad_options(capsys):
    script = str(REPO / "benchmarks" / "bench_distill.py")
    ok = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "--baseline" in ok.stdout and "cpu-vits-fp32" in ok.stdout
    for bad, msg in ((["--drop-masked"], "--mask-ratio"), (["--mask-ratio", "1.5"], "[0, 1)"),
                     (["--config", "nope"], "invalid choice")):
        with pytest.raises(SystemExit) as e:
            bench_distill.parse_args(bad)
        assert e.value.code == 2 and msg in capsys.readouterr().err


def test_cpu_peak_memory_counts_the_transient_high_water_mark():
    def step():
        a = torch.empty(2_000_000)  # 8 MB
        b = torch.empty(1_000_000)  # +4 MB -> 12 MB live
        del a
        c = torch.empty(500_000)  # 6 MB live
        return b, c

    peak = peak_step_memory(step, torch.device("cpu"), static_cpu_bytes=1000)
    assert peak == 1000 + 12_000_000


def test_live_tensor_bytes_counts_each_storage_once():
    m = torch.nn.Linear(100, 10)  # 1010 floats
    m.weight.grad = torch.zeros_like(m.weight)  # +1000
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    m(torch.randn(2, 100)).sum().backward()
    opt.step()  # momentum buffers: +1010
    x = torch.randn(7)
    assert live_tensor_bytes([m, m], [opt], [x, x[:3]]) == 4 * (1010 + 1010 + 1010 + 7)


def test_matmul_ceiling_is_a_plausible_rate():
    c = matmul_ceiling(torch.device("cpu"), torch.float32, n=256, repeats=2)
    assert c["n"] == 256 and c["dtype"] == "float32"
    assert math.isfinite(c["flops_per_s"]) and 1e8 < c["flops_per_s"] < 1e15
    assert c["flops_per_s"] == pytest.approx(2 * 256 ** 3 / c["best_s"])


def test_every_config_builds_with_aligned_grids_and_known_flops():
    """Built on the meta device (no memory, no compute): the GPU configs are checked here too.
    The several-teacher configs (CPU ones) are built on the CPU: MultiTeacherDistiller checks its
    loss weights' values when it is made, which a meta tensor does not have."""
    from benchmarks.configs import CONFIGS
    from benchmarks.variants import Options, build_models, teacher_targets

    flops = {}
    for name, cfg in CONFIGS.items():
        dev = torch.device("cpu" if cfg.multi else "meta")
        with dev:
            d = build_models(cfg, Options(), dev, drop_masked=False)
        assert all(tt.align == "none" for tt in teacher_targets(d)), name
        assert d.student_grid == (cfg.img_size // cfg.patch_size,) * 2, name
        assert len(teacher_targets(d)) == max(1, len(cfg.teachers)), name
        flops[name] = bench_distill.step_flops(d)["total"]
        del d
    # ViT-B/16: 4 * 35,126,120,448 - 231,211,008 (patch-embed input grad) + 6 * 197 * 768^2 (projector)
    assert flops["gpu-vitb-bf16"] == 140_970_442_752
    assert flops["cpu-vits-fp32"] == flops["cpu-vits-bf16"] == 36_846_673_920
    assert 640e9 < flops["gpu-vitl-bf16"] < 660e9  # ViT-L/14: 4.6x ViT-B/16
    # + a ViT-Ti/16 teacher: 2*196*768*192 + 12*(24*197*192^2 + 4*197^2*192) = 57,802,752 + 12 * 204,098,304
    #   = 2,506,982,400, and its head 3 * 2 * 197 * 384 * 192 = 87,146,496
    assert flops["cpu-multi-vits-fp32"] == 36_846_673_920 + 2_506_982_400 + 87_146_496


def test_tiny_multi_run_counts_every_teacher_and_head(tmp_path):
    """Two teachers of different widths -> one student, both variants, end to end; the FLOPs are
    the sum of the parts (each teacher's forward + the student's forward and backward once + each
    head's 3 x forward), and torch's FlopCounterMode counts the same on a real step."""
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.configs import get_config
    from benchmarks.flops import patch_embed_flops, vit_forward_flops
    from benchmarks.variants import Options, build_fast, teacher_targets, use_explicit_attention

    out = tmp_path / "multi.json"
    bench_distill.main(["--config", "tiny-multi", "--baseline", "--rounds", "1", "--warmup", "1", "--threads", "1",
                        "--data", "none", "--json", str(out)])
    r = json.loads(out.read_text())
    assert all(k in r for k in REQUIRED)
    assert r["config"] == "tiny-multi" and r["num_teachers"] == 2 and r["batch"] == 4
    assert [(t["name"], t["embed_dim"], t["weight"], t["input_size"]) for t in r["teachers"]] == \
        [("a", 48, 1.0, [32, 32]), ("b", 64, 0.5, [32, 32])]
    assert r["peak_mem_bytes"] > 0 and r["baseline_peak_mem_bytes"] > 0 and r["speedup_vs_baseline"] > 0

    cfg = get_config("tiny-multi")
    v = build_fast(cfg, Options(), torch.device("cpu"))
    teachers = [vit_dims(tt.teacher) for tt in teacher_targets(v.distiller)]
    s = vit_dims(v.distiller.student)
    assert [t.embed_dim for t in teachers] == [48, 64] and [t.depth for t in teachers] == [2, 1]
    n_tok = s.num_patches + 1  # every student token through every head
    t_each = [vit_forward_flops(t) for t in teachers]
    heads = [3 * 2 * n_tok * s.embed_dim * t.embed_dim for t in teachers]
    s_fwd = vit_forward_flops(s)
    want = sum(t_each) + s_fwd + (2 * s_fwd - patch_embed_flops(s)) + sum(heads)
    assert r["flops_per_image"] == want
    assert r["flops_breakdown"]["teacher_fwd_each"] == dict(zip("ab", t_each))
    assert r["flops_breakdown"]["projector_each"] == dict(zip("ab", heads))
    assert [t["fwd_flops"] for t in r["teachers"]] == t_each
    assert r["mfu"] == pytest.approx(r["flops_per_image"] * r["images_per_s"] / r["matmul_ceiling_flops"])
    # an independent count of one real step (no drop path: model FLOPs count every sample)
    d = build_fast(cfg.replace(drop_path_rate=0.0), Options(), torch.device("cpu")).distiller
    use_explicit_attention(d)
    with FlopCounterMode(display=False) as fc:
        d(torch.rand(4, 3, 32, 32))["loss"].backward()
    assert fc.get_total_flops() == 4 * want


def test_multi_config_refuses_dropping_masked_tokens():
    with pytest.raises(SystemExit, match="single-teacher"):
        bench_distill.main(["--config", "tiny-multi", "--mask-ratio", "0.5", "--drop-masked", "--rounds", "1",
                            "--data", "none"])
