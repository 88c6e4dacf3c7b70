"""Specs read back from an artifact are built only if building them cannot run code.

A checkpoint, an export's ``fdistill_export.json`` or a fine-tuning output's ``classifier.json``
records the spec of the model it came from, and evaluation rebuilds it (``fdistill zeroshot
--model RUN`` the FD student's teacher; ``load_classifier`` a fine-tuned adapter's backbone). Such
a file loads with ``weights_only=True`` or as JSON, so it cannot execute code by itself -- but a
recorded ``python:`` spec imports and calls whatever module it names (``python:subprocess:run``
runs a shell command), and a recorded Hugging Face ``trust_remote_code`` runs the repository's
code. Those are built only when the user says so: ``--trust-recorded-spec`` on the command line
(:func:`trust_recorded_specs` in Python), or by giving the spec again themselves (e.g.
``fdistill zeroshot --teacher SPEC``). Everything else a recorded spec can name (``timm:``,
``open_clip:``, ``hf:`` without remote code) builds a known architecture and loads tensors.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Dict, Iterator, Optional

from .base import TeacherError

FLAG = "--trust-recorded-spec"
_TRUSTED: contextvars.ContextVar[bool] = contextvars.ContextVar("fdistill_trust_recorded_specs", default=False)


class UntrustedSpecError(TeacherError):
    """A spec recorded in an artifact would run code, and the user has not said to trust it."""


@contextlib.contextmanager
def trust_recorded_specs(enabled: bool = True) -> Iterator[None]:
    """Within this block, specs recorded in artifacts are built even when that runs code."""
    token = _TRUSTED.set(bool(enabled))
    try:
        yield
    finally:
        _TRUSTED.reset(token)


def runs_code(spec: str, kwargs: Optional[Dict[str, Any]] = None) -> Optional[str]:
    """Why building ``spec`` with ``kwargs`` would run code not shipped with fdistill or a model
    library (``None``: it would not)."""
    source = str(spec).partition(":")[0]
    kw = dict(kwargs or {})
    if source == "python":
        return "a 'python:' spec imports and calls the module it names"
    if any(kw.get(k) for k in ("trust_remote_code", "code_revision")):
        return "trust_remote_code runs the repository's own code"
    if any(isinstance(v, dict) and v.get("trust_remote_code") for v in kw.values()):
        return "trust_remote_code runs the repository's own code"
    return None


def check_recorded_spec(spec: str, kwargs: Optional[Dict[str, Any]], *, where: str, trusted: bool = False) -> None:
    """Raise :class:`UntrustedSpecError` if the spec recorded in ``where`` would run code and
    neither ``trusted`` nor :func:`trust_recorded_specs` says to build it."""
    reason = runs_code(spec, kwargs)
    if reason is None or trusted or _TRUSTED.get():
        return
    raise UntrustedSpecError(
        f"{where} records the model spec {spec!r}; {reason}, so fdistill does not build it from a file. If you "
        f"trust that file, add {FLAG} to the command (trust_recorded_specs() in Python), or give the spec "
        "yourself (e.g. --teacher SPEC)")
