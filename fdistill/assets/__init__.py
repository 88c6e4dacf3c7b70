"""Models the project trained itself and ships (never weights of other projects).

``clip_mini``: a small CLIP (open_clip; 32 px images, patch 4 = 8x8 tokens, a 4-layer image tower
of width 128, a 2-layer text tower) pre-trained by ``fdistill pretrain-clip`` on 512 000
image-caption pairs drawn from a million procedural images -- far more than feature distillation
and fine-tuning see afterwards -- so it is a teacher that knows more than the data it is distilled
and fine-tuned on (the paper's first condition). Its folder's README.md gives the exact command,
seed, time and its numbers; ``tests/test_assets.py`` re-runs a prefix of that command and compares.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

#: the shipped teachers: name -> the folder inside this package
ASSETS = ("clip_mini",)


def asset_path(name: str) -> Path:
    """The folder of a shipped model (an open_clip ``local-dir`` folder for the CLIP teachers)."""
    if name not in ASSETS:
        raise KeyError(f"no shipped model {name!r}; shipped: {list(ASSETS)}")
    return Path(str(resources.files(__name__).joinpath(name)))


def teacher_spec(name: str = "clip_mini") -> str:
    """The teacher spec of a shipped model, e.g. ``open_clip:local-dir:/.../fdistill/assets/clip_mini``."""
    folder = asset_path(name)
    if not (folder / "open_clip_model.safetensors").is_file():
        raise FileNotFoundError(f"{folder} holds no weights (a source checkout without the committed asset?)")
    return f"open_clip:local-dir:{folder}"
