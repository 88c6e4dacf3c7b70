"""One precision resolver, one autocast, one device resolver (issue 12)."""
from pathlib import Path

import pytest
import torch

from fdistill.errors import ConfigError
from fdistill.precision import amp_dtype, autocast, resolve_precision
from fdistill.device import resolve_device

REPO = Path(__file__).resolve().parents[1]


def test_resolve_precision_rules():
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16" and resolve_precision("fp16", "cpu") == "fp16"
    with pytest.raises(ConfigError, match="precision must be one of"):
        resolve_precision("fp8", "cpu")
    assert amp_dtype("fp32") is None and amp_dtype("bf16") is torch.bfloat16 and amp_dtype("fp16") is torch.float16


def test_autocast_really_casts_on_cpu():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast("cpu", "bf16"):
        assert (a @ b).dtype == torch.bfloat16
    with autocast("cpu", "fp32"):
        assert (a @ b).dtype == torch.float32


def test_resolve_device_rules():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device is available"):
            resolve_device("cuda")
    with pytest.raises(ConfigError, match="is not a device"):
        resolve_device("gpu0")


def test_grep_finds_one_resolver_each():
    """No other module decides ``auto`` precision or device on its own."""
    offenders = []
    for f in sorted((REPO / "fdistill").rglob("*.py")):
        if f.name in ("precision.py", "device.py"):
            continue
        text = f.read_text()
        if "is_bf16_supported" in text or '"cuda" if torch.cuda.is_available() else "cpu"' in text:
            offenders.append(str(f.relative_to(REPO)))
    assert offenders == []
