"""JPEG decoding on the GPU: loader workers only read files; the device decodes and crops.

At FD's speeds a fast GPU consumes thousands of 224 px ImageNet images a second, and CPU
workers decoding full-size JPEGs and resizing them can fall behind (``benchmarks/
bench_distill.py`` times the loader next to the step to show it). In this mode:

* :class:`EncodedImageFolder` returns each file's raw bytes (a 1-d uint8 tensor) -- no decoding
  in the workers. Files that are not JPEG (PNG, ...) and JPEGs that look truncated are decoded in
  the worker as before (PIL), unreadable ones skipped and counted like
  :class:`~fdistill.data.ImageFolderDataset` does.
* :class:`DeviceDistillView` decodes a whole batch with ``torchvision.io.decode_jpeg(...,
  device="cuda")`` (nvJPEG) and applies the FD view (RandomResizedCrop + horizontal flip) on the
  device, returning the same uint8 (B, 3, H, W) batch the CPU path gives.

The views are the CPU path's: a sample's crop box and flip are drawn by torchvision's own
``RandomResizedCrop`` from the same per-sample seed ``(seed, epoch, index)`` (see
:mod:`fdistill.data.seeding`), and cropped by the same torchvision kernel; only the JPEG decoder
differs (nvJPEG vs libjpeg-turbo: a few grey levels on some pixels). On a machine without CUDA
the view decodes on the CPU (the fallback, also used for any image the device decoder rejects).

Usage::

    loader = build_encoded_loader("/data/imagenet/train", batch_size=128, seed=0)
    view = DeviceDistillView(224, seed=0)
    for batch in loader:
        images = view(batch, device)  # (B, 3, 224, 224) uint8 on the device
"""
from __future__ import annotations

import logging
from typing import List, Optional, Sequence, Tuple, Union

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2

from .errors import DataError
from .folder import MAX_CONSECUTIVE_BAD, ImageFolderDataset, open_rgb
from .loader import DistillDataLoader
from .sampler import ResumableDistributedSampler
from .seeding import sample_seed
from .transforms import DistillView, distill_transform
from .workers import worker_options

log = logging.getLogger(__name__)

JPEG_SOI = b"\xff\xd8\xff"
JPEG_EOI = b"\xff\xd9"
#: a JPEG's end-of-image marker must lie within this many bytes of the file's end (some
#: writers pad); otherwise the file is taken as truncated and decoded (or rejected) by PIL
EOI_SLACK = 64


def looks_like_complete_jpeg(data: bytes) -> bool:
    return data[:3] == JPEG_SOI and data.rfind(JPEG_EOI, max(0, len(data) - EOI_SLACK)) >= 0


class EncodedImageFolder(Dataset):
    """An image folder (as :class:`~fdistill.data.ImageFolderDataset`) read as encoded bytes.

    ``dataset[(epoch, index)]`` -> ``{"data", "label", "index", "epoch", "skipped"}`` where
    ``data`` is a 1-d uint8 tensor of JPEG bytes, or a decoded uint8 (3, H, W) image for files
    that are not (complete) JPEGs."""

    def __init__(self, root, *, labels: Optional[bool] = False):
        self.folder = ImageFolderDataset(root, labels=labels)

    def __len__(self) -> int:
        return len(self.folder)

    def __repr__(self) -> str:
        return f"EncodedImageFolder({self.folder.root!r}, {len(self)} images)"

    @property
    def classes(self):
        return self.folder.classes

    def load(self, index: int) -> Tuple[torch.Tensor, int, int]:
        """(payload, label, unreadable files stepped over); see the class doc."""
        samples, n = self.folder.samples, len(self.folder)
        for skipped in range(min(n, MAX_CONSECUTIVE_BAD)):
            path, label = samples[(index + skipped) % n]
            try:
                with open(path, "rb") as f:
                    data = f.read()
                if looks_like_complete_jpeg(data):
                    return torch.frombuffer(bytearray(data), dtype=torch.uint8), label, skipped
                img = open_rgb(path)  # not a JPEG, or truncated: PIL decodes it or raises
                return v2.functional.pil_to_tensor(img), label, skipped
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                self.folder.bad_paths.add(path)
                log.warning("skipping unreadable image %s (%s: %s)", path, type(e).__name__, e)
        raise DataError(f"{self.folder.root!r}: {min(n, MAX_CONSECUTIVE_BAD)} unreadable images in a row from "
                        f"index {index}")

    def __getitem__(self, key: Union[int, Tuple[int, int]]) -> dict:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        data, label, skipped = self.load(index)
        return {"data": data, "label": int(label), "index": int(index), "epoch": int(epoch), "skipped": int(skipped)}


def collate_encoded(samples: Sequence[dict]) -> dict:
    """Batch of encoded samples: ``data`` stays a list (the payloads differ in length)."""
    return {
        "data": [s["data"] for s in samples],
        "labels": torch.tensor([s["label"] for s in samples], dtype=torch.int64),
        "indices": torch.tensor([s["index"] for s in samples], dtype=torch.int64),
        "epochs": torch.tensor([s["epoch"] for s in samples], dtype=torch.int64),
        "skipped": sum(s["skipped"] for s in samples),
    }


