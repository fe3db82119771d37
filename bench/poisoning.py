"""Poisoned rounds: each strategy's distance from the honest mean under 20% attackers.

    python bench/poisoning.py [--devices 10] [--share 0.2] [--seed 0]

Real adapters (``eclm_lab.robustness.digits_fleet``), one round through the update
checks, the first ``--share`` of the devices attackers of one kind per row (scaled x100,
sign-flipped, NaN, lying sample counts of 1000x). Distance: |aggregate - honest mean| /
|honest mean - head| (0: the honest mean; 1: as far as the head the round started from).
Prints a table, then one line of JSON.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import print_json  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--share", type=float, default=0.2, help="share of attackers")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)  # every refused NaN update logs a line

    from cloud_trainer.federation.strategies import (
        CoordinateMedian,
        Krum,
        MultiKrum,
        TrimmedMean,
        WeightedMean,
    )
    from eclm_lab.robustness import digits_fleet, table

    strategies = {
        "mean, no cap": WeightedMean(cap=0),
        "mean, cap": WeightedMean(),
        "median": CoordinateMedian(),
        "trimmed-mean": TrimmedMean(),
        "krum": Krum(),
        "multi-krum": MultiKrum(),
    }
    fleet = digits_fleet(args.devices, seed=args.seed)
    rows = table(fleet, strategies, args.share)
    print(f"{'attack':<14}" + "".join(f"{name:>14}" for name in strategies))
    for attack, row in rows.items():
        if attack == "honest device":
            continue
        print(f"{attack:<14}" + "".join(f"{row[name]:>14.3f}" for name in strategies))
    print(f"(one honest device's own update is up to {rows['honest device']['-']:.3f} away)")
    result = {
        "bench": "poisoning",
        "devices": args.devices,
        "share": args.share,
        "seed": args.seed,
        "honest_device_max": round(rows["honest device"]["-"], 4),
        "distance": {
            attack: {name: round(d, 4) for name, d in row.items()}
            for attack, row in rows.items()
            if attack != "honest device"
        },
    }
    print_json(result)
    return result


if __name__ == "__main__":
    main()
