"""Processes that end with the one that started them.

Every process the project starts (export workers, the integration job's ranks, brokers,
agents, services started by a harness) must end when its starter is gone, however that
ended: SIGKILL runs no clean-up, and a container without an init or a supervisor that
kills only the main process would otherwise collect orphans (an export worker holds
hundreds of MB).

Two mechanisms, because neither covers every case alone:

- Linux's parent-death signal (``prctl(PR_SET_PDEATHSIG)``), sent by the kernel the moment
  the parent goes. It fires when the *thread* that started the child ends, so it is only
  set for children started from the main thread, whose end is the process's end.
- A watchdog thread in Python children that polls ``os.getppid()``: an orphan is
  re-parented, so a changed parent means the starter is gone (where a shell stands
  between the two, it polls whether the starter's pid still exists). It works on every
  POSIX system and for children started from any thread.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

PARENT_ENV = "ECLM_PARENT_PID"  # set by popen(): the pid the child must outlive no longer
PR_SET_PDEATHSIG = 1
POLL = 0.2  # seconds between the watchdog's looks at its parent

_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _set_pdeathsig(sig: int) -> bool:
    return _libc is not None and _libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0


def starter() -> tuple[int, bool]:
    """What a child needs to know of the process starting it now, for
    :func:`die_with_parent`: its pid, and whether this is its main thread."""
    return os.getpid(), threading.current_thread() is threading.main_thread()


def die_with_parent(parent: int, main_thread: bool = False, *, grace: float = 5.0) -> None:
    """End this process when ``parent`` (the pid that started it) is gone: at once when the
    kernel can tell us (``main_thread``: the parent started us from its main thread, Linux),
    and otherwise within :data:`POLL` seconds by a watchdog thread. The watchdog sends us
    SIGTERM, so a service finishes what it can, and exits hard after ``grace`` seconds."""
    direct = os.getppid() == parent  # else a shell or a wrapper stands between us
    if main_thread and direct:
        _set_pdeathsig(signal.SIGKILL)
    if not _alive(parent, direct):  # it died before we could ask
        os._exit(1)
    args = (parent, direct, grace)
    threading.Thread(target=_watch, args=args, name="lifeline", daemon=True).start()


def _alive(parent: int, direct: bool) -> bool:
    if direct:
        return os.getppid() == parent
    try:
        os.kill(parent, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # there, under another user
        pass
    return True


def _watch(parent: int, direct: bool, grace: float) -> None:
    while _alive(parent, direct):
        time.sleep(POLL)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace)
    os._exit(1)


def watch_from_env() -> None:
    """In a program started by :func:`popen`: end when the starter does."""
    value = os.environ.pop(PARENT_ENV, "")
    if value.isdigit():
        die_with_parent(int(value))


def popen(cmd: Sequence[str], *, env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
    """:class:`subprocess.Popen` for a child that must not outlive this process: it gets
    SIGTERM from the kernel when we die (Linux, started from the main thread), and the
    marker :data:`PARENT_ENV` so that a Python program of ours can watch for it itself
    (:func:`watch_from_env`)."""
    env = dict(os.environ if env is None else env)
    env[PARENT_ENV] = str(os.getpid())  # the child's own watchdog, from any thread
    parent, main_thread = starter()
    if _libc is not None and main_thread:
        kwargs["preexec_fn"] = _pdeathsig_hook(parent)
    return subprocess.Popen(list(cmd), env=env, **kwargs)


def _pdeathsig_hook(parent: int):
    def hook() -> None:  # runs in the child between fork and exec
        _set_pdeathsig(signal.SIGTERM)
        if os.getppid() != parent:
            os._exit(1)

    return hook