def build_encoded_loader(root, *, batch_size: int, num_workers: int = 4, seed: int = 0, epoch: int = 0,
                         start_index: int = 0, num_replicas: int = 1, rank: int = 0, drop_last: bool = True,
                         shuffle: bool = True, pin_memory: Optional[bool] = None,
                         labels: Optional[bool] = False) -> DistillDataLoader:
    """A loader of encoded batches over the image folder ``root`` (or an :class:`EncodedImageFolder`)
    with the same sampler (and so the same samples, batches, resume and epoch semantics) as
    :func:`~fdistill.data.build_distill_loader`; decode them with :class:`DeviceDistillView`."""
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    dataset = root if isinstance(root, EncodedImageFolder) else EncodedImageFolder(root, labels=labels)
    sampler = ResumableDistributedSampler(len(dataset), num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                                          seed=seed, drop_last=drop_last, yield_epoch=True)
    if drop_last and sampler.num_samples < batch_size:
        raise DataError(f"{len(dataset)} samples give {sampler.num_samples} per rank, fewer than one batch of "
                        f"{batch_size}")
    sampler.set_epoch(epoch)
    sampler.set_start(start_index)
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
    kw = dict(prefetch_factor=4, persistent_workers=True) if num_workers > 0 else {}
    return DistillDataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                             collate_fn=collate_encoded, pin_memory=pin_memory, drop_last=drop_last,
                             generator=generator, **worker_options(num_workers), **kw)


def decode_images(payloads: Sequence[torch.Tensor], device: torch.device) -> List[Optional[torch.Tensor]]:
    """Payloads (1-d JPEG bytes or decoded (3, H, W) uint8) -> RGB uint8 (3, H, W) on ``device``.

    JPEGs are decoded in one batched call on ``device`` (nvJPEG on CUDA); if that call fails,
    each image is tried alone, then on the CPU. An image no decoder reads gives None."""
    device = torch.device(device)
    out: List[Optional[torch.Tensor]] = [None] * len(payloads)
    enc = [i for i, p in enumerate(payloads) if p.dim() == 1]
    if enc:
        try:
            dec = decode_jpeg([payloads[i] for i in enc], mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            dec = [_decode_one(payloads[i], device) for i in enc]
        for i, d in zip(enc, dec):
            out[i] = d
    for i, p in enumerate(payloads):
        if p.dim() == 3:
            out[i] = p.to(device, non_blocking=True)
    return out


def _decode_one(data: torch.Tensor, device: torch.device) -> Optional[torch.Tensor]:
    for dev in ([device, torch.device("cpu")] if device.type != "cpu" else [device]):
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=dev).to(device)
        except RuntimeError as e:
            log.warning("JPEG decoding on %s failed (%s)", dev, str(e).splitlines()[0][:120])
    return None


class DeviceDistillView:
    """The FD training view of an encoded batch, computed on the device: decode, then per image
    RandomResizedCrop + horizontal flip (draws identical to :class:`~fdistill.data.transforms.
    DistillView` for the same ``seed``) -> uint8 (B, 3, H, W).

    Args: as :func:`~fdistill.data.distill_transform`, and ``seed``, the dataset's augmentation
    seed (what ``build_distill_dataset(seed=...)`` would get)."""

    def __init__(self, img_size, *, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip: float = 0.5,
                 interpolation: str = "bilinear", seed: int = 0):
        self.view: DistillView = distill_transform(img_size, scale=scale, ratio=ratio, hflip=hflip,
                                                   interpolation=interpolation)
        self.seed = int(seed)

    def draws(self, sizes: Sequence[Tuple[int, int]], epochs: Sequence[int], indices: Sequence[int]) -> List[dict]:
        """Crop boxes and flips of samples with these (H, W) sizes: torchvision's draws from each
        sample's seed, exactly as the CPU view makes them. torch's global CPU generator is
        restored afterwards (training's RNG is untouched)."""
        gen = torch.default_generator
        state = gen.get_state()
        out = []
        try:
            for (h, w), e, i in zip(sizes, epochs, indices):
                gen.manual_seed(sample_seed(self.seed, int(e), int(i)))
                p = self.view._params([torch.empty((3, h, w), device="meta")])
                flip = bool(self.view.hflip > 0 and torch.rand(1) < self.view.hflip)
                out.append({"top": p["top"], "left": p["left"], "height": p["height"], "width": p["width"],
                            "flip": flip})
        finally:
            gen.set_state(state)
        return out

    def __call__(self, batch: dict, device) -> torch.Tensor:
        """An encoded batch (from :func:`build_encoded_loader`) -> views, uint8 (B, 3, H, W) on
        ``device``. An image no decoder can read is replaced by the batch's previous (or next)
        image and counted in ``batch["skipped"]``."""
        images = decode_images(batch["data"], device)
        bad = [i for i, im in enumerate(images) if im is None]
        if len(bad) == len(images):
            raise DataError("no image of the batch could be decoded")
        for i in bad:
            images[i] = next(images[j] for j in list(range(i - 1, -1, -1)) + list(range(i + 1, len(images)))
                             if images[j] is not None)
        batch["skipped"] = batch.get("skipped", 0) + len(bad)
        d = self.draws([tuple(im.shape[-2:]) for im in images], batch["epochs"].tolist(), batch["indices"].tolist())
        out = []
        for im, p in zip(images, d):
            v = v2.functional.resized_crop_image(im, p["top"], p["left"], p["height"], p["width"], self.view.size,
                                                 interpolation=self.view.interpolation, antialias=True)
            out.append(v.flip(-1) if p["flip"] else v)
        return torch.stack(out)  # (B, 3, H, W) uint8
