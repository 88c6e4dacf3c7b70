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

import logging
import signal
import threading
from typing import Dict, Optional, Sequence

log = logging.getLogger(__name__)

DEFAULT_SIGNALS = tuple(s for s in ("SIGTERM", "SIGUSR1") if hasattr(signal, s))


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

    def _handler(self, signum, frame) -> None:
        if not self.requested:
            self.signame = signal.Signals(signum).name
            log.warning("received %s: will checkpoint and stop after the current step", self.signame)
        self.requested = True
        outer = self._previous.get(signum)
        if isinstance(getattr(outer, "__self__", None), StopRequest):  # an enclosing StopRequest
            outer(signum, frame)

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
