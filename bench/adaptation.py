"""Continuous adaptation against the baselines, on the same shifting streams, in one run.

    python bench/adaptation.py [--model DIR | --data NAME --preset NAME [--epochs N]]
                               [--seed 0 [1 2 ...]] [--devices 6] [--steps 120]
                               [--domains noise,rotate,contrast] [--out DIR]
                               [--tuned-from DIR]

Per seed: take the model in ``--model`` (trained or decomposed; its ``test.npz`` makes the
streams, so inputs, domains and memory readings follow it) or train the ``--preset``
network on ``--data`` (default: digits) under ``--out``; start Mosquitto (or the embedded
broker), deploy a fleet of real edge agents (``--profiles`` in turn; each device's memory
readings leave the model a share of its size, and drop once to its smallest sub-model),
tune the baselines on seed + 1000, then stream. Prints the table per seed, writes
``report.json`` and ``adaptation.png`` per seed under ``--out``, and ends with one line of
JSON holding the headline figures (averaged over the seeds).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# One torch thread per process (the benchmark, the cloud service and its export worker
# inherit it): they share the cores, and on a busy machine torch's pool of spinning
# threads made a training step 30x slower than on one thread (86 s against 2.8 s).
os.environ.setdefault("OMP_NUM_THREADS", "1")

from bench._common import print_json  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model", type=Path, help="a model dir (eclm cloud train|decompose); default: train one"
    )
    parser.add_argument("--data", help="without --model: the data to train on (default: digits)")
    parser.add_argument("--preset", default="digits", help="without --model: the network")
    parser.add_argument("--epochs", type=int, default=25, help="without --model: epochs")
    parser.add_argument("--seed", type=int, nargs="+", default=[0])
    parser.add_argument("--devices", type=int, default=6)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--domains", default="noise,rotate,contrast")
    parser.add_argument(
        "--profiles",
        help="comma list of board profiles, given to the devices in turn "
        "(default: rpi4,rpi-zero-2w,rpi5,android-phone)",
    )
    parser.add_argument("--no-tune", action="store_true", help="baselines keep their defaults")
    parser.add_argument("--out", type=Path, help="where reports and plots go (default: a temp dir)")
    parser.add_argument(
        "--tuned-from",
        type=Path,
        help="take each seed's tuned settings from DIR/seed<N>/report.json of an earlier run "
        "(skips the tuning, which runs no part of the cloud)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from eclm_lab.experiment import ADAPTIVE, Settings, run_with_broker
    from eclm_lab.report import headline, table
    from eclm_lab.scenario import ScenarioSpec

    out = args.out or Path(tempfile.mkdtemp(prefix="eclm-adaptation-"))
    figures = []
    for seed in args.seed:
        spec = ScenarioSpec(
            devices=args.devices,
            steps=args.steps,
            domains=tuple(args.domains.split(",")),
            seed=seed,
        )
        tuned = None
        if args.tuned_from:
            earlier = json.loads((args.tuned_from / f"seed{seed}" / "report.json").read_text())
            tuned = earlier["settings"]["tuned"]
            print(f"seed {seed}: settings tuned in {args.tuned_from}: {tuned}", flush=True)
        settings = replace(Settings(spec=spec), tune=not (args.no_tune or tuned))
        if args.profiles:
            settings = replace(settings, profiles=tuple(args.profiles.split(",")))
        report, paths = run_with_broker(
            settings,
            out / f"seed{seed}",
            model_dir=args.model,
            data=args.data,
            preset=args.preset,
            epochs=args.epochs,
            tuned=tuned,
        )
        print(f"\nseed {seed}:\n{table(report['methods'])}")
        print(f"report: {paths[0]}\nplot:   {paths[1]}")
        figures.append(headline(report, ADAPTIVE))
    mean = {
        key: (
            None
            if any(f[key] is None for f in figures)
            else float(np.mean([f[key] for f in figures]))
        )
        for key, value in figures[0].items()
        if not isinstance(value, dict)  # per-domain figures stay in per_seed
    }
    print_json(
        {
            "seeds": args.seed,
            "devices": args.devices,
            "steps": args.steps,
            "model": str(args.model or f"{args.preset} on {args.data or 'digits'}"),
            **mean,
            "per_seed": figures,
        }
    )


if __name__ == "__main__":
    main()
