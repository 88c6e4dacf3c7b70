"""``python:<file.py or dotted.module>:<factory>`` teachers: the user's own ``nn.Module``.

The factory (any callable returning an ``nn.Module``) is imported from a Python file or an
importable module and called with ``factory_kwargs``; ``weights=PATH`` then loads a safetensors or
weights-only PyTorch state dict into it (strictly by default). The token map is read in one of
two ways:

* ``feature_method=NAME``: a method of the model, ``model.NAME(images)``, returning tokens
  (B, L, C) or a spatial map (B, C, H, W) / (B, H, W, C). Default: ``forward_features`` when the
  model has one, else ``forward``.
* ``feature_module=DOTTED.NAME``: a submodule (``model.get_submodule(NAME)``, e.g. ``layer3`` or
  ``blocks.11`` or ``encoder.norm``) whose output is captured by a forward hook while the model
  runs (its ``forward``, or ``feature_method`` when given, e.g. ``forward_features`` for a model
  without a ``forward``); the run stops right after that module (the rest of the network, e.g.
  the classifier head, is never computed) and the hook is removed after every call.

Token outputs (B, L, C) are split into ``num_prefix_tokens`` prefix tokens and L - P patch tokens on
a grid of ``img_size / patch_size`` (or inferred from the token count); spatial maps become patch
tokens in row-major order with no prefix (``map_format`` "NCHW", the default, or "NHWC").
A tuple or list output counts as its first element (e.g. ``(hidden_states, attn)`` from a layer).
"""
from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib
import importlib.util
import logging
import math
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..weights import load_into, load_state_dict_file
from .base import Size2, Teacher, TeacherError, TokenMap, to_2tuple, tokens_from_map

log = logging.getLogger(__name__)

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
MAP_FORMATS = ("NCHW", "NHWC", "NLC")


class _Captured(Exception):
    """Raised by the capture hook to stop the forward once the wanted module has run."""


