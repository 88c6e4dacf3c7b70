"""Results of the miniature reproduction: the table (mean ± std over seeds), the figures and the
checker that ``make reproduce-mini`` and the slow test run on them."""
from __future__ import annotations

import json
import math
import platform
import shutil
import statistics
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

METRICS = ("finetune", "linprobe", "knn")
METRIC_TITLES = {"finetune": "fine-tune top-1", "linprobe": "linear probe top-1", "knn": "k-NN top-1"}
FIGURES = ("finetune_vs_fd_epochs.png", "attention_distance.png")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def describe(name: str, main_epochs: int) -> str:
    from .miniature import ABLATIONS

    if name == "teacher":
        return "teacher (shipped CLIP, fine-tuned as it is)"
    if name == "e0":
        return "scratch (student, FD 0 epochs)"
    if name.startswith("e"):
        return f"FD student, {name[1:]} epochs"
    return f"FD {main_epochs} ep, ablation: {ABLATIONS[name][1]}"


def fd_epochs_of(name: str, main_epochs: int) -> Optional[int]:
    if name == "teacher":
        return None
    return int(name[1:]) if name.startswith("e") else main_epochs


def summarise(values: List[float]) -> Dict[str, Any]:
    """Mean and sample standard deviation (n - 1; 0 for one value) of the per-seed numbers."""
    return {"values": values, "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def _read_top1(folder: str) -> float:
    """The stage's top-1: for fine-tuning the *last* epoch's (the protocol's choice: the best
    epoch on the evaluation set would be selected on it), for the probes the command's own."""
    js = json.loads((Path(folder) / "metrics.json").read_text())
    if js.get("last") is not None and "top1" in js["last"]:
        return float(js["last"]["top1"])
    return float(js["top1"])


def collect(evals: Dict[str, Dict[str, str]], main_epochs: int) -> List[Dict[str, Any]]:
    """One row per model: its per-seed numbers and their summary for every metric."""
    names: List[str] = []
    for tag in evals["finetune"]:
        n = tag.split("/")[0]
        if n not in names:
            names.append(n)
    rows = []
    for n in names:
        row: Dict[str, Any] = {"model": n, "description": describe(n, main_epochs), "fd_epochs": fd_epochs_of(n, main_epochs)}
        for metric in METRICS:
            per_seed = {tag.split("/s")[1]: _read_top1(f) for tag, f in evals[metric].items() if tag.split("/")[0] == n}
            row["seeds"] = sorted(int(s) for s in per_seed)
            row[metric] = summarise([per_seed[str(s)] for s in row["seeds"]])
        rows.append(row)
    return rows


def _cell(m: Dict[str, Any]) -> str:
    return f"{m['mean']:.1f} ± {m['std']:.1f}" if m["n"] > 1 else f"{m['mean']:.1f}"


def results_table(rows: List[Dict[str, Any]]) -> str:
    """The Markdown table of ``results.md`` (and docs/evidence.md), from the rows alone."""
    head = "| model | FD epochs | seeds | " + " | ".join(METRIC_TITLES[m] for m in METRICS) + " |"
    lines = [head, "|" + "---|" * (3 + len(METRICS))]
    for r in rows:
        ep = "-" if r["fd_epochs"] is None else str(r["fd_epochs"])
        seeds = ",".join(map(str, r["seeds"]))
        lines.append(f"| {r['description']} | {ep} | {seeds} | " + " | ".join(_cell(r[m]) for m in METRICS) + " |")
    return "\n".join(lines)


def plot_finetune_vs_epochs(rows: List[Dict[str, Any]], path: Path) -> Path:
    """Fine-tuning top-1 against FD epochs (the sweep; mean ± std where there are seeds), with the
    teacher's fine-tune and scratch as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {r["model"]: r for r in rows}
    sweep = sorted((r for r in rows if r["model"].startswith("e")), key=lambda r: r["fd_epochs"])
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    xs = [r["fd_epochs"] for r in sweep]
    ys = [r["finetune"]["mean"] for r in sweep]
    es = [r["finetune"]["std"] for r in sweep]
    ax.errorbar(xs, ys, yerr=es, marker="o", capsize=4, color="C0", label="FD student (mean ± std over seeds)")
    for r in sweep:
        if r["finetune"]["n"] > 1:
            ax.scatter([r["fd_epochs"]] * r["finetune"]["n"], r["finetune"]["values"], s=12, color="C0", alpha=0.4)
    t = by.get("teacher")
    if t:
        m, s = t["finetune"]["mean"], t["finetune"]["std"]
        ax.axhline(m, color="C3", label=f"teacher fine-tuned ({m:.1f} ± {s:.1f})")
        ax.axhspan(m - s, m + s, color="C3", alpha=0.15)
    if "e0" in by:
        ax.axhline(by["e0"]["finetune"]["mean"], color="grey", ls="--",
                   label=f"scratch ({by['e0']['finetune']['mean']:.1f})")
    for i, r in enumerate(r for r in rows if not r["model"].startswith("e") and r["model"] != "teacher"):
        ax.scatter([r["fd_epochs"]], [r["finetune"]["mean"]], marker="x", s=40, color=f"C{4 + i}",
                   label=f"ablation: {r['model']}")
    ax.set_xlabel("feature distillation epochs (5 000-image FD set)" if xs else "FD epochs")
    ax.set_ylabel("fine-tuning top-1 (%)")
    ax.set_xticks(xs)
    ax.set_title("Miniature Table 1: fine-tuning top-1 after FD")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def head_diversity(distance_json: Path) -> List[Dict[str, Any]]:
    """Per model: each layer's mean attention distance and its spread over heads (Fig. 3's claim
    is that the deep layers' spread grows after FD)."""
    js = json.loads(distance_json.read_text())
    return [{"label": m["label"], "layer_mean_px": m["layer_mean_px"], "head_spread_px": m["head_spread_px"]}
            for m in js["models"]]


def versions() -> Dict[str, str]:
    from ..demo.pipeline import versions as demo_versions

    return demo_versions()


def write_results(out: Path, *, plan: Dict[str, Any], evals: Dict[str, Dict[str, str]], models: Dict[str, str],
                  diagnostics: Optional[str], stages, total_seconds: float) -> Path:
    from ..eval.commands import write_json

    rows = collect(evals, plan["main_epochs"])
    figs = out / "figures"
    plot_finetune_vs_epochs(rows, figs / FIGURES[0])
    diversity = None
    if diagnostics:
        shutil.copyfile(Path(diagnostics) / "attention_distance.png", figs / FIGURES[1])
        diversity = head_diversity(Path(diagnostics) / "attention_distance.json")
    spent = sum(s.seconds for s in stages)  # each stage's own time, cached ones included: the whole protocol
    results = {
        "plan": plan, "rows": rows, "models": models, "head_diversity": diversity,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": platform.processor() or platform.machine(),
        "versions": versions(), "seconds_this_call": total_seconds, "seconds_all_stages": spent,
        "stages": [{"name": s.name, "seconds": s.seconds, "cached": s.cached, "folder": Path(s.folder).name}
                   for s in stages],
        "figures": [str(Path("figures") / f) for f in FIGURES if (figs / f).is_file()],
    }
    results["finding"] = finding(rows, plan) if {"teacher", f"e{plan['main_epochs']}"} <= {r["model"] for r in rows} else None
    path = write_json(results, out / "results.json")
    (out / "results.md").write_text(results_markdown(results))
    return path


def results_markdown(results: Dict[str, Any]) -> str:
    lines = [f"Measured {results['date']} on {results['versions']['platform']} "
             f"({results['versions']['cpu_threads']} threads); torch {results['versions']['torch']}, "
             f"timm {results['versions']['timm']}, open_clip {results['versions']['open_clip']}; "
             f"all stages {results['seconds_all_stages'] / 60:.0f} min.", "", results_table(results["rows"]), ""]
    if results.get("finding"):
        lines += [results["finding"], ""]
    if results.get("head_diversity"):
        lines += ["Attention distance per layer (mean over heads, px) and its spread over heads (std, px):", "",
                  "| model | " + " | ".join(f"layer {i + 1}" for i in range(len(results["head_diversity"][0]["layer_mean_px"])))
                  + " |", "|---|" + "---|" * len(results["head_diversity"][0]["layer_mean_px"])]
        for d in results["head_diversity"]:
            lines.append(f"| {d['label']} | " + " | ".join(f"{m:.1f} (± {s:.1f})" for m, s in
                                                         zip(d["layer_mean_px"], d["head_spread_px"])) + " |")
    return "\n".join(lines) + "\n"


def check_results(output: str | Path) -> List[str]:
    """Problems with a finished run's outputs (empty: all good): every planned model and seed has
    finite numbers in [0, 100] for every metric, ``results.md`` holds the table the numbers give,
    and every figure is a real PNG of a plausible size."""
    out = Path(output)
    p = out / "results.json"
    if not p.is_file():
        return [f"{p} is missing"]
    res = json.loads(p.read_text())
    problems: List[str] = []
    plan = res["plan"]
    want = {"teacher", "e0", f"e{plan['main_epochs']}", *(f"e{e}" for e in plan["fd_epochs"]), *plan["ablations"]}
    got = {r["model"] for r in res["rows"]}
    if want - got:
        problems.append(f"rows missing: {sorted(want - got)}")
    for r in res["rows"]:
        need = sorted(plan["seeds"]) if r["model"] in ("teacher", "e0", f"e{plan['main_epochs']}") else [plan["seeds"][0]]
        if r["seeds"] != need:
            problems.append(f"{r['model']}: seeds {r['seeds']}, expected {need}")
        for m in METRICS:
            vals = r[m]["values"]
            if len(vals) != len(r["seeds"]) or not all(math.isfinite(v) and 0.0 <= v <= 100.0 for v in vals):
                problems.append(f"{r['model']} {m}: values {vals} are not one finite percentage per seed")
            elif abs(statistics.fmean(vals) - r[m]["mean"]) > 1e-9:
                problems.append(f"{r['model']} {m}: mean {r[m]['mean']} is not the mean of {vals}")
    md = out / "results.md"
    if not md.is_file() or results_table(res["rows"]) not in md.read_text():
        problems.append(f"{md} does not hold the table of results.json")
    for f in FIGURES:
        fp = out / "figures" / f
        if not fp.is_file():
            problems.append(f"figure {fp} is missing")
            continue
        data = fp.read_bytes()
        if data[:8] != PNG_MAGIC or len(data) < 10_000:
            problems.append(f"figure {fp} is not a plausible PNG ({len(data)} bytes)")
        else:
            w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
            if w < 300 or h < 200:
                problems.append(f"figure {fp} is {w}x{h} px")
    return problems


def finding(rows: List[Dict[str, Any]], plan: Dict[str, Any]) -> str:
    """The headline in one sentence: the FD student of the main length against its teacher, both
    fine-tuned with the one recipe (mean ± std over seeds). A difference no larger than the larger
    of the two standard deviations is called what it is: inside the seed-to-seed spread."""
    by = {r["model"]: r for r in rows}
    main = f"e{plan['main_epochs']}"
    t, s = by["teacher"]["finetune"], by[main]["finetune"]
    d = s["mean"] - t["mean"]
    n = min(t["n"], s["n"])
    text = (f"after {plan['main_epochs']} epochs of feature distillation the student fine-tunes to "
            f"{s['mean']:.1f} ± {s['std']:.1f}% top-1 against its teacher's {t['mean']:.1f} ± {t['std']:.1f}% "
            f"({n} seed{'s' if n > 1 else ''}, {d:+.1f} points)")
    if n > 1 and abs(d) <= max(t["std"], s["std"]):
        verdict = "a difference within the seed-to-seed spread"
    elif d > 0:
        verdict = "the student beats its teacher"
    else:
        verdict = "the student does not beat its teacher"
    out = f"In miniature, {verdict}: {text}."
    longer = [r for r in rows if r["model"].startswith("e") and (r["fd_epochs"] or 0) > plan["main_epochs"]]
    if longer:  # the end of the FD-length sweep, said as plainly (it may have fewer seeds)
        r = max(longer, key=lambda r: r["fd_epochs"])
        f, dd = r["finetune"], r["finetune"]["mean"] - t["mean"]
        seeds = f"{f['n']} seed{'s' if f['n'] > 1 else ''}"
        where = ("within the teacher's seed-to-seed spread" if abs(dd) <= max(t["std"], f["std"])
                 else "above the teacher" if dd > 0 else "below the teacher")
        out += (f" The longest FD run ({r['fd_epochs']} epochs, {seeds}) fine-tunes to {f['mean']:.1f}%: "
                f"{dd:+.1f} points, {where}.")
    return out


#: the finished protocol's headline, shipped with the package so the demo's report can state it
PUBLISHED = "miniature_result.json"


def publish_finding(output: str | Path, target: Optional[Path] = None) -> Path:
    """Copy a finished, checked run's headline (finding, table, date, versions) into the package
    (``fdistill/experiments/miniature_result.json``), where the demo's report reads it."""
    problems = check_results(output)
    if problems:
        raise ValueError(f"{output}: not a finished, consistent run: {problems}")
    res = json.loads((Path(output) / "results.json").read_text())
    keep = {k: res[k] for k in ("finding", "rows", "plan", "date", "machine", "versions", "seconds_all_stages")}
    target = target or Path(__file__).with_name(PUBLISHED)
    from ..io import atomic_write_json

    return atomic_write_json(target, keep)


def published_finding() -> Optional[str]:
    """The shipped headline sentence with its date, or None when no run has been published."""
    from importlib import resources

    f = resources.files(__package__).joinpath(PUBLISHED)
    if not f.is_file():
        return None
    res = json.loads(f.read_text())
    return f"{res['finding']} (measured {res['date'][:10]}; docs/evidence.md)"
