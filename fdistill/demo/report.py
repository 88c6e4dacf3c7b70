"""The demo's report: one self-contained HTML page (PNGs embedded) and a printed table.

Shows what came out, whichever model wins: a Table-1-like comparison (teacher vs FD student:
fine-tune, linear probe, k-NN, zero-shot, linear segmentation mIoU; mean and spread over seeds),
the training curves, the diagnostic figures, the wall-clock time of every stage with its exact
command, versions and seeds.
"""
from __future__ import annotations

import base64
import html
import json
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

ROWS = (
    ("finetune", "Fine-tuning top-1 (%)"),
    ("linprobe", "Linear probe top-1 (%)"),
    ("knn", "k-NN top-1 (%, k=20, T=0.07)"),
    ("zeroshot", "Zero-shot top-1 (%)"),
    ("segprobe", "Linear segmentation mIoU (%)"),
)
PAPER = {  # Table 1 / Sec. 4 of the paper, CLIP ViT-B/16 on ImageNet-1K, 300 FD epochs
    "finetune": (82.9, 85.0), "linprobe": (79.5, 80.1), "zeroshot": (68.6, 68.0), "knn": (None, None),
    "segprobe": (None, None),  # the paper's dense results follow full fine-tuning (ADE20K, COCO): no probe number
}


def rows_of(results: Dict[str, Any]) -> List[Tuple[str, str]]:
    """The table rows this run has (the segmentation probe runs only on data with label maps)."""
    have = results.get("metrics")
    return [(m, label) for m, label in ROWS if have is None or m in have]


def _stats(vals: List[float]) -> Tuple[float, float]:
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summarize(results: Dict[str, Any]) -> Dict[str, Dict[str, Tuple[float, float]]]:
    """{metric: {"teacher": (mean, std), "student": (mean, std), "delta": (mean, std)}} over seeds."""
    out = {}
    for metric, _ in rows_of(results):
        t = [s[metric]["teacher"] for s in results["per_seed"]]
        s_ = [s[metric]["student"] for s in results["per_seed"]]
        d = [b - a for a, b in zip(t, s_)]
        out[metric] = {"teacher": _stats(t), "student": _stats(s_), "delta": _stats(d)}
    return out


def _fmt(ms: Tuple[float, float], n: int, signed: bool = False) -> str:
    m, s = ms
    txt = f"{m:+.1f}" if signed else f"{m:.1f}"
    return f"{txt} ± {s:.1f}" if n > 1 else txt


def text_table(results: Dict[str, Any]) -> str:
    """The comparison as aligned text (printed at the end of ``make demo``)."""
    summ, n = summarize(results), len(results["per_seed"])
    lines = [f"{'':32s} {'CLIP teacher':>14s} {'FD student':>14s} {'FD - teacher':>14s}"]
    for metric, label in rows_of(results):
        r = summ[metric]
        lines.append(f"{label:32s} {_fmt(r['teacher'], n):>14s} {_fmt(r['student'], n):>14s} "
                     f"{_fmt(r['delta'], n, True):>14s}")
    seeds = ", ".join(str(s) for s in results["seeds"])
    lines.append(f"(seeds: {seeds}; mean ± std over seeds)" if n > 1 else f"(seed {seeds})")
    return "\n".join(lines)


def verdict(results: Dict[str, Any]) -> str:
    """One honest sentence on the fine-tuning result, and what scale the paper measured at."""
    summ, n = summarize(results), len(results["per_seed"])
    d, sd = summ["finetune"]["delta"]
    if n > 1 and abs(d) <= sd:
        what = f"the fine-tuning difference ({d:+.1f} points) is within the seed-to-seed spread ({sd:.1f})"
    elif d > 0:
        what = f"the FD student fine-tuned better than its teacher by {d:+.1f} points"
    else:
        what = f"FD did NOT improve fine-tuning here: the student is {d:+.1f} points against its teacher"
    return (f"At this scale (a tiny CLIP trained for minutes on {results['data']}, 32 px images, CPU), {what}. "
            "The paper's gains were measured at ImageNet-1K scale: CLIP ViT-B/16 pre-trained on 400M image-text "
            "pairs, 300 FD epochs on 16 GPUs, 100 fine-tuning epochs (82.9 -> 85.0 top-1); "
            "a result in miniature is an illustration, not a reproduction.")


