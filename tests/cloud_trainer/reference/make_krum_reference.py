"""Write ``krum_flower.json``: inputs and Flower's ``aggregate_krum`` outputs on them.

Run with a Python that has Flower (``pip install flwr`` in a venv of its own; the project
does not depend on it)::

    python tests/cloud_trainer/reference/make_krum_reference.py

Each case is a list of (tensors, samples) of a few devices, some of them far off, and the
``num_malicious``/``to_keep`` Flower was called with; the outputs are Flower's, as lists.
"""

import json
from pathlib import Path

import flwr
import numpy as np
from flwr.server.strategy.aggregate import aggregate_krum

CASES = [  # (devices, bad ones, num_malicious, to_keep)
    (5, 1, 1, 0),
    (7, 1, 2, 0),
    (7, 2, 2, 3),
    (10, 2, 2, 8),
    (10, 3, 2, 0),
    (12, 2, 3, 6),
]


def main() -> None:
    rng = np.random.default_rng(18)
    cases = []
    for devices, bad, malicious, keep in CASES:
        results = []
        for i in range(devices):
            weight = rng.normal(0, 1, (3, 4)) + 2.0
            bias = rng.normal(0, 1, 3)
            if i < bad:  # an attacker: scaled or sign-flipped
                weight, bias = (weight * 50, bias * 50) if i % 2 == 0 else (-weight, -bias)
            results.append(([weight, bias], int(rng.integers(10, 200))))
        out = aggregate_krum(results, malicious, keep)
        cases.append(
            {
                "num_malicious": malicious,
                "to_keep": keep,
                "inputs": [
                    {"weight": w.tolist(), "bias": b.tolist(), "samples": n}
                    for (w, b), n in results
                ],
                "output": {"weight": out[0].tolist(), "bias": out[1].tolist()},
            }
        )
    path = Path(__file__).with_name("krum_flower.json")
    path.write_text(json.dumps({"flwr": flwr.__version__, "cases": cases}, indent=1) + "\n")
    print(f"{len(cases)} cases from Flower {flwr.__version__} in {path}")


if __name__ == "__main__":
    main()
