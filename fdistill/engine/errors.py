"""Errors of a run (defined with the others in :mod:`fdistill.errors`)."""
from __future__ import annotations

from ..errors import RunError

__all__ = ["RunError"]
