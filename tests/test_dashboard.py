"""The dashboard in a real browser (Debian's chromium through chromedriver) against
``eclm cloud serve`` with real agents over a real Mosquitto: the API refuses a missing or
wrong token with an empty 401 and a read-only token's POST with 403; the page takes its
token from the address's fragment, lists the devices, starts a rollout with the operator
token and shows its progress without a reload; a device's page shows a refusal with its
code, and its readings as a plot. The devices view is saved to docs/dashboard.png.
"""

from __future__ import annotations

import json
import re
import stat
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cloudproc import Cloud, wait

from broker.launcher import Broker
from device_profiles import load_profile
from edge_runtime.agent import AgentConfig, EdgeAgent

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
DEVICES = ("dev-a", "dev-b", "dev-c")
# read in one script: the page rebuilds its rows every second, so an element found by one
# WebDriver call may be gone by the next
ROWS_JS = """return Object.fromEntries([...document.querySelectorAll('#devices tbody tr')]
    .map((r) => [r.dataset.device, r.innerText]))"""
CARD_JS = """const c = document.querySelector(`[data-rollout='${arguments[0]}']`);
    return c && [c.dataset.state, c.dataset.succeeded,
      [...c.querySelectorAll('[data-wave] > span:first-child')].map((s) => s.textContent)]"""
TEXT_JS = (
    """return [...document.querySelectorAll(arguments[0])].map((e) => e.textContent).join(' ')"""
)
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "dashboard.png"

pytestmark = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="needs Debian's chromium and chromium-driver (scripts/setup.sh installs them)",
)


