"""The arm64 check's driver (scripts/arm64-check.sh prepares the machine and calls it).

Given a Debian arm64 root that runs under qemu-user-static (binfmt), it:

1. trains and exports the modular model on the host (cached under --cache);
2. makes an operator's access directory (CA, broker certificate, users) and signing keys,
   and starts Mosquitto with TLS and passwords on the host;
3. builds ``eclm edge bundle --profile rpi4`` (aarch64) and installs it inside the root
   with the bundle's own install.sh (chroot), timed;
4. starts the agent there as eclm-edge.service would (bin/run.sh with edge.env and
   credentials.env), with held-out data to report accuracy on and a latency slack;
5. has the cloud sign and assign the board's sub-model, waits until the board reports
   ``active``, and compares the accuracy it reports with the accuracy the same parts
   give on the host;
6. prints a summary and one JSON line; exits 0 only if the board converged within the
   tolerance.

It is not a speed measurement: qemu user-mode emulates every instruction.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEVICE_PREFIX = "/opt/eclm"
DATA_IN_ROOT = "/opt/eclm-data/test.npz"
HOST_CA_IN_ROOT = "/etc/ssl/certs/eclm-host-ca.crt"
CHROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, required=True, help="the Debian arm64 root")
    p.add_argument("--cache", type=Path, required=True, help="model cache and run directory")
    p.add_argument("--profile", default="rpi4", help="an aarch64 board profile")
    p.add_argument("--device-id", default="arm64-board", help="(default: %(default)s)")
    p.add_argument(
        "--latency-slack",
        type=float,
        default=50.0,
        help="the agent's --latency-slack: its health check holds the emulated board to "
        "this many times the profile's latency budget (under qemu on a busy 2-core host "
        "the rpi4's sub-model took 50-160 ms a sample against its 10 ms; default: %(default)s)",
    )
    p.add_argument(
        "--litert-delegates",
        choices=("default", "none"),
        default="default",
        help="the agent's --litert-delegates (default: %(default)s: checked, then used)",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=0.01,
        help="how far the board's accuracy may be from the host's on the same modules "
        "(absolute; default: %(default)s)",
    )
    p.add_argument(
        "--timeout", type=float, default=900.0, help="seconds to converge (default: %(default)s)"
    )
    p.add_argument("--epochs", type=int, default=25, help="training, when not cached")
    return p.parse_args(argv)


def trained(cache: Path, epochs: int) -> tuple[Path, Path]:
    """The model directory and artifact store, trained and exported once per cache."""
    from cloud_trainer.export.plan import export_model
    from cloud_trainer.model.checkpoint import train_model

    model, store, ready = cache / "model", cache / "artifacts", cache / "ready"
    if not ready.is_file():
        shutil.rmtree(model, ignore_errors=True)
        shutil.rmtree(store, ignore_errors=True)
        print(f"training the modular model ({epochs} epochs) and exporting it", flush=True)
        train_model(model, epochs=epochs)
        export_model(model, store)
        ready.write_text("trained\n")
    return model, store


def chroot(root: Path, script: str, **kw) -> list[str]:
    """argv running ``script`` with sh inside ``root``, in a clean environment (the host's
    CA bundle for pip: it is the one that reaches the package index from here)."""
    env = [f"PATH={CHROOT_PATH}", "HOME=/root", "LANG=C.UTF-8", f"PIP_CERT={HOST_CA_IN_ROOT}"]
    env += [f"{k}={v}" for k, v in kw.items()]
    return ["chroot", str(root), "/usr/bin/env", "-i", *env, "/bin/sh", "-c", script]


class Mounts:
    """/proc, /dev and /sys of the host inside the root while the check runs."""

    def __init__(self, root: Path) -> None:
        self.points = [(root / "proc", ["-t", "proc", "proc"])]
        self.points += [(root / d, ["--bind", f"/{d}"]) for d in ("dev", "sys")]
        self.done: list[Path] = []

    def __enter__(self) -> Mounts:
        for point, how in self.points:
            if not os.path.ismount(point):
                subprocess.run(["mount", *how, str(point)], check=True)
                self.done.append(point)
        return self

    def __exit__(self, *exc) -> None:
        for point in reversed(self.done):
            subprocess.run(["umount", "-l", str(point)], check=False)


def prepare_root(root: Path, data: Path) -> None:
    """DNS, the host's CA bundle and the held-out data inside the root."""
    shutil.copy2("/etc/resolv.conf", root / "etc/resolv.conf")
    shutil.copy2(
        os.environ.get("ECLM_HOST_CA", "/etc/ssl/certs/ca-certificates.crt"),
        root / HOST_CA_IN_ROOT.lstrip("/"),
    )
    target = root / DATA_IN_ROOT.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(data, target)


