"""Errors raised by the data layer (defined with the others in :mod:`fdistill.errors`)."""
from __future__ import annotations

from ..errors import DataError

__all__ = ["DataError"]
