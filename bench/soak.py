"""Soak: the cloud service and a fleet of agents working for a long while, watched for leaks.

    python bench/soak.py [--minutes 30] [--devices 4] [--agent-procs 2] [--out DIR]

One Mosquitto, one ``eclm cloud serve`` process and the agents in ``--agent-procs``
processes of their own. Every device serves a batch every ``--batch-interval`` seconds
(switching between the clean and a noisy domain now and then), learns from its labels and
uploads its adapter on schedule; a scripted resource trace (memory drops and recovers)
makes it swap module sets; the service closes a round when every device has sent an
update, integrates clean rounds into a new head and rolls it out. The clock starts when
every device serves its first sub-model; RSS and open file descriptors of every process
(service, agent processes, broker) are sampled every ``--sample`` seconds. Growth is the
median of the last five samples over the median of the first five after the warm-up
(the first ``--warmup`` share of the run, longer if the first rollout has not succeeded by
then: the service's first integration loads its export toolchain; the run is extended by
as much). Writes samples.csv, soak.json and soak.png to ``--out``; ends with one line of
JSON.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # cloudproc: the service as a process

from bench._common import print_json, trained_model  # noqa: E402
from eclm_common.lifeline import popen  # noqa: E402

WAVE_TIMEOUT = 120.0  # a starved machine is slow, not a failed device


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__)
    p.add_argument("--minutes", type=float, default=30.0, help="measured run after warm start")
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--agent-procs", type=int, default=2, help="processes the agents run in")
    p.add_argument("--profile", default="rpi4", help="board profile of every device")
    p.add_argument("--batch-interval", type=float, default=0.25, help="seconds between batches")
    p.add_argument("--upload-every", type=int, default=80, help="batches between uploads")
    p.add_argument("--domain-every", type=int, default=200, help="batches between domain changes")
    p.add_argument("--policy-interval", type=float, default=2.0, help="seconds between readings")
    p.add_argument("--sample", type=float, default=5.0, help="seconds between samples")
    p.add_argument("--warmup", type=float, default=0.2, help="share of the run left out")
    p.add_argument("--out", type=Path, help="where samples, plot and logs go (default: temp)")
    p.add_argument("--model-dir", type=Path, help="a trained model (default: train one)")
    p.add_argument("--artifacts", type=Path, help="its artifact store (default: in --out)")
    p.add_argument("--epochs", type=int, default=25, help="training epochs without --model-dir")
    sub = p.add_subparsers(dest="role")
    agents = sub.add_parser("agents", help="(internal) run agents in this process")
    agents.add_argument("--ids", required=True)
    agents.add_argument("--broker", required=True)
    agents.add_argument("--trust-key", type=Path, required=True)
    agents.add_argument("--work", type=Path, required=True)
    agents.add_argument("--data", type=Path, required=True)
    agents.add_argument("--status", type=Path, required=True)
    return p.parse_args(argv)


# --- the agent processes -------------------------------------------------------------------


def cycle_source(period: int):
    """A resource trace that drops memory for a third of every ``period`` readings."""
    from edge_runtime.monitor import Reading, ResourceSource

    class Cycle(ResourceSource):
        def __init__(self) -> None:
            self.n = 0

        def read(self) -> Reading:
            self.n += 1
            low = self.n % period < period // 3
            return Reading(available_mb=0.5 if low else 8000.0)

    return Cycle()


def run_agents(args: argparse.Namespace) -> int:
    """Start the agents named in ``--ids`` and drive them until SIGTERM."""
    import numpy as np

    from device_profiles import load_profile
    from eclm_wire.mqtt import BrokerAddress
    from edge_runtime.agent import AgentConfig, EdgeAgent
    from edge_runtime.learning import LearnerConfig

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    data = np.load(args.data)
    x, y = data["x"], data["y"]
    agents, counts = {}, {}
    for device_id in args.ids.split(","):
        config = AgentConfig(
            device_id,
            load_profile(args.profile),
            BrokerAddress.parse(args.broker),
            args.work / device_id,
            backend="litert",
            trust_key=args.trust_key,
            policy_interval=args.policy_interval,
            learning=LearnerConfig(upload_every=args.upload_every),
        )
        agents[device_id] = EdgeAgent(config, resources=cycle_source(9)).start()
        counts[device_id] = {"inferences": 0, "errors": 0}

    def drive(device_id: str, agent: EdgeAgent) -> None:
        rng = np.random.default_rng(abs(hash(device_id)) % 2**32)
        n = 0
        while not stop.wait(args.batch_interval):
            if agent.runner is None:
                continue
            pick = rng.integers(0, len(x), 16)
            domain = "clean" if (n // args.domain_every) % 3 else "noise"
            try:
                agent.infer(x[pick], domain)
                agent.learn(x[pick], y[pick])
                counts[device_id]["inferences"] += 16
            except Exception as exc:  # counted and shown, the loop goes on
                counts[device_id]["errors"] += 1
                counts[device_id]["last_error"] = repr(exc)[:300]
            n += 1

    threads = [threading.Thread(target=drive, args=item, daemon=True) for item in agents.items()]
    for t in threads:
        t.start()
    while not stop.wait(2.0):
        write_status(args.status, agents, counts)
    for t in threads:
        t.join(timeout=5)
    for agent in agents.values():
        agent.stop()
    write_status(args.status, agents, counts)
    return 0


def write_status(path: Path, agents: dict, counts: dict) -> None:
    status = {
        d: {
            **counts[d],
            "uploads": a.stats.uploads,
            "swaps": a.stats.swaps,
            "warm_starts": a.stats.warm_starts,
            "serial": a.report.serial,
            "phase": a.report.phase,
            "connected": a.client.is_connected(),
        }
        for d, a in agents.items()
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(status))
    os.replace(tmp, path)


# --- the harness ---------------------------------------------------------------------------


def prepare_model(args: argparse.Namespace, work: Path) -> dict:
    model_dir = trained_model(args.model_dir, work, args.epochs)
    return {"model_dir": model_dir, "store": args.artifacts or work / "artifacts"}


def start_fleet(args: argparse.Namespace, work: Path):
    from cloudproc import Cloud

    from broker import Broker

    model = prepare_model(args, work)
    broker = Broker(kind="auto", data_dir=work / "broker").start()
    cloud = Cloud(
        work / "cloud",
        model,
        broker.url,
        aggregation=f"quorum = {args.devices}\ndeadline = 120.0",
        rollout=f"canary = 1\nwaves = [1.0]\nwave_timeout = {WAVE_TIMEOUT}",
    )
    try:
        cloud.start()
    except BaseException:
        broker.stop()
        raise
    ids = [f"soak-{i:02d}" for i in range(args.devices)]
    procs = {}
    for k in range(max(1, min(args.agent_procs, args.devices))):
        mine = ids[k :: args.agent_procs]
        cmd = [
            sys.executable,
            __file__,
            *passthrough(args),
            "agents",
            "--ids",
            ",".join(mine),
            "--broker",
            broker.url,
            "--trust-key",
            str(cloud.public),
            "--work",
            str(work / "devices"),
            "--data",
            str(model["model_dir"] / "test.npz"),
            "--status",
            str(work / f"agents-{k}.json"),
        ]
        with open(work / f"agents-{k}.log", "ab") as log:
            procs[f"agents-{k}"] = popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    return broker, cloud, procs


def passthrough(args: argparse.Namespace) -> list[str]:
    return [
        f"--profile={args.profile}",
        f"--batch-interval={args.batch_interval}",
        f"--upload-every={args.upload_every}",
        f"--domain-every={args.domain_every}",
        f"--policy-interval={args.policy_interval}",
    ]


def fleet_status(work: Path) -> dict:
    status = {}
    for path in sorted(work.glob("agents-*.json")):
        try:
            status.update(json.loads(path.read_text()))
        except (OSError, ValueError):
            pass  # being replaced right now: the next read has it
    return status


def activity(work: Path, cloud) -> dict:
    """Totals of what the fleet did, from the agents' status files and the service's state."""
    status = fleet_status(work)
    total = {k: sum(s.get(k, 0) for s in status.values()) for k in ("inferences", "swaps")}
    total["uploads_sent"] = sum(s.get("uploads", 0) for s in status.values())
    total["agent_errors"] = sum(s.get("errors", 0) for s in status.values())
    state = cloud.state()
    try:
        total["updates_stored"] = sum(state.updates_by_worker().values())
        total["updates_refused"] = sum(state.counters("rejected:").values())
        rollouts = state.rollout_states()
        total["rollouts_succeeded"] = sum(r.state == "succeeded" for r in rollouts.values())
        total["rollouts_other"] = sum(r.state != "succeeded" for r in rollouts.values())
        total["rounds_done"] = len(state.rounds("done"))
        total["model_version"] = state.latest_version()[0]
    finally:
        state.db.close()
    return total


def sample(procs: dict) -> list[dict]:
    import psutil

    rows = []
    for name, pid in procs.items():
        try:
            p = psutil.Process(pid)
            rows.append(
                {
                    "process": name,
                    "rss_mb": p.memory_info().rss / 2**20,
                    "fds": p.num_fds(),
                    "threads": p.num_threads(),
                }
            )
        except psutil.Error:
            rows.append({"process": name, "rss_mb": float("nan"), "fds": -1, "threads": -1})
    return rows


def growth(samples: list[dict], warmup_s: float) -> dict:
    """Per process: RSS and fds at the start (after warm-up) and end, growth in %."""
    out = {}
    for name in dict.fromkeys(s["process"] for s in samples):
        after = [s for s in samples if s["process"] == name and s["t"] >= warmup_s]
        if len(after) < 2:
            continue
        k = min(5, max(1, len(after) // 4))
        result = {}
        for key in ("rss_mb", "fds"):
            first = statistics.median(s[key] for s in after[:k])
            last = statistics.median(s[key] for s in after[-k:])
            result[key] = {
                "start": round(first, 2),
                "end": round(last, 2),
                "max": round(max(s[key] for s in after), 2),
                "growth_pct": round(100 * (last - first) / first, 2) if first else 0.0,
                # what is held between bursts (an export's temp files come and go)
                "floor_start": round(min(s[key] for s in after[:k]), 2),
                "floor_end": round(min(s[key] for s in after[-k:]), 2),
            }
        out[name] = result
    return out


def plot(samples: list[dict], warmup_s: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for name in dict.fromkeys(s["process"] for s in samples):
        mine = [s for s in samples if s["process"] == name]
        t = [s["t"] / 60 for s in mine]
        axes[0].plot(t, [s["rss_mb"] for s in mine], label=name)
        axes[1].plot(t, [s["fds"] for s in mine], label=name)
    for ax, label in zip(axes, ("RSS (MB)", "open fds"), strict=True):
        ax.axvline(warmup_s / 60, color="grey", linestyle=":", label="end of warm-up")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper left", ncol=3)
    axes[1].set_xlabel("minutes since every device served")
    fig.suptitle("soak: memory and file descriptors per process")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def wait_serving(work: Path, devices: int, procs: dict, timeout: float = 300.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        status = fleet_status(work)
        if len(status) == devices and all(s["phase"] == "active" for s in status.values()):
            return time.monotonic() - start
        for name, proc in procs.items():
            if proc.poll() is not None:
                raise SystemExit(f"{name} exited with {proc.returncode}; see {work}/{name}.log")
        time.sleep(0.5)
    raise SystemExit(f"the devices did not all serve within {timeout:.0f} s: {status}")


def run(args: argparse.Namespace) -> dict:
    work = args.out or Path(tempfile.mkdtemp(prefix="eclm-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"soak: {args.devices} devices in {args.agent_procs} processes, {args.minutes:g} min")
    began = time.monotonic()
    broker, cloud, agent_procs = start_fleet(args, work)
    try:
        setup_s = wait_serving(work, args.devices, agent_procs)
        print(f"every device serves its sub-model after {setup_s:.0f} s; measuring", flush=True)
        pids = {"service": cloud.proc.pid, "broker": broker.proc.pid}
        pids.update({name: p.pid for name, p in agent_procs.items()})
        samples: list[dict] = []
        start, duration = time.monotonic(), args.minutes * 60
        share = warmup_s = duration * args.warmup
        next_print, first_rollout = 0.0, None
        while (t := time.monotonic() - start) < warmup_s + duration - share:
            for name, proc in [("service", cloud.proc), *agent_procs.items()]:
                if proc.poll() is not None:
                    raise SystemExit(f"{name} exited with {proc.returncode} at {t:.0f} s")
            cloud.get("/metrics")  # scraped as Prometheus would
            samples += [{"t": round(t, 1), **row} for row in sample(pids)]
            totals = activity(work, cloud)
            # The first integration loads the export toolchain into the service: a
            # one-off, so the warm-up lasts until then (up to 10 minutes more).
            if first_rollout is None and totals["rollouts_succeeded"]:
                first_rollout = t
            warmup_s = max(share, t if first_rollout is None else first_rollout + args.sample)
            warmup_s = min(warmup_s, share + 600)
            if t >= next_print:
                next_print = t + max(30.0, args.sample)
                print_progress(t, warmup_s + duration - share, samples, totals)
            time.sleep(max(0.0, args.sample - (time.monotonic() - start - t)))
        totals = activity(work, cloud)
    finally:
        stop_fleet(broker, cloud, agent_procs)
    return report(args, work, samples, totals, setup_s, warmup_s, time.monotonic() - began)


def stop_fleet(broker, cloud, agent_procs: dict) -> None:
    """The service first (SIGTERM: it finishes the wave in flight, which needs the agents),
    then the agents, then the broker."""
    try:
        if cloud.proc and cloud.proc.poll() is None:
            cloud.proc.send_signal(signal.SIGTERM)
            try:
                cloud.proc.wait(WAVE_TIMEOUT + 30)
            except subprocess.TimeoutExpired:
                cloud.proc.kill()
        for proc in agent_procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in agent_procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    finally:
        broker.stop()


def print_progress(t: float, duration: float, samples: list[dict], totals: dict) -> None:
    latest = {s["process"]: s for s in samples if s["t"] == samples[-1]["t"]}
    procs = "  ".join(f"{n} {s['rss_mb']:.0f}MB/{s['fds']}fd" for n, s in latest.items())
    print(
        f"[{t / 60:5.1f}/{duration / 60:.1f} min] {procs} | {totals['inferences']} inferences, "
        f"{totals['swaps']} swaps, {totals['updates_stored']} updates, "
        f"{totals['rollouts_succeeded']} rollouts, v{totals['model_version']}",
        flush=True,
    )


def report(args, work: Path, samples, totals, setup_s, warmup_s, wall_s) -> dict:
    found = growth(samples, warmup_s)
    with open(work / "samples.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["t", "process", "rss_mb", "fds", "threads"])
        writer.writeheader()
        writer.writerows(samples)
    plot(samples, warmup_s, work / "soak.png")
    print(
        f"\n{'process':<10} {'RSS start':>10} {'RSS end':>9} {'RSS growth':>11}"
        f" {'fds start':>10} {'fds end':>8} {'fds max':>8} {'fds growth':>11}"
    )
    for name, g in found.items():
        r, f = g["rss_mb"], g["fds"]
        print(
            f"{name:<10} {r['start']:>8.1f}MB {r['end']:>7.1f}MB {r['growth_pct']:>10.1f}%"
            f" {f['start']:>10.0f} {f['end']:>8.0f} {f['max']:>8.0f} {f['growth_pct']:>10.1f}%"
        )
    print(
        f"{totals['inferences']} inferences, {totals['swaps']} swaps, "
        f"{totals['uploads_sent']} uploads sent, {totals['updates_stored']} stored, "
        f"{totals['updates_refused']} refused, {totals['rollouts_succeeded']} rollouts succeeded "
        f"({totals['rollouts_other']} not), model v{totals['model_version']}, "
        f"{totals['agent_errors']} agent errors"
    )
    result = {
        "minutes": args.minutes,
        "devices": args.devices,
        "agent_procs": args.agent_procs,
        "setup_s": round(setup_s, 1),
        "wall_s": round(wall_s, 1),
        "warmup_s": warmup_s,
        "samples": len(samples),
        "growth": found,
        "max_rss_growth_pct": max(g["rss_mb"]["growth_pct"] for g in found.values()),
        "max_fds_growth_pct": max(g["fds"]["growth_pct"] for g in found.values()),
        **totals,
        "out": str(work),
    }
    (work / "soak.json").write_text(json.dumps({"result": result, "samples": samples}))
    print(f"samples: {work / 'samples.csv'}\nplot:    {work / 'soak.png'}")
    print_json(result)
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.role == "agents":
        return run_agents(args)
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