def _miniature_paragraph() -> str:
    """The miniature reproduction's finding (``make reproduce-mini``), which tests the paper's
    claim under the conditions this demo cannot meet (docs/evidence.md)."""
    from ..experiments.miniature_report import published_finding

    text = published_finding()
    if text is None:
        return ""
    return ("<p><strong>The careful small-scale test</strong> (a teacher that knows more than the data, an 8x8 token "
            f"map, an FD-length sweep, three seeds; <code>make reproduce-mini</code>): {html.escape(text)}</p>")


def plot_curves(results: Dict[str, Any], root: Path, path: Path) -> Optional[Path]:
    """Training curves of seed 0: CLIP pre-training loss, FD loss, fine-tuning top-1 of both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seed_dir = root / "seed0"
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    clip = _read_jsonl(seed_dir / "teacher" / "metrics.jsonl")
    if clip:
        axes[0].plot([r["step"] for r in clip], [r["loss"] for r in clip], color="C0")
    axes[0].set(title="1. CLIP teacher pre-training", xlabel="step", ylabel="contrastive loss")
    fd = [r for r in _read_jsonl(seed_dir / "fd" / "metrics.jsonl") if "loss" in r and "step" in r]
    if fd:
        axes[1].plot([r["step"] for r in fd], [r["loss"] for r in fd], color="C1", label="total")
        if "loss_patch" in fd[0]:
            axes[1].plot([r["step"] for r in fd], [r["loss_patch"] for r in fd], color="C1", ls=":", label="patch tokens")
            axes[1].plot([r["step"] for r in fd], [r["loss_prefix"] for r in fd], color="C1", ls="--", label="[CLS]")
        axes[1].legend(fontsize=8)
    axes[1].set(title="2. Feature distillation", xlabel="step", ylabel="smooth-L1 (beta 2)")
    for i, (name, colour) in enumerate((("CLIP teacher", "C0"), ("FD student", "C1"))):
        # fine-tuning's log.jsonl: {"epoch", "step", "model": {"top1", ...}, "ema": {...}} per evaluation
        rows = [r for r in _read_jsonl(_finetune_dir(seed_dir, i) / "log.jsonl") if "top1" in r.get("model", {})]
        if rows:
            x = [r.get("epoch", j + 1) for j, r in enumerate(rows)]
            axes[2].plot(x, [r["model"]["top1"] for r in rows], marker="o", ms=3, color=colour, label=name)
    axes[2].set(title="3. Fine-tuning (same recipe)", xlabel="epoch", ylabel="val top-1 (%)")
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _finetune_dir(seed_dir: Path, i: int) -> Path:
    js = json.loads((seed_dir / "finetune" / "compare.json").read_text())
    mf = js["results"][i].get("metrics_file")
    return Path(mf).parent if mf else seed_dir / "finetune"


#: the alt text of the segmentation probe's figures, teacher then student (written and checked)
SEG_FIGURES = ("Segmentation predictions of the CLIP teacher", "Segmentation predictions of the FD student")


def _seg_figures(seed_dir: Path) -> List[Tuple[str, Path]]:
    """(alt text, predictions.png) of the teacher and the student of a seed's segmentation probe."""
    results = json.loads((seed_dir / "segprobe" / "compare.json").read_text())["results"]
    return [(alt, Path(r.get("figure") or seed_dir / "segprobe" / "missing.png"))
            for alt, r in zip(SEG_FIGURES, results)]


from ..io import read_jsonl as _read_jsonl  # noqa: E402  (the project's JSON-lines reader)


def _img(path: Path, alt: str) -> str:
    if not path.is_file():
        return f"<p><em>{html.escape(alt)}: not produced ({html.escape(str(path))})</em></p>"
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(alt)}</figcaption></figure>'


