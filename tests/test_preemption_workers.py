"""Pre-emption as clusters send it: SIGTERM to the whole process group, DataLoader workers included.

Before the fix the workers died of the signal and the training process raised "DataLoader worker
(pid ...) is killed by signal: Terminated" instead of writing its pre-emption checkpoint.
"""
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.fault_review import wait_for
from fdistill.data.workers import STOP_SIGNALS, ignore_stop_signals

REPO = Path(__file__).resolve().parents[1]
FDISTILL = [sys.executable, "-m", "fdistill.cli.main"]


def _start(argv, log):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.Popen(FDISTILL + argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)  # its own process group, as under torchrun / SLURM




def _run_until_then_sigterm_the_group(argv, ready, log_path):
    """Start ``fdistill argv`` in its own process group, wait for ``ready()``, SIGTERM the whole
    group (the run and its loader workers); return (exit code, log text)."""
    with open(log_path, "w") as log:
        proc = _start(argv, log)
        try:
            assert wait_for(ready, proc, timeout=240.0), log_path.read_text()[-3000:]
            os.killpg(proc.pid, signal.SIGTERM)
            rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    text = log_path.read_text()
    assert "is killed by signal" not in text
    return rc, text


def test_workers_ignore_the_stop_signals():
    """The worker_init_fn itself (run here, in a child, so the test process keeps its handlers)."""
    code = ("import os, signal; from fdistill.data.workers import ignore_stop_signals; ignore_stop_signals(0); "
            "os.kill(os.getpid(), signal.SIGTERM); os.kill(os.getpid(), signal.SIGUSR1); print('alive')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "alive"
    assert signal.SIGTERM in STOP_SIGNALS and signal.SIGUSR1 in STOP_SIGNALS and callable(ignore_stop_signals)


_LOADER = """
import os, signal, sys, torch
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data._utils import signal_handling
from fdistill.data.workers import worker_options
"""


def _python(code, timeout=90):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=env)


def test_a_stop_signal_in_the_workers_start_up_window_is_discarded():
    """The race of the intermittent failure: a group SIGTERM reaching a worker after PyTorch has
    installed its worker SIGTERM handler (which dies of any SIGTERM not from the parent) and before
    the ``worker_init_fn`` ignores it. Here every worker signals itself exactly in that window."""
    code = _LOADER + """
install = signal_handling._set_worker_signal_handlers
def install_then_signal(*a):
    install(*a)
    os.kill(os.getpid(), signal.SIGTERM)  # as a killpg arriving at this instant would
    os.kill(os.getpid(), signal.SIGUSR1)
signal_handling._set_worker_signal_handlers = install_then_signal
loader = DataLoader(TensorDataset(torch.arange(64.)), batch_size=8, num_workers=2, **worker_options(2))
print(sum(len(b[0]) for b in loader), sum(len(b[0]) for b in loader))
"""
    out = _python(code)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["64", "64"]  # both epochs complete: no worker died
    # the parent's own mask is restored after starting the workers
    mask = _python(_LOADER + """
loader = DataLoader(TensorDataset(torch.arange(8.)), batch_size=4, num_workers=1, **worker_options(1))
list(loader); print(sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])))""")
    assert mask.returncode == 0 and mask.stdout.split() == ["[]"], (mask.stdout, mask.stderr[-2000:])


def test_workers_still_alive_at_exit_do_not_hang_the_exit():
    """A worker that ignores SIGTERM ignores multiprocessing's exit-time terminate() too, which then
    joins it without a timeout: a loader still alive at exit (here a global; an uncaught exception's
    traceback does the same) hung the process for ever."""
    code = _LOADER + """
loader = DataLoader(TensorDataset(torch.arange(4096.)), batch_size=8, num_workers=2, **worker_options(2))
it = iter(loader)
next(it)
print("exiting", flush=True)
"""
    out = _python(code, timeout=60)  # raises TimeoutExpired when the exit hangs
    assert out.returncode == 0 and out.stdout.strip() == "exiting", out.stderr[-2000:]


def test_loaders_without_workers_take_the_options():
    from torch.utils.data import DataLoader, TensorDataset
    from fdistill.data.workers import worker_options
    assert "multiprocessing_context" not in worker_options(0)  # PyTorch refuses it without workers
    assert [len(b[0]) for b in DataLoader(TensorDataset(torch.arange(6.)), batch_size=4, **worker_options(0))] == [4, 2]


def test_distill_with_workers_checkpoints_on_a_process_group_sigterm(tmp_path):
    out = tmp_path / "run"
    argv = ["distill", "--config", "configs/distill/tiny_cpu.yaml", "--output", str(out), "data.num_workers=2",
            "data.path=synthetic:20000", "train.epochs=50", "train.ckpt_interval=4", "train.log_interval=2"]
    rc, text = _run_until_then_sigterm_the_group(argv, lambda: any((out / "checkpoints").glob("ckpt_*.pt")),
                                                 tmp_path / "log.txt")
    assert rc == 0, text[-3000:]
    assert "stopped by SIGTERM" in text, text[-3000:]
    ckpts = sorted((out / "checkpoints").glob("ckpt_*.pt"))
    step = int(text.split("stopped by SIGTERM at step ")[1].split("/")[0])
    assert ckpts and any(int(p.stem.split("_")[1]) == step for p in ckpts), \
        ([p.name for p in ckpts], step)
    ck = torch.load(ckpts[-1], map_location="cpu", weights_only=True)
    assert int(ck["progress"]["step"]) == step


def test_finetune_with_workers_checkpoints_on_a_process_group_sigterm(tmp_path):
    out = tmp_path / "ft"
    log_path = tmp_path / "log.txt"
    kw = '{"pretrained": false, "img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}'
    argv = ["finetune", "--config", "configs/finetune/tiny_cpu.yaml", "--model", "timm:vit_tiny_patch16_224",
            "--model-kwargs", kw, "--train", "synthetic:20000", "--output", str(out), "data.num_workers=2",
            "epochs=50", "log_interval=1"]
    metrics = out / "metrics.jsonl"  # the first step's record (log_interval=1): the loop is running
    rc, text = _run_until_then_sigterm_the_group(argv, lambda: metrics.is_file() and metrics.read_text().strip() != "",
                                                 log_path)
    assert rc == 0, text[-3000:]
    ckpts = sorted((out / "checkpoints").glob("ckpt_*.pt"))
    assert ckpts, text[-3000:]
    ck = torch.load(ckpts[-1], map_location="cpu", weights_only=True)
    assert int(ck["progress"]["step"]) > 0 and "stopped by SIGTERM" in text
