"""The one atomic file writer: everything fdistill writes that a crash must not leave half
written (checkpoints, weights, configs, metrics, reports, figures) goes through
:func:`atomic_path`. The data goes to a temporary file in the same folder, which is fsync'ed and
renamed over the final name (``os.replace`` is atomic on POSIX), and the folder is fsync'ed; on
any error the temporary file is removed and the old file, if any, is untouched. Temporary names
are ``.<name>.<pid>.tmp`` (a crashed write leaves one; :func:`fdistill.engine.checkpoint.
clean_partial_writes` removes those of checkpoints). This module imports nothing from the rest of
the package."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator, List

__all__ = ["atomic_path", "atomic_write_text", "atomic_write_json", "fsync_dir", "read_jsonl"]


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename in ``path`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str = "") -> Iterator[Path]:
    """``with atomic_path(p) as tmp: write(tmp)``: write to ``tmp``, and on success it becomes
    ``p`` durably and at once. ``suffix`` is appended to the temporary name for writers that
    choose the format by extension (matplotlib's ``savefig``: ``suffix=".png"``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int = 2, strict: bool = False) -> Path:
    """JSON, atomically. ``strict``: refuse NaN/Inf (``allow_nan=False``) instead of writing them."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, default=None if strict else str,
                                              allow_nan=not strict))


def read_jsonl(path: str | os.PathLike) -> List[Any]:
    """The records of a JSON-lines file (``metrics.jsonl``, ``log.jsonl``); a missing file is
    empty and a line cut by a crash is skipped."""
    p = Path(path)
    if not p.is_file():
        return []
    rows = []
    for line in p.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
