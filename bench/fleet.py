"""N simulated devices against ``eclm cloud serve``, and the broker's raw fan-out of the bytes.

    python bench/fleet.py --devices 500 [--profiles rpi4,rpi-zero-2w,android-phone]
                          [--seed 0] [--model DIR] [--artifacts DIR]

One Mosquitto on loopback and the cloud service in its own process (SQLite state, leader,
auto-assignment, aggregation, integration rollouts), measured with psutil. N real edge
agents run in this process (edge_runtime.fleet: one MQTT connection, client id, store and
resource trace each; one network thread; programs loaded once per sha256). Measured:

- connection: from the first connect until the service counts N devices online (/metrics);
- convergence: the service gives every device that reports serial 0 its sub-model; from
  all online until the service sees N devices active (signed state, chunked fetches,
  verify, load, health check);
- rollout: a quorum of devices uploads clean-domain adapters; the round closes, the
  service integrates it into a new head and rolls it out (canary, then waves) to all N;
  from the rollout's first retained state until it succeeded;
- the service's CPU seconds and resident memory, per 100 devices;
- the raw fan-out: the same chunks (each device's own artifacts, in the service's chunk
  size) published once per group of devices that got the same bytes, to N
  ``mosquitto_sub`` processes, QoS 1. What the broker alone costs, in the same run.

The agents' stores live in /dev/shm where there is one (each board writes to its own
flash, not to one disk shared by N), and health checks are held to the boards' latency
budgets times ``--latency-slack`` (their timing on this shared host says nothing of a
board). Ends with one line of JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import resource
import selectors
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import print_json, trained_model  # noqa: E402
from eclm_common.lifeline import popen  # noqa: E402

PROFILES = "rpi4,rpi-zero-2w,android-phone"


def raise_fd_limit(need: int) -> None:
    """Raise the soft limit on open files toward the hard one if ``need`` exceeds it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def prepare_model(args, work: Path) -> tuple[Path, Path]:
    """The model (trained here unless ``--model``) and its per-profile programs, exported
    before the fleet arrives, as ``eclm cloud export`` would."""
    from cloud_trainer.export.plan import plan_device_modular
    from device_profiles import load_profile

    model = trained_model(args.model, work, args.epochs, args.seed)
    artifacts = args.artifacts or work / "artifacts"
    for name in args.profiles.split(","):
        start = time.perf_counter()
        plan_device_modular(model, artifacts, load_profile(name))
        print(f"programs for {name}: {time.perf_counter() - start:.1f} s", flush=True)
    return model, artifacts


class Service:
    """``eclm cloud serve`` as a child process, with its CPU and memory watched."""

    def __init__(self, work: Path, broker_url: str, model: Path, artifacts: Path, args) -> None:
        from broker.launcher import free_port
        from cloud_trainer.fleet.keys import init_keys

        keys = work / "keys"
        if not (keys / "signing.key").exists():
            init_keys(keys)
        self.public = keys / "signing.pub"
        self.port = free_port()
        self.log = work / "service.log"
        timeout = max(300.0, 2.0 * args.devices)
        self.config = work / "cloud.toml"
        self.config.write_text(
            f"""worker = "cloud-1"
[broker]
url = "{broker_url}"
[state]
database = "sqlite:///{work}/state.db"
[model]
dir = "{model}"
artifacts = "{artifacts}"
signing_key = "{keys / "signing.key"}"
[aggregation]
strategy = "mean"
quorum = {args.quorum}
deadline = 3600.0
[rollout]
canary = 1
waves = [0.25, 0.5, 1.0]
min_reports = 2
wave_timeout = {timeout}
[http]
port = {self.port}
"""
        )
        self.proc: subprocess.Popen | None = None
        self.peak_rss = 0
        self._stop = threading.Event()

    def start(self) -> None:
        import psutil

        cmd = [sys.executable, "-m", "eclm", "cloud", "serve", "--config", str(self.config)]
        with open(self.log, "ab") as out:
            self.proc = popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        self.ps = psutil.Process(self.proc.pid)
        threading.Thread(target=self._sample, daemon=True).start()
        wait(self._healthy, 120, "the service to answer /healthz")

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            try:
                self.peak_rss = max(self.peak_rss, self.ps.memory_info().rss)
            except Exception:  # the process is gone
                return

    def cpu(self) -> float:
        """CPU seconds the service has used (user + system)."""
        times = self.ps.cpu_times()
        return times.user + times.system

    def rss(self) -> int:
        return self.ps.memory_info().rss

    def _healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise SystemExit(f"the service exited:\n{self.log.read_text()[-3000:]}")
        try:
            health = json.loads(self.get("/healthz"))
        except OSError:
            return False
        return health["status"] == "ok" and health["leader"]

    def get(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=30) as r:
            return r.read().decode()

    def metrics(self) -> dict[str, float]:
        """Devices online, and devices by phase (summed over model versions)."""
        text = self.get("/metrics")
        found: dict[str, float] = defaultdict(float)
        for line in text.splitlines():
            if line.startswith("eclm_devices_online "):
                found["online"] = float(line.split()[1])
            sent = re.match(r'eclm_artifact_bytes_sent_total\{topic="(\w+)"\} (\S+)', line)
            if sent:
                found["bytes_out"] += float(sent[2])
                found[f"bytes_{sent[1]}"] = float(sent[2])
            match = re.match(r'eclm_fleet_devices\{phase="([^"]+)",version="[^"]*"\} (\S+)', line)
            if match:
                found[match[1]] += float(match[2])
        return found

    def stop(self) -> None:
        self._stop.set()
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def wait(predicate, timeout: float, what: str, every: float = 0.2, progress=None):
    deadline = time.monotonic() + timeout
    next_line = time.monotonic() + 5
    while not (result := predicate()):
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")
        if progress and time.monotonic() > next_line:
            next_line = time.monotonic() + 5
            progress()
        time.sleep(every)
    return result


