"""Streaming capture of attention probabilities, one layer at a time, from any model fdistill loads.

Attention weights are not outputs of a vision model: fused kernels (``F.scaled_dot_product_attention``)
never form them, and keeping all layers' weights costs ~22 MB per image for ViT-B/16 at 224. So
:func:`capture_attention` hooks the attention modules, makes them form the (B, H, T, T) softmax
probabilities, and hands each layer's tensor to a callback *as it is computed*; the callback
reduces it at once (a sum per head, a mean map) and nothing else is kept.

Supported families (recognised by module type, wherever they sit inside the model/adapter):

* **timm** ``Attention`` (ViT, DeiT, CLIP, DINO(v2), MAE...), ``AttentionRope``, BEiT's
  ``Attention`` (BEiT and the FD student: the relative position bias is added before the softmax,
  so it is part of what is captured) and EVA's ``EvaAttention``. Their fused path hides the
  weights, so ``fused_attn`` is switched off per module for the capture (restored after) and a
  forward hook on ``attn_drop`` (identity in eval mode) receives the post-softmax tensor. This is
  the hook point of timm's own ``AttentionExtract`` (``*attn_drop``); we do not use that class
  because it collects every layer's tensor before returning.
* **timm Swin / Swin V2** ``WindowAttention`` (windowed attention, also EsViT-style Swin
  teachers loaded through timm): captured at the same hook point, as (B * windows, H, N, N) maps
  over the N tokens of one window (shifted windows included: tokens from different image regions
  get -100 added before the softmax, so their weight is ~e^-100). There is no global map, so the
  capture also reports each such layer's :class:`WindowGeometry` (the window and the stage's token
  grid, from the enclosing block's ``input_resolution``); :meth:`AttentionCapture.window` gives it.
* **open_clip** (and any ``torch.nn.MultiheadAttention`` used as self-attention): the call is
  rewritten to ``need_weights=True, average_attn_weights=False`` and the module's second output,
  the per-head weights, is captured and then dropped (the caller asked for none).
* **Hugging Face** transformers: the attention modules each model declares in
  ``can_record_outputs["attentions"]`` (the ones ``output_attentions=True`` reads). The eager
  attention implementation is switched on for the capture (SDPA returns no weights) and each
  module's weights output is captured as it is returned; all layers are never gathered.

A capture that sees nothing is an error (:class:`AttentionCaptureError`), never an empty result:
entering fails at once for a model without recognised attention modules (a CNN, an unknown
attention class), and leaving fails if the model ran but no attention came out.
"""
from __future__ import annotations

import importlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn

from ..teachers.base import TeacherError

AttentionCallback = Callable[[int, torch.Tensor], None]
Size2 = Tuple[int, int]

#: timm attention classes whose non-fused path is ``attn_drop(softmax(logits [+ bias]))``
TIMM_ATTENTION_CLASSES: Tuple[Tuple[str, str], ...] = (
    ("timm.layers.attention", "Attention"),
    ("timm.layers.attention", "AttentionRope"),
    ("timm.models.beit", "Attention"),
    ("timm.models.eva", "EvaAttention"),
)


#: timm windowed attention classes (same non-fused path; maps over one window's tokens)
TIMM_WINDOW_ATTENTION_CLASSES: Tuple[Tuple[str, str], ...] = (
    ("timm.models.swin_transformer", "WindowAttention"),
    ("timm.models.swin_transformer_v2", "WindowAttention"),
)


@dataclass(frozen=True)
class WindowGeometry:
    """Where a windowed layer's tokens sit: ``window`` (wh, ww) tokens per window (row-major, as
    in the captured map) and ``resolution`` (H, W) the token grid of the stage it works on, so one
    token step is ``image_size / resolution`` pixels."""

    window: Size2
    resolution: Size2


class AttentionCaptureError(TeacherError):
    """A model's attention cannot be captured (no supported attention modules, or none ran).

    ``no_attention`` is True when the model has no supported attention module at all (a CNN, an
    unknown attention class): callers comparing several models may skip it with a note."""

    def __init__(self, message: str, *, no_attention: bool = False):
        super().__init__(message)
        self.no_attention = no_attention


