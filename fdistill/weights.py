"""Safe weight files: safetensors, or ``torch.load(weights_only=True)``; never arbitrary pickles."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch

from .errors import WeightsError  # the one hierarchy: fdistill.errors

_NESTED_KEYS = ("state_dict", "model", "model_state_dict", "module", "student")


def save_model_weights(model: torch.nn.Module, path: str | os.PathLike) -> Path:
    """``model``'s state dict as a safetensors file, written atomically (:mod:`fdistill.io`)."""
    from safetensors.torch import save_file

    from .io import atomic_path

    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(sd, str(tmp), metadata={"format": "pt"})
    return Path(path)


def load_state_dict_file(path: str | os.PathLike, *, key: Optional[str] = None,
                         prefer: Sequence[str] = ()) -> Dict[str, torch.Tensor]:
    """Read a state dict from a ``.safetensors`` file or a PyTorch file (``weights_only=True``).

    A checkpoint that nests its weights (``{"state_dict": ...}``, ``{"model": ...}``) is unwrapped
    (the entries named in ``prefer`` tried first, e.g. ``("teacher",)`` for a DINO-style file), or
    ``key`` picks the entry; a leading ``module.`` (DataParallel/DDP) is stripped.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise WeightsError(f"weights file not found: {p}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd = load_file(str(p), device="cpu")
        except Exception as e:  # safetensors raises its own error types
            raise WeightsError(f"cannot read safetensors file {p}: {e}") from e
    else:
        try:
            sd = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:
            raise WeightsError(
                f"cannot load {p} safely (torch.load weights_only=True): {e}. "
                "Convert it to safetensors or a plain state dict of tensors."
            ) from e
    if key is not None:
        if not isinstance(sd, dict) or key not in sd:
            has = sorted(sd)[:20] if isinstance(sd, dict) else type(sd).__name__
            raise WeightsError(f"{p} has no {key!r} entry (it has {has})")
        sd = sd[key]
    while isinstance(sd, dict) and not any(isinstance(v, torch.Tensor) for v in sd.values()):
        nested = next((k for k in (*prefer, *_NESTED_KEYS) if isinstance(sd.get(k), dict)), None)
        if nested is None:
            break
        sd = sd[nested]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"{p} does not hold a state dict of tensors")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def load_into(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor], *, strict: bool = True, what: str = "model"):
    """``model.load_state_dict`` with an error that lists the mismatching keys clearly."""
    own = model.state_dict()
    # BatchNorm's num_batches_tracked counter is optional in a file (many published checkpoints drop
    # it), so its absence is not a mismatch: the model's own counter is kept.
    counters = [k for k in own if k.endswith("num_batches_tracked") and k not in state_dict]
    if counters:
        meta = getattr(state_dict, "_metadata", None)
        state_dict = dict(state_dict, **{k: own[k] for k in counters})
        if meta is not None:
            state_dict = _with_metadata(state_dict, meta)
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if shapes or (strict and (missing or unexpected)):
        msg = [f"weights do not fit {what}:"]
        if shapes:
            msg.append("  shape mismatch: " + "; ".join(shapes[:10]))
        if strict and missing:
            msg.append(f"  missing ({len(missing)}): {missing[:10]}")
        if strict and unexpected:
            msg.append(f"  unexpected ({len(unexpected)}): {unexpected[:10]}")
        raise WeightsError("\n".join(msg))
    return model.load_state_dict(state_dict, strict=strict)


def _with_metadata(state_dict: Dict[str, torch.Tensor], meta) -> Dict[str, torch.Tensor]:
    from collections import OrderedDict

    out = OrderedDict(state_dict)
    out._metadata = meta  # module versions drive torch's own state-dict conversions
    return out
