"""Where log lines go: fdistill's own to the terminal, other libraries' chatter to the run's file.

open_clip, timm and friends log INFO lines through the root logger ("Parsing model identifier",
"Final image preprocessing configuration set", "Model ... creation process complete"); on the
terminal they drowned the progress and the results. The terminal shows fdistill's INFO lines and
every library's WARNING and above (``-v``: everything); a run's folder gets ``run.log`` with all
INFO lines, third-party ones included, for as long as the run lasts (:func:`run_log_file`).
Written here because the standard library's ``logging`` has the pieces but no policy.
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Iterator

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATEFMT = "%H:%M:%S"
RUN_LOG = "run.log"


class TerminalFilter(logging.Filter):
    """Pass fdistill's records at any enabled level, other loggers' from WARNING up."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.name == "fdistill" or record.name.startswith("fdistill.")


def configure_logging(verbose: bool = False) -> None:
    """The CLI's logging: INFO (``verbose``: DEBUG) on stderr, third-party INFO kept off it.
    Like ``logging.basicConfig`` it adds a handler only when the root logger has none (an
    application or a test harness that configured logging keeps its own)."""
    root = logging.getLogger()
    had_handlers = bool(root.handlers)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=FORMAT, datefmt=DATEFMT)
    if had_handlers or verbose:
        return
    for h in root.handlers:
        if not any(isinstance(f, TerminalFilter) for f in h.filters):
            h.addFilter(TerminalFilter())


@contextlib.contextmanager
def run_log_file(folder: str | os.PathLike, enabled: bool = True) -> Iterator[None]:
    """Append every INFO (and higher) line of any logger to ``<folder>/run.log`` while the block
    runs (``enabled=False``: no file, e.g. on ranks other than 0)."""
    if not enabled:
        yield
        return
    root = logging.getLogger()
    handler = logging.FileHandler(Path(folder) / RUN_LOG, encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter(FORMAT, "%Y-%m-%d %H:%M:%S"))
    old_level = root.level
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)  # third-party INFO records must be created to reach the file
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()
