"""DataLoader worker processes that survive a pre-emption signal sent to the whole process group.

torchrun and SLURM signal every process of the job's group; a DataLoader worker then dies of
SIGTERM, and the training process, at its next batch, raises "DataLoader worker (pid ...) is
killed by signal: Terminated" before its own handler (:class:`fdistill.engine.signals.
StopRequest`) can write the pre-emption checkpoint. Workers therefore ignore the stop signals:
the training process alone decides when to stop.

Three details make that hold every time, not only most of the time (pass :func:`worker_options`
to every ``DataLoader``):

- *No window at start-up.* A ``worker_init_fn`` runs only after PyTorch has installed its own
  SIGTERM handler in the new worker, which dies of any SIGTERM not sent by its parent; a signal
  arriving in between killed the worker. Workers are therefore started with the stop signals
  blocked (:class:`StopSafeProcess`, through the loader's ``multiprocessing_context``), and the
  ``worker_init_fn`` ignores them before unblocking: a signal that arrived meanwhile is discarded.
- *No hang at exit.* A worker that ignores SIGTERM also ignores the ``terminate()`` with which
  multiprocessing ends daemon children at interpreter exit, and then waits in ``join()`` for ever
  when a loader was still alive at exit (e.g. held by an uncaught exception's traceback). Workers
  still alive at exit are therefore killed (SIGKILL) first: at exit their batches are worthless.
- A worker whose parent is gone exits by itself (PyTorch's worker watchdog).

Written here because PyTorch's loader has no option for either: its own handler is what makes
workers die of a group SIGTERM.
"""
from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.util  # noqa: F401  (registers its exit handler before ours: ours runs first)
import signal
import weakref
from typing import Any, Dict

#: what clusters send to ask for a stop (SLURM --signal=USR1@N; torchrun forwards TERM/INT/HUP/QUIT)
STOP_SIGNALS = tuple(getattr(signal, s) for s in ("SIGTERM", "SIGINT", "SIGUSR1", "SIGHUP", "SIGQUIT")
                     if hasattr(signal, s))

_STARTED: "weakref.WeakSet" = weakref.WeakSet()  # workers started by this process, for the exit hook


def ignore_stop_signals(worker_id: int = 0) -> None:
    """``worker_init_fn`` of every fdistill loader: the stop signals are ignored in this worker
    (and unblocked, after :class:`StopSafeProcess` started it with them blocked; one that arrived
    in between is discarded, as POSIX does for a pending signal set to be ignored)."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


_BASE = multiprocessing.get_context()  # the platform's default start method, as at import


class StopSafeProcess(_BASE.Process):  # type: ignore[name-defined,misc]
    """A loader worker started with the stop signals blocked. A fork, or the fork + exec of
    spawn, keeps the starting thread's signal mask, so no stop signal is delivered before
    :func:`ignore_stop_signals` has run in the worker (forkserver: the server started by the first
    such worker keeps the mask too; one started earlier by other code does not)."""

    def start(self) -> None:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            super().start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        _STARTED.add(self)


class StopSafeContext(type(_BASE)):  # type: ignore[misc]
    """The default multiprocessing context, its processes being :class:`StopSafeProcess`."""
    Process = StopSafeProcess


_CONTEXT = StopSafeContext()


def worker_options(num_workers: int) -> Dict[str, Any]:
    """The ``DataLoader`` keyword arguments every fdistill loader passes: workers that ignore the
    stop signals from their first instruction (``multiprocessing_context`` exists only with
    workers: PyTorch refuses it with ``num_workers=0``)."""
    opts: Dict[str, Any] = {"worker_init_fn": ignore_stop_signals}
    if int(num_workers) > 0:
        opts["multiprocessing_context"] = _CONTEXT
    return opts


@atexit.register
def _kill_workers_left_at_exit() -> None:
    """Registered after multiprocessing's own exit handler, so it runs first: that handler
    ``terminate()``s daemon children (ignored here) and then joins them without a timeout.
    PyTorch's SIGCHLD handler, which raises when a worker dies of a signal, is put aside first:
    at exit a killed worker is what is wanted, and its error would stop the killing half-way."""
    live = []
    for proc in list(_STARTED):
        try:
            if proc.is_alive():
                live.append(proc)
        except (AssertionError, ValueError):  # not this process's child (a worker's copy), or closed
            pass
    if not live:
        return
    if hasattr(signal, "SIGCHLD"):
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for proc in live:
        try:
            proc.kill()
        except OSError:  # already gone
            pass
    for proc in live:
        proc.join(timeout=5)
