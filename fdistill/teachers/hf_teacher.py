"""``hf:<repo id or folder>`` teachers: Hugging Face ``transformers`` vision models.

Supported and tested: ``CLIPVisionModel`` and the vision tower of a full ``CLIPModel``,
``Dinov2Model`` (with or without register tokens), ``ViTModel``, ``SiglipVisionModel`` (and the
vision tower of ``SiglipModel``). Other ``AutoModel`` vision models whose output has a
``last_hidden_state`` of tokens (B, L, C) or a map (B, C, H, W) work the same way.

Tokens = ``last_hidden_state``, after the final norm by default (the official FD configs):

* CLIP: ``last_hidden_state`` is the last block's output (``post_layernorm`` is applied to the
  pooled [CLS] only), so ``post_layernorm`` is applied to every token when ``after_norm=True``;
* ViT / Dinov2 / SigLIP: ``last_hidden_state`` is already after ``layernorm`` / ``post_layernorm``;
  ``after_norm=False`` gives that norm's input (captured by a forward pre-hook, which keeps only
  the one tensor, unlike ``output_hidden_states`` which keeps every layer's).

Which case applies is found from the model itself (does the final norm's output have the shape of
``last_hidden_state``?), not from a table of families. Prefix tokens = everything before the
patch grid: [CLS] (+ Dinov2 registers), none for SigLIP.

Mean/std come from the folder's ``preprocessor_config.json`` when present, else the family's
defaults. A full CLIP model is kept (unregistered) as ``clip_model`` for zero-shot evaluation, with
``tokenizer``, ``encode_text``, ``encode_image`` and ``embed_tokens``.
"""
from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Teacher, TeacherError, TokenMap, to_2tuple, tokens_from_map
from .offline import prefer_offline_when_unreachable, pretrained_error

log = logging.getLogger(__name__)

