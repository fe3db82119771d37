"""Fuzz fixtures: a recorder per parser, and at the end of the session a table of cases,
rejections by error type, crashes, hangs and the slowest case per parser (also saved as
JSON to ``$ECLM_FUZZ_REPORT`` when that is set)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import fuzzkit
import pytest


@pytest.fixture
def fuzz(request):
    """``fuzz(name, *error_types)``: the recorder of one parser for this test."""

    def make(name: str, *rejects: type[BaseException]) -> fuzzkit.Recorder:
        return fuzzkit.recorder(name, rejects, request.node.nodeid)

    return make


def pytest_runtest_logreport(report) -> None:
    if report.when != "call" and not (report.when == "setup" and report.failed):
        return
    for stats in fuzzkit.STATS.values():
        if stats.nodeid == report.nodeid:
            stats.outcome = report.outcome


def pytest_terminal_summary(terminalreporter) -> None:
    if not fuzzkit.STATS:
        return
    terminalreporter.section("fuzzing: cases per parser")
    for line in fuzzkit.table():
        terminalreporter.write_line(line)
    path = os.environ.get("ECLM_FUZZ_REPORT")
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        rows = [s.as_dict() for s in sorted(fuzzkit.STATS.values(), key=lambda s: s.name)]
        Path(path).write_text(
            json.dumps({"cases_per_parser": fuzzkit.CASES, "parsers": rows}, indent=2) + "\n"
        )
        terminalreporter.write_line(f"fuzz report: {path}")
