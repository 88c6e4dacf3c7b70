"""Which schema a recipe file is for: ``fdistill validate-config`` checks any recipe in
``configs/`` (distillation or evaluation) without being told its kind.

A file's kind is its folder under ``configs/`` (``configs/<kind>/*.yaml``) or its own name (the
demo's stage files ``configs/demo/<kind>.yaml``); anything else is tried against every schema, and
must fit exactly one.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .core import ConfigError, build_config

__all__ = ["SCHEMA_NAMES", "schemas", "infer_schema", "build_any_config"]

#: the kinds of recipe, as the command that reads each
SCHEMA_NAMES = ("distill", "finetune", "linprobe", "knn", "zeroshot", "segprobe", "segment", "depth", "detect")


def schemas() -> Dict[str, type]:
    """{kind: schema dataclass} for every kind in :data:`SCHEMA_NAMES`."""
    from .dense import DepthConfig, DetectConfig, SegmentConfig
    from .distill import DistillConfig
    from .finetune import FinetuneConfig, KnnConfig, LinprobeConfig, SegprobeConfig, ZeroshotConfig

    return {"distill": DistillConfig, "finetune": FinetuneConfig, "linprobe": LinprobeConfig, "knn": KnnConfig,
            "zeroshot": ZeroshotConfig, "segprobe": SegprobeConfig, "segment": SegmentConfig,
            "depth": DepthConfig, "detect": DetectConfig}


def infer_schema(path: str | os.PathLike, overrides=()) -> str:
    """The kind of recipe ``path`` is (see module docstring); a clear ConfigError when it fits
    none, or several and its name does not say which."""
    p = Path(path)
    for name in (p.parent.name, p.stem):
        if name in SCHEMA_NAMES:
            return name
    fits: List[str] = []
    errors: List[Tuple[str, str]] = []
    for name, cls in schemas().items():
        try:
            build_config(cls, p, overrides)
            fits.append(name)
        except ConfigError as e:
            errors.append((name, str(e)))
    if len(fits) == 1:
        return fits[0]
    if fits:
        raise ConfigError(f"{p} is a valid {', '.join(fits)} recipe; say which with --schema")
    detail = "; ".join(f"{n}: {e}" for n, e in errors)
    raise ConfigError(f"{p} fits no recipe kind ({detail})")


def build_any_config(path: str | os.PathLike, overrides=(), schema: Optional[str] = None):
    """(kind, config) of a recipe file of any kind (``schema`` names it, else :func:`infer_schema`)."""
    if schema is not None and schema not in SCHEMA_NAMES:
        raise ConfigError(f"unknown schema {schema!r}; choose from {', '.join(SCHEMA_NAMES)}")
    kind = schema or infer_schema(path, overrides)
    return kind, build_config(schemas()[kind], path, overrides)
