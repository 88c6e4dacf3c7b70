"""Pre-emption: SIGTERM / SIGUSR1 ask the run to checkpoint and stop at the next step.

Clusters announce pre-emption with a signal (SLURM sends SIGTERM, or SIGUSR1 some seconds
before the time limit with ``--signal=USR1@120``; Kubernetes sends SIGTERM). The handler only
sets a flag -- nothing unsafe happens inside a signal handler -- and the training loop,
between two optimizer steps, writes a checkpoint and returns normally. Previous handlers are
put back when the context exits. Contexts nest: a stop seen by an inner one (a training loop) is
passed on to an enclosing one (a pipeline of several commands, such as ``reproduce-mini``), so
the pipeline stops too instead of treating the checkpointed stage as finished.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Dict, Iterator, Optional, Sequence

log = logging.getLogger(__name__)

DEFAULT_SIGNALS = tuple(s for s in ("SIGTERM", "SIGUSR1") if hasattr(signal, s))


class StopWhileWaiting(Exception):
    """Raised by the signal handler inside :meth:`StopRequest.interruptible`: a stop arrived
    while the loop was blocked waiting for data, which may take arbitrarily long (a stalled file
    system), so the wait is abandoned and the run checkpoints at once."""


class StopRequest:
    """Context manager that turns the given signals into a ``requested`` flag.

    >>> with StopRequest() as stop:
    ...     for step in ...:
    ...         train_step()
    ...         if stop.requested: save(); break
    """

    def __init__(self, signals: Sequence[str] = DEFAULT_SIGNALS):
        self.signals = tuple(signals)
        self.requested = False
        self.signame: Optional[str] = None
        self._previous: Dict[int, object] = {}
        self._interruptible = False

    def _handler(self, signum, frame) -> None:
        if not self.requested:
            self.signame = signal.Signals(signum).name
            log.warning("received %s: will checkpoint and stop after the current step", self.signame)
        self.requested = True
        outer = self._previous.get(signum)
        if isinstance(getattr(outer, "__self__", None), StopRequest):  # an enclosing StopRequest
            outer(signum, frame)
        if self._interruptible:  # blocked waiting for data: abandon the wait (see interruptible)
            self._interruptible = False
            raise StopWhileWaiting(self.signame)

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """Code that may wait without bound and holds no state worth keeping (fetching the next
        batch from a loader that will be abandoned): a stop signal arriving inside raises
        :class:`StopWhileWaiting` there, so the stop is honoured at once instead of when the
        data comes. A stop requested before entering raises it at once too."""
        if self.requested:
            raise StopWhileWaiting(self.signame)
        self._interruptible = True
        try:
            yield
        finally:
            self._interruptible = False

    def request(self, reason: str = "requested") -> None:
        """Ask for a stop without a signal (e.g. from a test or another thread)."""
        self.signame = self.signame or reason
        self.requested = True

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # handlers only install there
            for name in self.signals:
                num = getattr(signal, name)
                self._previous[num] = signal.signal(num, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for num, prev in self._previous.items():
            signal.signal(num, prev)
        self._previous.clear()
