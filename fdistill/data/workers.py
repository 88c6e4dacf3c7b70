"""DataLoader worker processes that survive a pre-emption signal sent to the whole process group.

torchrun and SLURM signal every process of the job's group; a DataLoader worker then dies of
SIGTERM, and the training process, at its next batch, raises "DataLoader worker (pid ...) is
killed by signal: Terminated" before its own handler (:class:`fdistill.engine.signals.
StopRequest`) can write the pre-emption checkpoint. Workers therefore ignore the stop signals:
the training process alone decides when to stop, and its loader shuts the workers down as usual
(a worker also exits by itself when its parent is gone: PyTorch's worker watchdog).
"""
from __future__ import annotations

import signal

#: what clusters send to ask for a stop (SLURM --signal=USR1@N; torchrun forwards TERM/INT/HUP/QUIT)
STOP_SIGNALS = tuple(getattr(signal, s) for s in ("SIGTERM", "SIGINT", "SIGUSR1", "SIGHUP", "SIGQUIT")
                     if hasattr(signal, s))


def ignore_stop_signals(worker_id: int = 0) -> None:
    """``worker_init_fn`` of every fdistill loader: the stop signals are ignored in this worker."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
