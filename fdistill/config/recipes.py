"""Recipes by name: ``--config clip_vit_base_300ep`` works from any folder, as a path does.

A ``--config`` value that is an existing file is that file. Otherwise it names a shipped recipe
(``fdistill/recipes/``, read with ``importlib.resources`` so an installed wheel has them):
``NAME`` in the folder of the command's kind (``fdistill finetune --config vit_base`` ->
``finetune/vit_base.yaml``), or ``KIND/NAME`` (``demo/distill``); ``.yaml`` may be left out.
"""
from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Dict, List, Optional

from .core import ConfigError

__all__ = ["recipes_dir", "resolve_recipe", "list_recipes"]


def recipes_dir() -> Path:
    """The folder of the shipped recipes (inside the installed package)."""
    return Path(str(resources.files("fdistill").joinpath("recipes")))


def list_recipes(kind: Optional[str] = None) -> List[Dict[str, str]]:
    """Every shipped recipe: ``{"name", "kind", "path", "about"}`` (``about``: its first comment
    line), sorted by kind and name; only ``kind``'s folder when given."""
    root = recipes_dir()
    out = []
    for p in sorted(root.glob("*/*.yaml")):
        if kind is not None and p.parent.name != kind:
            continue
        about = ""
        for line in p.read_text().splitlines():
            if line.startswith("#"):
                about = line.lstrip("#").strip()
                break
        out.append({"name": p.stem, "kind": p.parent.name, "path": str(p), "about": about})
    return out


def resolve_recipe(spec: Optional[str | os.PathLike], kind: Optional[str] = None) -> Optional[Path]:
    """The recipe file ``spec`` means (see the module docstring); ``None`` stays ``None``.

    Raises:
        ConfigError: neither a file nor a shipped recipe (the message lists the close ones).
    """
    if spec is None:
        return None
    p = Path(spec).expanduser()
    if p.is_file():
        return p
    s = str(spec)
    name = s[:-5] if s.endswith(".yaml") else s
    root = recipes_dir()
    if "/" not in name and os.sep not in name:
        candidates = [root / kind / f"{name}.yaml"] if kind else sorted(root.glob(f"*/{name}.yaml"))
    else:
        candidates = [root / f"{name}.yaml"]
    found = [c for c in candidates if c.is_file()]
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        kinds = ", ".join(f"{c.parent.name}/{c.stem}" for c in found)
        raise ConfigError(f"--config {s}: several shipped recipes have that name ({kinds}); give KIND/NAME")
    known = [r["name"] if kind else f"{r['kind']}/{r['name']}" for r in list_recipes(kind)]
    import difflib

    close = difflib.get_close_matches(name.split("/")[-1], [k.split("/")[-1] for k in known], n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(f"--config {s}: no such file, and no shipped {kind + ' ' if kind else ''}recipe of that name"
                      f"{hint} (`fdistill recipes{' ' + kind if kind else ''}` lists them)")
