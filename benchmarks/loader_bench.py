"""Time the distillation data loader alone: is it fast enough to feed the step?

The loader is ``fdistill``'s own (:func:`~fdistill.data.build_distill_dataset` +
:func:`~fdistill.data.build_distill_loader`: worker processes, pinned memory on CUDA,
persistent workers, uint8 batches), on a real image folder when one is given, else on the
synthetic dataset (rendered images: a different cost from decoding files). With
``gpu_decode`` the workers only read the JPEG files and the batch is decoded and cropped on
the device (:mod:`fdistill.data.gpu_decode`); that time is included.
"""
from __future__ import annotations

import time
from typing import Optional

import torch

from fdistill.data import build_distill_dataset, build_distill_loader
from fdistill.data.loader import default_num_workers

from .measure import sync


def time_loader(data: str, *, img_size: int, batch: int, batches: int = 20, num_workers: Optional[int] = None,
                device: torch.device = torch.device("cpu"), gpu_decode: bool = False, seed: int = 0) -> dict:
    """Images per second of the loader over ``batches`` batches, after its first batch (worker
    start-up, reported separately), including the copy to ``device``."""
    workers = default_num_workers() if num_workers is None else int(num_workers)
    pin = device.type == "cuda"
    if gpu_decode:
        from fdistill.data.gpu_decode import DeviceDistillView, build_encoded_loader

        loader = build_encoded_loader(data, batch_size=batch, num_workers=workers, seed=seed, pin_memory=pin)
        view = DeviceDistillView(img_size, seed=seed)

        def to_images(b):
            return view(b, device)
    else:
        dataset = build_distill_dataset(data, img_size=img_size, seed=seed)
        loader = build_distill_loader(dataset, batch_size=batch, num_workers=workers, seed=seed, pin_memory=pin)

        def to_images(b):
            return b["images"].to(device, non_blocking=True)

    per_epoch = loader.batches_per_epoch or batches + 1
    batches = max(1, min(batches, per_epoch - 1))
    t0 = time.perf_counter()
    it = iter(loader)
    to_images(next(it))
    sync(device)
    startup = time.perf_counter() - t0
    n = 0
    t0 = time.perf_counter()
    for _ in range(batches):
        x = to_images(next(it))
        n += x.shape[0]
    sync(device)
    dt = time.perf_counter() - t0
    del it
    return {"images_per_s": n / dt, "batches": batches, "num_workers": workers, "startup_s": startup,
            "data": str(data), "gpu_decode": bool(gpu_decode)}