def build_and_install(args, work: Path, access, public: Path, port: int) -> dict:
    """The bundle, unpacked into the root and installed by its install.sh; its timings."""
    from eclm.bundle import BundleSpec, build_bundle

    archive = work / "bundle.tar.gz"
    spec = BundleSpec(
        device_id=args.device_id,
        profile=args.profile,
        access_dir=access.dir,
        trust_key=public,
        broker=f"mqtts://127.0.0.1:{port}",
    )
    started = time.monotonic()
    build_bundle(spec, archive)
    built = time.monotonic() - started
    unpack = args.root / "tmp/eclm-bundle"
    shutil.rmtree(unpack, ignore_errors=True)
    unpack.mkdir(parents=True)
    with tarfile.open(archive) as tar:
        tar.extractall(unpack, filter="data")
    top = f"/tmp/eclm-bundle/eclm-edge-{args.device_id}"
    pins = (unpack / f"eclm-edge-{args.device_id}/requirements.txt").read_text()
    litert = next(ln.split()[0] for ln in pins.splitlines() if ln.startswith("ai-edge-litert"))
    print(f"bundle built in {built:.1f} s; pins {litert}; installing in the root", flush=True)
    log = work / "install.log"
    started = time.monotonic()
    with open(log, "wb") as fh:
        done = subprocess.run(
            chroot(args.root, f"sh {top}/install.sh --no-systemd", PREFIX=DEVICE_PREFIX),
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    seconds = time.monotonic() - started
    text = log.read_text(errors="replace")
    if done.returncode != 0:
        raise SystemExit(f"install.sh failed (exit {done.returncode}):\n{text[-3000:]}")
    print("\n".join("  " + ln for ln in text.splitlines() if ln.startswith("eclm install")))
    env = args.root / DEVICE_PREFIX.lstrip("/") / "etc/edge.env"
    with open(env, "a") as fh:  # what an operator of an emulated board would set
        fh.write(f"ECLM_EVAL_DATA={DATA_IN_ROOT}\nECLM_LATENCY_SLACK={args.latency_slack:g}\n")
        fh.write(f"ECLM_LITERT_DELEGATES={args.litert_delegates}\n")
    return {"bundle_s": round(built, 1), "install_s": round(seconds, 1), "litert_pin": litert}


def start_agent(args, work: Path):
    from eclm_common.lifeline import popen

    etc = f"{DEVICE_PREFIX}/etc"
    script = f"set -a; . {etc}/edge.env; . {etc}/credentials.env; set +a; "
    script += f'cd "$ECLM_STORE"; exec {DEVICE_PREFIX}/bin/run.sh'
    log = open(work / "agent.log", "wb")
    return popen(chroot(args.root, script), stdout=log, stderr=subprocess.STDOUT), log


def memory(pid: int) -> dict:
    """The agent's resident memory now and at its peak (qemu's own pages included)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return {"rss_mb": round(fields["VmRSS"], 1), "peak_rss_mb": round(fields["VmHWM"], 1)}


def host_accuracy(store: Path, desired, active: tuple[str, ...], eval_set, profile) -> float:
    """The accuracy the cloud expects: the module set the board serves, run on the host."""
    from edge_runtime.artifacts import ArtifactStore
    from edge_runtime.backends import get_backend
    from edge_runtime.composer import part_names
    from edge_runtime.monitor import PsutilSource
    from edge_runtime.runner import ModularRunner

    refs = [r for r in desired.artifacts if r.format in ("tflite", "safetensors")]
    parts = {r.part: r.sha256 for r in refs if r.format == "tflite"}
    option = next(
        o for o in desired.options if {parts[p] for p in part_names(o.selection)} == set(active)
    )
    backend = get_backend("litert", threads=1, check=None)
    runner = ModularRunner(
        "litert",
        backend,
        ArtifactStore(store),
        refs,
        (option,),
        profile.budget,
        PsutilSource().read(),
    )
    try:
        return float(runner.evaluate(eval_set))
    finally:
        runner.close()


def cloud(broker, access, store: Path, private: Path):
    """The fleet coordinator logged in as the cloud on the broker's TLS cloud listener."""
    from cloud_trainer.fleet.coordinator import FleetCoordinator
    from cloud_trainer.fleet.keys import load_signing_key
    from eclm_wire.mqtt import BrokerAddress
    from edge_runtime.artifacts import ArtifactStore

    address = BrokerAddress(
        "127.0.0.1",
        broker.cloud_port,
        True,
        "cloud",
        access.password("cloud"),
        str(access.tls.cafile),
    )
    key = load_signing_key(private)
    return FleetCoordinator(
        address, ArtifactStore(store), client_id="cloud-arm64", signing_key=key
    ).start()


def converge(args, fc, model: Path, store: Path, agent) -> dict:
    """Sign and assign the board's sub-model, wait for its report, compare accuracies."""
    from cloud_trainer.fleet.deploy import plan_fleet, wait_for_fleet
    from device_profiles import load_profile
    from edge_runtime.data import load_npz

    started = time.monotonic()
    target = plan_fleet(model, store, [(args.device_id, args.profile)], modular=True)
    target = target[args.device_id]
    desired = fc.assign(
        args.device_id, list(target.artifacts), options=target.options, target=target.profile
    )
    reached = wait_for_fleet(fc, {args.device_id: desired.serial}, timeout=args.timeout)
    seconds = time.monotonic() - started
    found = {"converge_s": round(seconds, 1), "serial": desired.serial}
    report = fc.reported.get(args.device_id)
    if agent.poll() is None:
        found.update(memory(agent.pid))
    if report is None or report.serial != desired.serial:
        return {**found, "phase": "no report", "converged": False}
    found.update(phase=report.phase, backend=report.backend, detail=report.detail)
    if not reached or report.accuracy is None:
        return {**found, "converged": False}
    expected = host_accuracy(
        store, desired, report.active, load_npz(model / "test.npz"), load_profile(args.profile)
    )
    gap = abs(report.accuracy - expected)
    return {
        **found,
        "accuracy": round(report.accuracy, 4),
        "expected_accuracy": round(expected, 4),
        "tolerance": args.tolerance,
        "converged": gap <= args.tolerance,
    }


def run(args) -> dict:
    from broker import Access, Broker
    from broker.launcher import free_port
    from cloud_trainer.fleet.keys import init_keys

    model, store = trained(args.cache, args.epochs)
    work = args.cache / "run"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    access = Access(work / "access").init()
    private, public = init_keys(work / "keys")
    port = free_port()
    prepare_root(args.root, model / "test.npz")
    shutil.rmtree(args.root / DEVICE_PREFIX.lstrip("/"), ignore_errors=True)
    result = {"profile": args.profile, "machine": "aarch64 (qemu-user-static)"}
    with Mounts(args.root):
        result.update(build_and_install(args, work, access, public, port))
        broker = Broker(
            kind="mosquitto",
            port=port,
            data_dir=work / "broker",
            password_file=access.password_file,
            tls=access.tls,
        ).start()
        agent, log = start_agent(args, work)
        fc = cloud(broker, access, store, private)
        try:
            result.update(converge(args, fc, model, store, agent))
        finally:
            fc.stop()
            agent.terminate()
            try:
                agent.wait(60)
            except subprocess.TimeoutExpired:
                agent.kill()
            broker.stop()
            log.close()
    result["agent_log"] = str(work / "agent.log")
    text = (work / "agent.log").read_text(errors="replace")
    fell_back = "running LiteRT without them" in text  # edge_runtime/backends/delegates.py
    fallback = "none (the check fell back)"
    result["litert_delegates"] = fallback if fell_back else args.litert_delegates
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    agent_log = Path(result["agent_log"]).read_text(errors="replace")
    lines = [
        ln
        for ln in agent_log.splitlines()
        if "health" in ln or "delegates" in ln or " on litert" in ln or "active" in ln
    ]
    print("agent (in the root):", *("  " + ln[:160] for ln in lines[-6:]), sep="\n")
    ok = result.get("converged", False)
    print(
        f"arm64 check: {'CONVERGED' if ok else 'FAILED'}: profile {result['profile']} on "
        f"{result['machine']}, {result['litert_pin']} (delegates {result['litert_delegates']}); "
        f"install.sh {result['install_s']} s; "
        f"phase {result.get('phase')}; accuracy {result.get('accuracy')} against "
        f"{result.get('expected_accuracy')} expected (tolerance {args.tolerance}); "
        f"RSS {result.get('rss_mb')} MB (peak {result.get('peak_rss_mb')} MB, qemu included)"
    )
    print(json.dumps(result, sort_keys=True))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
