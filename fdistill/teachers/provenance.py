"""Provenance: which weights a teacher carries and under which licence (the student, trained to
reproduce the teacher's features, derives from those weights and inherits the licence)."""
from __future__ import annotations

import os
import re
from typing import Any, Dict, Optional

from ..backbone import UNKNOWN_LICENSE  # the licence nobody states (defined beside the backbone)

#: the licence of a teacher whose weights were never loaded: nothing was derived from anyone's weights
RANDOM_INIT_LICENSE = "none (random init)"
_NC = re.compile(r"(?<![a-z0-9])nc(?![a-z])|non[-_ ]?commercial", re.IGNORECASE)


def make_provenance(spec: str, *, weights: Optional[str], license: Optional[str] = None,
                    license_source: Optional[str] = None) -> Dict[str, Any]:
    """The ``provenance`` record of a teacher: ``spec`` (the teacher spec string), ``weights`` (the
    pretrained tag, hub repo or local weight file name; ``None`` for a random initialisation) and
    ``license`` (as the weights' library / model card / user states it), plus ``license_source``
    (where the licence string came from).

    ``weights=None`` means randomly initialised: the licence is then :data:`RANDOM_INIT_LICENSE`
    whatever else is given. Loaded weights with no known licence get :data:`UNKNOWN_LICENSE`."""
    if weights is None:
        return {"spec": spec, "weights": None, "license": RANDOM_INIT_LICENSE, "license_source": None}
    lic = str(license).strip() if license is not None and str(license).strip() else None
    return {"spec": spec, "weights": str(weights), "license": lic or UNKNOWN_LICENSE,
            "license_source": license_source if lic else None}


def is_non_commercial(license: Optional[str]) -> bool:
    """Whether a licence string restricts use to non-commercial purposes: an ``nc`` element as
    in ``cc-by-nc-4.0`` / ``cc-by-nc-sa-4.0``, or the words non-commercial / noncommercial."""
    return bool(license) and _NC.search(str(license)) is not None


def license_from_model_card(path: Optional[str | os.PathLike]) -> Optional[str]:
    """The ``license:`` of a Hugging Face style model card (README.md with a YAML front matter),
    read from a local file only; ``license: other`` with ``license_name: X`` gives ``other (X)``.
    ``None`` when there is no such file or field."""
    if not path or not os.path.isfile(path):
        return None
    try:
        text = open(path, encoding="utf-8", errors="replace").read()
    except OSError:
        return None
    m = re.match(r"\A\ufeff?---\s*\n(.*?)\n---\s*(\n|\Z)", text, re.DOTALL)
    if not m:
        return None
    try:
        import yaml

        meta = yaml.safe_load(m.group(1)) or {}
    except Exception:  # a malformed card says nothing
        return None
    if not isinstance(meta, dict) or not meta.get("license"):
        return None
    lic = meta["license"]
    lic = ", ".join(str(x) for x in lic) if isinstance(lic, (list, tuple)) else str(lic)
    if lic.strip().lower() == "other" and meta.get("license_name"):
        lic = f"other ({meta['license_name']})"
    return lic.strip() or None


def cached_hub_model_card_license(repo_id: str, *, revision: Optional[str] = None,
                                  cache_dir: Optional[str] = None) -> Optional[str]:
    """The licence of a hub repo's model card if its README.md is already in the local Hugging
    Face cache (never downloads); ``None`` otherwise."""
    try:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(repo_id, "README.md", revision=revision, cache_dir=cache_dir)
    except Exception:  # not a valid repo id, no hub library...
        return None
    return license_from_model_card(path) if isinstance(path, str) else None
