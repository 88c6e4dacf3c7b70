"""WebDataset tar shards: data too big for a file-system listing.

A shard is a tar of samples grouped by key (``000123.jpg`` + optional ``000123.cls``), as
written by ``webdataset.ShardWriter`` or ``tarp``. Shards are given as a brace pattern
(``/data/in1k-{000000..001023}.tar``), a glob (``/data/in1k-*.tar``), several patterns
joined by ``::``, or a list.

Streaming order, per epoch: the shard list is shuffled with ``seed + epoch``, split by rank
(``shards[rank::world]``) and then by DataLoader worker (``[worker::num_workers]``); each
worker reads its shards in order, and the DataLoader takes batches from the workers in turn.
Reading tars and expanding patterns is ``webdataset``'s (optional dependency, the
``webdataset`` extra); decoding (PIL), the bad-sample policy and the per-sample seeding are
the same as for image folders.

Resume: :meth:`WebShardDataset.set_start` makes each worker skip the batches the DataLoader had
taken from its stream (batch ``j`` comes from worker ``j % num_workers``), and rotates the
streams so the round robin continues where it stopped. Skipped samples are decoded (not
augmented) so that unreadable ones, which the run dropped, are not counted: the cost is one
decode per skipped sample, paid once per resume. This is exact for the same ``num_workers``
while every worker still has data, i.e. everywhere except the last, partial round of an epoch
when workers hold unequal numbers of samples.

The stream of a rank is fixed by the *layout* ``(world size, DataLoader workers, batch size per
rank)``: which shards a worker reads and which batches the DataLoader takes from it follow from
it. Mid-epoch, a resume under another layout would skip samples that were never seen and
repeat others (the old run's workers read other shard groups), so it is refused:
:func:`check_resume_layout`, called by the training engine. ``num_workers`` 0 and 1 are the same
layout (one stream per rank). At an epoch boundary any layout is accepted: the next epoch is
the one a run started under the new layout reads. (Making another layout exact mid-epoch would
need every shard's sample count, i.e. reading all shards the old workers had started.)
"""
from __future__ import annotations

import glob
import io
import logging
import os
import random
import tarfile
from typing import Callable, Iterator, List, Optional, Sequence, Union

from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from .errors import DataError
from .folder import to_rgb
from .seeding import sample_seed, seeded

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "ppm")
LABEL_KEYS = ("cls", "label", "cls.txt")
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
#: shards whose tar header is opened at build time (all are checked to exist)
MAX_HEADER_CHECKS = 64


def _require_webdataset():
    try:
        import webdataset  # noqa: F401
    except ImportError:
        raise DataError("reading tar shards needs the optional dependency webdataset: "
                        "pip install 'fdistill[webdataset]'") from None
    return webdataset


def looks_like_shards(spec: Union[str, Sequence[str]]) -> bool:
    """True for a list of shards or a pattern / path naming ``.tar`` files."""
    if not isinstance(spec, str):
        return True
    return any(part.strip().endswith(SHARD_SUFFIXES) or part.strip().endswith(SHARD_SUFFIXES[0] + "}")
               for part in spec.split("::"))


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def expand_shards(spec: Union[str, Sequence[str]]) -> List[str]:
    """Brace-expand, then glob (local paths with ``*?[``), keeping the order given."""
    wds = _require_webdataset()
    patterns = list(spec) if not isinstance(spec, str) else wds.shardlists.expand_urls(spec)
    urls: List[str] = []
    for p in patterns:
        p = os.path.expanduser(p) if _is_local(p) else p
        if _is_local(p) and any(c in p for c in "*?["):
            hits = sorted(glob.glob(p))
            if not hits:
                raise DataError(f"shard pattern {p!r} matches no file")
            urls.extend(hits)
        else:
            urls.append(p)
    if not urls:
        raise DataError(f"shard spec {spec!r} names no shard")
    return urls


