"""Chaos: broker restarts and network cuts during update uploads and rollouts.

    python bench/chaos.py [--restarts 20] [--cuts 20] [--devices 3] [--out DIR]

A Mosquitto of its own, ``eclm cloud serve`` as a process and ``--devices`` real edge
agents that reach the broker through a loopback proxy (tests/netproxy.py). The agents
serve a batch and upload their adapter every ``--interval`` seconds; a round closes when
every device has sent one, and each clean round becomes a new head rolled out in waves.
Faults, shuffled: ``--restarts`` broker restarts (SIGTERM, down 0.5-3 s, same port and
data directory) and ``--cuts`` link faults (a third each: a cut, a 2-8 s partition that
then resumes, a 2-8 s partition that ends in a cut), the first of each kind and then
every other one waiting (up to 20 s) for a rollout to be running. ``--kills`` adds broker
SIGKILLs, which lose what Mosquitto had not saved yet (it autosaves every 30 s).
After each fault the fleet must converge: every device connected and active on the
desired state the broker retains for it, and every update a device got a PUBACK for
stored in the service's database. Prints a table of faults and one line of JSON.
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # chaos, netproxy, cloudproc

from bench._common import print_json, trained_model  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__)
    p.add_argument("--restarts", type=int, default=20, help="broker restarts (SIGTERM)")
    p.add_argument("--cuts", type=int, default=20, help="cuts and partitions of agent links")
    p.add_argument("--kills", type=int, default=0, help="broker SIGKILLs (may lose state)")
    p.add_argument("--devices", type=int, default=3)
    p.add_argument("--interval", type=float, default=0.5, help="seconds between a device's uploads")
    p.add_argument("--gap", type=float, default=2.0, help="max seconds of calm between faults")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="work directory (default: a temporary one)")
    p.add_argument("--model-dir", type=Path, help="a trained model (default: train one)")
    p.add_argument("--artifacts", type=Path, help="its artifact store (default: in --out)")
    p.add_argument("--epochs", type=int, default=25, help="training epochs without --model-dir")
    return p.parse_args(argv)


def schedule(args: argparse.Namespace, rng: random.Random) -> list[tuple[str, float]]:
    """(kind, seconds to wait for a rollout) for every fault, shuffled."""
    links = ("cut", "partition", "partition+cut")
    kinds = ["restart"] * args.restarts + [links[i % 3] for i in range(args.cuts)]
    kinds += ["kill"] * args.kills
    rng.shuffle(kinds)
    seen: dict[str, int] = {}
    out = []
    for kind in kinds:
        n = seen[kind] = seen.get(kind, 0) + 1
        out.append((kind, 20.0 if n % 2 == 1 else 0.0))
    return out


def prepare(args: argparse.Namespace, work: Path) -> dict:
    model_dir = trained_model(args.model_dir, work, args.epochs)
    return {"model_dir": model_dir, "store": args.artifacts or work / "artifacts"}


def run(args: argparse.Namespace) -> dict:
    from chaos import ChaosFleet

    work = args.out or Path(tempfile.mkdtemp(prefix="eclm-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    plan = schedule(args, rng)
    fleet = ChaosFleet(work, prepare(args, work), devices=args.devices, interval=args.interval)
    began = time.monotonic()
    try:
        fleet.start()
        setup = fleet.wait_converged(timeout=300)
        if setup is None:
            raise SystemExit(f"the fleet did not come up: {fleet.lagging()}")
        print(f"{args.devices} devices serve after {time.monotonic() - began:.0f} s; faults:")
        fleet.drive()
        for i, (kind, wait_rollout) in enumerate(plan, 1):
            time.sleep(rng.uniform(0, args.gap))
            f = fleet.inject(kind, rng, wait_rollout=wait_rollout)
            took = "NOT CONVERGED" if f.converge_s is None else f"converged in {f.converge_s:.1f} s"
            print(
                f"  {i:>2}/{len(plan)} {kind:<14} {f.seconds:4.1f} s"
                f"{' during a rollout' if f.during_rollout else '                 '}  {took}"
                f"  ({f.acknowledged} updates acknowledged"
                f"{f', {f.lost} LOST' if f.lost else ''})",
                flush=True,
            )
            if f.converge_s is None:
                print(f"     lagging: {fleet.lagging()}", flush=True)
        end = fleet.settle()
    finally:
        fleet.stop()
    return report(args, fleet, end, time.monotonic() - began, work)


def report(args, fleet, end: dict, wall: float, work: Path) -> dict:
    head = ("fault", "count", "in rollout", "converged", "median s", "max s", "lost")
    print("\n{:<14} {:>5} {:>10} {:>9} {:>8} {:>6} {:>5}".format(*head))
    by_kind: dict[str, dict] = {}
    for kind in dict.fromkeys(f.kind for f in fleet.faults):
        mine = [f for f in fleet.faults if f.kind == kind]
        times = [f.converge_s for f in mine if f.converge_s is not None]
        by_kind[kind] = {
            "count": len(mine),
            "during_rollout": sum(f.during_rollout for f in mine),
            "converged": len(times),
            "median_s": round(statistics.median(times), 2) if times else None,
            "max_s": round(max(times), 2) if times else None,
            "lost": sum(f.lost for f in mine),
        }
        k = by_kind[kind]
        print(
            f"{kind:<14} {k['count']:>5} {k['during_rollout']:>10} {k['converged']:>9}"
            f" {k['median_s'] or float('nan'):>8.2f} {k['max_s'] or float('nan'):>6.2f}"
            f" {k['lost']:>5}"
        )
    lost = end["lost"]
    print(
        f"end: {'converged' if end['converged'] else 'NOT converged: ' + str(end['lagging'])};"
        f" {end['on_latest_version']}/{args.devices} devices on model v{end['model_version']};"
        f" updates sent {end['sent']}, acknowledged {end['acknowledged']}, stored"
        f" {end['stored']}, lost {len(lost)}; refused {end['refused']};"
        f" rollouts {sum(s == 'succeeded' for s in end['rollouts'].values())} succeeded of"
        f" {len(end['rollouts'])}; {wall:.0f} s"
    )
    if end["errors"]:
        print(f"agent errors: {end['errors']}")
    link = ("cut", "partition", "partition+cut")
    result = {
        "restarts": sum(f.kind == "restart" for f in fleet.faults),
        "kills": sum(f.kind == "kill" for f in fleet.faults),
        "cuts": sum(f.kind in link for f in fleet.faults),
        "faults_during_rollout": sum(f.during_rollout for f in fleet.faults),
        "faults_converged": sum(f.converge_s is not None for f in fleet.faults),
        "devices": args.devices,
        "devices_converged": 0 if not end["converged"] else args.devices,
        "devices_on_latest_version": end["on_latest_version"],
        "model_version": end["model_version"],
        "updates_sent": end["sent"],
        "updates_acknowledged": end["acknowledged"],
        "updates_stored": end["stored"],
        "lost": len(lost),
        "lost_in_kills": sum(f.lost for f in fleet.faults),
        "refused": end["refused"],
        "rollouts": len(end["rollouts"]),
        "rollouts_succeeded": sum(s == "succeeded" for s in end["rollouts"].values()),
        "converge_s": [
            None if f.converge_s is None else round(f.converge_s, 2) for f in fleet.faults
        ],
        "fault_kinds": [f.kind for f in fleet.faults],
        "by_kind": by_kind,
        "wall_s": round(wall, 1),
        "out": str(work),
    }
    print_json(result)
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    result = run(args)
    ok = result["lost"] == result["lost_in_kills"] and result["devices_converged"] == args.devices
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
