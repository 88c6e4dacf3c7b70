"""``open_clip:<arch>/<pretrained tag or weight file>`` teachers: the visual tower of an OpenCLIP model.

Spec forms::

    open_clip:ViT-B-16/openai                      built-in architecture + pretrained tag (hub cache)
    open_clip:ViT-B-16/path/to/weights.safetensors  built-in architecture + local file (.safetensors/.bin/.pt/.npz)
    open_clip:ViT-B-16  (pretrained=False)         random initialisation
    open_clip:hf-hub:timm/ViT-B-16-SigLIP          config + weights from a Hugging Face repo
    open_clip:local-dir:/path/to/folder            open_clip_config.json + weights in a folder
    open_clip:tiny  (model_cfg=dict(embed_dim=..., vision_cfg=..., text_cfg=...))   custom config

Tokens (paper Sec. 3.1: the teacher's full output map) for the three kinds of visual tower:

* native OpenCLIP ViT (``VisionTransformer``): [CLS] (class embedding) = prefix, the rest = patches,
  after the final norm ``ln_post`` by default (``after_norm=False``: the last block's output), read
  with the tower's own ``forward_intermediates``;
* timm trunk (``TimmModel``): the trunk's tokens or map, exactly as a ``timm:`` teacher gives them;
* ``ModifiedResNet`` (RN50 ...): the last stage's (B, C, H/32, W/32) map as patch tokens, no prefix
  (there is no final norm: ``after_norm`` has no effect; the attention pool is not run).

The adapter keeps the whole CLIP model for zero-shot evaluation: ``clip_model`` (text tower,
``visual.proj``), ``tokenizer``, ``encode_text``, ``encode_image`` and ``embed_tokens`` (the image
embedding computed from an after-norm token map). ``clip_model`` is not a registered submodule, so
``parameters()``/``state_dict()`` cover the visual tower only; ``.to()`` still moves the text tower.
"""
from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..weights import WeightsError, load_into, load_state_dict_file
from .base import Size2, Teacher, TeacherError, TokenMap, tokens_from_map
from .offline import prefer_offline_when_unreachable, pretrained_error

log = logging.getLogger(__name__)

#: licences of open_clip pretrained tags, which open_clip's pretrained configs do not state: only
#: the well-known ones (first match of the tag's prefix wins); everything else is "unknown" unless
#: the tag's hub model card is in the local cache or the user passes ``license=``.
#: openai: OpenAI's CLIP release (github.com/openai/CLIP) is MIT; laion*: the LAION OpenCLIP
#: model cards say MIT; metaclip*: Meta's MetaCLIP weights are CC-BY-NC-4.0; webli: Google's
#: SigLIP (big_vision) weights are Apache-2.0.
OPEN_CLIP_TAG_LICENSES: Tuple[Tuple[str, str], ...] = (
    ("openai", "mit"),
    ("laion", "mit"),
    ("metaclip", "cc-by-nc-4.0"),
    ("webli", "apache-2.0"),
)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".npz", ".npy")
HOW_LOCAL = "checkpoint=PATH (or the spec open_clip:<arch>/<path to a .safetensors/.bin file>)"


