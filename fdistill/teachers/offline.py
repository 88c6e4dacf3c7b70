"""One clear error when pre-trained weights cannot be had (offline is normal here)."""
from __future__ import annotations

from .base import TeacherError


def pretrained_error(spec: str, cause: BaseException, how: str) -> TeacherError:
    """Replace a stack of hub / network errors by one message naming the spec and the way to
    pass a local file instead."""
    first = str(cause).strip().splitlines()[0][:300] if str(cause).strip() else type(cause).__name__
    return TeacherError(
        f"could not get pre-trained weights for teacher '{spec}' (no network or not in the local cache: "
        f"{type(cause).__name__}: {first}). Pass a local weight file with {how}, "
        f"or pretrained=False for a randomly initialised teacher."
    )


_HUB_CHECKED = False


def prefer_offline_when_unreachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """If the Hugging Face hub cannot be reached, switch huggingface_hub to offline mode so that
    cached weights still load and missing ones fail at once (instead of minutes of retries).

    Returns True when offline mode is on. Checked once per process."""
    global _HUB_CHECKED
    import os
    import socket

    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - hub is a dependency of timm
        return True
    if constants.HF_HUB_OFFLINE:
        return True
    if _HUB_CHECKED:
        return bool(constants.HF_HUB_OFFLINE)
    _HUB_CHECKED = True
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return False
    except OSError:
        constants.HF_HUB_OFFLINE = True
        os.environ["HF_HUB_OFFLINE"] = "1"
        return True
