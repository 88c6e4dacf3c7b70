"""Errors of a distillation run."""
from __future__ import annotations


class RunError(RuntimeError):
    """A run cannot go on as asked: an incompatible or unreadable checkpoint, too many
    non-finite losses in a row, a resume target that does not exist. Printed by the CLI as
    one line; the run folder and its last good checkpoint are left intact."""
