"""Device-side JPEG decoding + FD view (fdistill.data.gpu_decode): its CPU fallback gives the CPU
loader's exact batches, the crop geometry is torchvision's RandomResizedCrop from the same
per-sample seed, bad files are skipped and counted. (The CUDA decode itself needs a GPU.)"""
import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from conftest import CIFAR_MINI, need_shared, write_random_images
from fdistill.data import build_distill_dataset, build_distill_loader
from fdistill.data.gpu_decode import (DeviceDistillView, EncodedImageFolder, build_encoded_loader, collate_encoded,
                                      decode_images)
from fdistill.data.seeding import sample_seed




def test_cpu_fallback_gives_the_cpu_loaders_batches(tmp_path):
    root = write_random_images(tmp_path / "imgs")
    cpu = build_distill_loader(build_distill_dataset(root, img_size=24, seed=5), batch_size=4, num_workers=0,
                               seed=1, epoch=2)
    enc = build_encoded_loader(root, batch_size=4, num_workers=0, seed=1, epoch=2)
    view = DeviceDistillView(24, seed=5)
    n = 0
    for a, b in zip(cpu, enc):
        assert torch.equal(a["indices"], b["indices"]) and b["epochs"].eq(2).all()
        got = view(b, torch.device("cpu"))
        assert got.dtype == torch.uint8 and got.shape == (4, 3, 24, 24)
        assert torch.equal(got, a["images"])  # same decoder (libjpeg-turbo) on the CPU: identical
        n += 1
    assert n == 3


@need_shared(CIFAR_MINI)
def test_cpu_fallback_matches_on_real_jpegs():
    root = CIFAR_MINI / "val"
    cpu = build_distill_dataset(root, img_size=64, seed=3)
    enc = EncodedImageFolder(root)
    keys = [(0, 5), (2, 17), (1, 999), (7, 500)]
    batch = collate_encoded([enc[k] for k in keys])
    assert all(d.dim() == 1 for d in batch["data"])  # real JPEGs travel encoded
    got = DeviceDistillView(64, seed=3)(batch, torch.device("cpu"))
    assert torch.equal(got, torch.stack([cpu[k]["image"] for k in keys]))


def test_crop_geometry_is_torchvisions_draw_from_the_sample_seed():
    view = DeviceDistillView(32, scale=(0.2, 0.9), ratio=(0.5, 2.0), seed=11)
    sizes = [(50, 80), (300, 200), (33, 33), (64, 48)] * 8
    epochs = list(range(len(sizes)))
    indices = [3 * i + 1 for i in range(len(sizes))]
    torch.manual_seed(42)
    before = torch.rand(3)
    torch.manual_seed(42)
    d = view.draws(sizes, epochs, indices)
    assert torch.equal(torch.rand(3), before)  # training's RNG untouched
    ref = v2.RandomResizedCrop(32, scale=(0.2, 0.9), ratio=(0.5, 2.0))
    in_range = 0
    for (h, w), e, i, p in zip(sizes, epochs, indices, d):
        torch.manual_seed(sample_seed(11, e, i))
        q = ref.make_params([torch.empty(3, h, w)])
        flip = bool(torch.rand(1) < 0.5)
        assert (p["top"], p["left"], p["height"], p["width"], p["flip"]) == \
            (q["top"], q["left"], q["height"], q["width"], flip)
        assert 0 <= p["top"] and p["top"] + p["height"] <= h and 0 <= p["left"] and p["left"] + p["width"] <= w
        area, ar = p["height"] * p["width"] / (h * w), p["width"] / p["height"]
        in_range += (0.2 - 0.05 <= area <= 0.9 + 0.05) and (0.5 - 0.1 <= ar <= 2.0 + 0.1)
    assert in_range >= 0.9 * len(sizes)  # (after 10 failed tries torchvision falls back to a centre crop)
    assert 0.25 < sum(p["flip"] for p in d) / len(d) < 0.75


def test_pixels_are_the_crop_of_the_decoded_image():
    """A coordinate image: every output pixel must come from inside the drawn box."""
    h, w = 60, 90
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    img = torch.stack([yy * 4, xx * 2, torch.zeros_like(xx)]).to(torch.uint8)  # (3, h, w) position code
    view = DeviceDistillView(16, hflip=0.0, interpolation="nearest", seed=0)
    batch = {"data": [img], "epochs": torch.tensor([0]), "indices": torch.tensor([7])}
    out = view(batch, torch.device("cpu"))[0]
    p = view.draws([(h, w)], [0], [7])[0]
    rows, cols = out[0].long() // 4, out[1].long() // 2
    assert rows.min() >= p["top"] and rows.max() < p["top"] + p["height"]
    assert cols.min() >= p["left"] and cols.max() < p["left"] + p["width"]
    assert rows.max() - rows.min() >= 0.8 * (p["height"] - p["height"] / 16)  # spans the box


def test_bad_files_are_skipped_and_counted(tmp_path):
    root = write_random_images(tmp_path / "imgs", n=4)
    good = (root / "000.jpg").read_bytes()
    (root / "001.png").unlink()
    (root / "001.jpg").write_bytes(good[: len(good) // 2])  # truncated: caught in the worker
    ds = EncodedImageFolder(root)
    s = ds[(0, 1)]
    assert s["skipped"] == 1 and s["index"] == 1
    # markers intact but the body is garbage: only the decoder can tell
    (root / "003.jpg").write_bytes(good[:20] + b"\x00" * 200 + good[-2:])
    batch = collate_encoded([ds[(0, i)] for i in range(4)])
    out = DeviceDistillView(16, seed=0)(batch, torch.device("cpu"))
    assert out.shape == (4, 3, 16, 16) and batch["skipped"] == 2


def test_decode_images_mixed_payloads():
    arr = (np.random.default_rng(1).random((10, 12, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    jpeg = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
    decoded = torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
    out = decode_images([jpeg, decoded, torch.zeros(50, dtype=torch.uint8)], torch.device("cpu"))
    assert out[0].shape == (3, 10, 12) and torch.equal(out[1], decoded) and out[2] is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (nvJPEG)")
def test_cuda_decode_close_to_cpu(tmp_path):
    root = write_random_images(tmp_path / "imgs")
    enc = build_encoded_loader(root, batch_size=4, num_workers=0, seed=0)
    view = DeviceDistillView(24, seed=0)
    b = next(iter(enc))
    on_gpu = view(b, torch.device("cuda")).cpu()
    on_cpu = view(b, torch.device("cpu"))
    assert (on_gpu.float() - on_cpu.float()).abs().mean() < 2.0  # decoders differ by a few grey levels
