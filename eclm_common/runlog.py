"""A command's log file: what libraries print goes there; the terminal keeps what the
command itself prints (progress, results, where its outputs went) and its errors.

Python log records and warnings reach the file through ``logging``. Native code
(TensorFlow Lite's "Created ... XNNPACK delegate", absl, cpuinfo, torchao's loaders)
writes to file descriptor 2 directly, so fd 2 *is* the file for the duration, while
``sys.stderr`` is pointed at a copy of the terminal's descriptor: progress bars and error
messages written from Python still show. Handlers that kept the old ``sys.stderr``
object (torch's own logging handler) write to fd 2, i.e. the file, too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@contextlib.contextmanager
def routed_to(path: Path, *, verbose: bool = False) -> Iterator[Path]:
    """Send library output to ``path`` (appended) while the block runs; ``verbose``: keep
    it all on the terminal instead. If the block raises, the traceback goes to the file
    and the terminal is told where the file is; the exception propagates."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if verbose:
        yield path
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved_fd = os.dup(2)
    saved_stderr = sys.stderr
    terminal = os.fdopen(os.dup(2), "w", buffering=1, errors="backslashreplace")
    sink = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    root = logging.getLogger()
    handlers = root.handlers[:]
    file_handler = logging.FileHandler(path, encoding="utf-8")
    file_handler.setFormatter(logging.Formatter(FORMAT))
    os.dup2(sink, 2)
    os.close(sink)
    sys.stderr = terminal
    root.handlers = [file_handler]
    logging.captureWarnings(True)
    try:
        yield path
    except BaseException as exc:
        if not isinstance(exc, SystemExit | KeyboardInterrupt):
            logging.getLogger("eclm").error("failed", exc_info=True)
        print(f"(the full log: {path})", file=terminal, flush=True)
        raise
    finally:
        logging.captureWarnings(False)
        root.handlers = handlers
        file_handler.close()
        sys.stdout.flush()
        sys.stderr = saved_stderr
        terminal.close()
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