def _timm_classes(names: Tuple[Tuple[str, str], ...] = TIMM_ATTENTION_CLASSES) -> Tuple[type, ...]:
    out = []
    for mod, cls in names:
        try:
            c = getattr(importlib.import_module(mod), cls, None)
        except ImportError:
            c = None
        if isinstance(c, type):
            out.append(c)
    return tuple(out)


class AttentionCapture:
    """What :func:`capture_attention` yields: counts what it has seen.

    ``layer_names[i]`` is the qualified module name of layer ``i`` (layers are numbered in the
    order they first run, which is depth order); ``families`` the supported families found."""

    def __init__(self, name: str, callback: AttentionCallback, expected_tokens: Optional[int]):
        self.name = name
        self._callback = callback
        self.expected_tokens = expected_tokens
        self._index: Dict[int, int] = {}
        self._windows: Dict[int, WindowGeometry] = {}
        self.layer_names: List[str] = []
        self.families: List[str] = []
        self.calls = 0

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)

    def window(self, layer: int) -> Optional[WindowGeometry]:
        """The window geometry of a windowed layer (as of its latest call), ``None`` for global attention."""
        return self._windows.get(layer)

    def _emit(self, module: nn.Module, qualname: str, attn, window: Optional[WindowGeometry] = None) -> None:
        if not isinstance(attn, torch.Tensor):
            raise AttentionCaptureError(
                f"{self.name}: attention module {qualname} ({type(module).__name__}) returned no weights")
        if attn.dim() == 3:  # (B*H, T, T) is never produced by the supported families
            raise AttentionCaptureError(f"{self.name}: {qualname} gave 3-d attention {tuple(attn.shape)}")
        if attn.dim() != 4 or attn.shape[-1] != attn.shape[-2]:
            return  # cross-attention / pooling (e.g. an attention-pool head): not token self-attention
        T = attn.shape[-1]
        if window is not None:
            if T != window.window[0] * window.window[1]:
                raise AttentionCaptureError(f"{self.name}: {qualname} attends over {T} tokens but its window is "
                                            f"{window.window[0]}x{window.window[1]}")
        elif self.expected_tokens is not None and T != self.expected_tokens:
            raise AttentionCaptureError(
                f"{self.name}: {qualname} attends over {T} tokens but the model's token map has "
                f"{self.expected_tokens} (pooled or windowed attention of an unsupported kind has no global map)")
        key = id(module)
        if key not in self._index:
            self._index[key] = len(self.layer_names)
            self.layer_names.append(qualname)
        layer = self._index[key]
        if window is not None:
            self._windows[layer] = window
        self.calls += 1
        self._callback(layer, attn.detach())


def _window_geometry(attn: nn.Module, block: Optional[nn.Module]) -> WindowGeometry:
    """The geometry of a timm Swin ``WindowAttention`` now (window and stage grid can be resized)."""
    res = getattr(block, "input_resolution", None)
    if res is None:
        raise AttentionCaptureError(f"{type(attn).__name__}: the enclosing block has no input_resolution, so the "
                                    "window's place in the image (pixels per token) is unknown")
    w = attn.window_size
    return WindowGeometry(window=(int(w[0]), int(w[1])), resolution=(int(res[0]), int(res[1])))


def _install_timm(model: nn.Module, cap: AttentionCapture, undo: list) -> int:
    classes = _timm_classes()
    windowed = _timm_classes(TIMM_WINDOW_ATTENTION_CLASSES)
    modules = dict(model.named_modules())
    n = 0
    for qualname, m in modules.items():
        is_window = bool(windowed) and isinstance(m, windowed)
        if not (is_window or (classes and isinstance(m, classes))):
            continue
        drop = getattr(m, "attn_drop", None)
        if not isinstance(drop, nn.Module) or not (is_window or hasattr(m, "fused_attn")):
            continue
        if hasattr(m, "fused_attn"):  # Swin V2 always forms the weights
            old = m.fused_attn
            m.fused_attn = False
            undo.append(lambda m=m, old=old: setattr(m, "fused_attn", old))
        if is_window:
            block = modules.get(qualname.rpartition(".")[0])
            hook = (lambda mod, args, out, m=m, q=qualname, b=block:
                    cap._emit(m, q, out, window=_window_geometry(m, b)))
        else:
            hook = (lambda mod, args, out, m=m, q=qualname: cap._emit(m, q, out))
        undo.append(drop.register_forward_hook(hook).remove)
        n += 1
    return n


