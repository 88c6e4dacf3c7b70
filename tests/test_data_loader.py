"""Sampler and loader: rank shards, resume, per-sample augmentation independent of workers/resume."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from fdistill.data import (DataError, ResumableDistributedSampler, SyntheticShapes, build_distill_dataset,
                           build_distill_loader, distill_transform, eval_transform, sample_seed, seeded)
from tests.conftest import CIFAR_MINI, need_shared


# ----------------------------------------------------------------------------- sampler

@pytest.mark.parametrize("n,world,drop_last", [(10, 3, True), (10, 3, False), (12, 4, True), (7, 1, True)])
def test_sampler_matches_torch_distributed_sampler(n, world, drop_last):
    for rank in range(world):
        ours = ResumableDistributedSampler(n, num_replicas=world, rank=rank, seed=5, drop_last=drop_last)
        ref = DistributedSampler(range(n), num_replicas=world, rank=rank, seed=5, drop_last=drop_last)
        for epoch in (0, 3):
            ours.set_epoch(epoch)
            ref.set_epoch(epoch)
            assert list(ours) == list(ref) and len(ours) == len(ref)


def test_rank_shards_disjoint_and_cover():
    n, world = 103, 4
    shards = []
    for rank in range(world):
        s = ResumableDistributedSampler(n, num_replicas=world, rank=rank, seed=1)
        s.set_epoch(2)
        shards.append(list(s))
    flat = [i for sh in shards for i in sh]
    assert len(flat) == len(set(flat)) == (n // world) * world  # disjoint, only the tail (3) dropped
    s = [ResumableDistributedSampler(n, num_replicas=world, rank=r, drop_last=False) for r in range(world)]
    assert set().union(*[set(x) for x in s]) == set(range(n))  # padding covers everything
    e0 = ResumableDistributedSampler(n, seed=1)
    e1 = ResumableDistributedSampler(n, seed=1)
    e1.set_epoch(1)
    assert list(e0) != list(e1) and sorted(e0) == sorted(e1)  # new order per epoch


def test_set_start_resumes_same_order():
    full = ResumableDistributedSampler(50, num_replicas=2, rank=1, seed=9)
    full.set_epoch(4)
    order = list(full)
    resumed = ResumableDistributedSampler(50, num_replicas=2, rank=1, seed=9)
    resumed.set_epoch(4)
    resumed.set_start(17)
    assert list(resumed) == order[17:] and len(resumed) == 25 - 17
    resumed.set_epoch(5)  # the next epoch starts from 0 again
    assert len(resumed) == 25
    st = ResumableDistributedSampler(50, num_replicas=2, rank=1, seed=9)
    st.load_state_dict({"epoch": 4, "start": 17, "seed": 9})
    assert list(st) == order[17:]
    with pytest.raises(ValueError):
        st.set_start(26)


def test_yield_epoch_tags():
    s = ResumableDistributedSampler(6, shuffle=False, yield_epoch=True)
    s.set_epoch(3)
    assert list(s) == [(3, i) for i in range(6)]


# ----------------------------------------------------------------------------- seeding

def test_sample_seed_and_seeded_restore_global_rng():
    assert sample_seed(0, 0, 5) == sample_seed(0, 0, 5)
    assert len({sample_seed(0, 0, 5), sample_seed(1, 0, 5), sample_seed(0, 1, 5), sample_seed(0, 0, 6),
                sample_seed(0, 0, "5")}) == 5
    torch.manual_seed(123)
    random.seed(1)
    np.random.seed(2)
    ref = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(123)
    random.seed(1)
    np.random.seed(2)
    with seeded(77):
        inside = (torch.rand(1), random.random(), np.random.rand())
    assert (torch.rand(3).tolist(), random.random(), np.random.rand()) == (ref[0].tolist(), ref[1], ref[2])
    with seeded(77):
        assert (torch.rand(1), random.random(), np.random.rand()) == inside


# ----------------------------------------------------------------------------- transforms

def test_distill_transform_uint8_and_seeded():
    img = SyntheticShapes(1, 48).sample(0)["image"]
    t = distill_transform(24)
    with seeded(1):
        a = t(img)
    with seeded(1):
        b = t(img)
    with seeded(2):
        c = t(img)
    assert a.dtype == torch.uint8 and a.shape == (3, 24, 24) and type(a) is torch.Tensor
    assert torch.equal(a, b) and not torch.equal(a, c)
    # scale=(1,1), ratio=(1,1), no flip: the whole image resized
    whole = distill_transform(48, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0)(img)
    assert torch.equal(whole, torch.from_numpy(np.array(img)).permute(2, 0, 1))
    flipped = distill_transform(48, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=1.0)(img)
    assert torch.equal(flipped, whole.flip(-1))
    with pytest.raises(DataError):
        distill_transform(24, scale=(0.5, 0.1))


def test_eval_transform_center_crop():
    arr = np.arange(40 * 40 * 3, dtype=np.uint8).reshape(40, 40, 3)
    out = eval_transform(32, crop_pct=1.0)(arr[4:36, 4:36])
    assert torch.equal(out, torch.from_numpy(arr[4:36, 4:36]).permute(2, 0, 1))  # identity at native size
    big = eval_transform(224)  # 224 / 0.875 = 256 short side, then centre 224
    x = torch.zeros(3, 300, 400, dtype=torch.uint8)
    assert big(x).shape == (3, 224, 224) and big(x).dtype == torch.uint8


# ----------------------------------------------------------------------------- loader

@pytest.fixture(scope="module")
def synth():
    return build_distill_dataset("synthetic:96", img_size=16, seed=3)


def _all(loader):
    return [{k: v.clone() if torch.is_tensor(v) else v for k, v in b.items()} for b in loader]


def _same(xs, ys):
    return len(xs) == len(ys) and all(torch.equal(a["images"], b["images"]) and torch.equal(a["indices"], b["indices"])
                                      for a, b in zip(xs, ys))


def test_batches_are_uint8_dicts(synth):
    b = next(iter(build_distill_loader(synth, batch_size=8, num_workers=0)))
    assert b["images"].dtype == torch.uint8 and b["images"].shape == (8, 3, 16, 16)
    assert b["labels"].dtype == torch.int64 and b["indices"].shape == (8,) and b["skipped"] == 0
    assert torch.equal(b["labels"], b["indices"] % 10)  # synthetic labels cycle through the classes


def test_workers_do_not_change_batches(synth):
    ref = _all(build_distill_loader(synth, batch_size=8, num_workers=0, seed=1, epoch=2))
    two = _all(build_distill_loader(synth, batch_size=8, num_workers=2, seed=1, epoch=2))
    assert len(ref) == 12 and _same(ref, two)
    other_epoch = _all(build_distill_loader(synth, batch_size=8, num_workers=0, seed=1, epoch=3))
    assert not torch.equal(ref[0]["images"], other_epoch[0]["images"])


def test_same_sample_same_view_regardless_of_position(synth):
    """The view of (epoch, index) does not depend on the shuffle order it appears in."""
    a = _all(build_distill_loader(synth, batch_size=96, num_workers=0, seed=1))[0]
    b = _all(build_distill_loader(synth, batch_size=96, num_workers=0, seed=2))[0]
    pa = {int(i): img for i, img in zip(a["indices"], a["images"])}
    pb = {int(i): img for i, img in zip(b["indices"], b["images"])}
    assert a["indices"].tolist() != b["indices"].tolist()
    assert all(torch.equal(pa[i], pb[i]) for i in pa)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_yields_the_remaining_batches(synth, workers):
    ref = _all(build_distill_loader(synth, batch_size=8, num_workers=0, seed=4, epoch=1))
    resumed = build_distill_loader(synth, batch_size=8, num_workers=workers, seed=4, epoch=1, start_index=5 * 8)
    assert len(resumed) == 7 and _same(ref[5:], _all(resumed))
    # the same loader object, moved to another epoch/position
    resumed.set_epoch(1, start_index=10 * 8)
    assert _same(ref[10:], _all(resumed))
    resumed.set_epoch(1)
    assert _same(ref, _all(resumed))


def test_distributed_ranks_partition_the_epoch(synth):
    seen = []
    for rank in range(3):
        ld = build_distill_loader(synth, batch_size=4, num_workers=0, num_replicas=3, rank=rank)
        assert ld.samples_per_epoch == 32 and ld.batches_per_epoch == 8
        seen += [i for b in ld for i in b["indices"].tolist()]
    assert sorted(seen) == list(range(96))


def test_loader_does_not_touch_global_rng(synth):
    torch.manual_seed(0)
    ref = torch.rand(2)
    torch.manual_seed(0)
    for workers in (0, 2):
        for _ in build_distill_loader(synth, batch_size=32, num_workers=workers):
            pass
    assert torch.equal(torch.rand(2), ref)


def test_plain_dataset_is_wrapped_and_checked():
    class Plain(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return torch.full((3, 4, 4), i, dtype=torch.uint8), i % 2

    b = next(iter(build_distill_loader(Plain(), batch_size=4, num_workers=0, shuffle=False)))
    assert b["images"][:, 0, 0, 0].tolist() == [0, 1, 2, 3] and b["labels"].tolist() == [0, 1, 0, 1]

    class Floats(Plain):
        def __getitem__(self, i):
            return torch.zeros(3, 4, 4), 0

    with pytest.raises(DataError, match="uint8"):
        next(iter(build_distill_loader(Floats(), batch_size=4, num_workers=0)))
    with pytest.raises(DataError, match="fewer than one batch"):
        build_distill_loader(Plain(), batch_size=16, num_workers=0)


def test_persistent_workers_follow_set_epoch(synth):
    loader = build_distill_loader(synth, batch_size=16, num_workers=2, persistent_workers=True, seed=2)
    assert loader.persistent_workers
    e0 = _all(loader)
    loader.set_epoch(1)
    e1 = _all(loader)
    loader.set_epoch(1, start_index=32)
    e1_resumed = _all(loader)
    ref1 = _all(build_distill_loader(synth, batch_size=16, num_workers=0, seed=2, epoch=1))
    assert _same(e1, ref1) and _same(e1_resumed, ref1[2:]) and not _same(e0, e1)


@pytest.mark.parametrize("hflip,interp", [(0.5, "bicubic"), (0.0, "bilinear"), (1.0, "nearest")])
def test_distill_view_equals_torchvision_v2_pipeline(hflip, interp):
    """The lean view draws the same random numbers and gives the same pixels as v2.Compose."""
    from torchvision.transforms import v2

    from fdistill.data.transforms import INTERPOLATIONS

    img = SyntheticShapes(1, 40).sample(0)["image"]
    ours = distill_transform((24, 20), scale=(0.2, 1.0), ratio=(0.6, 1.5), hflip=hflip, interpolation=interp)
    ops = [v2.PILToTensor(), v2.RandomResizedCrop((24, 20), scale=(0.2, 1.0), ratio=(0.6, 1.5),
                                                  interpolation=INTERPOLATIONS[interp], antialias=True)]
    if hflip > 0:
        ops.append(v2.RandomHorizontalFlip(hflip))
    ref = v2.Compose(ops)
    for s in range(30):
        with seeded(s):
            a, after_a = ours(img), torch.rand(1)
        with seeded(s):
            b, after_b = ref(img), torch.rand(1)
        assert torch.equal(a, b.as_subclass(torch.Tensor)) and torch.equal(after_a, after_b)


def test_default_num_workers_shares_cpus(monkeypatch):
    from fdistill.data import default_num_workers

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_num_workers() == 8  # capped
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert default_num_workers() == 4  # 16 CPUs shared by 4 torchrun processes
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert default_num_workers() == 0


@need_shared(CIFAR_MINI)
@pytest.mark.realdata
def test_cifar10_mini_distill_batches():
    ds = build_distill_dataset(CIFAR_MINI / "train", img_size=32, seed=0)
    loader = build_distill_loader(ds, batch_size=64, num_workers=2)
    assert loader.batches_per_epoch == 5000 // 64
    it = iter(loader)
    for _ in range(3):
        b = next(it)
        assert b["images"].shape == (64, 3, 32, 32) and b["skipped"] == 0 and (b["labels"] == -1).all()
        mean = b["images"].float().mean().item()
        assert 60 < mean < 190 and b["images"].float().std() > 30  # real photos, not blank crops