OPENAI_CLIP_MEAN, OPENAI_CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)
#: model_type -> (mean, std) when the folder has no preprocessor_config.json (the families' processors)
FAMILY_NORMALIZATION = {
    "clip": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
    "clip_vision_model": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
    "siglip": (HALF, HALF),
    "siglip_vision_model": (HALF, HALF),
    "vit": (HALF, HALF),
    "dinov2": (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    "dinov2_with_registers": (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
}
HUB_KWARGS = ("revision", "cache_dir", "token", "local_files_only")
FINAL_NORM_NAMES = ("post_layernorm", "layernorm", "final_layernorm", "norm", "ln_post")
HOW_LOCAL = "the spec hf:/path/to/folder (a folder written by save_pretrained, or a downloaded hub snapshot)"


def _final_norm(vision: nn.Module) -> Optional[nn.Module]:
    inner = getattr(vision, "vision_model", vision)  # transformers 4.x nests CLIPVisionTransformer
    for name in FINAL_NORM_NAMES:
        m = getattr(inner, name, None)
        if isinstance(m, nn.Module) and not isinstance(m, nn.Identity):
            return m
    return None


class HFTeacher(Teacher):
    """Adapter for a Hugging Face vision model (see the module docstring)."""

    def __init__(self, model: nn.Module, *, name: str, after_norm: bool = True,
                 mean: Sequence[float], std: Sequence[float], source: str = ""):
        config = model.config
        vision = getattr(model, "vision_model", model)  # CLIPModel / SiglipModel -> vision tower
        vcfg = getattr(config, "vision_config", config)
        self.after_norm = bool(after_norm)
        img = to_2tuple(getattr(vcfg, "image_size", 224))
        ps = getattr(vcfg, "patch_size", None)
        ps = to_2tuple(ps)[0] if ps is not None else None
        takes_interp = "interpolate_pos_encoding" in inspect.signature(vision.forward).parameters
        norm = _final_norm(vision)

        # probe once: token layout, whether last_hidden_state is already normed, prefix count
        vision.eval()
        with torch.no_grad():
            x = torch.zeros(1, 3, *img, dtype=_float_dtype(vision))
            seen = {}
            h = norm.register_forward_hook(lambda m, i, o: seen.setdefault("out", o)) if norm is not None else None
            try:
                last = vision(pixel_values=x).last_hidden_state
            finally:
                if h is not None:
                    h.remove()
        self.is_map = last.dim() == 4
        #: whether the model's last_hidden_state already went through the final norm
        self.tokens_normed = isinstance(seen.get("out"), torch.Tensor) and seen["out"].shape == last.shape
        if self.is_map:
            embed_dim, grid, P = last.shape[1], tuple(last.shape[-2:]), 0
            ps = img[0] // grid[0] if img[0] % grid[0] == 0 else ps
        else:
            if ps is None:
                raise TeacherError(f"{name}: a token model without config.patch_size is not supported")
            grid = (img[0] // ps, img[1] // ps)
            embed_dim, P = last.shape[-1], last.shape[1] - grid[0] * grid[1]
            if P < 0:
                raise TeacherError(f"{name}: {last.shape[1]} tokens cannot hold a {grid} patch grid")
        if norm is None and not self.is_map and not after_norm:
            raise TeacherError(f"{name}: no final norm found ({FINAL_NORM_NAMES}); after_norm=False is undefined")
        super().__init__(vision, name=name, embed_dim=embed_dim, patch_size=ps, num_prefix_tokens=P,
                         mean=mean, std=std, img_size=img, dynamic_img_size=takes_interp or self.is_map
                         or config.model_type.startswith("dinov2"))  # Dinov2 always interpolates
        self._grid_cache[img] = grid
        self.takes_interp = takes_interp
        self.__dict__["final_norm"] = norm  # a submodule of self.model, not registered twice
        # a full CLIP-style model (text tower, projections) rides along unregistered for zero-shot
        full = model if model is not vision and hasattr(model, "get_text_features") else None
        if full is not None:
            for p in full.parameters():
                p.requires_grad_(False)
            full.eval()
        self.__dict__["clip_model"] = full
        self.source = source
        self._tokenizer = None

    # -- tokens ---------------------------------------------------------------------------------
    def _forward_tokens(self, x: torch.Tensor) -> TokenMap:
        kw = {}
        if self.takes_interp and tuple(x.shape[-2:]) != self.img_size:
            kw["interpolate_pos_encoding"] = True
        pre = {}
        hook = None
        if not self.is_map and not self.after_norm and self.tokens_normed:
            hook = self.final_norm.register_forward_pre_hook(lambda m, args: pre.setdefault("x", args[0]))
        try:
            last = self.model(pixel_values=x, **kw).last_hidden_state
        finally:
            if hook is not None:
                hook.remove()
        if self.is_map:
            tokens, grid = tokens_from_map(last, "NCHW")
            return TokenMap(None, tokens, grid)
        if hook is not None:
            last = pre["x"]  # the final norm's input: the last block's output
        elif self.after_norm and not self.tokens_normed and self.final_norm is not None:
            last = self.final_norm(last)  # CLIP: post_layernorm on every token
        p = self.patch_size
        grid = (x.shape[-2] // p, x.shape[-1] // p)
        P = self.num_prefix_tokens
        return TokenMap(last[:, :P] if P else None, last[:, P:], grid)

    # -- the full model, for zero-shot evaluation -----------------------------------------------
    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        if self.clip_model is not None:
            self.clip_model._apply(fn, recurse)  # the text tower follows the vision tower
        return self

    def _need_clip(self):
        if self.clip_model is None:
            raise TeacherError(f"{self.name} is a vision model only (no text tower); zero-shot needs a full CLIP "
                               "model folder (CLIPModel / SiglipModel)")
        return self.clip_model

    @property
    def tokenizer(self):
        """The repo's tokenizer (``AutoTokenizer``), loaded on first use."""
        self._need_clip()
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(self.source)
            except Exception as e:
                raise TeacherError(f"{self.name}: no tokenizer in {self.source}: {type(e).__name__}: {e}") from e
        return self._tokenizer

    def encode_text(self, texts: Sequence[str], normalize: bool = False) -> torch.Tensor:
        """Texts -> (T, D) text embeddings."""
        m = self._need_clip()
        ctx = getattr(getattr(m.config, "text_config", None), "max_position_embeddings", None)
        enc = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=ctx, return_tensors="pt")
        dev = next(m.parameters()).device
        with torch.no_grad():
            out = m.get_text_features(**{k: v.to(dev) for k, v in enc.items() if k in ("input_ids", "attention_mask")})
        emb = getattr(out, "pooler_output", out)  # a tensor in transformers 4.x, an output object in 5.x
        return F.normalize(emb, dim=-1) if normalize else emb

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(B, 3, H, W) images normalised with ``self.mean``/``self.std`` -> (B, D) image embeddings."""
        m = self._need_clip()
        with torch.no_grad():
            out = m.get_image_features(pixel_values=images)
        emb = getattr(out, "pooler_output", out)
        return F.normalize(emb, dim=-1) if normalize else emb

    def embed_tokens(self, tokens: TokenMap, normalize: bool = False) -> torch.Tensor:
        """An after-norm token map -> (B, D) image embedding: the model's pooling and projection
        ([CLS] + ``visual_projection`` for CLIP, the attention-pooling ``head`` for SigLIP)."""
        m = self._need_clip()
        if hasattr(m, "visual_projection") and tokens.prefix is not None:
            emb = m.visual_projection(tokens.prefix[:, 0])
        elif getattr(self.model, "head", None) is not None:
            emb = self.model.head(tokens.full())
        else:
            raise TeacherError(f"{self.name}: embed_tokens does not know this model's pooling")
        return F.normalize(emb, dim=-1) if normalize else emb


def _float_dtype(model: nn.Module) -> torch.dtype:
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    return p.dtype if p is not None else torch.float32


def _normalization(source: str, model_type: str, local: bool):
    """(mean, std) from preprocessor_config.json, else the family's defaults."""
    try:
        from transformers.image_processing_base import ImageProcessingMixin

        d, _ = ImageProcessingMixin.get_image_processor_dict(source, local_files_only=local)
        if d.get("image_mean") is not None and d.get("image_std") is not None:
            return tuple(d["image_mean"]), tuple(d["image_std"])
    except Exception:  # no preprocessor config: fall back to the family's defaults
        pass
    if model_type not in FAMILY_NORMALIZATION:
        log.warning("hf teacher %s: no preprocessor_config.json and unknown family %r; using ImageNet mean/std "
                    "(pass mean=, std= if the model was trained otherwise)", source, model_type)
    return FAMILY_NORMALIZATION.get(model_type, (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD))


def _dtype_kwarg(dtype) -> dict:
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return {"dtype": dtype} if major >= 5 else {"torch_dtype": dtype}


def create_hf_teacher(
    rest: str,
    *,
    pretrained: bool = True,
    after_norm: bool = True,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    dtype: torch.dtype = torch.float32,
    license: Optional[str] = None,
    **model_kwargs,
) -> HFTeacher:
    """Build a frozen Hugging Face teacher.

    Args:
        rest: a local folder (``save_pretrained`` output / hub snapshot) or a hub repo id
            (``openai/clip-vit-base-patch16``, ``facebook/dinov2-base``; needs the HF cache offline).
        pretrained: load the weights; ``False`` builds the architecture from its config, randomly initialised.
        after_norm: tokens after the final norm (default) or before it.
        mean, std: override the preprocessing statistics.
        dtype: parameter dtype (default float32, whatever the checkpoint stores).
        license: the weights' licence, when the model card does not say (or says wrong);
            recorded in ``teacher.provenance`` (see :func:`hf_provenance`).
        model_kwargs: passed to ``from_pretrained`` (e.g. ``revision=``, ``attn_implementation="eager"``).
    """
    from transformers import AutoConfig, AutoModel

    spec = f"hf:{rest}"
    path = Path(rest).expanduser()
    local = path.is_dir()
    if not local and (rest.startswith(("/", "./", "../", "~")) or path.exists()):
        raise TeacherError(f"{spec}: folder not found: {path}")
    source = str(path) if local else rest
    if not local:
        prefer_offline_when_unreachable()
    try:
        config = AutoConfig.from_pretrained(source, **{k: v for k, v in model_kwargs.items() if k in HUB_KWARGS})
    except Exception as e:
        if local:
            raise TeacherError(f"{spec}: no usable config.json in {path}: {type(e).__name__}: {e}") from e
        raise pretrained_error(spec, e, HOW_LOCAL) from e
    try:
        if pretrained:
            model = AutoModel.from_pretrained(source, **_dtype_kwarg(dtype), **model_kwargs)
        else:
            kw = {k: v for k, v in model_kwargs.items() if k not in HUB_KWARGS}
            model = AutoModel.from_config(config, **kw).to(dtype)
    except ValueError as e:
        raise TeacherError(f"{spec}: transformers cannot build a model for model_type {config.model_type!r}: {e}") from e
    except OSError as e:
        if local:
            raise TeacherError(f"{spec}: cannot load the weights in {path}: {e}") from e
        raise pretrained_error(spec, e, HOW_LOCAL) from e
    if mean is None or std is None:
        m, s = _normalization(source, config.model_type, local or bool(_offline()))
        mean, std = mean or m, std or s
    teacher = HFTeacher(model, name=spec, after_norm=after_norm, mean=mean, std=std, source=source)
    teacher.provenance = hf_provenance(spec, source, local=local, pretrained=pretrained, license=license,
                                       revision=model_kwargs.get("revision"), cache_dir=model_kwargs.get("cache_dir"))
    return teacher


def hf_provenance(spec: str, source: str, *, local: bool, pretrained: bool, license: Optional[str] = None,
                  revision: Optional[str] = None, cache_dir: Optional[str] = None) -> dict:
    """``teacher.provenance`` of an ``hf:`` teacher (see :func:`fdistill.teachers.provenance.make_provenance`).

    weights: the hub repo id (``repo@revision`` when a revision is given) or the local folder's
    name; ``None`` with ``pretrained=False``. license: ``license=`` if given, else the model card's
    ``license:`` (README.md front matter in the folder, or the repo's README.md when it is in the
    local Hugging Face cache: nothing is downloaded for it), else "unknown"."""
    from .provenance import cached_hub_model_card_license, license_from_model_card, make_provenance

    if not pretrained:
        return make_provenance(spec, weights=None)
    if local:
        weights = Path(source).name or source
        card = license_from_model_card(Path(source) / "README.md")
    else:
        weights = f"{source}@{revision}" if revision else source
        card = cached_hub_model_card_license(source, revision=revision, cache_dir=cache_dir)
    if license:
        return make_provenance(spec, weights=weights, license=license, license_source="user (license=)")
    return make_provenance(spec, weights=weights, license=card, license_source="model card")


def _offline() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover
        return True