class FeatureReader:
    """How to get a token map out of a user model: a method or a hooked submodule, and how to
    read its output (prefix tokens, patch size, map layout). Plain object, no parameters."""

    def __init__(self, *, feature_method: Optional[str], feature_module: Optional[str], num_prefix_tokens: int,
                 patch_size: Optional[int], map_format: str, name: str):
        self.feature_method = feature_method
        self.feature_module = feature_module
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.patch_size = None if patch_size is None else int(patch_size)
        self.map_format = map_format
        self.name = name

    def describe(self) -> str:
        return (f"feature_module '{self.feature_module}'" if self.feature_module
                else f"feature_method '{self.feature_method}'")

    def _run(self, model: nn.Module, x: torch.Tensor) -> Any:
        # model(x) rather than model.forward(x): the model's own hooks run as usual
        return model(x) if self.feature_method == "forward" else getattr(model, self.feature_method)(x)

    # -- raw output ----------------------------------------------------------------------------
    def raw(self, model: nn.Module, x: torch.Tensor) -> Any:
        if self.feature_module is None:
            return self._run(model, x)
        module = model.get_submodule(self.feature_module)
        captured = []

        def hook(_m, _inp, out):
            captured.append(out)
            raise _Captured  # the rest of the forward (head, loss...) is not needed

        handle = module.register_forward_hook(hook)
        try:
            self._run(model, x)
        except _Captured:
            pass
        finally:
            handle.remove()
        if not captured:
            raise TeacherError(f"{self.name}: module '{self.feature_module}' did not run during "
                               f"model.{self.feature_method}(images)")
        return captured[0]

    # -- output -> tokens ----------------------------------------------------------------------
    def __call__(self, model: nn.Module, x: torch.Tensor) -> TokenMap:
        return self.read(model, x)[0]

    def read(self, model: nn.Module, x: torch.Tensor) -> Tuple[TokenMap, bool]:
        """-> (tokens, whether the model gave a spatial map rather than tokens)."""
        out = self.raw(model, x)
        if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
            out = out[0]
        if not isinstance(out, torch.Tensor):
            keys = f" with keys {sorted(out)[:10]}" if isinstance(out, dict) else ""
            raise TeacherError(
                f"{self.name}: {self.describe()} returned a {type(out).__name__}{keys}, not a tensor; "
                "point feature_method/feature_module at something that returns tokens (B, N, C) or a map (B, C, H, W)")
        B = x.shape[0]
        if out.dim() not in (3, 4) or out.shape[0] != B:
            hint = " (a classifier's logits? use the features before the head)" if out.dim() == 2 else ""
            raise TeacherError(
                f"{self.name}: {self.describe()} returned shape {tuple(out.shape)} for a batch of {B}; expected "
                f"tokens (B, N, C) or a feature map (B, C, H, W){hint}")
        if out.dim() == 4:
            if self.map_format == "NLC":
                raise TeacherError(f"{self.name}: map_format='NLC' but {self.describe()} returned a 4-d map "
                                   f"{tuple(out.shape)}; use map_format='NCHW' or 'NHWC'")
            if self.num_prefix_tokens:
                raise TeacherError(f"{self.name}: num_prefix_tokens={self.num_prefix_tokens} but the output is a "
                                   f"spatial map {tuple(out.shape)} without prefix tokens")
            tokens, grid = tokens_from_map(out, self.map_format)  # (B, H*W, C)
            return TokenMap(None, tokens, grid), True
        P = self.num_prefix_tokens
        L = out.shape[1]
        if P >= L:
            raise TeacherError(f"{self.name}: {L} tokens cannot hold num_prefix_tokens={P} prefix tokens and patches")
        grid = self.token_grid(L - P, tuple(x.shape[-2:]))
        return TokenMap(out[:, :P] if P else None, out[:, P:], grid), False

    def token_grid(self, n: int, img: Size2) -> Size2:
        """The (H, W) grid of ``n`` patch tokens for an ``img`` input."""
        H, W = img
        if self.patch_size:
            grid = (H // self.patch_size, W // self.patch_size)
            if grid[0] * grid[1] != n:
                raise TeacherError(
                    f"{self.name}: {n} patch tokens do not fill the {grid[0]}x{grid[1]} grid of a {H}x{W} input "
                    f"with patch_size={self.patch_size}; check num_prefix_tokens={self.num_prefix_tokens} and patch_size")
            return grid
        gh = max(1, round(math.sqrt(n * H / W)))  # same aspect ratio as the image
        if n % gh or abs(gh / (n // gh) - H / W) > 0.5 * H / W:
            raise TeacherError(
                f"{self.name}: cannot tell the grid of {n} patch tokens for a {H}x{W} input; pass patch_size= "
                f"(and check num_prefix_tokens={self.num_prefix_tokens})")
        return gh, n // gh


class PythonTeacher(Teacher):
    """Adapter for a user-defined ``nn.Module`` (see the module docstring)."""

    def __init__(self, model: nn.Module, reader: FeatureReader, *, name: str, mean: Sequence[float],
                 std: Sequence[float], img_size: int | Size2, dynamic_img_size: Optional[bool] = None):
        img = to_2tuple(img_size)
        model.eval()
        with torch.no_grad():
            try:
                probe, is_map = reader.read(model, torch.zeros(1, 3, *img, dtype=_float_dtype(model),
                                                              device=_device(model)))
            except TeacherError:
                raise
            except (RuntimeError, ValueError, AssertionError) as e:  # e.g. position embeddings of another size
                raise TeacherError(
                    f"{name}: the model fails on a {img[0]}x{img[1]} probe image ({type(e).__name__}: "
                    f"{str(e).splitlines()[0][:160] if str(e) else ''}); if its native input size is not "
                    f"{img[0]}, pass img_size=<that size> (e.g. --model-kwargs '{{\"img_size\": 32}}', or "
                    "teacher.kwargs.img_size in a recipe)") from e
        grid = tuple(probe.grid)
        patch = reader.patch_size
        if patch is None and img[0] % grid[0] == 0 and img[1] % grid[1] == 0 and img[0] // grid[0] == img[1] // grid[1]:
            patch = img[0] // grid[0]  # the output stride
        if dynamic_img_size is None:
            dynamic_img_size = is_map  # CNN maps take any size; a custom ViT may not
        self.reader = reader
        super().__init__(model, name=name, embed_dim=probe.patches.shape[-1], patch_size=patch,
                         num_prefix_tokens=reader.num_prefix_tokens, mean=mean, std=std, img_size=img,
                         dynamic_img_size=dynamic_img_size)
        self._grid_cache[img] = grid

    def _forward_tokens(self, x: torch.Tensor) -> TokenMap:
        return self.reader(self.model, x)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", {self.reader.describe()}"


def _float_dtype(model: nn.Module) -> torch.dtype:
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    return p.dtype if p is not None else torch.float32


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


# -- import the user's code -------------------------------------------------------------------------
def _import_source(source: str, spec: str):
    """A ``.py`` file (path absolute or relative to the working directory) or a dotted module."""
    if not _is_file_source(source):
        try:
            return importlib.import_module(source)
        except ModuleNotFoundError as e:
            if e.name and source.startswith(e.name):
                raise TeacherError(
                    f"{spec}: no module named {source!r} (not importable from sys.path; give a file path "
                    f"ending in .py instead, e.g. python:path/to/{source.replace('.', '/')}.py:<factory>)") from e
            raise TeacherError(f"{spec}: importing {source!r} failed: {e}") from e
    path = Path(source).expanduser()
    if not path.is_file():
        where = "" if path.is_absolute() else f" (relative to the working directory {Path.cwd()})"
        raise TeacherError(f"{spec}: Python file not found: {path}{where}")
    path = path.resolve()
    mod_name = f"fdistill_user_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"
    stamp = path.stat().st_mtime_ns
    cached = sys.modules.get(mod_name)
    if cached is not None and getattr(cached, "__fdistill_mtime__", None) == stamp:
        return cached
    module_spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(module_spec)
    module.__fdistill_mtime__ = stamp
    sys.modules[mod_name] = module  # dataclasses / pickling look the module up by name
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(mod_name, None)
        raise TeacherError(f"{spec}: error while importing {path}: {type(e).__name__}: {e}") from e
    return module


def _is_file_source(source: str) -> bool:
    return source.endswith(".py") or "/" in source or "\\" in source


@contextlib.contextmanager
def _neighbours_importable(source: str):
    """While a user file is imported and its factory runs, its folder is on ``sys.path`` so that
    it can import the files next to it (also lazily, inside the factory)."""
    folder = str(Path(source).expanduser().resolve().parent) if _is_file_source(source) else None
    if folder is None:
        yield
        return
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        if folder in sys.path:
            sys.path.remove(folder)


def _suggest(name: str, options, what: str) -> str:
    close = difflib.get_close_matches(name, list(options), n=3, cutoff=0.5)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else f"; {what}"


def _build_model(source: str, factory_name: str, factory_kwargs: Dict[str, Any], spec: str) -> nn.Module:
    with _neighbours_importable(source):
        return _call_factory(_import_source(source, spec), source, factory_name, factory_kwargs, spec)


def _call_factory(module, source: str, factory_name: str, factory_kwargs: Dict[str, Any], spec: str) -> nn.Module:
    factory = getattr(module, factory_name, None)
    if factory is None:
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise TeacherError(f"{spec}: {source} has no {factory_name!r}"
                           + _suggest(factory_name, public, f"callables there: {public[:15]}"))
    if not callable(factory):
        raise TeacherError(f"{spec}: {factory_name!r} in {source} is a {type(factory).__name__}, not a callable")
    try:
        model = factory(**factory_kwargs)
    except Exception as e:
        raise TeacherError(f"{spec}: {factory_name}(**{factory_kwargs!r}) failed: {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise TeacherError(f"{spec}: {factory_name}() returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _check_feature_access(model: nn.Module, feature_method: Optional[str], feature_module: Optional[str],
                          spec: str) -> Tuple[Optional[str], Optional[str]]:
    if feature_module:
        names = [n for n, _ in model.named_modules() if n]
        try:
            model.get_submodule(feature_module)
        except AttributeError:
            raise TeacherError(f"{spec}: the model has no submodule {feature_module!r}"
                               + _suggest(feature_module, names, f"submodules: {names[:12]}...")) from None
    has_forward = type(model).forward is not nn.Module.forward
    if feature_method is None:
        if feature_module and has_forward:
            feature_method = "forward"  # run the whole model, take the hooked module's output
        elif callable(getattr(model, "forward_features", None)):
            feature_method = "forward_features"
        elif has_forward:
            feature_method = "forward"
        else:
            raise TeacherError(f"{spec}: the model ({type(model).__name__}) has neither forward nor forward_features; "
                               "name the method that runs it with feature_method=")
    if feature_method == "forward" and not has_forward:
        raise TeacherError(f"{spec}: the model ({type(model).__name__}) does not implement forward; "
                           "name the method that runs it with feature_method=")
    if not callable(getattr(model, feature_method, None)):
        methods = sorted(n for n in dir(model) if not n.startswith("_") and callable(getattr(model, n, None))
                         and ("feature" in n or n.startswith("forward")))
        raise TeacherError(f"{spec}: the model ({type(model).__name__}) has no method {feature_method!r}"
                           + _suggest(feature_method, methods, f"feature-like methods: {methods}"))
    return feature_method, feature_module


def create_python_teacher(
    rest: str,
    *,
    weights: Optional[str] = None,
    strict: bool = True,
    weights_key: Optional[str] = None,
    factory_kwargs: Optional[Dict[str, Any]] = None,
    feature_method: Optional[str] = None,
    feature_module: Optional[str] = None,
    num_prefix_tokens: int = 0,
    patch_size: Optional[int] = None,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    img_size: int | Size2 = 224,
    map_format: str = "NCHW",
    dynamic_img_size: Optional[bool] = None,
    after_norm: bool = True,
    pretrained: bool = True,
    license: Optional[str] = None,
) -> PythonTeacher:
    """Build a frozen teacher from the user's own model code.

    Args:
        rest: ``<file.py or dotted.module>:<factory>``, e.g. ``my_models.py:build_resnet``,
            ``/abs/path/nets.py:vit_small``, ``mypkg.models:Backbone`` (a class is a factory too).
        weights: a ``.safetensors`` file or a PyTorch state dict (read with ``weights_only=True``;
            nested ``{"state_dict": ...}`` / ``{"model": ...}`` and ``module.`` prefixes are handled).
        strict: every key must match (default); ``False`` loads what fits, shapes still checked.
        weights_key: the entry of a checkpoint dict holding the state dict, if not a standard one.
        factory_kwargs: keyword arguments for the factory.
        feature_method: the model's method returning the token map (default ``forward_features``
            when present, else ``forward``); with ``feature_module``, the method that runs the
            model (default ``forward``, else ``forward_features``).
        feature_module: dotted name of the submodule whose output is the token map (forward hook).
        num_prefix_tokens: leading [CLS]/register tokens of a token output (0 for CNN maps).
        patch_size: the output stride; found from the grid at ``img_size`` when not given.
        mean, std: the input normalisation the model was trained with (default ImageNet's).
        img_size: the model's native input size (int or (H, W)).
        map_format: layout of a 4-d output: ``NCHW`` (default) or ``NHWC``; ``NLC`` asserts tokens.
        dynamic_img_size: whether other input sizes work (default: yes for spatial maps, no for tokens).
        after_norm: accepted for a uniform teacher config; a ``python:`` teacher's target is exactly
            what ``feature_method``/``feature_module`` returns (hook the norm or the block before it).
        pretrained: ``False`` skips ``weights`` (random initialisation, e.g. for smoke tests).
        license: the licence of the model's weights, which fdistill cannot know for user code;
            recorded in ``teacher.provenance`` (see :func:`python_provenance`). Never passed to the
            factory: a ``license`` entry of ``factory_kwargs`` is taken as this and removed too.
    """
    spec = f"python:{rest}"
    if map_format not in MAP_FORMATS:
        raise TeacherError(f"{spec}: map_format must be one of {MAP_FORMATS}, got {map_format!r}")
    if num_prefix_tokens < 0:
        raise TeacherError(f"{spec}: num_prefix_tokens must be >= 0, got {num_prefix_tokens}")
    if ":" not in rest:
        raise TeacherError(f"teacher spec {spec!r} must be python:<file.py or module>:<factory>")
    source, factory_name = rest.rsplit(":", 1)
    if not source or not factory_name:
        raise TeacherError(f"teacher spec {spec!r} must be python:<file.py or module>:<factory>")
    if not after_norm:
        log.warning("%s: after_norm=False has no effect on a python: teacher; choose the tokens with "
                    "feature_module (e.g. the last block instead of the final norm)", spec)
    factory_kwargs = dict(factory_kwargs or {})
    if "license" in factory_kwargs:  # a licence is fdistill's business, not the factory's
        given = factory_kwargs.pop("license")
        license = license or given
    model = _build_model(source, factory_name, factory_kwargs, spec)
    if weights and pretrained:
        load_into(model, load_state_dict_file(weights, key=weights_key), strict=strict, what=f"{spec} ({weights})")
    feature_method, feature_module = _check_feature_access(model, feature_method, feature_module, spec)
    reader = FeatureReader(feature_method=feature_method, feature_module=feature_module,
                           num_prefix_tokens=num_prefix_tokens, patch_size=patch_size, map_format=map_format,
                           name=spec)
    teacher = PythonTeacher(model, reader, name=spec, mean=mean, std=std, img_size=img_size,
                            dynamic_img_size=dynamic_img_size)
    teacher.provenance = python_provenance(spec, weights=weights, pretrained=pretrained, license=license)
    return teacher


def python_provenance(spec: str, *, weights: Optional[str], pretrained: bool, license: Optional[str]) -> dict:
    """``teacher.provenance`` of a ``python:`` teacher (see :func:`fdistill.teachers.provenance.make_provenance`).

    weights: the ``weights=`` file's name; ``None`` (random init, licence "none (random init)")
    with ``pretrained=False``; with ``pretrained=True`` and no ``weights=`` the factory built the
    model as it likes (it may load weights of its own), recorded as ``"<factory>"``.
    license: the user's ``license=``; "unknown" without one (fdistill cannot know)."""
    from .provenance import make_provenance

    if not pretrained:
        return make_provenance(spec, weights=None)
    name = Path(weights).name if weights else "<factory>"
    return make_provenance(spec, weights=name, license=license, license_source="user (license=)")
