"""The fuzzing harness: hypothesis settings sized by ``$ECLM_FUZZ_CASES``, a wall-clock
guard around every call, and a recorder per parser that counts cases, rejections by error
type and code, crashes, hangs and the slowest case (tests/fuzz/conftest.py prints them).
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings

from eclm_wire.mqtt import BrokerAddress

CASES = int(os.environ.get("ECLM_FUZZ_CASES", "200"))
# A case that takes longer than this is a hang (the guard interrupts it and the test fails).
HANG_SECONDS = float(os.environ.get("ECLM_FUZZ_HANG_SECONDS", "20"))
# Far above any single parse (< 50 ms) yet safe on 2 cores shared with other work.
DEADLINE = timedelta(seconds=float(os.environ.get("ECLM_FUZZ_DEADLINE_SECONDS", "5")))

FUZZ = settings(
    max_examples=CASES,
    deadline=DEADLINE,
    database=None,  # every run draws fresh cases; a failure prints its reproduction blob
    print_blob=True,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
        HealthCheck.filter_too_much,
    ],
)


NOWHERE = BrokerAddress("127.0.0.1", 9)  # never connected to: handlers are called directly


def fresh_dir(root: Path) -> Path:
    """A new empty directory under ``root`` (one per case)."""
    return Path(tempfile.mkdtemp(dir=root))


class Hang(Exception):
    """A call that did not return within HANG_SECONDS."""


@contextmanager
def wall_clock(seconds: float):
    """Interrupt the block with Hang after ``seconds`` (SIGALRM, main thread). A hang in C
    code that never returns to Python is caught by faulthandler, which dumps every
    thread's stack and ends the process."""

    def alarm(signum, frame):
        raise Hang(f"no answer within {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    faulthandler.dump_traceback_later(seconds * 3, exit=True, file=sys.stderr)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        faulthandler.cancel_dump_traceback_later()
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Stats:
    """What one parser did with its cases."""

    name: str
    nodeid: str = ""
    cases: int = 0
    accepted: int = 0
    rejected: Counter = field(default_factory=Counter)  # "ProtocolError[malformed]" -> n
    crashes: Counter = field(default_factory=Counter)  # exception type -> n
    hangs: int = 0
    seconds: float = 0.0
    slowest: float = 0.0
    slowest_input: str = ""
    outcome: str = "not run"
    accepted_by: Counter = field(default_factory=Counter)  # what accepted cases were, if noted

    def as_dict(self) -> dict[str, Any]:
        return {
            "parser": self.name,
            "test": self.nodeid,
            "outcome": self.outcome,
            "cases": self.cases,
            "accepted": self.accepted,
            "accepted_by": dict(self.accepted_by.most_common()),
            "rejected": sum(self.rejected.values()),
            "rejected_by_error": dict(self.rejected.most_common()),
            "crashes": sum(self.crashes.values()),
            "crashes_by_type": dict(self.crashes),
            "hangs": self.hangs,
            "seconds": round(self.seconds, 3),
            "slowest_ms": round(self.slowest * 1000, 3),
            "slowest_input": self.slowest_input,
        }


STATS: dict[str, Stats] = {}


def error_key(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    return f"{type(exc).__name__}[{code}]" if isinstance(code, str) else type(exc).__name__


@dataclass
class Outcome:
    """What a guarded call gave: its value, or the error it was allowed to raise."""

    value: Any = None
    error: BaseException | None = None

    @property
    def accepted(self) -> bool:
        return self.error is None


class Recorder:
    """Calls one parser under the wall-clock guard and counts what happened. An error of
    a type in ``rejects`` is a rejection; any other exception is a crash (counted, then
    raised so the test fails)."""

    def __init__(self, stats: Stats, rejects: tuple[type[BaseException], ...]) -> None:
        self.stats = stats
        self.rejects = rejects

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Outcome:
        started = time.perf_counter()
        try:
            with wall_clock(HANG_SECONDS):
                value = fn(*args, **kwargs)
        except Hang:
            self.stats.hangs += 1
            self._took(started, args)
            raise
        except self.rejects as exc:
            self._took(started, args)
            self.stats.rejected[error_key(exc)] += 1
            return Outcome(error=exc)
        except Exception as exc:
            self._took(started, args)
            self.stats.crashes[type(exc).__name__] += 1
            raise
        self._took(started, args)
        self.stats.accepted += 1
        return Outcome(value=value)

    def note(self, key: str) -> None:
        """Say what the case just accepted was (for the JSON report)."""
        self.stats.accepted_by[key] += 1

    def refused(self, key: str) -> None:
        """Count the case just called as refused (a parser that falls back, not raises)."""
        self.stats.accepted -= 1
        self.stats.rejected[key] += 1

    def _took(self, started: float, args: tuple) -> None:
        elapsed = time.perf_counter() - started
        self.stats.cases += 1
        self.stats.seconds += elapsed
        if elapsed > self.stats.slowest:
            self.stats.slowest = elapsed
            self.stats.slowest_input = _describe(args)

    def assert_both_outcomes(self) -> None:
        """The cases reached both sides of the parser (a fuzzer that only ever hits one
        branch would prove little). Checked only when there are enough cases."""
        if self.stats.cases >= 50:
            assert self.stats.accepted > 0, f"{self.stats.name}: no case was accepted"
            assert self.stats.rejected, f"{self.stats.name}: no case was rejected"


def _describe(args: tuple) -> str:
    parts = []
    for arg in args:
        if isinstance(arg, bytes | bytearray | str):
            parts.append(
                f"{type(arg).__name__} of {len(arg)}: {bytes(arg[:40])!r}"
                if isinstance(arg, bytes | bytearray)
                else f"str of {len(arg)}: {arg[:40]!r}"
            )
        else:
            parts.append(repr(arg)[:80])
    return "; ".join(parts)[:200]


def recorder(name: str, rejects: tuple[type[BaseException], ...], nodeid: str = "") -> Recorder:
    """The recorder of parser ``name`` (its counts add up over every test that uses it)."""
    stats = STATS.setdefault(name, Stats(name))
    stats.nodeid = stats.nodeid or nodeid
    return Recorder(stats, rejects)


def table() -> list[str]:
    """The per-parser summary as text lines."""
    head = (
        f"{'parser':<34} {'cases':>7} {'accepted':>8} {'rejected':>8} {'crashes':>7} "
        f"{'hangs':>5} {'slowest':>10}  outcome  rejections by error"
    )
    lines = [head, "-" * len(head)]
    for s in sorted(STATS.values(), key=lambda s: s.name):
        top = ", ".join(f"{k} {n}" for k, n in s.rejected.most_common(4))
        more = len(s.rejected) - 4
        top += f", +{more} more" if more > 0 else ""
        lines.append(
            f"{s.name:<34} {s.cases:>7} {s.accepted:>8} {sum(s.rejected.values()):>8} "
            f"{sum(s.crashes.values()):>7} {s.hangs:>5} {s.slowest * 1000:>8.1f}ms  "
            f"{s.outcome:<7}  {top}"
        )
    total = sum(s.cases for s in STATS.values())
    lines.append(f"{len(STATS)} parsers, {total} cases, ECLM_FUZZ_CASES={CASES}")
    return lines
