"""``benchmarks/RESULTS.md``: one dated table row per recorded benchmark run."""
from __future__ import annotations

from pathlib import Path

RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"

HEADER = """# Benchmark results

Rows are appended by `python benchmarks/bench_distill.py --config NAME --baseline --record`
(see docs/performance.md for what each number means). Random-init timm teachers, one FD step
(teacher forward + student forward/backward + AdamW) on a fixed batch; median over interleaved
rounds; MFU against a dense matmul measured in the same run, same device and dtype.

| date | device | torch / timm | config | options | img/s | step ms | peak mem | GFLOP/img | MFU | matmul ceiling | baseline img/s | baseline MFU | speed-up | loader img/s | other load |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|
"""


def _fmt_bytes(n) -> str:
    if n is None:
        return "-"
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.0f} MiB"


def _num(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def options_text(opts: dict) -> str:
    parts = [k.replace("_", "-") for k in ("compile", "channels_last", "grad_ckpt") if opts.get(k)]
    if opts.get("mask_ratio"):
        parts.append(f"mask {opts['mask_ratio']:g}" + (" drop" if opts.get("drop_masked") else ""))
    if opts.get("teacher_dtype"):
        parts.append(f"teacher {opts['teacher_dtype']}")
    return ", ".join(parts) or "default"


def table_row(r: dict) -> str:
    v = r["versions"]
    loader = r.get("loader") or {}
    ceiling = r.get("matmul_ceiling_flops")
    cells = [
        r["timestamp"][:16].replace("T", " "),
        r["device"],
        f"{v['torch']} / {v['timm']}",
        r["config"],
        options_text(r.get("options", {})),
        _num(r.get("images_per_s"), ".2f"),
        _num(r.get("step_ms"), ".0f"),
        _fmt_bytes(r.get("peak_mem_bytes")),
        _num(r.get("flops_per_image") and r["flops_per_image"] / 1e9, ".2f"),
        _num(r.get("mfu") and 100 * r["mfu"], ".0f") + ("%" if r.get("mfu") else ""),
        (f"{ceiling / 1e12:.3g} TFLOP/s {r.get('dtype')}" if ceiling else "-"),
        _num(r.get("baseline_images_per_s"), ".2f"),
        _num(r.get("baseline_mfu") and 100 * r["baseline_mfu"], ".0f") + ("%" if r.get("baseline_mfu") else ""),
        _num(r.get("speedup_vs_baseline"), ".2f") + ("x" if r.get("speedup_vs_baseline") else ""),
        _num(loader.get("images_per_s"), ".0f"),
        _num(r.get("others_load_est"), ".2f"),
    ]
    return "| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |\n"


def append_row(r: dict, path: Path = RESULTS_MD) -> Path:
    """Append ``r``'s row to the results table (the file and its header are made if absent)."""
    path = Path(path)
    if not path.exists():
        path.write_text(HEADER)
    text = path.read_text()
    with path.open("a") as f:
        if not text.endswith("\n"):
            f.write("\n")
        f.write(table_row(r))
    return path