def request(port: int, path: str, token: str | None = None, body: bytes | None = None):
    """(status, body) of a plain HTTP request, with ``token`` as a Bearer header."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=5) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture
def mosquitto(tmp_path):
    """A broker of this test's own: the page lists the whole fleet the broker knows, and
    the session's broker keeps earlier tests' devices."""
    with Broker(kind="mosquitto", data_dir=tmp_path / "broker") as broker:
        yield broker


@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service as DriverService

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--window-size=1400,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(
        service=DriverService(executable_path=str(CHROMEDRIVER)), options=options
    )
    yield driver
    driver.quit()


def agent(name: str, tmp_path, address, public, site: str) -> EdgeAgent:
    config = AgentConfig(
        name,
        load_profile("rpi4"),
        address,
        tmp_path / name,
        backend="litert",
        trust_key=public,
        labels=(f"site={site}",),
        health_interval=0.5,  # readings often enough for a plot within the test
    )
    return EdgeAgent(config).start()


@pytest.mark.slow
def test_the_dashboard_shows_the_fleet_and_a_rollout_live(
    tmp_path, modular, mosquitto, address, browser, collector_factory
):
    home = tmp_path / "cloud"
    cloud = Cloud(
        home,
        modular,
        mosquitto.url,
        rollout="canary = 1\nwaves = [0.5, 1.0]\nwave_timeout = 60.0",
        dashboard=f'token_file = "{home}/read.token"\n'
        f'operator_token_file = "{home}/operator.token"',
    )
    cloud.start()
    agents = {}
    try:
        for i, d in enumerate(DEVICES):
            agents[d] = agent(d, tmp_path, address, cloud.public, "north" if i else "south")
        wait(lambda: all(a.report.phase == "active" for a in agents.values()), 120, "assignment")

        # Tokens: made at start, mode 600, named (never shown) on stdout.
        read = (home / "read.token").read_text().strip()
        operator = (home / "operator.token").read_text().strip()
        for f in ("read.token", "operator.token"):
            assert stat.S_IMODE((home / f).stat().st_mode) == 0o600
        log = cloud.log.read_text()
        assert f"dashboard: http://127.0.0.1:{cloud.port}/" in log
        assert str(home / "read.token") in log and read not in log and operator not in log

        # Plain HTTP: no token or a wrong one is an empty 401; /healthz and /metrics as before.
        assert request(cloud.port, "/api/v1/devices") == (401, b"")
        assert request(cloud.port, "/api/v1/devices", "x" * 43) == (401, b"")
        assert request(cloud.port, "/api/v1/rollouts", read[:-1]) == (401, b"")
        assert request(cloud.port, "/healthz")[0] == 200
        metrics = request(cloud.port, "/metrics")[1].decode()
        online = re.search(r"^eclm_devices_online (\S+)$", metrics, re.M)
        assert online and float(online.group(1)) == 3
        status, body = request(cloud.port, "/api/v1/devices?label=site%3Dnorth", read)
        listed = json.loads(body)
        assert status == 200 and (listed["matched"], listed["total"]) == (2, 3)
        assert sorted(d["id"] for d in listed["devices"]) == ["dev-b", "dev-c"]
        start = json.dumps({"rollout_id": "op-1"}).encode()
        assert request(cloud.port, "/api/v1/rollouts", read, start)[0] == 403

        # A refusal for dev-a's timeline: a desired state that is not JSON.
        collector_factory().publish("eclm/v1/devices/dev-a/desired", b"not json")

        # The page moves its token from the fragment into the tab and lists the devices.
        browser.get(f"http://127.0.0.1:{cloud.port}/#token={operator}")
        rows = "#devices tbody tr[data-device]"
        wait(lambda: len(browser.find_elements("css selector", rows)) == 3, 20, "three rows")
        assert "token" not in browser.current_url
        stored = browser.execute_script("return sessionStorage.getItem('eclm-token')")
        assert stored == operator
        texts = browser.execute_script(ROWS_JS)  # at once: the rows are rebuilt every second
        assert sorted(texts) == list(DEVICES)
        assert all("active" in t and "rpi4" in t and "online" in t for t in texts.values())

        # Start a rollout from the page; its progress shows without a reload.
        browser.execute_script("window.sameDocument = true; location.hash = '#/rollouts'")
        wait(lambda: "No rollout yet" in browser.find_element("id", "rollouts").text, 10)
        form = browser.find_element("id", "start-rollout")
        form.find_element("name", "rollout_id").send_keys("op-1")
        form.find_element("name", "profile").send_keys("rpi4")
        form.find_element("tag name", "button").click()
        wait(lambda: "op-1: queued" in browser.find_element("id", "start-result").text, 10)
        # dev-c, in the last wave, goes away: the rollout waits for it, and the page shows it
        agents["dev-c"].stop()
        seen = []

        def finished():
            found = browser.execute_script(CARD_JS, "op-1")
            if found and found not in seen:
                seen.append(found)
            return found and found[:2] == ["succeeded", "3"] and found

        def waiting_for_dev_c():
            found = browser.execute_script(CARD_JS, "op-1")
            if found and found not in seen:
                seen.append(found)
            return found and found[:2] == ["running", "2"]

        wait(waiting_for_dev_c, 60, "the rollout's first two devices on the page")
        agents["dev-c"] = agent("dev-c", tmp_path, address, cloud.public, "north")
        waves = wait(finished, 60, "the rollout to succeed on the page")[2]
        assert browser.execute_script("return window.sameDocument") is True  # no reload
        assert waves == ["canary", "wave 1", "wave 2"]
        assert seen[-1][:2] == ["succeeded", "3"] and ["running", "2"] in [f[:2] for f in seen]

        # One device's page: the refusal with its code, and the readings as a plot.
        browser.execute_script("location.hash = '#/device/dev-a'")
        timeline = "#device-timeline tbody tr[data-kind='event'] td"
        wait(lambda: "malformed" in browser.execute_script(TEXT_JS, timeline), 20, "the refusal")
        plot = "#device-plot polyline[data-series='available_mb']"
        wait(lambda: browser.find_elements("css selector", plot), 20, "a plot")

        browser.execute_script("location.hash = '#/devices'")
        wait(lambda: len(browser.find_elements("css selector", rows)) == 3, 10)
        time.sleep(0.3)  # a settled frame for the picture
        SCREENSHOT.parent.mkdir(exist_ok=True)
        assert browser.save_screenshot(str(SCREENSHOT))

        # Without a token the page asks for one and shows no data.
        browser.execute_script("sessionStorage.clear(); location.reload()")
        wait(lambda: browser.find_element("id", "login").is_displayed(), 10, "the token form")
        assert not browser.find_elements("css selector", rows)
    finally:
        for a in agents.values():
            a.stop()
        cloud.stop()
