"""WebDataset tar shards: patterns, reading, bad samples, rank/worker split, per-sample views, resume."""
from __future__ import annotations

import io
import logging
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("webdataset")

from fdistill.data import DataError, WebShardDataset, build_distill_dataset, build_distill_loader  # noqa: E402
from fdistill.data.shards import expand_shards  # noqa: E402


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _add(tf, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def write_shards(root, n_shards=4, per_shard=6, bad=()):
    """Shards ``root/s-00000{k}.tar``; sample ``n`` (global) has label ``n`` and image seed ``n``."""
    n = 0
    for k in range(n_shards):
        with tarfile.open(root / f"s-{k:06d}.tar", "w") as tf:
            for _ in range(per_shard):
                _add(tf, f"{n:06d}.png", b"broken" if n in bad else _png(n))
                _add(tf, f"{n:06d}.cls", str(n).encode())
                n += 1
    return str(root / ("s-{000000..%06d}.tar" % (n_shards - 1)))


def _collect(loader):
    out = {}
    for b in loader:
        for lab, img in zip(b["labels"].tolist(), b["images"]):
            out[lab] = img.clone()
    return out


def test_patterns_expand(tmp_path):
    pattern = write_shards(tmp_path, n_shards=3)
    braces = expand_shards(pattern)
    assert [p.rsplit("/", 1)[1] for p in braces] == ["s-000000.tar", "s-000001.tar", "s-000002.tar"]
    assert expand_shards(str(tmp_path / "s-*.tar")) == braces
    assert expand_shards(f"{braces[0]}::{braces[2]}") == [braces[0], braces[2]]
    with pytest.raises(DataError, match="matches no file"):
        expand_shards(str(tmp_path / "x-*.tar"))


def test_reads_every_sample_with_labels(tmp_path):
    pattern = write_shards(tmp_path)
    ds = build_distill_dataset(pattern, img_size=8, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0)
    assert isinstance(ds, WebShardDataset)
    batches = list(build_distill_loader(ds, batch_size=4, num_workers=0, drop_last=False))
    labels = sorted(i for b in batches for i in b["labels"].tolist())
    assert labels == list(range(24))
    b = batches[0]
    assert b["images"].dtype == torch.uint8 and b["images"].shape == (4, 3, 8, 8)
    assert (b["indices"] == -1).all() and b["skipped"] == 0
    # the pixels are the stored image, resized (whole-image view)
    lab = int(b["labels"][0])
    ref = Image.open(io.BytesIO(_png(lab))).convert("RGB").resize((8, 8), Image.BICUBIC)
    diff = (b["images"][0].permute(1, 2, 0).int() - torch.from_numpy(np.array(ref)).int()).abs()
    assert diff.float().mean() < 12  # PIL vs torch bicubic-antialias differ slightly


def test_bad_samples_skipped_counted_logged(tmp_path, caplog):
    pattern = write_shards(tmp_path, n_shards=2, per_shard=5, bad={2, 7})
    ds = build_distill_dataset(pattern, img_size=8)
    with caplog.at_level(logging.WARNING):
        batches = list(build_distill_loader(ds, batch_size=2, num_workers=0, drop_last=False))
    labels = sorted(i for b in batches for i in b["labels"].tolist())
    assert labels == [0, 1, 3, 4, 5, 6, 8, 9] and sum(b["skipped"] for b in batches) == 2
    assert "000002" in caplog.text and "000007" in caplog.text


def test_views_independent_of_workers_and_ranks(tmp_path):
    pattern = write_shards(tmp_path)
    ds = build_distill_dataset(pattern, img_size=8, seed=5)
    zero = _collect(build_distill_loader(ds, batch_size=3, num_workers=0, drop_last=False, epoch=1))
    two = _collect(build_distill_loader(ds, batch_size=3, num_workers=2, drop_last=False, epoch=1))
    assert sorted(zero) == sorted(two) == list(range(24))
    assert all(torch.equal(zero[k], two[k]) for k in zero)
    ranks = [_collect(build_distill_loader(ds, batch_size=3, num_workers=0, drop_last=False, epoch=1,
                                           num_replicas=2, rank=r)) for r in range(2)]
    assert not set(ranks[0]) & set(ranks[1]) and set(ranks[0]) | set(ranks[1]) == set(range(24))
    assert all(torch.equal(ranks[r][k], zero[k]) for r in range(2) for k in ranks[r])
    other = _collect(build_distill_loader(ds, batch_size=3, num_workers=0, drop_last=False, epoch=2))
    assert sum(torch.equal(other[k], zero[k]) for k in zero) < 6  # a new epoch, new views


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch(tmp_path, workers):
    pattern = write_shards(tmp_path)  # 4 shards x 6: with 2 workers each has 12 samples = 4 batches of 3
    ds = build_distill_dataset(pattern, img_size=8, seed=1)
    ref = [b["labels"].tolist() for b in build_distill_loader(ds, batch_size=3, num_workers=workers, epoch=3)]
    assert len(ref) == 8
    for done in (1, 4, 5):
        resumed = build_distill_loader(ds, batch_size=3, num_workers=workers, epoch=3, start_index=done * 3)
        assert [b["labels"].tolist() for b in resumed] == ref[done:], done


def test_shard_errors(tmp_path):
    pattern = write_shards(tmp_path, n_shards=2)
    with pytest.raises(DataError, match="missing"):
        build_distill_dataset(str(tmp_path / "s-{000000..000003}.tar"), img_size=8)
    (tmp_path / "junk.tar").write_bytes(b"\x00not a tar" * 3)
    with pytest.raises(DataError, match="unreadable shard"):
        build_distill_dataset([str(tmp_path / "s-000000.tar"), str(tmp_path / "junk.tar")], img_size=8)
    ds = build_distill_dataset(pattern, img_size=8)
    with pytest.raises(DataError, match="ranks"):
        build_distill_loader(ds, batch_size=2, num_workers=0, num_replicas=3, rank=0)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_after_dropped_bad_samples(tmp_path, workers):
    """Bad samples before the resume point were dropped by the run: the resumed stream skips
    what the run *consumed* (readable samples), so it continues exactly where it stopped."""
    pattern = write_shards(tmp_path, bad=(1, 7, 13))  # one bad sample early in three shards
    ds = build_distill_dataset(pattern, img_size=8, seed=1)
    ref = [b["labels"].tolist() for b in build_distill_loader(ds, batch_size=3, num_workers=workers, epoch=0)]
    # 21 readable samples: 7 batches of 3; with 2 workers (10 and 11 readable) 3 full batches each
    assert len(ref) == (7 if workers == 0 else 6) and not {1, 7, 13} & {x for b in ref for x in b}
    for done in (1, 2, 3, 5):
        resumed = build_distill_loader(ds, batch_size=3, num_workers=workers, epoch=0, start_index=done * 3)
        assert [b["labels"].tolist() for b in resumed] == ref[done:], done


def test_16_bit_grey_shards_decode_as_image_folders_do(tmp_path):
    """A 16-bit grey PNG in a shard came out almost white (PIL's convert clips 0..65535 to 255);
    it must decode as the image-folder path does: scaled to 0..255 (issue 13 item 10)."""
    from fdistill.data.folder import open_rgb
    from fdistill.data.shards import _decode_image

    arr = (np.arange(20 * 20, dtype=np.uint16).reshape(20, 20) * 160)  # 0 .. 63 840
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith("I")  # really a 16-bit grey file
    (tmp_path / "g.png").write_bytes(buf.getvalue())
    got = np.asarray(_decode_image({"png": buf.getvalue()}))
    want = np.asarray(open_rgb(str(tmp_path / "g.png")))
    assert np.array_equal(got, want)
    # and the numbers are the scaled ones, worked out by hand: 63 840 * 255 / 65535 = 248.4 -> 248
    assert got[0, 0].tolist() == [0, 0, 0] and got[-1, -1].tolist() == [248, 248, 248]
    assert got.mean() < 200  # not the near-white image of the bug