def _install_mha(model: nn.Module, cap: AttentionCapture, undo: list) -> int:
    n = 0
    for qualname, m in model.named_modules():
        if not isinstance(m, nn.MultiheadAttention):
            continue

        def pre(mod, args, kwargs):
            kwargs = dict(kwargs)
            kwargs["need_weights"] = True
            kwargs["average_attn_weights"] = False
            return args, kwargs

        def post(mod, args, kwargs, out, q=qualname):
            query = args[0] if args else kwargs.get("query")
            key = args[1] if len(args) > 1 else kwargs.get("key")
            if query is key:  # self-attention only (not an attention-pool's latent queries)
                cap._emit(mod, q, out[1])
            return out[0], None

        undo.append(m.register_forward_pre_hook(pre, with_kwargs=True).remove)
        undo.append(m.register_forward_hook(post, with_kwargs=True).remove)
        n += 1
    return n


def _hf_rules(model: nn.Module) -> list:
    """(target class, class-name suffix, output index, layer name) of every attention recorder the
    model's Hugging Face families declare (``_can_record_outputs["attentions"]``).

    Found on the PreTrainedModel instances inside ``model`` and, for towers that are plain
    modules (``CLIPModel.vision_model`` is a ``CLIPVisionTransformer``), on the PreTrainedModel
    classes of the same ``transformers.models.*`` source file."""
    import sys

    try:
        from transformers import PreTrainedModel
    except ImportError:
        return []
    try:
        from transformers.utils.output_capturing import OutputRecorder
    except ImportError:  # transformers 4.5x kept it in utils.generic; older ones have no recorders
        try:
            from transformers.utils.generic import OutputRecorder
        except ImportError:
            return []
    declared = []
    files = set()
    for m in model.modules():
        if isinstance(m, PreTrainedModel):
            declared.append(m.can_record_outputs or {})
        if type(m).__module__.startswith("transformers.models."):
            files.add(type(m).__module__)
    for f in sorted(files):
        for obj in vars(sys.modules[f]).values():
            if isinstance(obj, type) and issubclass(obj, PreTrainedModel) and obj._can_record_outputs:
                declared.append(obj._can_record_outputs)
    rules = []
    for d in declared:
        specs = d.get("attentions")
        if specs is None:
            continue
        for s in specs if isinstance(specs, list) else [specs]:
            if isinstance(s, OutputRecorder):
                rule = (s.target_class, s.class_name, s.index, s.layer_name)
            elif isinstance(s, str):
                rule = (None, s, 1, None)
            else:
                rule = (s, None, 1, None)
            if rule not in rules:
                rules.append(rule)
    return rules


def _hf_targets(model: nn.Module) -> List[Tuple[str, nn.Module, int]]:
    """(qualified name, module, output index) of every HF attention module ``output_attentions`` reads."""
    rules = _hf_rules(model)
    found: Dict[int, Tuple[str, nn.Module, int]] = {}
    for qual, m in model.named_modules():
        for cls, cls_name, index, layer_name in rules:
            if (cls is not None and isinstance(m, cls)) or (cls_name is not None and qual.endswith(cls_name)):
                if layer_name is not None and f".{layer_name.strip('.')}." not in f".{qual}.":
                    continue
                found.setdefault(id(m), (qual, m, index))
    return list(found.values())


