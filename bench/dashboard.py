"""The dashboard's devices view with N simulated devices, timed by Chromium itself.

    python bench/dashboard.py --devices 500 [--model DIR] [--seconds 20]

One Mosquitto on loopback, ``eclm cloud serve`` in its own process (as bench/fleet.py
starts it, here without auto-assignment: the view's cost is the rows, not what the
devices run) and N real edge agents in this process (edge_runtime.fleet), each reporting
its resource readings every 10 s, so the rows keep changing. Headless Chromium opens the
page; the page's own code times itself with ``performance.now()``
(``window.eclmTimings``):

- first render: from navigation start until the first devices table is built and laid
  out (token check, fetch, JSON parse, DOM, layout), over several fresh loads;
- update: one poll of the open view, from the request until the new rows are laid out,
  over ``--seconds`` of polling at 1 s; with the default page (50 rows) and with every
  device on one page.

Goals: first render <= 1 s, update <= 200 ms. Ends with one line of JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import percentile, print_json, trained_model  # noqa: E402
from bench.fleet import PROFILES, Service, raise_fd_limit, wait  # noqa: E402

READ_TOKEN = "bench-read-token-0123456789"


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--window-size=1400,900"):
        options.add_argument(arg)
    return webdriver.Chrome(
        service=DriverService(executable_path="/usr/bin/chromedriver"), options=options
    )


def first_renders(driver, url: str, loads: int) -> list[float]:
    """Milliseconds from navigation start to the first devices table, per fresh load."""
    out = []
    for _ in range(loads):
        driver.get("about:blank")
        driver.get(url)
        wait(lambda: driver.execute_script("return window.eclmTimings.first"), 30, "a render")
        out.append(driver.execute_script("return window.eclmTimings.first"))
    return out


def updates(driver, seconds: float, size: int) -> tuple[list[float], list[float]]:
    """Milliseconds per poll of the devices view over ``seconds``, ``size`` rows a page:
    in all, and of that the request, the service's answer and the JSON parse."""
    driver.execute_script(
        "state.query.size = arguments[0]; const t = window.eclmTimings;"
        " t.updates = []; t.fetches = []; poll(true)",
        size,
    )
    time.sleep(seconds)
    found = driver.execute_script("return window.eclmTimings")
    # the first one after a resize builds every row of the larger page
    return found["updates"][1:], found["fetches"][1:]


def summary(values: list[float]) -> dict:
    return {
        "n": len(values),
        "median_ms": round(statistics.median(values), 1),
        "p95_ms": round(percentile(values, 95), 1),
        "max_ms": round(max(values), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=500, help="agents (default: %(default)s)")
    parser.add_argument("--profiles", default=PROFILES, help="boards taken in turn (%(default)s)")
    parser.add_argument("--model", type=Path, help="a trained model dir (default: train one)")
    parser.add_argument("--epochs", type=int, default=1, help="when training (default: 1)")
    parser.add_argument("--seconds", type=float, default=20.0, help="of updates per page size")
    parser.add_argument("--loads", type=int, default=5, help="fresh page loads timed")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    args.quorum, args.seed = 4, 0  # what bench.fleet.Service's config reads
    import psutil

    from broker.launcher import Broker
    from eclm_wire.mqtt import BrokerAddress
    from edge_runtime.fleet import FleetSimulator, make_devices

    load_before = round(os.getloadavg()[0], 2)
    raise_fd_limit(4 * args.devices + 1024)
    shm = Path("/dev/shm")
    with (
        tempfile.TemporaryDirectory(prefix="eclm-dash-") as tmp,
        tempfile.TemporaryDirectory(dir=shm if shm.is_dir() else None) as stores,
        Broker(kind="mosquitto", data_dir=Path(tmp) / "broker") as broker,
    ):
        work = Path(tmp)
        model = trained_model(args.model, work, args.epochs)
        service = Service(work, broker.url, model, work / "artifacts", args)
        service.config.write_text(
            service.config.read_text()
            + f'[fleet]\nauto_assign = false\n[dashboard]\ntoken = "{READ_TOKEN}"\n'
            + 'operator_token = "bench-operator-token-0123456789"\n'
        )
        service.start()
        devices = make_devices(args.devices, args.profiles.split(","))
        sim = FleetSimulator(
            devices, BrokerAddress.parse(broker.url), Path(stores), trust_key=service.public
        )
        driver = None
        try:
            started = time.perf_counter()
            sim.start()
            wait(lambda: service.metrics()["online"] >= args.devices, 300, "every device online")
            print(f"{args.devices} devices online in {time.perf_counter() - started:.1f} s")
            api = "/api/v1/devices?size=1"
            wait(lambda: _total(service, api) >= args.devices, 60, "every device listed")
            driver = browser()
            url = f"http://127.0.0.1:{service.port}/#token={READ_TOKEN}"
            first = first_renders(driver, url, args.loads)
            page, page_fetch = updates(driver, args.seconds, 50)
            whole, whole_fetch = updates(driver, args.seconds, args.devices)
            rows = driver.execute_script(
                "return document.querySelectorAll('#devices tbody tr').length"
            )
        finally:
            if driver:
                driver.quit()
            sim.stop()
            service.stop()
    figures = {
        "devices": args.devices,
        "first_render": summary(first),
        "update_50_rows": summary(page),
        "update_50_rows_fetch": summary(page_fetch),
        f"update_{args.devices}_rows": summary(whole),
        f"update_{args.devices}_rows_fetch": summary(whole_fetch),
        "rows_on_last_page": rows,
        "cores": psutil.cpu_count(),
        "load_before": load_before,
    }
    print(
        f"\n{'devices view, ' + str(args.devices) + ' devices':<32}{'median':>9}{'p95':>9}"
        f"{'max':>9}{'n':>5}   goal"
    )
    n = args.devices
    for name, goal in (
        ("first_render", "<= 1000 ms"),
        ("update_50_rows", "<= 200 ms"),
        ("update_50_rows_fetch", "(of which fetch + parse)"),
        (f"update_{n}_rows", "<= 200 ms"),
        (f"update_{n}_rows_fetch", "(of which fetch + parse)"),
    ):
        f = figures[name]
        print(
            f"{name:<32}{f['median_ms']:>7.1f}ms{f['p95_ms']:>7.1f}ms{f['max_ms']:>7.1f}ms"
            f"{f['n']:>5}   {goal}"
        )
    print_json(figures)


def _total(service, path: str) -> int:
    import urllib.request

    req = urllib.request.Request(
        f"http://127.0.0.1:{service.port}{path}", headers={"Authorization": f"Bearer {READ_TOKEN}"}
    )
    with urllib.request.urlopen(req, timeout=30) as reply:
        return json.load(reply)["total"]


if __name__ == "__main__":
    main()
