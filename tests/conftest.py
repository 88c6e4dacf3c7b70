"""Shared test fixtures: tiny models, deterministic seeds, ../shared location."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from fdistill.runtime import tune_cpu_allocator  # noqa: E402

tune_cpu_allocator()  # the CLI does this too: no page-fault storm on every large tensor

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FDISTILL_SHARED", REPO.parent / "shared"))
CIFAR_MINI = SHARED / "data" / "cifar10-jpg-mini"
RESNET_WEIGHTS = SHARED / "weights" / "resnet-cifar10"


def need_shared(*paths: Path):
    """Skip (cleanly) when ../shared data or weights are absent."""
    missing = [str(p) for p in paths if not p.exists()]
    return pytest.mark.skipif(bool(missing), reason=f"shared data absent: {missing}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def tiny_student():
    from fdistill import create_student

    return create_student("vit_tiny", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


@pytest.fixture
def tiny_vit_teacher():
    from fdistill import create_teacher

    return create_teacher("timm:vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                          depth=2, embed_dim=48, num_heads=3)


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and far faster than on two when other processes load
    the CPUs (OpenMP threads then wait on each other); the thread count is restored afterwards.
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
