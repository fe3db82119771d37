"""A fleet simulator: hundreds of real edge agents in one process.

Every simulated device is an :class:`~edge_runtime.agent.EdgeAgent` with its own MQTT
connection, client id, artifact store, board profile and resource trace, speaking the
real protocol (signed desired states, chunked fetches, installs, reports, adapter
uploads). What the agents share is what one process can share without changing what
they do: one network thread for every connection (:class:`NetworkLoop`) and one loaded
program per backend and sha256 (:class:`ProgramCache`). Each agent keeps its own worker
thread, so a slow install still never holds up another device.

    python -m edge_runtime.fleet --devices 200 --broker mqtt://HOST:1883 --trust-key signing.pub
"""

from __future__ import annotations

import argparse
import logging
import queue
import selectors
import signal
import socket
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho

from device_profiles import DeviceProfile, load_profile
from eclm_common.lifeline import watch_from_env
from eclm_wire.mqtt import BrokerAddress
from edge_runtime.agent import AgentConfig, EdgeAgent
from edge_runtime.artifacts import sha256_bytes
from edge_runtime.backends import Backend, Program, get_backend
from edge_runtime.backends.base import Source, read_source
from edge_runtime.learning import LearnerConfig
from edge_runtime.monitor import Reading, TraceSource

log = logging.getLogger(__name__)
_READ, _WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE


@dataclass
class _Connection:
    """What the network loop knows of one client."""

    sock: Any = None  # the socket registered with the selector (paho's SocketLike)
    events: int = 0
    retry_at: float = 0.0  # when to reconnect a lost connection (0: not lost yet)
    delay: float = 1.0


class NetworkLoop:
    """One thread that reads, writes and keeps alive many paho clients through epoll.

    paho's own loop (``loop_start``) costs a thread per client and waits in
    ``select()``, which fails once the process holds a file descriptor above 1023 (with
    three per client, past about 340 clients). A lost connection is retried with a
    growing delay, as paho's loop would."""

    MISC_INTERVAL = 0.5  # seconds between keepalive checks and reconnect attempts

    def __init__(self, *, min_delay: float = 1.0, max_delay: float = 30.0) -> None:
        self.min_delay, self.max_delay = min_delay, max_delay
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, _READ, None)
        self._requests: queue.SimpleQueue[tuple[str, paho.Client]] = queue.SimpleQueue()
        self._clients: dict[paho.Client, _Connection] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fleet-network", daemon=True)
        self.reconnects = 0

    def start(self) -> NetworkLoop:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake()
        self._thread.join(timeout=10)
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def add(self, client: paho.Client) -> None:
        """Run ``client`` (connected, or connecting) on this loop."""
        client.on_socket_register_write = lambda c, userdata, sock: self._request("write", c)
        client.on_socket_close = lambda c, userdata, sock: self._closing(c)
        self._request("add", client)

    def remove(self, client: paho.Client) -> None:
        """Send what ``client`` has queued (its DISCONNECT, say), then forget it."""
        self._request("remove", client)

    def _closing(self, client: paho.Client) -> None:
        # Unregistered before paho closes the socket, so no stale entry keeps its number.
        if threading.current_thread() is self._thread:
            self._forget(client)
        else:
            self._request("closed", client)

    def _request(self, kind: str, client: paho.Client) -> None:
        self._requests.put((kind, client))
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass  # a wake-up is pending already (or the loop has stopped)

    def _run(self) -> None:
        next_misc = 0.0
        while not self._stop.is_set():
            for key, mask in self._selector.select(timeout=self.MISC_INTERVAL):
                if key.data is None:
                    self._drain_wake()
                else:
                    self._serve(key.data, mask)
            self._handle_requests()
            if time.monotonic() >= next_misc:
                next_misc = time.monotonic() + self.MISC_INTERVAL
                self._misc()

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _serve(self, client: paho.Client, mask: int) -> None:
        rc = paho.MQTT_ERR_SUCCESS
        if mask & _READ:
            rc = client.loop_read()
            # TLS may hold decrypted packets that no readiness event will announce.
            while not rc and _pending(client.socket()):
                rc = client.loop_read()
        if not rc and mask & _WRITE:
            client.loop_write()
        self._watch(client)

    def _handle_requests(self) -> None:
        while True:
            try:
                kind, client = self._requests.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self._clients.setdefault(client, _Connection(delay=self.min_delay))
            elif kind == "remove" and client in self._clients:
                if client.want_write():
                    client.loop_write()  # a DISCONNECT goes out, and paho closes the socket
                self._forget(client)
                del self._clients[client]
                continue
            self._watch(client)

    def _misc(self) -> None:
        now = time.monotonic()
        for client, conn in list(self._clients.items()):
            if client.socket() is not None:
                client.loop_misc()  # keepalive pings; closes a connection gone silent
            elif conn.retry_at == 0.0:
                conn.retry_at = now + conn.delay  # lost: try again after the delay
            elif now >= conn.retry_at:
                self._reconnect(client, conn)
            self._watch(client)  # also catches a write request that raced a write

    def _reconnect(self, client: paho.Client, conn: _Connection) -> None:
        try:
            client.reconnect()
        except OSError as exc:
            conn.retry_at, conn.delay = 0.0, min(conn.delay * 2, self.max_delay)
            log.debug("reconnecting failed (next try in %.0f s): %s", conn.delay, exc)
            return
        conn.retry_at, conn.delay = 0.0, self.min_delay
        self.reconnects += 1

    def _watch(self, client: paho.Client) -> None:
        """Register the client's current socket for reading, and for writing while it has
        something queued."""
        conn = self._clients.get(client)
        sock = client.socket()
        if conn is None:
            return
        if sock is not conn.sock:
            self._forget(client)
        if sock is None:
            return
        events = _READ | (_WRITE if client.want_write() else 0)
        if conn.sock is None:
            self._selector.register(sock, events, client)
        elif events != conn.events:
            self._selector.modify(sock, events, client)
        conn.sock, conn.events = sock, events

    def _forget(self, client: paho.Client) -> None:
        conn = self._clients.get(client)
        if conn is None or conn.sock is None:
            return
        try:
            self._selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass  # closed and unregistered already
        conn.sock, conn.events = None, 0


