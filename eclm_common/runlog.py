"""A command's log file: what libraries print goes there; the terminal keeps what the
command itself prints (progress, results, where its outputs went) and its errors.

Native code (TensorFlow Lite's "Created ... XNNPACK delegate", absl, cpuinfo) writes to
file descriptor 2 directly, so fd 2 *is* the file for the duration. ``sys.stderr`` is a
stand-in that writes to a copy of the terminal's descriptor, so progress bars and error
messages from Python still show, except what a logging handler writes through it: those
are log records (a library's own handler, such as the one torch makes at import, keeps
the stream it found), so they go to the file. Python warnings become log records.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _Stderr(io.TextIOBase):
    """``sys.stderr`` during the block: the terminal, log records to the log file; after
    it (handlers made during it still hold this), whatever stderr was before."""

    def __init__(self, terminal, logfile, after) -> None:
        self._terminal, self._logfile, self._after = terminal, logfile, after
        self.active = True

    def _target(self, caller):
        if not self.active:
            return self._after
        return self._logfile if caller.f_globals.get("__name__") == "logging" else self._terminal

    def write(self, text: str) -> int:
        target = self._target(sys._getframe(1))
        target.write(text)
        if target is self._terminal:
            target.flush()  # progress bars redraw in place
        return len(text)

    def flush(self) -> None:
        for stream in (self._terminal, self._logfile) if self.active else (self._after,):
            stream.flush()

    def fileno(self) -> int:
        return (self._terminal if self.active else self._after).fileno()

    def isatty(self) -> bool:
        return (self._terminal if self.active else self._after).isatty()

    @property
    def encoding(self) -> str:
        return self._terminal.encoding


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
    saved_fd, saved_stderr = os.dup(2), sys.stderr
    terminal = os.fdopen(os.dup(2), "w", errors="backslashreplace")
    logfile = open(path, "a", encoding="utf-8", errors="backslashreplace")
    stand_in = _Stderr(terminal, logfile, saved_stderr)
    root = logging.getLogger()
    handlers = root.handlers[:]
    handler = logging.StreamHandler(stand_in)
    handler.setFormatter(logging.Formatter(FORMAT))
    os.dup2(logfile.fileno(), 2)
    sys.stderr = stand_in
    root.handlers = [handler]
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
        stand_in.flush()
        stand_in.active = False
        sys.stderr = saved_stderr
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
        terminal.close()
        logfile.close()