class RolloutWatch:
    """When each retained rollout state arrived (a plain paho client)."""

    def __init__(self, address) -> None:
        import paho.mqtt.client as paho

        import eclm_wire as wire

        self.seen: list[tuple[float, object]] = []
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="bench-watch")

        def on_message(client, userdata, msg):
            if msg.payload:
                self.seen.append((time.perf_counter(), wire.decode(wire.RolloutState, msg.payload)))

        self.client.on_message = on_message
        self.client.connect(address.host, address.port)
        self.client.subscribe(f"{wire.TOPIC_ROOT}/rollouts/+", qos=1)
        self.client.loop_start()

    def first(self, state: str) -> float | None:
        return next((t for t, s in list(self.seen) if s.state == state), None)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def fleet_phases(sim, service: Service, args) -> dict:
    """Connect, converge, roll out; seconds and the service's CPU per phase."""
    import numpy as np

    n = args.devices
    figures: dict = {}
    import psutil

    me = psutil.Process()  # this process: the simulator (and what trained the model)
    me_rss, me_cpu = me.memory_info().rss, sum(me.cpu_times()[:2])
    cpu0, figures["service_idle_rss_mb"] = service.cpu(), service.rss() / 2**20

    def status() -> None:
        m = service.metrics()
        seen = {k: int(v) for k, v in sorted(m.items()) if k != "online" and v}
        print(f"  service sees {int(m['online'])} online; {seen}; agents {dict(sim.phases())}")

    start = time.perf_counter()
    sim.start(lambda i, total: print(f"\ragents started: {i}/{total}", end="", flush=True))
    print()
    wait(lambda: sim.connected() == n, 120, "every agent's connection")
    figures["agents_connected_s"] = time.perf_counter() - start
    wait(lambda: service.metrics()["online"] >= n, 300, "the service to see N online", 0.5)
    figures["connect_s"] = time.perf_counter() - start
    cpu1 = service.cpu()
    print(f"{n} online as the service sees them: {figures['connect_s']:.2f} s", flush=True)

    online = time.perf_counter()
    timeout = max(600.0, 6.0 * n)

    def converged() -> bool:
        m = service.metrics()
        return m["active"] + m["failed"] >= n

    bytes0 = service.metrics()["bytes_out"]
    wait(converged, timeout, "convergence", 1.0, status)
    figures["converge_s"] = time.perf_counter() - online
    bytes1 = service.metrics()["bytes_out"]
    figures["converge_cloud_mb"] = (bytes1 - bytes0) / 1e6
    cpu2, figures["service_converged_rss_mb"] = service.cpu(), service.rss() / 2**20
    print(f"every device active on its sub-model: {figures['converge_s']:.1f} s", flush=True)
    wait(lambda: sim.phases()["active"] + sim.phases()["failed"] == n, 60, "every agent")
    figures["converge_failed"] = sim.phases()["failed"]
    for agent in sim.agents.values():
        if agent.report.phase != "active":
            print(f"  {agent.config.device_id}: {agent.report.phase}: {agent.report.detail}")
    first = {d: a.report.serial for d, a in sim.agents.items()}
    before = {d: a.store.names() for d, a in sim.agents.items()}

    watch = RolloutWatch(sim.broker)
    test = np.load(args.model_dir / "test.npz")
    for k, device_id in enumerate(list(sim.agents)[: args.quorum]):
        sl = slice(16 * k, 16 * k + 16)
        sim.feed(device_id, test["x"][sl], test["y"][sl])  # learns, then uploads its adapter
    trigger = time.perf_counter()

    def rolled(devices) -> bool:
        return all(
            sim.agents[d].report.serial > first[d] and sim.agents[d].report.phase == "active"
            for d in devices
        )

    cpu_started: list[float] = []  # the service's CPU when the rollout's first state came

    def over() -> bool:
        if not cpu_started and watch.first("running"):
            cpu_started.append(service.cpu())
        return bool(watch.first("succeeded") or watch.first("aborted"))

    wait(over, timeout, "the rollout", 0.1, status)
    started, done = watch.first("running"), watch.first("succeeded")
    final = watch.seen[-1][1]
    watch.close()
    if done is None:
        raise SystemExit(f"the rollout did not succeed: {final}")
    wait(lambda: rolled(final.succeeded), 60, "the rollout's devices to report it active")
    figures["rollout_failed"] = len(final.failed)
    for device_id in final.failed:
        report = sim.agents[device_id].report
        print(f"  {device_id} failed the rollout: {report.phase}: {report.detail}")
    figures["integrate_s"] = started - trigger  # round closes, new head exported
    figures["rollout_s"] = done - started
    cpu3 = service.cpu()
    figures["rollout_cloud_mb"] = (service.metrics()["bytes_out"] - bytes1) / 1e6
    figures["rollout_waves"] = final.wave + 1
    print(
        f"rollout of the new head to {n}: {figures['rollout_s']:.1f} s "
        f"({figures['integrate_s']:.1f} s from the quorum's uploads to its start)",
        flush=True,
    )
    figures["cpu_s"] = {
        "connect": cpu1 - cpu0,
        "converge": cpu2 - cpu1,
        "integrate": cpu_started[0] - cpu2,  # once per round, not per device
        "rollout": cpu3 - cpu_started[0],
    }
    figures["sim_cpu_s"] = sum(me.cpu_times()[:2]) - me_cpu
    figures["sim_rss_mb"] = (me.memory_info().rss - me_rss) / 2**20
    figures["sim_threads"] = me.num_threads()
    figures["rollout_new"] = {d: a.store.names() - before[d] for d, a in sim.agents.items()}
    figures["converge_shas"] = before
    return figures