def _pending(sock) -> int:
    return sock.pending() if sock is not None and hasattr(sock, "pending") else 0


class _SharedProgram(Program):
    """One loaded program used by many agents, one call at a time."""

    def __init__(self, program: Program) -> None:
        self.program = program
        self.inputs, self.outputs = program.inputs, program.outputs
        self.max_batch, self.pads_batch = program.max_batch, program.pads_batch
        self._lock = threading.Lock()

    def run(self, *arrays: np.ndarray) -> list[np.ndarray]:
        with self._lock:
            return self.program.run(*arrays)

    def _run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        with self._lock:
            return self.program._run(arrays)


class _CachedBackend(Backend):
    def __init__(self, backend: Backend, cache: ProgramCache) -> None:
        self.backend, self.cache = backend, cache
        self.name, self.file_format = backend.name, backend.file_format

    def load(self, source: Source) -> Program:
        return self.cache.load(self.backend, read_source(source))


class ProgramCache:
    """Programs loaded once per backend and sha256, shared by every agent of a process.

    ``loads`` counts the loads of each ``(backend, sha256)``; a program that no agent
    holds any longer is freed (and loaded again if one needs it later)."""

    def __init__(self, *, threads: int = 1) -> None:
        self.threads = threads
        self.loads: Counter[tuple[str, str]] = Counter()
        self._backends: dict[str, Backend] = {}
        self._programs: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self._lock = threading.Lock()

    def backend(self, name: str) -> Backend:
        """The backend ``name`` loading through this cache (``EdgeAgent(backends=...)``)."""
        with self._lock:
            if name not in self._backends:
                self._backends[name] = _CachedBackend(get_backend(name, threads=self.threads), self)
            return self._backends[name]

    def load(self, backend: Backend, data: bytes) -> Program:
        key = (backend.name, sha256_bytes(data))
        with self._lock:  # one load at a time: the same program is never loaded twice
            program = self._programs.get(key)
            if program is None:
                program = _SharedProgram(backend.load(data))
                self._programs[key] = program
                self.loads[key] += 1
            return program

    @property
    def loaded(self) -> int:
        """Programs held now."""
        return len(self._programs)


@dataclass(frozen=True)
class SimDevice:
    """One simulated device: its id, board profile, labels and resource trace (one
    reading per policy interval; the last one repeats)."""

    device_id: str
    profile: DeviceProfile
    trace: tuple[Reading, ...]
    labels: tuple[str, ...] = ()