def _table_row_head(label: str, r: Dict[str, Tuple[float, float]], n: int) -> str:
    """The comparison row's first cells (label, teacher, student): what the report writes and
    :func:`check_demo_report` looks for."""
    return f"<tr><td>{label}</td><td>{_fmt(r['teacher'], n)}</td><td>{_fmt(r['student'], n)}</td>"


def write_demo_report(root: Path, results: Dict[str, Any]) -> Path:
    """Write ``root/report.html`` (+ ``curves.png``) and print the comparison; returns the path."""
    root = Path(root)
    curves = plot_curves(results, root, root / "curves.png")
    summ, n = summarize(results), len(results["per_seed"])
    rows, seg = [], "segprobe" in dict(rows_of(results))
    for metric, label in rows_of(results):
        r = summ[metric]
        pt, ps = PAPER[metric]
        paper = f"{pt} → {ps}" if pt is not None else "—"
        rows.append(_table_row_head(label, r, n) + f"<td><b>{_fmt(r['delta'], n, True)}</b></td><td>{paper}</td></tr>")
    per_seed = "".join(
        f"<tr><td>{s['seed']}</td>" + "".join(f"<td>{s[m]['teacher']:.1f} / {s[m]['student']:.1f}</td>"
                                             for m, _ in rows_of(results))
        + f"<td>{s.get('clip_zero_shot_check') or float('nan'):.1f}</td></tr>" for s in results["per_seed"])
    stage_rows = "".join(
        f"<tr><td>{s['seed']}</td><td>{html.escape(s['name'])}</td><td>{s['seconds']:.0f} s</td>"
        f"<td><code>{html.escape(s['command'])}</code></td></tr>" for s in results["stages"])
    versions = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>"
                       for k, v in results["versions"].items())
    diag = root / "seed0" / "diagnose"
    figures = "".join([
        _img(curves, "Training curves (seed 0)") if curves else "",
        _img(diag / "attention_distance.png", "Per-head attention distance, per layer (paper Fig. 3)"),
        _img(diag / "attention_maps.png", "Attention maps averaged over heads and images (paper Fig. 4)"),
        _img(diag / "loss_landscape.png", "Loss landscape along filter-normalised directions (paper Fig. 5)"),
        *(_img(path, f"{alt} (linear probe, seed 0)") for alt, path in (_seg_figures(root / "seed0") if seg else [])),
    ])
    total = results["total_seconds"]
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>fdistill demo report</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
td:first-child,th:first-child{{text-align:left}}code{{font-size:85%}}img{{max-width:100%}}
figure{{margin:1.5em 0}}figcaption{{color:#555;font-size:90%}}.verdict{{background:#f4f4f4;padding:1em}}</style></head><body>
<h1>fdistill demo: feature distillation in miniature</h1>
<p>A tiny CLIP teacher was pre-trained from scratch, feature-distilled into a same-size ViT with the paper's
defaults, and both were evaluated with identical recipes. Data: {html.escape(results['data'])}.
Seeds: {", ".join(map(str, results['seeds']))} (fixed in advance, never chosen).
{"QUICK mode. " if results['quick'] else ""}Total wall-clock time: {total/60:.1f} min on {html.escape(results['device'])}
({html.escape(results['date'])}).</p>
<h2>Teacher vs FD student (Table 1 in miniature)</h2>
<table><tr><th></th><th>CLIP teacher</th><th>FD student</th><th>FD − teacher</th><th>paper, ViT-B/16 (IN-1K)</th></tr>
{''.join(rows)}</table>
<p class="verdict">{html.escape(verdict(results))}</p>
{_miniature_paragraph()}
{_SEG_NOTE if seg else ""}
<h3>Per seed (teacher / student)</h3>
<table><tr><th>seed</th>{''.join(f'<th>{html.escape(l)}</th>' for _, l in rows_of(results))}<th>teacher pre-training zero-shot check (%)</th></tr>{per_seed}</table>
<h2>Figures</h2>{figures}
<p>The full diagnostics report (tables of per-layer distances, head spread, landscapes) is
<code>seed0/diagnose/report.html</code>.</p>
<h2>Stages, wall-clock time and the commands that ran them</h2>
<table><tr><th>seed</th><th>stage</th><th>time</th><th>command</th></tr>{stage_rows}</table>
<h2>Versions</h2><table>{versions}</table>
</body></html>"""
    path = root / "report.html"
    path.write_text(page)
    print(text_table(results))
    print(verdict(results))
    from ..experiments.miniature_report import published_finding

    if published_finding():
        print(f"The miniature reproduction (make reproduce-mini): {published_finding()}")
    return path


FIGURES = ("Training curves", "attention distance", "Attention maps", "Loss landscape")
_SEG_NOTE = ("<p>Linear segmentation: DINOv2's linear probe (BatchNorm + 1x1 conv on the frozen output tokens, "
             "upsampled to the label map) on the scenes' object masks, background + 10 shapes; mIoU at 32 px "
             "from 4x4 tokens. The paper's dense results (ADE20K, COCO) follow full fine-tuning with task heads, "
             "so no paper number stands beside it.</p>")


def check_demo_report(root: str | Path) -> List[str]:
    """What is missing or wrong in a demo's output folder; an empty list means the report is whole.

    Checked: ``results.json`` holds, for every seed, a teacher and a student number in [0, 100]
    for each metric the data allows (the segmentation probe needs the built-in scenes' masks) and a
    time for every stage; ``report.html`` has the comparison table with
    those numbers, the four figures embedded as real PNGs (six with the segmentation probe's
    predictions), and the time of every stage."""
    import re

    from .pipeline import expected_metrics, expected_stages

    root = Path(root)
    problems: List[str] = []
    res_path, page_path = root / "results.json", root / "report.html"
    for p in (res_path, page_path):
        if not p.is_file():
            problems.append(f"missing {p}")
    if problems:
        return problems
    results = json.loads(res_path.read_text())
    page = page_path.read_text()
    data_spec = results.get("data_spec")
    metrics = expected_metrics(data_spec)
    if sorted(results.get("metrics") or []) != sorted(metrics):
        problems.append(f"results.json lists metrics {results.get('metrics')}, expected {metrics}")
        results["metrics"] = metrics
    present = bool(results.get("per_seed"))  # every metric a number (possibly NaN): the table can be checked
    if not present:
        problems.append("results.json has no per-seed results")
    for seed in results.get("per_seed", []):
        for metric in metrics:
            for who in ("teacher", "student"):
                v = seed.get(metric, {}).get(who)
                if not isinstance(v, (int, float)) or not 0 <= v <= 100:  # NaN fails the range test too
                    problems.append(f"seed {seed.get('seed')}: {metric} {who} value is {v!r}")
                    present = present and isinstance(v, (int, float))
    stages = results.get("stages", [])
    for seed in results.get("seeds", []):
        for name in expected_stages(data_spec):
            if not any(s["name"] == name and s["seed"] == seed and s["seconds"] > 0 for s in stages):
                problems.append(f"seed {seed}: no timing for stage {name!r}")
    if "Teacher vs FD student" not in page:
        problems.append("report.html has no comparison table")
    elif present:
        summ, n = summarize(results), len(results["per_seed"])
        for metric, label in rows_of(results):
            if _table_row_head(label, summ[metric], n) not in page:
                problems.append(f"report.html table lacks the row {label!r} with the results' numbers")
    images = re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,([^"]+)"', page)
    for fig in FIGURES + (SEG_FIGURES if "segprobe" in metrics else ()):
        hit = [data for alt, data in images if fig.lower() in alt.lower()]
        if not hit:
            problems.append(f"report.html lacks the figure {fig!r}")
        elif not base64.b64decode(hit[0])[:8] == b"\x89PNG\r\n\x1a\n":
            problems.append(f"report.html figure {fig!r} is not a PNG")
    for name in expected_stages(data_spec):
        if not re.search(rf"<td>{re.escape(html.escape(name))}</td><td>\d+ s</td>", page):
            problems.append(f"report.html lacks the time of stage {name!r}")
    if "Total wall-clock time" not in page:
        problems.append("report.html lacks the total time")
    return problems