def chunk_groups(sim, shas_of: dict[str, set[str]]) -> list[tuple[int, list[bytes]]]:
    """Devices that fetched the same artifacts, as (how many, their chunks on the wire)."""
    import eclm_wire as wire

    groups: dict[frozenset, list[str]] = defaultdict(list)
    for device_id, shas in shas_of.items():
        groups[frozenset(shas)].append(device_id)
    out = []
    for shas, devices in groups.items():
        store, size = sim.agents[devices[0]].store, wire.DEFAULT_CHUNK_SIZE
        chunks = []
        for sha in sorted(shas):
            data = store.read(sha)
            chunks += [wire.pack_chunk(data[i : i + size]) for i in range(0, len(data), size)]
        out.append((len(devices), chunks))
    return out


def fan_out(broker, groups: list[tuple[int, list[bytes]]]) -> float:
    """Seconds for the broker to get each group's chunks to as many ``mosquitto_sub``."""
    import paho.mqtt.client as paho

    sub = shutil.which("mosquitto_sub")
    if not sub:
        raise SystemExit("mosquitto_sub missing: apt-get install mosquitto-clients")
    pub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="bench-fanout")
    pub.max_inflight_messages_set(100)
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    host = ["-h", broker.host, "-p", str(broker.port), "-q", "1", "-F", "%t"]
    procs, selector = [], selectors.DefaultSelector()
    for g, (count, chunks) in enumerate(groups):
        # A retained probe arrives first: its line on stdout says the subscription is live.
        pub.publish(f"bench/fanout/{g}/ready", b"1", qos=1, retain=True).wait_for_publish(10)
        for i in range(count):
            proc = popen(
                [
                    sub,
                    *host,
                    "-t",
                    f"bench/fanout/{g}/#",
                    "-C",
                    str(1 + len(chunks)),
                    "-i",
                    f"fan-{g}-{i}",
                ],
                stdout=subprocess.PIPE,
            )
            selector.register(proc.stdout, selectors.EVENT_READ)
            procs.append(proc)
    ready = 0
    deadline = time.monotonic() + 120
    while ready < len(procs) and time.monotonic() < deadline:
        for key, _ in selector.select(1.0):
            key.fileobj.readline()
            selector.unregister(key.fileobj)
            ready += 1
    if ready < len(procs):
        raise SystemExit(f"only {ready} of {len(procs)} mosquitto_sub subscribed")
    start = time.perf_counter()
    sent = [
        pub.publish(f"bench/fanout/{g}/{n}", chunk, qos=1)
        for g, (_, chunks) in enumerate(groups)
        for n, chunk in enumerate(chunks)
    ]
    for proc in procs:
        proc.wait(600)
    seconds = time.perf_counter() - start
    for info in sent:
        info.wait_for_publish(10)
    for g in range(len(groups)):
        pub.publish(f"bench/fanout/{g}/ready", b"", qos=1, retain=True).wait_for_publish(10)
    pub.loop_stop()
    pub.disconnect()
    for proc in procs:
        proc.stdout.close()
    return seconds