def _install_hf(model: nn.Module, cap: AttentionCapture, undo: list) -> int:
    targets = _hf_targets(model)
    if not targets:
        return 0
    from transformers import PretrainedConfig

    # eager attention on every config the model holds (SDPA / flash kernels return no weights)
    configs: Dict[int, PretrainedConfig] = {}
    for m in model.modules():
        c = getattr(m, "config", None)
        if isinstance(c, PretrainedConfig):
            stack = [c]
            while stack:
                cfg = stack.pop()
                if id(cfg) in configs:
                    continue
                configs[id(cfg)] = cfg
                for key in getattr(cfg, "sub_configs", {}) or {}:
                    sub = getattr(cfg, key, None)
                    if isinstance(sub, PretrainedConfig):
                        stack.append(sub)
    for cfg in configs.values():
        old = cfg.__dict__.get("_attn_implementation_internal")
        cfg._attn_implementation_internal = "eager"
        undo.append(lambda cfg=cfg, old=old: setattr(cfg, "_attn_implementation_internal", old))
    for qual, m, index in targets:
        def post(mod, args, out, q=qual, i=index):
            w = out[i] if isinstance(out, (tuple, list)) and len(out) > i else None
            cap._emit(mod, q, w)
        undo.append(m.register_forward_hook(post).remove)
    return len(targets)


_FAMILIES = (("timm", _install_timm), ("hf", _install_hf), ("torch.nn.MultiheadAttention", _install_mha))


def _model_name(model: nn.Module, name: Optional[str]) -> str:
    return name or getattr(model, "name", None) or type(model).__name__


def _unsupported_hint(model: nn.Module) -> str:
    kinds = sorted({type(m).__module__ + "." + type(m).__name__ for m in model.modules()
                    if "attention" in type(m).__name__.lower()})
    if kinds:
        hf = any(k.startswith("transformers.") for k in kinds)
        return (f" (found attention modules of unsupported types: {', '.join(kinds[:6])}"
                + ("; Hugging Face models need a transformers version whose models declare "
                   "_can_record_outputs, 4.54 or newer" if hf else "") + ")")
    return " (it has no attention modules at all, e.g. a CNN)"


@contextmanager
def capture_attention(
    model: nn.Module,
    callback: AttentionCallback,
    *,
    name: Optional[str] = None,
    expected_tokens: Optional[int] = None,
) -> Iterator[AttentionCapture]:
    """Hand every self-attention layer's probabilities to ``callback(layer, attn)`` while the
    model runs inside the ``with`` block.

    Args:
        model: a :class:`~fdistill.backbone.Backbone` or any ``nn.Module`` containing
            supported attention modules (see module docstring).
        callback: called once per layer and forward pass with the layer index (0 = first to run)
            and the detached (B, H, T, T) post-softmax probabilities (rows = queries); for windowed
            layers (B * windows, H, N, N) over one window's N tokens, and the yielded capture's
            ``window(layer)`` gives the geometry. It should reduce them immediately; the tensor is
            freed when it returns.
        name: model name for error messages (default: the adapter's ``name``).
        expected_tokens: if given, every captured global map must be over this many tokens (catches
            pooled or unknown windowed attention, which has no global map).

    Raises:
        AttentionCaptureError: no supported attention module in ``model``; or, on leaving the
        block normally, the model ran no captured attention at all.
    """
    label = _model_name(model, name)
    cap = AttentionCapture(label, callback, expected_tokens)
    undo: list = []
    try:
        for family, install in _FAMILIES:
            if install(model, cap, undo):
                cap.families.append(family)
        if not cap.families:
            raise AttentionCaptureError(
                f"{label}: no attention layers fdistill can capture{_unsupported_hint(model)}; supported: timm "
                "ViT/BEiT/EVA and Swin/SwinV2 window attention, open_clip / torch.nn.MultiheadAttention, "
                "Hugging Face attention",
                no_attention=True)
        yield cap
        if cap.calls == 0:
            raise AttentionCaptureError(
                f"{label}: the model ran but none of its attention modules ({', '.join(cap.families)}) produced "
                "attention weights; nothing was captured")
    finally:
        for fn in reversed(undo):
            fn()
