"""Validating and aggregating adapter updates: each strategy next to the plain mean.

    python bench/aggregate.py [--devices 50] [--updates 5] [--seed 0] [--rounds 7]

Real AdapterUpdate messages (a 10x512 weight and its bias, float16 safetensors after a
JSON header, as devices send them: a head plus a small per-device delta, fresh nonces),
encoded to bytes once. A pass, per strategy: a fresh DomainAggregator decodes, validates
and keeps every message (``add``), and aggregates the domain after each round of one
update per device (``--updates`` rounds). Then ``aggregate`` alone on a full domain.
Strategies take turns, so the ratios against the plain mean hold on a busy machine.
Ends with one line of JSON.
"""

from __future__ import annotations

import argparse
import secrets
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from bench._common import print_json, time_interleaved  # noqa: E402

CLASSES, FEATURES = 10, 512


def payloads(devices: int, updates: int, seed: int) -> tuple[dict, list[list[bytes]]]:
    """A head, and ``updates`` rounds of one encoded update per device."""
    import eclm_wire as wire
    from eclm_wire.codec import tensor_bytes

    rng = np.random.default_rng(seed)
    head = {
        "weight": rng.normal(0, 0.05, (CLASSES, FEATURES)).astype(np.float32),
        "bias": rng.normal(0, 0.05, CLASSES).astype(np.float32),
    }
    rounds = []
    for _ in range(updates):
        batch = []
        for device in range(devices):
            weights = {k: v + rng.normal(0, 0.01, v.shape) for k, v in head.items()}
            histogram = tuple(int(n) for n in rng.integers(0, 20, CLASSES))
            update = wire.AdapterUpdate(
                device_id=f"pi4-{device:04d}",
                domain="rotate",
                base="1",
                samples=sum(histogram),
                histogram=histogram,
                weights=tensor_bytes(weights),
                nonce=secrets.token_hex(8),
            )
            batch.append(update.encode())
        rounds.append(batch)
    return head, rounds


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=50, help="devices per round")
    parser.add_argument("--updates", type=int, default=5, help="rounds: updates per device")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=7, help="timed passes per strategy")
    args = parser.parse_args(argv)

    import eclm_wire as wire
    from cloud_trainer.federation.aggregation import DomainAggregator
    from cloud_trainer.federation.strategies import CoordinateMedian, TrimmedMean, WeightedMean

    strategies = {
        "mean": WeightedMean(),
        "median": CoordinateMedian(),
        "trimmed-mean": TrimmedMean(trim=0.2),
        "mean clip=1": WeightedMean(clip=1.0),
        "median clip=1": CoordinateMedian(clip=1.0),
    }
    head, rounds = payloads(args.devices, args.updates, args.seed)
    count = args.devices * args.updates

    def full_pass(strategy) -> DomainAggregator:
        aggregator = DomainAggregator(head, strategy=strategy)
        for batch in rounds:
            for payload in batch:
                aggregator.add(wire.decode(wire.AdapterUpdate, payload))
            aggregator.aggregate("rotate")
        return aggregator

    filled = {name: full_pass(s) for name, s in strategies.items()}
    assert all(a.accepted == count and not a.rejected for a in filled.values())
    end_to_end = time_interleaved(
        {name: (lambda s=s: full_pass(s)) for name, s in strategies.items()},
        rounds=args.rounds,
        inner=1,
    )
    combine = time_interleaved(
        {name: (lambda a=a: a.aggregate("rotate")) for name, a in filled.items()},
        rounds=args.rounds,
        inner=10,
    )
    figures = {
        name: {
            "updates_per_s": round(count / end_to_end[name] * 1e6),
            "throughput_vs_mean": round(end_to_end["mean"] / end_to_end[name], 2),
            "aggregate_ms": round(combine[name] / 1e3, 3),
            "aggregate_time_vs_mean": round(combine[name] / combine["mean"], 1),
        }
        for name in strategies
    }
    size = len(rounds[0][0])
    print(f"{count} updates ({args.devices} devices x {args.updates} rounds), {size} bytes each")
    print(f"{'strategy':<14} {'updates/s':>10} {'/ mean':>7} {'aggregate ms':>13} {'x mean':>7}")
    for name, row in figures.items():
        print(
            f"{name:<14} {row['updates_per_s']:>10} {row['throughput_vs_mean']:>7.2f} "
            f"{row['aggregate_ms']:>13.3f} {row['aggregate_time_vs_mean']:>7.1f}"
        )
    print("updates/s: decode, validate, nonce check, keep, and one aggregate per round;")
    print("/ mean: that throughput over the plain mean's; x mean: aggregate time over the mean's")
    print_json({"devices": args.devices, "updates": args.updates, "bytes": size, **figures})
    return figures


if __name__ == "__main__":
    main()