class OpenClipTeacher(Teacher):
    """Adapter for the visual tower of an open_clip CLIP model (see the module docstring)."""

    def __init__(self, clip_model: nn.Module, *, name: str, after_norm: bool = True, tokenizer_name: str = "",
                 mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None):
        from open_clip.model import get_model_preprocess_cfg
        from open_clip.modified_resnet import ModifiedResNet
        from open_clip.timm_model import TimmModel
        from open_clip.transformer import VisionTransformer

        from .timm_teacher import TimmTeacher, f_is_tokens

        visual = clip_model.visual
        pp = get_model_preprocess_cfg(clip_model)
        self.after_norm = bool(after_norm)
        timm_tokens = None
        if isinstance(visual, VisionTransformer):
            self.kind = "vit"
            if visual.attn_pool is not None and after_norm:
                raise TeacherError(
                    f"{name}: this tower pools with attention before its final norm (CoCa style), so it has no "
                    "after-norm token map; use after_norm=False (the last block's tokens)")
            embed_dim, stride, P, dynamic = visual.transformer.width, visual.patch_size[0], 1, False
        elif isinstance(visual, ModifiedResNet):
            self.kind = "resnet"
            embed_dim = visual.layer4[-1].bn3.num_features
            stride, P, dynamic = 32, 0, True  # fully convolutional up to the (unused) attention pool
        elif isinstance(visual, TimmModel):
            self.kind = "timm"
            # the trunk read exactly like a timm: teacher; shares the trunk, not registered twice
            timm_tokens = TimmTeacher(visual.trunk, name=name, after_norm=after_norm,
                                      mean=pp.get("mean"), std=pp.get("std"))
            embed_dim, stride, P = timm_tokens.embed_dim, timm_tokens.patch_size, timm_tokens.num_prefix_tokens
            dynamic = not f_is_tokens(visual.trunk)
        else:
            raise TeacherError(
                f"{name}: the visual tower {type(visual).__name__} is not supported (expected an OpenCLIP "
                "VisionTransformer, a timm trunk or a ModifiedResNet)")
        super().__init__(visual, name=name, embed_dim=embed_dim, patch_size=stride, num_prefix_tokens=P,
                         mean=mean or pp["mean"], std=std or pp["std"], img_size=getattr(visual, "image_size"),
                         dynamic_img_size=dynamic)
        self.__dict__["_timm_tokens"] = timm_tokens  # plain attribute: its trunk is self.model.trunk
        # the full CLIP model (text tower, projections) rides along unregistered, frozen, in eval mode
        for p in clip_model.parameters():
            p.requires_grad_(False)
        clip_model.eval()
        self.__dict__["clip_model"] = clip_model
        self.tokenizer_name = tokenizer_name
        self._tokenizer = None

    # -- tokens ---------------------------------------------------------------------------------
    def _forward_tokens(self, x: torch.Tensor) -> TokenMap:
        v = self.model
        if self.kind == "vit":
            out = v.forward_intermediates(x, indices=1, normalize_intermediates=self.after_norm,
                                          intermediates_only=True, output_fmt="NLC", output_extra_tokens=True)
            patches = out["image_intermediates"][-1]  # (B, N, C)
            prefix = out["image_intermediates_prefix"][-1]  # (B, 1, C)
            grid = (x.shape[-2] // v.patch_size[0], x.shape[-1] // v.patch_size[1])
            return TokenMap(prefix, patches, grid)
        if self.kind == "resnet":
            fmap = v.forward_intermediates(x, indices=1, intermediates_only=True)["image_intermediates"][-1]
            tokens, grid = tokens_from_map(fmap, "NCHW")  # (B, H*W, C)
            return TokenMap(None, tokens, grid)
        return self._timm_tokens._forward_tokens(x)

    # -- the CLIP model, for zero-shot evaluation -------------------------------------------------
    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self.clip_model._apply(fn, recurse)  # the text tower follows the visual tower (device, dtype)
        return self

    @property
    def tokenizer(self):
        """open_clip's tokenizer for this model (texts -> (T, context_length) token ids)."""
        if self._tokenizer is None:
            import open_clip

            ctx = getattr(self.clip_model, "context_length", None)
            self._tokenizer = open_clip.get_tokenizer(self.tokenizer_name, context_length=ctx)
        return self._tokenizer

    def _device(self) -> torch.device:
        return next(self.clip_model.parameters()).device

    def encode_text(self, texts: Sequence[str], normalize: bool = False) -> torch.Tensor:
        """Texts -> (T, D) CLIP text embeddings."""
        tokens = self.tokenizer(list(texts)).to(self._device())
        with torch.no_grad():
            return self.clip_model.encode_text(tokens, normalize=normalize)

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(B, 3, H, W) images normalised with ``self.mean``/``self.std`` -> (B, D) CLIP image embeddings."""
        with torch.no_grad():
            return self.clip_model.encode_image(images, normalize=normalize)

    def embed_tokens(self, tokens: TokenMap, normalize: bool = False) -> torch.Tensor:
        """An after-norm token map (as ``forward_tokens`` gives with ``after_norm=True``, or an FD
        student's prediction of it) -> (B, D) CLIP image embedding: the tower's pooling then
        ``visual.proj``, i.e. what the model does after its last block."""
        v = self.model
        if self.kind != "vit" or v.attn_pool is not None or (v.final_ln_after_pool and v.pool_type == "avg"):
            raise TeacherError(f"{self.name}: embed_tokens supports OpenCLIP ViT towers with token or average "
                               "pooling only")
        if v.pool_type == "tok":
            pooled = tokens.prefix[:, 0]  # (B, C)
        elif v.pool_type == "avg":
            pooled = tokens.patches.mean(dim=1)
        else:
            raise TeacherError(f"{self.name}: the tower has no pooled output (pool_type={v.pool_type!r})")
        emb = pooled @ v.proj if v.proj is not None else pooled  # (B, D)
        return F.normalize(emb, dim=-1) if normalize else emb


# -- building ------------------------------------------------------------------------------------
def _parse(rest: str) -> Tuple[str, Optional[str]]:
    """'ViT-B-16/openai' -> ('ViT-B-16', 'openai'); 'ViT-B-16/a/b.bin' -> ('ViT-B-16', 'a/b.bin');
    'hf-hub:org/repo' and 'local-dir:/path' stay whole (their weights come with them)."""
    if rest.startswith(("hf-hub:", "local-dir:")):
        return rest, None
    arch, _, tag = rest.partition("/")
    return arch, (tag or None)


def _is_file_ref(tag: str) -> bool:
    return os.path.isfile(os.path.expanduser(tag)) or "/" in tag or "\\" in tag or tag.endswith(WEIGHT_SUFFIXES)


def _read_model_cfg(model_cfg) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """A dict or a JSON file, either a bare model config ({embed_dim, vision_cfg, text_cfg, ...}) or
    open_clip's ``open_clip_config.json`` layout ({model_cfg, preprocess_cfg}) -> (model, preprocess)."""
    if isinstance(model_cfg, (str, os.PathLike)):
        p = Path(model_cfg).expanduser()
        if not p.is_file():
            raise TeacherError(f"open_clip model_cfg file not found: {p}")
        try:
            model_cfg = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise TeacherError(f"open_clip model_cfg {p} is not valid JSON: {e}") from e
    if not isinstance(model_cfg, dict):
        raise TeacherError(f"open_clip model_cfg must be a dict or a JSON file, got {type(model_cfg).__name__}")
    cfg = copy.deepcopy(model_cfg)
    if "model_cfg" in cfg:
        return cfg["model_cfg"], cfg.get("preprocess_cfg", {})
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
    if missing:
        raise TeacherError(f"open_clip model_cfg lacks {missing} (needs embed_dim, vision_cfg, text_cfg)")
    return cfg, {}


def _build_from_cfg(cfg: Dict[str, Any], preprocess: Dict[str, Any], img_size, spec: str) -> nn.Module:
    """open_clip's CLIP / CustomTextCLIP from a config dict (what create_model does for built-ins)."""
    from open_clip import CLIP, CustomTextCLIP
    from open_clip.model import set_model_preprocess_cfg
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    cfg = copy.deepcopy(cfg)
    custom_text = cfg.pop("custom_text", False) or "hf_model_name" in cfg.get("text_cfg", {})
    if img_size is not None:
        cfg["vision_cfg"]["image_size"] = img_size
    try:
        model = (CustomTextCLIP if custom_text else CLIP)(**cfg)
    except (TypeError, ValueError, AssertionError) as e:
        raise TeacherError(f"{spec}: invalid open_clip model_cfg: {type(e).__name__}: {e}") from e
    pp = merge_preprocess_dict(PreprocessCfg(), preprocess)
    pp["size"] = model.visual.image_size
    set_model_preprocess_cfg(model, pp)
    return model


def load_clip_weights(model: nn.Module, path: str, spec: str) -> None:
    """Load a CLIP checkpoint file into ``model``.

    Mirrors open_clip's ``load_checkpoint`` (same conversions, through open_clip's own helpers) but
    reads the file with fdistill's safe reader: open_clip's ``load_state_dict`` retries with an
    unrestricted ``torch.load`` when the weights-only load raises TypeError, which a crafted file can
    trigger."""
    from open_clip.convert import convert_state_dict
    from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed, resize_text_pos_embed

    p = Path(path).expanduser()
    if not p.is_file():
        raise TeacherError(f"{spec}: weight file not found: {p}")
    if p.suffix in (".npz", ".npy"):  # big_vision (SigLIP) numpy weights: np.load, no pickles
        from open_clip.convert import load_big_vision_weights

        load_big_vision_weights(model, str(p))
        return
    try:
        sd = load_state_dict_file(p)
    except WeightsError as e:
        if "TorchScript" in str(e):
            raise WeightsError(
                f"{p} is a TorchScript archive (OpenAI's original CLIP format), which is not loaded as plain "
                "weights; use the pretrained tag (e.g. open_clip:ViT-B-16/openai) or save model.state_dict() "
                "to .safetensors once in a trusted environment") from e
        raise
    sd = convert_state_dict(model, sd)
    if "positional_embedding" in sd and not hasattr(model, "positional_embedding"):
        sd = convert_to_custom_text_state_dict(sd)
    for key in ("logit_scale", "logit_bias"):
        own = getattr(model, key, None)
        if key in sd and own is not None and own.ndim != sd[key].ndim:
            sd[key] = sd[key].reshape(own.shape)
    if "logit_bias" not in sd and getattr(model, "logit_bias", None) is not None and "logit_scale" in sd:
        sd["logit_bias"] = torch.zeros_like(sd["logit_scale"])
    sd.pop("text.transformer.embeddings.position_ids", None)
    resize_pos_embed(sd, model)
    resize_text_pos_embed(sd, model)
    load_into(model, sd, strict=True, what=f"{spec} ({p})")


def resolve_tag(arch: str, tag: str, spec: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """A pretrained tag -> (open_clip's pretrained cfg, create_model kwargs the weights need):
    QuickGELU for tags trained with it (OpenAI's), and the tag's preprocessing (mean/std...)."""
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

    tag_cfg = get_pretrained_cfg(arch, tag)
    if not tag_cfg:
        raise TeacherError(f"{spec}: unknown pretrained tag {tag!r} for {arch} (known: "
                           f"{list_pretrained_tags_by_model(arch)}); for a local file use {HOW_LOCAL}")
    kwargs: Dict[str, Any] = {}
    if tag_cfg.get("quick_gelu"):
        kwargs["force_quick_gelu"] = True  # else open_clip builds nn.GELU and only warns
    pp = {k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg}
    if pp:
        kwargs["force_preprocess_cfg"] = pp
    return tag_cfg, kwargs


def _download(cfg_or_id, spec: str, cache_dir: Optional[str], hub_id: bool = False) -> str:
    from open_clip.pretrained import download_pretrained, download_pretrained_from_hf

    prefer_offline_when_unreachable()
    try:
        path = download_pretrained_from_hf(cfg_or_id, cache_dir=cache_dir) if hub_id else \
            download_pretrained(cfg_or_id, cache_dir=cache_dir)
    except Exception as e:  # hub / network errors come in many types
        raise pretrained_error(spec, e, HOW_LOCAL) from e
    if not path:
        raise pretrained_error(spec, FileNotFoundError("no download source"), HOW_LOCAL)
    return path


class _quiet_random_init_warning(logging.Filter):
    """Drop open_clip's "No pretrained weights loaded ... initialized randomly" while it builds the
    architecture: the weights are loaded right after by :func:`load_clip_weights`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded")

    def __enter__(self):
        logging.getLogger().addFilter(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger().removeFilter(self)


def _find_weights_in_dir(folder: Path) -> Optional[str]:
    for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "model.safetensors",
                 "open_clip_pytorch_model.bin", "pytorch_model.bin", "open_clip_pytorch_model.pth", "model.pth"):
        if (folder / name).is_file():
            return str(folder / name)
    found = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pth"))
    return str(found[0]) if found else None


def create_open_clip_teacher(
    rest: str,
    *,
    pretrained: bool = True,
    checkpoint: Optional[str] = None,
    after_norm: bool = True,
    model_cfg: Optional[Dict[str, Any] | str] = None,
    img_size: Optional[int | Size2] = None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    cache_dir: Optional[str] = None,
    license: Optional[str] = None,
    **create_kwargs,
) -> OpenClipTeacher:
    """Build a frozen open_clip teacher.

    Args:
        rest: ``<arch>[/<pretrained tag or weight file>]``, ``hf-hub:<repo>`` or ``local-dir:<folder>``.
        pretrained: load weights (a tag's or a file's); ``False`` for a randomly initialised tower.
        checkpoint: a local weight file (``.safetensors``, or a state dict read with
            ``weights_only=True``; ``.npz`` big_vision weights) instead of a tag.
        after_norm: tokens after ``ln_post`` (default, the official FD configs) or before it.
        model_cfg: a custom model config (dict or JSON file) instead of a built-in architecture,
            e.g. ``dict(embed_dim=32, vision_cfg=dict(image_size=32, patch_size=8, width=64,
            layers=2, head_width=32), text_cfg=dict(context_length=16, vocab_size=1000, width=32,
            heads=2, layers=1))``.
        img_size: input size other than the architecture's (position embeddings are resampled when
            pretrained weights load, as open_clip's ``force_image_size`` does).
        mean, std: override the model's preprocessing statistics.
        cache_dir: open_clip download cache.
        license: the weights' licence, when you know it (e.g. a local weight file); recorded in
            ``teacher.provenance`` (see :func:`open_clip_provenance`).
        create_kwargs: passed to ``open_clip.create_model`` (e.g. ``force_quick_gelu=True``).
            QuickGELU is switched on automatically for tags trained with it (``openai``).
    """
    import open_clip
    from open_clip.pretrained import list_pretrained_tags_by_model

    spec = f"open_clip:{rest}"
    arch, tag = _parse(rest)
    if tag and _is_file_ref(tag):
        if checkpoint:
            raise TeacherError(f"{spec}: give the weight file in the spec or as checkpoint=, not both")
        checkpoint, tag = tag, None
    if checkpoint and not Path(checkpoint).expanduser().is_file():
        raise TeacherError(f"{spec}: weight file not found: {checkpoint}")
    weights: Optional[str] = checkpoint if pretrained else None
    tokenizer_name = arch
    tag_cfg: Dict[str, Any] = {}

    if model_cfg is not None:
        if tag:
            raise TeacherError(f"{spec}: a custom model_cfg takes weights from a file (checkpoint=PATH), not a tag")
        cfg, preprocess = _read_model_cfg(model_cfg)
        clip = _build_from_cfg(cfg, preprocess, img_size, spec)
        text_cfg = cfg.get("text_cfg", {})
        tokenizer_name = arch if arch in open_clip.list_models() and not text_cfg.get("hf_tokenizer_name") else ""
    else:
        kwargs = dict(create_kwargs)
        if img_size is not None:
            kwargs["force_image_size"] = img_size
        schema = arch.split(":", 1)[0] if arch.startswith(("hf-hub:", "local-dir:")) else None
        if schema is None:
            if arch.replace("/", "-") not in open_clip.list_models():
                import difflib

                close = difflib.get_close_matches(arch, open_clip.list_models(), n=4)
                raise TeacherError(f"open_clip has no architecture {arch!r}"
                                   + (f"; did you mean {close}?" if close else " (see open_clip.list_models())")
                                   + " For a custom one pass model_cfg=.")
            if tag:
                tag_cfg, tag_kwargs = resolve_tag(arch, tag, spec)
                kwargs = {**tag_kwargs, **kwargs}
                if pretrained:
                    weights = _download(tag_cfg, spec, cache_dir)
            elif pretrained and not checkpoint:
                raise TeacherError(
                    f"{spec}: name the pretrained weights: open_clip:{arch}/<tag> with a tag in "
                    f"{list_pretrained_tags_by_model(arch)}, a weight file via {HOW_LOCAL}, or pretrained=False "
                    "for a randomly initialised teacher")
        elif pretrained and not checkpoint:
            if schema == "local-dir":
                folder = Path(arch.split(":", 1)[1]).expanduser()
                if not (folder / "open_clip_config.json").is_file():
                    raise TeacherError(f"{spec}: {folder} has no open_clip_config.json")
                weights = _find_weights_in_dir(folder)
                if weights is None:
                    raise TeacherError(f"{spec}: no weight file (.safetensors/.bin/.pth) in {folder}")
            else:
                weights = _download(arch.split(":", 1)[1], spec, cache_dir, hub_id=True)
        if schema == "hf-hub":
            prefer_offline_when_unreachable()
        try:
            with _quiet_random_init_warning():  # fdistill loads the weights itself, just below
                clip = open_clip.create_model(arch, pretrained=None, load_weights=False, cache_dir=cache_dir,
                                              **kwargs)
        except (FileNotFoundError, ValueError) as e:
            raise TeacherError(f"{spec}: {e}") from e
        except RuntimeError as e:
            if schema == "hf-hub":
                raise pretrained_error(spec, e, HOW_LOCAL) from e
            raise TeacherError(f"{spec}: open_clip could not build the model: {e}") from e
    if weights:
        load_clip_weights(clip, weights, spec)
    teacher = OpenClipTeacher(clip, name=spec, after_norm=after_norm, tokenizer_name=tokenizer_name, mean=mean,
                              std=std)
    teacher.provenance = open_clip_provenance(spec, arch, tag, weights, tag_cfg=tag_cfg, cache_dir=cache_dir,
                                              license=license)
    return teacher


def open_clip_provenance(spec: str, arch: str, tag: Optional[str], weights: Optional[str], *,
                         tag_cfg: Optional[Dict[str, Any]] = None, cache_dir: Optional[str] = None,
                         license: Optional[str] = None) -> Dict[str, Any]:
    """``teacher.provenance`` of an open_clip teacher (see :func:`fdistill.teachers.provenance.make_provenance`).

    weights (``None``: nothing loaded, random init): the pretrained tag; the hub repo of
    ``hf-hub:``; the folder name of ``local-dir:``; else the weight file's name.
    license: ``license=`` if given; else the model card (README.md front matter) of the
    ``local-dir:`` folder, of the ``hf-hub:`` repo or of the tag's hub repo when it is in the local
    Hugging Face cache; else, for a tag, :data:`OPEN_CLIP_TAG_LICENSES`; else "unknown"."""
    from .provenance import cached_hub_model_card_license, license_from_model_card, make_provenance

    if not weights:
        return make_provenance(spec, weights=None)
    card = None
    if arch.startswith("local-dir:"):
        folder = Path(arch.split(":", 1)[1]).expanduser()
        name = folder.name or str(folder)
        card = license_from_model_card(folder / "README.md")
    elif arch.startswith("hf-hub:"):
        name = arch.split(":", 1)[1]
        repo, _, rev = name.partition("@")
        card = cached_hub_model_card_license(repo, revision=rev or None, cache_dir=cache_dir)
    elif tag:
        name = tag
        hub = str((tag_cfg or {}).get("hf_hub") or "").strip("/")
        if hub:
            card = cached_hub_model_card_license(hub, cache_dir=cache_dir)
    else:
        name = Path(weights).name
    if license:
        return make_provenance(spec, weights=name, license=license, license_source="user (license=)")
    if card:
        return make_provenance(spec, weights=name, license=card, license_source="model card")
    if tag:
        for prefix, lic in OPEN_CLIP_TAG_LICENSES:
            if tag.lower().startswith(prefix):
                return make_provenance(spec, weights=name, license=lic,
                                       license_source="fdistill's table of open_clip tags (OPEN_CLIP_TAG_LICENSES)")
    return make_provenance(spec, weights=name)


def timm_vit_from_open_clip(visual: nn.Module) -> nn.Module:
    """The same network as open_clip's ``VisionTransformer`` tower ``visual``, as a timm
    ``VisionTransformer`` (pre-norm, [CLS], QuickGELU when the tower uses it), its weights renamed
    by timm's own OpenAI-CLIP converter (``vision_transformer._convert_openai_clip``); the output
    projection is left out (``num_classes=0``). For what needs timm's block structure (ViTDet's
    windowed attention, :mod:`fdistill.dense.vitdet`); token maps equal the tower's (tested)."""
    from functools import partial

    from open_clip.transformer import VisionTransformer as OpenClipViT
    from timm.layers import QuickGELU
    from timm.models.vision_transformer import VisionTransformer, _convert_openai_clip

    if not isinstance(visual, OpenClipViT):
        raise TeacherError(f"{type(visual).__name__} is not an open_clip VisionTransformer tower")
    t = visual.transformer
    blk = t.resblocks[0]
    if visual.attn_pool is not None or not isinstance(blk.ls_1, nn.Identity) or \
            not isinstance(blk.attn, nn.MultiheadAttention):
        raise TeacherError("this open_clip tower (attention pooling, layer scale or custom attention) has no "
                           "plain timm ViT equivalent")
    act = QuickGELU if type(blk.mlp.gelu).__name__ == "QuickGELU" else nn.GELU
    heads = blk.attn.num_heads
    mlp_ratio = blk.mlp.c_fc.out_features / t.width
    eps = visual.ln_pre.eps
    net = VisionTransformer(img_size=tuple(visual.image_size), patch_size=tuple(visual.patch_size), embed_dim=t.width,
                            depth=t.layers, num_heads=heads, mlp_ratio=mlp_ratio, pre_norm=True, num_classes=0,
                            global_pool="token", norm_layer=partial(nn.LayerNorm, eps=eps), act_layer=act)
    sd = _convert_openai_clip({f"visual.{k}": v for k, v in visual.state_dict().items()}, net)
    sd = {k: v for k, v in sd.items() if not k.startswith("head.")}  # the projection: not part of the token map
    net.load_state_dict(sd, strict=True)
    return net
