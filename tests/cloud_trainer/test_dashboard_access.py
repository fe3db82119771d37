"""The dashboard's tokens: made once, mode 600; refused when others may read them, short,
or the same for both roles; a request's role from its Authorization header."""

from __future__ import annotations

import stat

import pytest

import eclm_wire as wire
from cloud_trainer.errors import ConfigError
from cloud_trainer.service.access import Access, Role
from cloud_trainer.service.config import DashboardSection, ServiceConfig, load_config
from cloud_trainer.service.observer import FleetObserver


def section(tmp_path, **changes) -> DashboardSection:
    files = {"token_file": str(tmp_path / "r.token"), "operator_token_file": str(tmp_path / "o")}
    return DashboardSection(**(files | changes))


def test_token_files_are_made_once_with_mode_600_and_kept(tmp_path):
    first = Access.from_config(section(tmp_path))
    again = Access.from_config(section(tmp_path))
    assert (first.read_token, first.operator_token) == (again.read_token, again.operator_token)
    assert stat.S_IMODE((tmp_path / "r.token").stat().st_mode) == 0o600
    assert first.read_token != first.operator_token and len(first.read_token) >= 32
    assert first.read_token not in first.where() and str(tmp_path / "r.token") in first.where()


def test_a_request_gets_the_role_of_its_bearer_token(tmp_path):
    access = Access.from_config(section(tmp_path, token="r" * 20, operator_token="o" * 20))
    assert access.role(f"Bearer {'r' * 20}") is Role.READ
    assert access.role(f"Bearer {'o' * 20}") is Role.OPERATE
    for header in (None, "", "r" * 20, f"Basic {'r' * 20}", f"Bearer {'r' * 19}", "Bearer "):
        assert access.role(header) is Role.NONE


def test_a_token_file_others_may_read_is_refused(tmp_path):
    (tmp_path / "r.token").write_text("x" * 40)
    (tmp_path / "r.token").chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        Access.from_config(section(tmp_path))


@pytest.mark.parametrize(
    "text, match",
    [
        ("[dashboard]\ntoken = 'short'", "16 printable"),
        (f"[dashboard]\ntoken = '{'t' * 20}'\noperator_token = '{'t' * 20}'", "differ"),
        ("[dashboard]\nstale_after = 0.0", "stale_after"),
        ("[dashboard]\nhistory = 0", "history"),
        ("[dashboard]\nstale_after = 'soon'", "expected float"),
        ("[dashboard]\ncolour = 'blue'", "unknown key"),
    ],
)
def test_dashboard_keys_are_checked_like_the_others(tmp_path, text, match):
    path = tmp_path / "cloud.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(path)


def test_the_defaults_listen_on_localhost_only():
    assert ServiceConfig().http.host == "127.0.0.1"


def test_the_observer_keeps_a_bounded_ring_and_the_phase_start():
    now = [100.0]
    seen = FleetObserver(history=3, clock=lambda: now[0])
    before = None
    for i in range(10):
        now[0] += 1
        phase = "downloading" if i < 5 else "active"
        report = wire.ReportedState(
            "d", "rpi4", ("litert",), 1, phase, available_mb=100.0 + i, ts=1000.0 + i
        )
        seen(before, report)
        before = report
    assert [s.available_mb for s in seen.samples("d")] == [107.0, 108.0, 109.0]
    assert seen.since("d", before) == 106.0 and seen.seen("d", before) == 110.0
    assert [c.phase for c in seen.changes("d")] == ["downloading", "active"]
