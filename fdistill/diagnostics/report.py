"""One self-contained HTML page comparing the models on the three diagnostics (PNGs embedded as
base64, numbers in tables), written atomically."""
from __future__ import annotations

import base64
import html
import os
from pathlib import Path
from typing import Any, Dict

from .. import __version__

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{font-size:1.6em}h2{margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}h3{font-size:1.05em}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.88em}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:right}th{background:#f4f4f4}
td.l,th.l{text-align:left}img{max-width:100%;border:1px solid #eee}
.note{color:#555;font-size:.9em}.how{background:#f8f8f2;border-left:3px solid #bbb;padding:.4em .8em;font-size:.92em}
"""


def _img(path) -> str:
    if path is None:
        return "<p class='note'>No model in this comparison has attention to show.</p>"
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(Path(path).name)}" src="data:image/png;base64,{data}">'


def _e(x: Any) -> str:
    return html.escape(str(x))


def _f(x: float, nd: int = 2) -> str:
    return f"{x:.{nd}f}" if x == x and abs(x) != float("inf") else str(x)


def _table(header, rows, left=1) -> str:
    th = "".join(f'<th class="{"l" if i < left else ""}">{_e(h)}</th>' for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f'<td class="{"l" if i < left else ""}">{c}</td>' for i, c in enumerate(r))
                   + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _models_table(models) -> str:
    rows = [[_e(m["label"]), _e(m["spec"]), _e(m["kind"]), "x".join(map(str, m["img_size"])), _e(m["patch_size"]),
             "x".join(map(str, m["grid"] or [])), _e(m["num_prefix_tokens"])] for m in models]
    return _table(["model", "spec", "kind", "input", "patch (px)", "grid", "prefix tokens"], rows, left=3)


def write_html_report(path: str | os.PathLike, *, distance: Dict[str, Any], maps: Dict[str, Any],
                      landscape: Dict[str, Any], figures: Dict[str, Path]) -> Path:
    """``report.html`` from the three diagnostics' JSON dicts and their PNG paths."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>fdistill diagnostics</title>"
             f"<style>{_CSS}</style></head><body>",
             "<h1>fdistill diagnostics</h1>",
             f"<p class='note'>fdistill {__version__}; attention on {distance['num_images']} {_e(distance['split'])} "
             f"images of <code>{_e(distance['data'])}</code> (seed {distance['seed']}). Wei et al., "
             f"\"Improving CLIP Fine-tuning Performance\" (ICCV 2023), Section 4.</p>",
             "<h2>Models</h2>", _models_table(landscape["models"])]

    # -- attention distance
    skipped = "".join(f"<p class='note'>{_e(m['label'])}: not shown ({_e(m['reason'])}).</p>"
                      for m in distance.get("skipped", []))
    parts += ["<h2>1. Attention distance (Figure 3)</h2>", _img(figures.get("distance")), skipped,
              f"<p class='note'>{_e(distance['note'])}</p>",
              "<p class='how'>Each dot is one head: how far (in pixels) its queries look on average. Heads of a "
              "layer spread over a range of distances = diverse (local and global heads); all heads of a layer "
              "at the same distance = collapsed. The paper finds deep layers of CLIP collapse and FD students "
              "keep them diverse: compare the <b>head spread</b> column in the last layers.</p>"]
    for m in distance["models"]:
        rows = [[str(i + 1), _f(m["layer_mean_px"][i], 1), _f(m["head_spread_px"][i], 1), _f(m["head_min_px"][i], 1),
                 _f(m["head_max_px"][i], 1)] for i in range(m["layers"])]
        parts += [f"<h3>{_e(m['label'])}</h3>",
                  _table(["layer", "mean over heads (px)", "head spread: std (px)", "min head (px)", "max head (px)"],
                         rows)]

    # -- attention maps
    parts += ["<h2>2. Attention maps (Figure 4)</h2>", _img(figures.get("maps")), skipped,
              f"<p class='note'>{_e(maps['note'])}</p>",
              "<p class='how'>Diagonal bands mean attention at fixed relative offsets (translation-equivariant, "
              "relative-position patterns); vertical bars mean every query attends to the same few keys (global "
              "patterns). FD students show more of the former. <b>self</b>: weight on the query itself; "
              "<b>local</b>: patch queries' weight on patches at most one step away (incl. diagonal steps); "
              "<b>top-5% keys</b>: patch queries' weight on the 5% most attended patch keys (high for vertical "
              "bars); <b>prefix</b>: weight on [CLS]/registers.</p>"]
    for m in maps["models"]:
        rows = [[str(s["layer"]), _f(s["prefix_mass"], 3), _f(s["self_mass"], 3), _f(s["local_mass"], 3),
                 _f(s["top_key_mass"], 3)] for s in m["summary"]]
        parts += [f"<h3>{_e(m['label'])}</h3>", _table(["layer", "prefix", "self", "local", "top-5% keys"], rows)]

    # -- loss landscape
    parts += ["<h2>3. Loss landscape (Figure 5)</h2>", _img(figures["landscape"]),
              f"<p class='note'>{_e(landscape['note'])}</p>",
              "<p class='how'>Loss and accuracy when all weights move by alpha along a random direction scaled "
              "filter by filter to the weights' own norms. A curve that stays low for larger |alpha| marks a flatter, "
              "wider minimum, which the paper links to better fine-tuning (FD students are flatter).</p>"]
    rows = [[_e(m["label"]), _e(m["classifier"]), str(m["num_images"]), _f(m["loss0"], 4),
             _f(100 * m["accuracy0"], 2), _f(m["loss_at_0.5"], 4), _f(m["loss_at_1"], 4),
             _f(100 * m["accuracy_at_0.5"], 2), _f(100 * m["accuracy_at_1"], 2)] for m in landscape["models"]]
    parts += [_table(["model", "classifier", "images", "loss (alpha=0)", "acc % (alpha=0)", "loss |alpha|=0.5",
                      "loss |alpha|=1", "acc % |alpha|=0.5", "acc % |alpha|=1"], rows, left=2),
              "<p class='note'>Values at |alpha| = 0.5 and 1 are means over both signs and all directions.</p>",
              "</body></html>"]
    from ..io import atomic_write_text

    return atomic_write_text(path, "\n".join(parts))