def check_shards(urls: Sequence[str]) -> None:
    """Every local shard exists; the headers of up to :data:`MAX_HEADER_CHECKS` of them (spread
    over the list) read as tar. Remote URLs are left to reading time."""
    local = [u for u in urls if _is_local(u)]
    missing = [u for u in local if not os.path.isfile(u)]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise DataError(f"{len(missing)} of {len(urls)} shard(s) missing: {', '.join(missing[:3])}{more}")
    step = max(1, len(local) // MAX_HEADER_CHECKS)
    for u in local[::step]:
        try:
            with tarfile.open(u, mode="r:*") as tf:
                first = tf.next()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(f"unreadable shard {u!r}: {type(e).__name__}: {e}") from None
        if first is None:
            raise DataError(f"shard {u!r} is an empty tar")


def _decode_image(sample: dict) -> Image.Image:
    for k in IMAGE_KEYS:
        if k in sample:
            with Image.open(io.BytesIO(sample[k])) as im:
                im.load()
                return to_rgb(im)  # as image folders decode: 16-bit grey scaled, not clipped to white
    raise ValueError(f"no image in sample (keys {sorted(k for k in sample if not k.startswith('__'))}, "
                     f"expected one of {IMAGE_KEYS})")


def _decode_label(sample: dict) -> int:
    for k in LABEL_KEYS:
        if k in sample:
            try:
                return int(sample[k].decode("utf-8").strip())
            except ValueError:
                return -1
    return -1


def stream_layout(*, world_size: int, num_workers: int, batch_size: int) -> dict:
    """The values that fix a rank's shard stream (see the module doc); ``num_workers`` 0 (the
    main process reads) counts as 1 worker: both read all of the rank's shards in order."""
    return {"world_size": int(world_size), "num_workers": max(1, int(num_workers)), "batch_size": int(batch_size)}


def check_resume_layout(saved: dict, now: dict, *, samples_in_epoch: int, epoch: int = 0) -> None:
    """Refuse to resume a shard stream mid-epoch under another :func:`stream_layout`.

    ``saved``/``now``: the layouts of the checkpointed run and of this one;
    ``samples_in_epoch``: what all ranks had consumed of the epoch (0: an epoch boundary,
    where any layout is fine). Raises :class:`DataError` naming each value that differs."""
    if int(samples_in_epoch) == 0:
        return
    raw = dict(saved)
    saved, now = stream_layout(**saved), stream_layout(**now)
    names = {"world_size": "processes", "num_workers": "data.num_workers (0 counts as 1)",
             "batch_size": "data.batch_size"}
    fixes = {"world_size": f"{saved['world_size']} process(es)", "num_workers": f"data.num_workers={raw['num_workers']}",
             "batch_size": f"data.batch_size={saved['batch_size']}"}
    differ = [k for k in names if saved[k] != now[k]]
    if differ:
        raise DataError(
            f"cannot resume tar-shard data in the middle of epoch {epoch} ({samples_in_epoch} samples consumed) "
            f"with another stream layout ({'; '.join(f'{names[k]}: {saved[k]} in the checkpoint, {now[k]} now' for k in differ)}): "
            "each DataLoader worker of each process streams its own group of shards, so another split would "
            f"repeat some samples and never show others. Resume with {', '.join(fixes[k] for k in differ)} "
            "(the layout may change at an epoch boundary), or start a new run.")


class WebShardDataset(IterableDataset):
    """Samples streamed from tar shards, transformed with a per-sample seed.

    Yields the same dicts as the map-style :class:`~fdistill.data.loader.DistillDataset`:
    ``image`` (the transform's output), ``label`` (``.cls`` or -1), ``index`` (-1: streams have
    no global index), ``skipped`` (bad samples stepped over just before this one). A sample's
    augmentation is seeded by ``(seed, epoch, "<shard file name>/<key>")``: independent of
    workers, ranks and resume.

    Args:
        urls: pattern(s) or list (see module doc); checked at construction (``check=True``).
        transform: PIL RGB -> tensor (e.g. :func:`~fdistill.data.transforms.distill_transform`).
        seed: augmentation and shard-shuffle seed.
        shuffle_shards: shuffle the shard order per epoch.
    """

    def __init__(self, urls: Union[str, Sequence[str]], transform: Optional[Callable] = None, *, seed: int = 0,
                 shuffle_shards: bool = True, check: bool = True):
        self.spec = urls
        self.urls = expand_shards(urls)
        if check:
            check_shards(self.urls)
        self.transform, self.seed, self.shuffle_shards = transform, int(seed), bool(shuffle_shards)
        self.epoch, self.start = 0, 0
        self.num_replicas, self.rank, self.batch_size = 1, 0, 1

    def __repr__(self) -> str:
        return f"WebShardDataset({len(self.urls)} shards, seed={self.seed})"

    def configure(self, *, num_replicas: int = 1, rank: int = 0, batch_size: int = 1) -> None:
        """Set the rank split and the batch size (needed to resume); called by the loader."""
        if num_replicas > len(self.urls):
            raise DataError(f"{len(self.urls)} shard(s) cannot feed {num_replicas} ranks: split the data into "
                            f"at least one shard per rank (better: several per DataLoader worker)")
        self.num_replicas, self.rank, self.batch_size = int(num_replicas), int(rank), int(batch_size)

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) != self.epoch:
            self.start = 0
        self.epoch = int(epoch)

    def set_start(self, index: int) -> None:
        """Resume after this rank consumed ``index`` samples of the epoch (rounded down to
        whole batches)."""
        if index < 0:
            raise ValueError(f"start must be >= 0, got {index}")
        self.start = int(index)

    def shards_for(self, worker: int = 0, num_workers: int = 1) -> List[str]:
        """The shards one worker of this rank reads this epoch, in order."""
        order = list(self.urls)
        if self.shuffle_shards:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order[self.rank::self.num_replicas][worker::num_workers]

    def __iter__(self) -> Iterator[dict]:
        wds = _require_webdataset()
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # resume: in the uninterrupted epoch batch j came from worker j % num_workers. The DataLoader
        # restarts its round robin at worker 0, so worker w takes over the stream of worker
        # (w + done) % num_workers, skipping (undecoded) the batches that worker had delivered.
        done = self.start // max(1, self.batch_size)
        role = (worker + done) % num_workers
        shards = self.shards_for(role, num_workers)
        if not shards:
            if worker == 0:
                log.warning("rank %d has no shard this epoch", self.rank)
            return
        skip = max(0, -(-(done - role) // num_workers)) * self.batch_size

        def handler(exn: Exception) -> bool:
            log.warning("skipping unreadable shard data (%s: %s)", type(exn).__name__, exn)
            return True

        pending_bad = 0
        restore_rng = info is None  # restore the global RNGs only in the main process
        stream = wds.tariterators.tarfile_samples([{"url": u} for u in shards], handler=handler)
        for sample in stream:
            url, key = sample.get("__url__", "?"), sample.get("__key__", "?")
            try:
                # decoded while skipping too: the run consumed *readable* samples, and only decoding
                # tells which ones were (a dropped bad sample would otherwise shift the stream)
                img = _decode_image(sample)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                if skip <= 0:
                    pending_bad += 1
                    log.warning("skipping unreadable image %s in shard %s (%s: %s)", key, url, type(e).__name__, e)
                continue
            if skip > 0:  # resumed: already consumed (decoded, not augmented)
                skip -= 1
                continue
            with seeded(sample_seed(self.seed, self.epoch, f"{os.path.basename(url)}/{key}"), restore=restore_rng):
                image = self.transform(img) if self.transform is not None else img
            yield {"image": image, "label": _decode_label(sample), "index": -1, "skipped": pending_bad}
            pending_bad = 0
        if pending_bad:
            log.warning("%d unreadable sample(s) at the end of worker %d's shards", pending_bad, worker)