def make_devices(
    count: int,
    profiles: Sequence[str] = ("rpi4", "rpi-zero-2w", "android-phone"),
    *,
    seed: int = 0,
    prefix: str = "sim",
    pressure: float = 0.1,
    readings: int = 120,
) -> list[SimDevice]:
    """``count`` devices taking ``profiles`` in turn. Each trace has the board's free
    memory wander around a share of its RAM; a ``pressure`` share of devices goes through
    one memory squeeze (their policy drops to a smaller module set, then climbs back),
    and battery boards drain."""
    rng = np.random.default_rng(seed)
    boards = [load_profile(name) for name in profiles]
    devices = []
    for i in range(count):
        board = boards[i % len(boards)]
        free = board.ram_mb * rng.uniform(0.4, 0.7) * (1 + 0.05 * rng.standard_normal(readings))
        if rng.random() < pressure:
            start = int(rng.integers(2, readings // 2))
            free[start : start + int(rng.integers(3, 12))] = board.ram_mb * rng.uniform(0.01, 0.1)
        battery = rng.uniform(40, 100) - 0.2 * np.arange(readings) if board.has_battery else None
        trace = tuple(
            Reading(
                available_mb=float(free[k]),
                battery_percent=None if battery is None else float(max(battery[k], 1.0)),
                on_power=battery is None,
                ts=0.0,
            )
            for k in range(readings)
        )
        devices.append(SimDevice(f"{prefix}-{i:04d}", board, trace, ("fleet=sim",)))
    return devices


class FleetSimulator:
    """Runs ``devices`` as real agents against ``broker``, their stores under ``root``.

    With ``passwords`` (device id -> password) each device logs in as itself, as broker
    ACLs that keep a device to its own topics expect. A health check's latency is measured
    on the simulating host, by the checking thread's CPU time (the wall time there is
    mostly the other agents' turns on the same cores and interpreter); it says nothing
    of the board, so it is held to the board's budget times ``latency_slack`` (1 holds it
    to the board's own)."""

    def __init__(
        self,
        devices: Sequence[SimDevice],
        broker: BrokerAddress,
        root: Path,
        *,
        trust_key: Path | None = None,
        insecure: bool = False,
        eval_data: Path | None = None,
        learning: LearnerConfig | None = None,
        policy_interval: float = 5.0,
        latency_slack: float = 20.0,
        passwords: Mapping[str, str] | None = None,
    ) -> None:
        self.devices, self.broker, self.root = list(devices), broker, Path(root)
        self.latency_slack, self.passwords = latency_slack, passwords
        self.trust_key, self.insecure, self.eval_data = trust_key, insecure, eval_data
        self.learning, self.policy_interval = learning or LearnerConfig(), policy_interval
        self.network = NetworkLoop()
        self.cache = ProgramCache()
        self.agents: dict[str, EdgeAgent] = {}

    def start(self, progress: Callable[[int, int], None] | None = None) -> FleetSimulator:
        """Connect every device (BrokerUnreachable if the broker cannot be reached)."""
        self.network.start()
        for n, device in enumerate(self.devices, 1):
            budget = device.profile.budget
            slack = replace(budget, latency_ms=budget.latency_ms * self.latency_slack)
            broker = self.broker
            if self.passwords is not None:
                password = self.passwords[device.device_id]
                broker = replace(broker, username=device.device_id, password=password)
            config = AgentConfig(
                device.device_id,
                replace(device.profile, budget=slack),
                broker,
                self.root / device.device_id,
                eval_data=self.eval_data,
                policy_interval=self.policy_interval,
                trust_key=self.trust_key,
                insecure=self.insecure,
                labels=device.labels,
                learning=self.learning,
            )
            resources = TraceSource(device.trace)
            resources.inference_clock = time.thread_time  # not the others' turns
            agent = EdgeAgent(
                config,
                resources=resources,
                backends=self.cache.backend,
                network=self.network,
            )
            self.agents[device.device_id] = agent.start()
            if progress:
                progress(n, len(self.devices))
        return self

    def stop(self) -> None:
        """Every agent says offline and disconnects; then the network thread stops."""
        with ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(EdgeAgent.stop, self.agents.values()))
        self.network.stop()

    def __enter__(self) -> FleetSimulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def connected(self) -> int:
        """Agents whose connection the broker has accepted."""
        return sum(a.client.is_connected() for a in self.agents.values())

    def phases(self) -> Counter[str]:
        """How many agents report each phase."""
        return Counter(a.report.phase for a in self.agents.values())

    def feed(self, device_id: str, x: np.ndarray, y: np.ndarray, domain: str = "clean") -> None:
        """One step of a device's stream: serve ``x`` seen in ``domain``, then learn ``y``."""
        agent = self.agents[device_id]
        agent.infer(x, domain)
        agent.learn(x, y)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=100, help="how many (default: 100)")
    parser.add_argument("--broker", required=True, help="mqtt://host:port")
    parser.add_argument(
        "--trust-key", type=Path, help="the cloud's public key (required unless --insecure)"
    )
    parser.add_argument(
        "--insecure", action="store_true", help="accept unsigned states (development only)"
    )
    parser.add_argument("--profiles", default="rpi4,rpi-zero-2w,android-phone")
    parser.add_argument("--store", type=Path, default=Path("runs/fleet"), help="agents' stores")
    parser.add_argument("--prefix", default="sim", help="device ids are PREFIX-0000, ...")
    parser.add_argument("--seed", type=int, default=0, help="for the resource traces")
    args = parser.parse_args(argv)
    watch_from_env()  # started by a harness: end with it
    if args.trust_key is None and not args.insecure:
        parser.error("--trust-key is required (or --insecure, to accept unsigned states)")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    devices = make_devices(
        args.devices, args.profiles.split(","), seed=args.seed, prefix=args.prefix
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    sim = FleetSimulator(
        devices,
        BrokerAddress.parse(args.broker),
        args.store,
        trust_key=args.trust_key,
        insecure=args.insecure,
    )
    with sim:
        try:
            while not stop.wait(10):
                print(
                    f"connected {sim.connected()}/{len(devices)}; {dict(sim.phases())}", flush=True
                )
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
