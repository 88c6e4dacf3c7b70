"""The ``fdistill diagnose`` commands as library functions: load each model, stream the data
through it, write JSON + the paper-style PNGs (and an HTML report).

Models are processed one at a time (loaded, measured, freed), so comparing several large models
costs the memory of one. Each function returns the dict it writes as JSON.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from .capture import capture_attention
from .distance import DEFAULT_RENORMALIZE, AttentionDistanceMeter, grid_distances
from .landscape import DEFAULT_NUM_ALPHAS, DEFAULT_NUM_DIRECTIONS, alpha_grid, loss_landscape
from .maps import AttentionMapMeter, select_layers
from .models import DiagnosticModel, load_diagnostic_model
from .plots import plot_attention_distance, plot_attention_maps, plot_loss_landscape, save_json_atomic

log = logging.getLogger(__name__)

DEFAULT_ATTENTION_IMAGES = 128  # ViT paper, App. D.7: attention distance over 128 images
DEFAULT_LANDSCAPE_IMAGES = 500
DEFAULT_HEAD_IMAGES = 2000


@dataclass
class ModelRef:
    """A model to diagnose: a spec ``load_model`` understands (or a fine-tuning output folder),
    its factory keyword arguments and an optional figure label."""

    spec: str
    kwargs: Dict[str, Any] = field(default_factory=dict)
    label: Optional[str] = None


@dataclass
class DataOptions:
    """Which images: ``data`` (folder, ``synthetic[:N]``, torchvision name), ``split``, how many
    (a seeded random subset, the same for every model), batch size, loader workers."""

    data: str
    split: str = "val"
    images: Optional[int] = DEFAULT_ATTENTION_IMAGES
    batch_size: int = 32
    seed: int = 0
    num_workers: Optional[int] = None


from ..device import resolve_device  # noqa: E402,F401  (the one device resolver)


def _refs(models: Sequence[ModelRef | str]) -> List[ModelRef]:
    from ..config import ConfigError

    refs = [m if isinstance(m, ModelRef) else ModelRef(str(m)) for m in models]
    if not refs:
        raise ConfigError("give at least one --model")
    labels = [r.label for r in refs if r.label]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"--label values must be distinct, got {labels}")
    return refs


def _free(dm: DiagnosticModel, device: torch.device) -> None:
    dm.module.to("cpu")
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -- attention ------------------------------------------------------------------------------------------
def distance_settings_text(exclude_self: bool, renormalize: bool) -> str:
    """One sentence stating how distances were computed (JSON ``note`` and figure captions)."""
    self_txt = "the query patch itself excluded" if exclude_self else "the query patch itself kept"
    renorm_txt = ("the remaining weights renormalised to sum to 1 per query" if renormalize else
                  "the remaining weights used as they are (not renormalised)")
    default = " (default)" if renormalize == DEFAULT_RENORMALIZE else f" (default: {DEFAULT_RENORMALIZE})"
    return (f"Distance = patch size x Euclidean distance on the token grid; prefix tokens ([CLS], registers) "
            f"omitted, {self_txt}, {renorm_txt}; renormalize={renormalize}{default}.")


@torch.no_grad()
def measure_attention(
    dm: DiagnosticModel,
    batches,
    *,
    device: torch.device | str = "cpu",
    distance: bool = True,
    maps: bool = True,
    exclude_self: bool = True,
    renormalize: bool = DEFAULT_RENORMALIZE,
    progress: bool = True,
) -> Dict[str, Any]:
    """One streaming pass of ``batches`` (uint8 images, labels) through ``dm`` with attention
    captured: per-layer, per-head distances (``distance``: one (H_l,) tensor per layer), per-layer
    mean maps (``maps``: {0-based: (T, T)}) and each layer's token geometry (``geometry``: a
    :func:`layer_geometry` dict; windowed layers measure and map one window, see
    :mod:`fdistill.diagnostics.distance`)."""
    from tqdm.auto import tqdm

    from .capture import AttentionCaptureError

    device = torch.device(device)
    dm.to(device)
    if dm.grid is None or (distance and dm.patch_size is None):
        raise AttentionCaptureError(f"{dm.label}: no token grid / patch size known, so attention cannot be measured",
                                    no_attention=True)
    P = dm.num_prefix_tokens
    dist_meter = AttentionDistanceMeter(dm.grid, dm.patch_size, num_prefix_tokens=P, exclude_self=exclude_self,
                                        renormalize=renormalize) if distance else None
    map_meter = AttentionMapMeter() if maps else None

    geometry: Dict[int, Dict[str, Any]] = {}

    def on_layer(layer: int, attn: torch.Tensor) -> None:
        g = geometry.get(layer)
        if g is None:  # `cap` is bound: layers are only seen inside the `with` block
            g = geometry[layer] = layer_geometry(dm, cap.window(layer))
        if dist_meter is not None:
            dist_meter.update(layer, attn, grid_size=g["grid"], patch_size=g["patch_px"],
                              num_prefix_tokens=g["num_prefix_tokens"])
        if map_meter is not None:
            map_meter.update(layer, attn)

    n = 0
    expected = P + dm.grid[0] * dm.grid[1]
    with capture_attention(dm.module, on_layer, name=dm.label, expected_tokens=expected) as cap:
        for images, _ in tqdm(batches, desc=f"attention {dm.label}", unit="batch", disable=not progress,
                              leave=False):
            dm.run(dm.normalize(images.to(device, non_blocking=True)))
            n += images.shape[0]
    out: Dict[str, Any] = dict(num_images=n, layers=cap.num_layers, layer_modules=list(cap.layer_names),
                               families=list(cap.families), geometry=[geometry[i] for i in range(cap.num_layers)])
    if dist_meter is not None:
        out["distance"] = dist_meter.compute_layers()  # L x (H_l,)
    if map_meter is not None:
        out["maps"] = map_meter.compute()
    return out


def layer_geometry(dm: DiagnosticModel, window=None) -> Dict[str, Any]:
    """One captured layer's token geometry: ``grid`` (the map's patch grid: the model's, or the
    window), ``patch_px`` (pixels per token step), ``num_prefix_tokens`` and, for windowed layers,
    ``windowed`` True with the stage's ``resolution``. ``window``: a
    :class:`~fdistill.diagnostics.capture.WindowGeometry` or None."""
    if window is None:
        return dict(grid=list(dm.grid), patch_px=dm.patch_size, num_prefix_tokens=dm.num_prefix_tokens,
                    windowed=False)
    res = window.resolution
    px = [dm.img_size[0] / res[0], dm.img_size[1] / res[1]]
    px = [int(v) if float(v).is_integer() else v for v in px]
    return dict(grid=list(window.window), patch_px=px[0] if px[0] == px[1] else px, num_prefix_tokens=0,
                windowed=True, resolution=list(res))


def distance_summary(d: torch.Tensor | Sequence[torch.Tensor]) -> Dict[str, List[float]]:
    """Per-layer mean, spread (std over heads), min and max of an (L, H) distance table (or one
    (H_l,) tensor per layer)."""
    rows = [torch.as_tensor(r, dtype=torch.float32) for r in d]
    return dict(layer_mean_px=[float(r.mean()) for r in rows],
                head_spread_px=[float(r.std(unbiased=False)) if r.numel() > 1 else 0.0 for r in rows],
                head_min_px=[float(r.min()) for r in rows], head_max_px=[float(r.max()) for r in rows])


def map_summary(a: torch.Tensor, grid, num_prefix_tokens: int) -> Dict[str, float]:
    """Numbers that tell map patterns apart: ``prefix_mass`` (mean weight on prefix tokens),
    ``self_mass`` (mean weight on the query itself: the main diagonal), ``local_mass`` (patch
    queries' mean weight on patches at most one grid step away, diagonals included: a bright
    band around the diagonal), ``top_key_mass`` (patch queries' mean weight on the 5% of patch
    keys that receive the most: high for vertical bars)."""
    P = int(num_prefix_tokens)
    N = a.shape[-1] - P
    pp = a[P:, P:]  # (N, N) patch -> patch
    d = grid_distances(grid, 1.0)
    local = (pp * (d <= 1.5)).sum(1).mean()
    k = max(1, int(round(0.05 * N)))
    top = pp.sum(0).topk(k).indices
    return dict(prefix_mass=float(a[:, :P].sum(1).mean()) if P else 0.0, self_mass=float(torch.diagonal(a).mean()),
                local_mass=float(local), top_key_mass=float(pp[:, top].sum(1).mean()))


def _each_model(refs: List[ModelRef], device: torch.device):
    """Yield loaded models one at a time, freeing each after use."""
    for ref in refs:
        dm = load_diagnostic_model(ref.spec, kwargs=ref.kwargs, label=ref.label, device=device)
        try:
            yield dm
        finally:
            _free(dm, device)


def _attention_pass(refs, opts: DataOptions, device, *, distance: bool, maps: bool, exclude_self: bool,
                    renormalize: bool, progress: bool):
    from .data import image_batches

    results = []
    for dm in _each_model(refs, device):
        batches = image_batches(opts.data, split=opts.split, img_size=dm.img_size, num_images=opts.images,
                                batch_size=opts.batch_size, seed=opts.seed, num_workers=opts.num_workers)
        stats = measure_attention(dm, batches, device=device, distance=distance, maps=maps,
                                  exclude_self=exclude_self, renormalize=renormalize, progress=progress)
        results.append((dm.describe(), stats))
        log.info("%s: %d layers measured on %d images", dm.label, stats["layers"], stats["num_images"])
    _dedupe([desc for desc, _ in results])
    return results


def _distance_json(results, opts: DataOptions, exclude_self: bool, renormalize: bool,
                   skipped: Optional[List[Dict[str, str]]] = None) -> Dict[str, Any]:
    models = []
    for desc, st in results:
        d = st["distance"]  # one (H_l,) tensor per layer
        heads = [int(r.numel()) for r in d]
        models.append(dict(desc, layers=len(d), heads=heads[0] if len(set(heads)) == 1 else None,
                           heads_per_layer=heads, families=st["families"], num_images=st["num_images"],
                           windowed=any(g["windowed"] for g in st["geometry"]), layer_patch_px=[g["patch_px"] for g in st["geometry"]],
                           layer_window=[g["grid"] if g["windowed"] else None for g in st["geometry"]],
                           distance_px=[r.tolist() for r in d], **distance_summary(d)))
    n = results[0][1]["num_images"] if results else 0
    return dict(diagnostic="attention-distance", data=opts.data, split=opts.split, num_images=n, seed=opts.seed,
                exclude_self=exclude_self, renormalize=renormalize, renormalize_default=DEFAULT_RENORMALIZE,
                prefix_tokens="omitted", unit="px", note=distance_settings_text(exclude_self, renormalize),
                models=models, skipped=list(skipped or []))


def _write_distance(js: Dict[str, Any], out_dir: Path) -> Dict[str, Path]:
    cap = (f"Figure 3 style: mean attention distance of each head (dots) per layer, averaged over query patches "
           f"and {js['num_images']} {js['split']} images of {js['data']}. " + js["note"])
    if any(m.get("windowed") for m in js["models"]):
        cap += (" Windowed models (Swin): distance within each window, in pixels of the layer's stage (its stride "
                "per token is given in the panel); a window bounds what a head can reach.")
    png = plot_attention_distance(js["models"], out_dir / "attention_distance.png", caption=cap) \
        if js["models"] else None
    path = save_json_atomic(js, out_dir / "attention_distance.json")
    return dict(json=path, png=png)


def _maps_json_and_tensors(results, opts: DataOptions, layers: Optional[Sequence[int]],
                           skipped: Optional[List[Dict[str, str]]] = None):
    models, tensors = [], {}
    for i, (desc, st) in enumerate(results):
        depth = st["layers"]
        try:
            chosen = select_layers(depth, layers)
        except ValueError as e:
            from ..config import ConfigError

            raise ConfigError(f"--layers for {desc['label']}: {e}") from None
        summaries, keys = [], []
        for li in chosen:
            a = st["maps"][li]
            key = f"model{i}.layer{li + 1}"
            tensors[key] = a.contiguous()
            keys.append(key)
            g = st["geometry"][li]
            summaries.append(dict(layer=li + 1, tokens=int(a.shape[-1]), windowed=g["windowed"], grid=g["grid"],
                                  num_prefix_tokens=g["num_prefix_tokens"],
                                  **map_summary(a, g["grid"], g["num_prefix_tokens"])))
        models.append(dict(desc, depth=depth, layers=[li + 1 for li in chosen], tokens=int(st["maps"][0].shape[-1]),
                           num_images=st["num_images"], map_keys=keys, summary=summaries))
    n = results[0][1]["num_images"] if results else 0
    js = dict(diagnostic="attention-maps", data=opts.data, split=opts.split, num_images=n, seed=opts.seed,
              maps_file="attention_maps.safetensors",
              note="Per-layer attention probabilities averaged over heads and images; rows are queries, columns "
                   "keys, prefix tokens first then patches in row-major order (rows sum to 1). Windowed layers "
                   "(Swin; summary windowed=true) give one window's map, averaged over windows too.",
              models=models, skipped=list(skipped or []))
    return js, tensors


def _write_maps(js, tensors, out_dir: Path) -> Dict[str, Path]:

    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    path = save_json_atomic(js, out_dir / "attention_maps.json")
    if not js["models"]:
        return dict(json=path, png=None, tensors=None)
    st_path = out_dir / js["maps_file"]
    from ..io import atomic_path

    with atomic_path(st_path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "fdistill-attention-maps"})
    panels = [dict(label=m["label"], num_prefix_tokens={r["layer"]: r["num_prefix_tokens"] for r in m["summary"]},
                   windowed={r["layer"] for r in m["summary"] if r["windowed"]},
                   maps={layer: tensors[key] for layer, key in zip(m["layers"], m["map_keys"])}) for m in js["models"]]
    cap = (f"Figure 4 style: attention maps averaged over heads and {js['num_images']} {js['split']} images of "
           f"{js['data']}; rows = query tokens, columns = key tokens, prefix tokens first (white lines), then "
           f"patches in row-major order. Colour: 0 (dark) to each panel's 99th percentile (yellow). Diagonal "
           f"bands = relative-position attention; vertical bars = all queries attending the same keys.")
    if any(r["windowed"] for m in js["models"] for r in m["summary"]):
        cap += (" Windowed layers (Swin) show one window's map averaged over all windows; in shifted-window layers "
                "the blocks are the image regions a window may not mix.")
    png = plot_attention_maps(panels, out_dir / "attention_maps.png", caption=cap)
    return dict(json=path, png=png, tensors=st_path)


def run_attention_distance(models: Sequence[ModelRef | str], data: DataOptions, out_dir: str | Path, *,
                           exclude_self: bool = True, renormalize: bool = DEFAULT_RENORMALIZE,
                           device: str | torch.device | None = "cpu", progress: bool = True) -> Dict[str, Any]:
    """``fdistill diagnose attention-distance``: per-layer, per-head mean attention distance of
    each model; writes ``attention_distance.json`` and ``attention_distance.png``."""
    refs, dev = _refs(models), resolve_device(device)
    torch.manual_seed(data.seed)
    results = _attention_pass(refs, data, dev, distance=True, maps=False, exclude_self=exclude_self,
                              renormalize=renormalize, progress=progress)
    js = _distance_json(results, data, exclude_self, renormalize)
    files = _write_distance(js, Path(out_dir))
    log.info("wrote %s and %s", files["json"], files["png"])
    return js


def run_attention_maps(models: Sequence[ModelRef | str], data: DataOptions, out_dir: str | Path, *,
                       layers: Optional[Sequence[int]] = None, device: str | torch.device | None = "cpu",
                       progress: bool = True) -> Dict[str, Any]:
    """``fdistill diagnose attention-maps``: mean attention maps of the chosen layers (1-based,
    negative from the end; default first, second and last three); writes
    ``attention_maps.{json,png,safetensors}``."""
    refs, dev = _refs(models), resolve_device(device)
    torch.manual_seed(data.seed)
    results = _attention_pass(refs, data, dev, distance=False, maps=True, exclude_self=True,
                              renormalize=DEFAULT_RENORMALIZE, progress=progress)
    js, tensors = _maps_json_and_tensors(results, data, layers)
    files = _write_maps(js, tensors, Path(out_dir))
    log.info("wrote %s and %s", files["json"], files["png"])
    return js


# -- loss landscape -------------------------------------------------------------------------------------
@dataclass
class LandscapeOptions:
    """Directions (seeds ``seed + i``), alphas, and the linear head for non-classifiers (fitted on
    ``head_images`` images of ``head_split``)."""

    directions: int = DEFAULT_NUM_DIRECTIONS
    num_alphas: int = DEFAULT_NUM_ALPHAS
    alpha_range: float = 1.0
    head_split: str = "train"
    head_images: Optional[int] = DEFAULT_HEAD_IMAGES
    head_weight_decay: float = 1e-3


def _check_classes(dm: DiagnosticModel, data_classes: List[str], num_outputs: int) -> None:
    from ..data.errors import DataError

    if data_classes and num_outputs != len(data_classes):
        raise DataError(f"{dm.label} has {num_outputs} outputs but the data has {len(data_classes)} classes")
    if dm.classes and data_classes and list(dm.classes) != list(data_classes):
        raise DataError(f"{dm.label} was fine-tuned on classes {dm.classes[:5]}... but the data has "
                        f"{data_classes[:5]}...: the loss would be meaningless")


def landscape_for_model(dm: DiagnosticModel, data: DataOptions, opts: LandscapeOptions, *,
                        device: torch.device, progress: bool = True) -> Dict[str, Any]:
    """The loss landscape of one model (see :mod:`fdistill.diagnostics.landscape`); a non-classifier
    first gets a linear head on its frozen features (:mod:`fdistill.diagnostics.classifier`)."""
    from .classifier import linear_probe_classifier
    from .data import image_batches

    dm.to(device)
    batches = image_batches(data.data, split=data.split, img_size=dm.img_size, num_images=data.images,
                            batch_size=data.batch_size, seed=data.seed, num_workers=data.num_workers)
    if dm.classifier is not None:
        clf, how = dm.classifier, "fine-tuned classifier"
        head_info: Dict[str, Any] = {}
    else:
        fit = image_batches(data.data, split=opts.head_split, img_size=dm.img_size, num_images=opts.head_images,
                            batch_size=data.batch_size, seed=data.seed, num_workers=data.num_workers)
        if not fit.classes:
            from ..data.errors import DataError

            raise DataError(f"{data.data} has no class labels: a loss landscape needs a labelled dataset")
        torch.manual_seed(data.seed)
        clf, train_acc = linear_probe_classifier(dm.backbone, fit, len(fit.classes), device=device,
                                                 weight_decay=opts.head_weight_decay, progress=progress)
        how = (f"frozen backbone + linear head fitted on {fit.num_images} {opts.head_split} images "
               f"(train accuracy {100 * train_acc:.1f}%)")
        head_info = dict(head_split=opts.head_split, head_images=fit.num_images, head_train_accuracy=train_acc)
    clf.to(device)
    cached = batches.materialize()  # revisited at every point of the sweep; uint8, normalised per batch
    with torch.no_grad():
        out = clf(dm.normalize(cached[0][0][:1].to(device)))
    _check_classes(dm, batches.classes, int(out.shape[-1]))
    res = loss_landscape(clf, cached, seeds=[data.seed + i for i in range(opts.directions)],
                         alphas=alpha_grid(opts.num_alphas, opts.alpha_range), device=device, progress=progress,
                         desc=f"landscape {dm.label}", prepare=dm.normalize)
    d = res.to_dict()
    d.update(classifier=how, **head_info)
    return d


def landscape_summary(m: Dict[str, Any]) -> Dict[str, float]:
    """Mean loss / accuracy over directions at |alpha| = 0.5 and 1 (nearest grid points)."""
    alphas = m["alphas"]

    def at(val):
        i = min(range(len(alphas)), key=lambda k: abs(alphas[k] - val))
        return i

    out = {}
    for a in (0.5, 1.0):
        idx = [at(-a), at(a)]
        losses = [m["loss"][d][i] for d in range(len(m["loss"])) for i in idx]
        accs = [m["accuracy"][d][i] for d in range(len(m["accuracy"])) for i in idx]
        out[f"loss_at_{a:g}"] = sum(losses) / len(losses)  # inf if a point diverged
        out[f"accuracy_at_{a:g}"] = sum(accs) / len(accs)
    return out


def _landscape_json(models, data: DataOptions, opts: LandscapeOptions) -> Dict[str, Any]:
    return dict(diagnostic="loss-landscape", data=data.data, split=data.split, seed=data.seed,
                directions=opts.directions, num_alphas=opts.num_alphas, alpha_range=opts.alpha_range,
                note="Li et al. 2018 filter normalisation: for every weight tensor of 2+ dims each slice along dim 0 "
                     "of the random direction has the norm of the same weight slice; 1-D tensors (biases, norm "
                     "parameters) are not perturbed. Eval mode, no augmentation.",
                models=[dict(m, **landscape_summary(m)) for m in models])


def _write_landscape(js, out_dir: Path) -> Dict[str, Path]:
    n = js["models"][0]["num_images"] if js["models"] else 0
    cap = (f"Figure 5 style: loss and accuracy on {n} {js['split']} images of {js['data']} along "
           f"{js['directions']} random filter-normalised directions (Li et al. 2018) with distinct seeds, "
           f"alpha in [-{js['alpha_range']:g}, {js['alpha_range']:g}] ({js['num_alphas']} points); eval mode, no "
           f"augmentation. Flatter curves around alpha = 0 mean a wider minimum.")
    png = plot_loss_landscape(js["models"], out_dir / "loss_landscape.png", caption=cap)
    path = save_json_atomic(js, out_dir / "loss_landscape.json")
    return dict(json=path, png=png)


def run_loss_landscape(models: Sequence[ModelRef | str], data: DataOptions, out_dir: str | Path, *,
                       options: Optional[LandscapeOptions] = None, device: str | torch.device | None = "cpu",
                       progress: bool = True) -> Dict[str, Any]:
    """``fdistill diagnose loss-landscape``: writes ``loss_landscape.json`` and ``loss_landscape.png``."""
    refs, dev, opts = _refs(models), resolve_device(device), options or LandscapeOptions()
    results = []
    for dm in _each_model(refs, dev):
        torch.manual_seed(data.seed)
        results.append(dict(dm.describe(), **landscape_for_model(dm, data, opts, device=dev, progress=progress)))
        log.info("%s: loss %.4f, accuracy %.2f%% at alpha=0", dm.label, results[-1]["loss0"],
                 100 * results[-1]["accuracy0"])
    _dedupe(results)
    js = _landscape_json(results, data, opts)
    files = _write_landscape(js, Path(out_dir))
    log.info("wrote %s and %s", files["json"], files["png"])
    return js


def _dedupe(rows: List[Dict[str, Any]]) -> None:
    seen: Dict[str, int] = {}
    for r in rows:
        seen[r["label"]] = seen.get(r["label"], 0) + 1
        if seen[r["label"]] > 1:
            r["label"] = f"{r['label']} #{seen[r['label']]}"


# -- report ---------------------------------------------------------------------------------------------
def run_report(models: Sequence[ModelRef | str], data: DataOptions, out_dir: str | Path, *,
               landscape_data: Optional[DataOptions] = None, landscape: Optional[LandscapeOptions] = None,
               layers: Optional[Sequence[int]] = None, exclude_self: bool = True,
               renormalize: bool = DEFAULT_RENORMALIZE, device: str | torch.device | None = "cpu",
               progress: bool = True) -> Dict[str, Any]:
    """``fdistill diagnose report``: all three diagnostics (one attention pass per model gives both
    distances and maps), their JSON/PNG files, and ``report.html`` (self-contained: PNGs embedded)."""
    from .report import write_html_report

    refs, dev = _refs(models), resolve_device(device)
    lopts = landscape or LandscapeOptions()
    ldata = landscape_data or DataOptions(data.data, data.split, DEFAULT_LANDSCAPE_IMAGES, data.batch_size, data.seed,
                                          data.num_workers)
    out = Path(out_dir)
    from .capture import AttentionCaptureError
    from .data import image_batches

    descs, attn_stats, land_results, skipped = [], [], [], []
    for dm in _each_model(refs, dev):
        descs.append(dm.describe())
        torch.manual_seed(data.seed)
        batches = image_batches(data.data, split=data.split, img_size=dm.img_size, num_images=data.images,
                                batch_size=data.batch_size, seed=data.seed, num_workers=data.num_workers)
        try:
            stats = measure_attention(dm, batches, device=dev, distance=True, maps=True,
                                      exclude_self=exclude_self, renormalize=renormalize, progress=progress)
        except AttentionCaptureError as e:
            if not e.no_attention:
                raise
            stats = None  # a CNN in the comparison: landscape only
            log.warning("%s", e)
        attn_stats.append(stats)
        torch.manual_seed(data.seed)
        land_results.append(dict(descs[-1], **landscape_for_model(dm, ldata, lopts, device=dev, progress=progress)))
    _dedupe(descs)  # the same labels everywhere
    for desc, lr, st in zip(descs, land_results, attn_stats):
        lr["label"] = desc["label"]
        if st is None:
            skipped.append(dict(label=desc["label"], reason="no attention layers fdistill can capture"))
    attn_results = [(d, st) for d, st in zip(descs, attn_stats) if st is not None]
    dist_js = _distance_json(attn_results, data, exclude_self, renormalize, skipped)
    maps_js, tensors = _maps_json_and_tensors(attn_results, data, layers, skipped)
    land_js = _landscape_json(land_results, ldata, lopts)
    files = dict(distance=_write_distance(dist_js, out), maps=_write_maps(maps_js, tensors, out),
                 landscape=_write_landscape(land_js, out))
    html = write_html_report(out / "report.html", distance=dist_js, maps=maps_js, landscape=land_js,
                             figures={k: v.get("png") for k, v in files.items()})
    log.info("wrote %s", html)
    return dict(report=str(html), distance=dist_js, maps=maps_js, landscape=land_js)

