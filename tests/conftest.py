"""Shared test fixtures: tiny models, deterministic seeds, ../shared location."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from fdistill.speed import tune_cpu_allocator  # noqa: E402

tune_cpu_allocator()  # the CLI does this too: no page-fault storm on every large tensor

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FDISTILL_SHARED", REPO.parent / "shared"))
CIFAR_MINI = SHARED / "data" / "cifar10-jpg-mini"
RESNET_WEIGHTS = SHARED / "weights" / "resnet-cifar10"


def torchrun_prefix():
    """The venv's ``torchrun`` (or ``python -m torch.distributed.run``) as a command prefix."""
    import shutil
    import sys

    exe = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    return [exe] if exe else [sys.executable, "-m", "torch.distributed.run"]


def run_torchrun(args, *, nproc: int = 2, timeout: float = 300):
    """``torchrun --standalone --nproc_per_node=nproc ARGS`` from the repository root with one
    thread per process (gloo on CPU); asserts it succeeded, showing the end of its output if not."""
    import subprocess

    cmd = torchrun_prefix() + [
        "--standalone", f"--nproc_per_node={nproc}", *[str(a) for a in args]]
    proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


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


# -- small image folders written by tests ---------------------------------------------------------
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}


def make_colour_patches(root, n_per_class, seed):
    """A procedural 4-class task a tiny ViT learns in a few steps, one class folder per COLOURS
    entry under ``root``: a rectangle of the class's colour (jittered), random size and place, on
    grey noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name, rgb in COLOURS.items():
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            img = rng.integers(60, 200, (32, 32, 1)).repeat(3, 2).astype(np.float32)
            h, w = rng.integers(12, 24, 2)
            y, x = rng.integers(0, 32 - h), rng.integers(0, 32 - w)
            img[y:y + h, x:x + w] = np.asarray(rgb) + rng.integers(-25, 26, 3)
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(d / f"{i:03d}.png")


def write_random_images(root, n=12):
    """n random-noise images of random sizes in the flat folder ``root``: mostly RGB JPEGs, every
    4th a PNG (decoded in the loader workers, not as a JPEG), every 4th a greyscale JPEG."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        h, w = int(rng.integers(20, 70)), int(rng.integers(20, 70))
        arr = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        if i % 4 == 1:
            Image.fromarray(arr).save(root / f"{i:03d}.png")  # not a JPEG: decoded in the worker
        elif i % 4 == 2:
            Image.fromarray(arr[..., 0]).save(root / f"{i:03d}.jpg", quality=90)  # greyscale JPEG
        else:
            Image.fromarray(arr).save(root / f"{i:03d}.jpg", quality=90)
    return root


def tiny_hf_clip_folder(root, name="clip"):
    """A tiny random Hugging Face ``CLIPModel`` (vision: 2 layers, width 32, 32 px, patch 8; text:
    1 layer over a 26-letter character vocabulary) saved with its tokenizer in ``root / name``.
    Returns (model, tokenizer, folder)."""
    import json
    import string

    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    vocab = {c: i for i, c in enumerate(string.ascii_lowercase)}
    vocab.update({c + "</w>": 26 + i for i, c in enumerate(string.ascii_lowercase)})
    vocab.update({"<|startoftext|>": 52, "<|endoftext|>": 53})
    root.mkdir(parents=True, exist_ok=True)
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"))
    text = dict(vocab_size=54, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=24, bos_token_id=52, eos_token_id=53, pad_token_id=53)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=12)).eval()
    folder = root / name
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, tok, folder
