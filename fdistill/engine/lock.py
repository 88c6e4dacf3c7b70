"""One run per output folder: an exclusive lock held for the whole run.

Two runs writing to one folder race on its files: the second one's start-up clean-up deleted the
first one's checkpoint being written (the first then crashed), and without that race both trained
and appended to the same ``metrics.jsonl``. The lock is ``fcntl.flock`` on ``<folder>/.fdistill.lock``:
the kernel releases it when the holding process exits, however it exits, so a crashed or killed run
never leaves a stale lock behind (the file itself stays and is reused). Written here because no
dependency offers a process lock with that guarantee in a few lines.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Optional

from .errors import RunError

LOCK_NAME = ".fdistill.lock"


class RunLock:
    """``with RunLock(folder):`` -- refuses (RunError) while another process holds ``folder``."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: Optional[int] = None

    def __enter__(self) -> "RunLock":
        import fcntl

        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunError(f"another fdistill run (pid {holder}) is using {self.folder}: wait for it to finish, "
                           "or give this run another output folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


@contextlib.contextmanager
def hold_run_lock(folder: str | os.PathLike, env) -> Iterator[None]:
    """The output folder's lock for a (possibly ``torchrun``) run: rank 0 takes it, and every
    rank learns whether it got it, so all raise together (a lone raise would leave the others
    waiting in their first collective)."""
    from .distributed import broadcast_object

    with contextlib.ExitStack() as stack:
        error = None
        if env.is_main:
            try:
                stack.enter_context(RunLock(Path(folder).expanduser()))
            except RunError as e:
                error = str(e)
        error = broadcast_object(error, env)
        if error:
            raise RunError(error)
        yield
