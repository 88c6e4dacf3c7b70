"""Errors raised by the data layer."""
from __future__ import annotations


class DataError(RuntimeError):
    """Bad data input: a missing path, an empty folder, a folder without images, an unreadable
    shard, an unknown dataset name. Raised while datasets are *built*, before any compute, and
    printed by the CLI as one line."""