def report(args, f: dict) -> None:
    n = args.devices
    per100 = 100 / n
    cpu = f["cpu_s"]
    rows = [
        ("agents connected (CONNACK)", f"{f['agents_connected_s']:.2f} s", ""),
        ("N online, as the service sees", f"{f['connect_s']:.2f} s", ""),
        (
            "desired-state convergence",
            f"{f['converge_s']:.1f} s",
            f"{f['converge_fanout_s']:.2f} s raw fan-out of {f['converge_mb']:.1f} MB: "
            f"{f['converge_s'] / f['converge_fanout_s']:.0f}x",
        ),
        ("integration (quorum -> rollout start)", f"{f['integrate_s']:.1f} s", ""),
        (
            "rollout of the new head to N",
            f"{f['rollout_s']:.1f} s",
            f"{f['rollout_fanout_s']:.2f} s raw fan-out of {f['rollout_mb']:.2f} MB: "
            f"{f['rollout_s'] / f['rollout_fanout_s']:.0f}x",
        ),
        (
            "bytes out of the cloud, rollout",
            f"{f['rollout_cloud_mb']:.2f} MB",
            f"(waves + 5%) x sub-model = ({f['rollout_waves']} + 0.05) x "
            f"{f['rollout_unique_mb']:.3f} MB = "
            f"{(f['rollout_waves'] + 0.05) * f['rollout_unique_mb']:.2f} MB; "
            f"{f['rollout_mb']:.2f} MB if each device got its own",
        ),
        (
            "bytes out of the cloud, convergence",
            f"{f['converge_cloud_mb']:.1f} MB",
            f"{f['converge_mb']:.1f} MB if each device got its own",
        ),
        (
            "service CPU per 100 devices",
            f"{(sum(cpu.values()) - cpu['integrate']) * per100:.1f} s",
            f"connect {cpu['connect'] * per100:.1f}, converge {cpu['converge'] * per100:.1f}, "
            f"rollout {cpu['rollout'] * per100:.1f}; integration {cpu['integrate']:.1f} s once",
        ),
        (
            "service RSS per 100 devices",
            f"{(f['service_converged_rss_mb'] - f['service_idle_rss_mb']) * per100:.1f} MB",
            f"idle {f['service_idle_rss_mb']:.0f} MB, converged "
            f"{f['service_converged_rss_mb']:.0f} MB, peak {f['service_peak_rss_mb']:.0f} MB",
        ),
        (
            "devices failed (convergence, rollout)",
            f"{f['converge_failed']}, {f['rollout_failed']}",
            "",
        ),
        (
            "simulator: programs loaded / agents",
            f"{f['program_loads']} / {n}",
            f"{f['sim_threads']} threads; +{f['sim_rss_mb']:.0f} MB and "
            f"{f['sim_cpu_s']:.0f} CPU s for the fleet",
        ),
    ]
    print(
        f"\n{n} devices ({args.profiles}), seed {args.seed}, on {f['cores']} cores "
        f"(load average {f['load_before']} before the run)"
    )
    print(f"health checks held to {args.latency_slack:g}x the boards' latency budgets")
    print(f"{'':<40} {'figure':>10}   against")
    for name, value, against in rows:
        print(f"{name:<40} {value:>10}   {against}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=50, help="agents (default: %(default)s)")
    parser.add_argument("--profiles", default=PROFILES, help="boards taken in turn (%(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="training and resource traces")
    parser.add_argument("--model", type=Path, help="a trained model dir (default: train one)")
    parser.add_argument("--artifacts", type=Path, help="the export cache to use and fill")
    parser.add_argument("--epochs", type=int, default=3, help="when training (default: 3)")
    parser.add_argument("--quorum", type=int, default=4, help="updates that close a round")
    parser.add_argument(
        "--latency-slack",
        type=float,
        default=20.0,
        help="health checks run on this shared host: boards' latency budgets times this",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    import psutil

    from broker.launcher import Broker
    from eclm_wire.mqtt import BrokerAddress
    from edge_runtime.fleet import FleetSimulator, make_devices
    from edge_runtime.learning import LearnerConfig

    args.quorum = min(args.quorum, args.devices)
    load_before = round(os.getloadavg()[0], 2)  # others' work on this machine
    raise_fd_limit(4 * args.devices + 1024)
    shm = Path("/dev/shm")  # each simulated board writes to its own flash, not one shared disk
    with (
        tempfile.TemporaryDirectory(prefix="eclm-fleet-") as tmp,
        tempfile.TemporaryDirectory(dir=shm if shm.is_dir() else None) as stores,
        Broker(kind="mosquitto", data_dir=Path(tmp) / "broker") as broker,
    ):
        work = Path(tmp)
        args.model_dir, artifacts = prepare_model(args, work)
        service = Service(work, broker.url, args.model_dir, artifacts, args)
        service.start()
        devices = make_devices(args.devices, args.profiles.split(","), seed=args.seed)
        sim = FleetSimulator(
            devices,
            BrokerAddress.parse(broker.url),
            Path(stores),
            trust_key=service.public,
            learning=LearnerConfig(upload_every=1),
            latency_slack=args.latency_slack,
        )
        try:
            f = fleet_phases(sim, service, args)
            f["service_peak_rss_mb"] = service.peak_rss / 2**20
            f["program_loads"] = sum(sim.cache.loads.values())
            converge = chunk_groups(sim, f.pop("converge_shas"))
            rollout = chunk_groups(sim, f.pop("rollout_new"))
        finally:
            sim.stop()
            service.stop()
        f["converge_mb"] = sum(n * sum(map(len, c)) for n, c in converge) / 1e6
        f["rollout_mb"] = sum(n * sum(map(len, c)) for n, c in rollout) / 1e6
        # what every device's copy would be without broadcasts, once per distinct artifact
        f["rollout_unique_mb"] = sum(sum(map(len, c)) for _, c in rollout) / 1e6
        print("raw fan-out of the same chunks to N mosquitto_sub ...", flush=True)
        f["converge_fanout_s"] = fan_out(broker, converge)
        f["rollout_fanout_s"] = fan_out(broker, rollout)
    f["cores"], f["load_before"] = psutil.cpu_count(), load_before
    report(args, f)
    print_json(
        {
            "devices": args.devices,
            "profiles": args.profiles,
            "seed": args.seed,
            **{k: round(v, 3) if isinstance(v, float) else v for k, v in f.items() if k != "cpu_s"},
            "service_cpu_s": {k: round(v, 2) for k, v in f["cpu_s"].items()},
            "converge_vs_fanout": round(f["converge_s"] / f["converge_fanout_s"], 1),
            "rollout_vs_fanout": round(f["rollout_s"] / f["rollout_fanout_s"], 1),
        }
    )


if __name__ == "__main__":
    main()
