"""fdistill's one error hierarchy: every error a user can cause and fix is a :class:`FdistillError`,
which the command line prints as one line (``fdistill COMMAND: error: ...``, exit status 2;
``-v`` shows the traceback). Each kind keeps the built-in base it always had (``ConfigError``
is a ``ValueError``, the others ``RuntimeError``s), so existing ``except`` clauses still work.
This module imports nothing from the rest of the package."""
from __future__ import annotations

__all__ = ["FdistillError", "ConfigError", "DataError", "TeacherError", "WeightsError", "RunError", "UsageError"]


class FdistillError(Exception):
    """Base class: a problem with the user's input, files or run, explained in the message."""


class ConfigError(FdistillError, ValueError):
    """Bad configuration: unknown key, wrong type, out-of-range value, unreadable file."""


class UsageError(FdistillError, ValueError):
    """A command used in a way it does not support (conflicting or missing options)."""


class DataError(FdistillError, RuntimeError):
    """Bad data input: a missing path, an empty folder, a folder without images, an unreadable
    shard, an unknown dataset name. Raised while datasets are *built*, before any compute."""


class TeacherError(FdistillError, RuntimeError):
    """A model cannot be built or used as asked (bad spec, missing weights, wrong input)."""


class WeightsError(FdistillError, RuntimeError):
    """A weight file is missing, unreadable or does not fit the model."""


class RunError(FdistillError, RuntimeError):
    """A run cannot go on as asked: an incompatible or unreadable checkpoint, too many
    non-finite losses in a row, a resume target that does not exist. The run folder and its
    last good checkpoint are left intact."""
