"""Inference latency with no swaps and during continuous module swaps, per backend.

    python bench/hotswap.py [--seconds 4] [--gap-ms 1] [--swap-every-ms 20]

A serving thread calls the sub-model at a steady pace (a 1 ms gap, like a request
stream); in the second phase a loader thread swaps between two module sets without end
(every 20 ms by default; 0 swaps back to back, a stress case). Ends with one line of
JSON. The goal: p99 during swaps at most 1.5x p99 without.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from bench._common import FORMATS, export_parts, load_or_init, percentile, print_json  # noqa: E402

A = ((0, 1), (2, 3))
B = ((2,), (0, 3))


def serve(
    server, x, seconds: float, gap: float, swapping: bool, swap_every: float
) -> tuple[list[float], int]:
    """Latencies (us) of calls made for ``seconds``, and how many swaps happened meanwhile."""
    from edge_runtime.composer import part_names

    stop = threading.Event()
    swaps = [0]
    parts = server.bench_parts

    def swapper():
        while not stop.is_set():
            selection = A if swaps[0] % 2 else B
            server.swap({p: parts[p] for p in part_names(selection)}, selection)
            swaps[0] += 1
            stop.wait(swap_every)

    thread = threading.Thread(target=swapper) if swapping else None
    if thread:
        thread.start()
    latencies = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        server.predict(x)
        latencies.append((time.perf_counter() - start) * 1e6)
        time.sleep(gap)
    stop.set()
    if thread:
        thread.join()
    return latencies, swaps[0]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="per phase")
    parser.add_argument("--gap-ms", type=float, default=1.0, help="idle time between calls")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument(
        "--swap-every-ms",
        type=float,
        default=20.0,
        help="pause between swaps in the swapping phase (0: back to back)",
    )
    args = parser.parse_args(argv)

    from edge_runtime.artifacts import ArtifactStore
    from edge_runtime.backends import get_backend
    from edge_runtime.composer import part_names
    from edge_runtime.hotswap import SubModelServer

    net = load_or_init(None)
    x = np.random.default_rng(0).random((args.batch, 1, 8, 8), dtype=np.float32)
    figures: dict = {}
    print(f"{'backend':<11} {'phase':<10} {'calls':>6} {'swaps':>6} {'p50 us':>8} {'p99 us':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        store = ArtifactStore(tmp)
        for backend_name in FORMATS:
            parts = export_parts(net, store, backend_name)
            server = SubModelServer(get_backend(backend_name, threads=1), store.read, smoke_input=x)
            server.bench_parts = parts
            server.swap({p: parts[p] for p in part_names(A)}, A)
            row = {}
            for phase, swapping in (("steady", False), ("swapping", True)):
                lat, swaps = serve(
                    server, x, args.seconds, args.gap_ms / 1e3, swapping, args.swap_every_ms / 1e3
                )
                p50, p99 = percentile(lat, 50), percentile(lat, 99)
                print(
                    f"{backend_name:<11} {phase:<10} {len(lat):>6} {swaps:>6} "
                    f"{p50:>8.1f} {p99:>8.1f}"
                )
                row[phase] = {
                    "calls": len(lat),
                    "swaps": swaps,
                    "p50_us": round(p50, 1),
                    "p99_us": round(p99, 1),
                }
            row["p99_ratio"] = round(row["swapping"]["p99_us"] / row["steady"]["p99_us"], 3)
            print(f"{backend_name:<11} p99 during swaps / without: {row['p99_ratio']:.2f}")
            figures[backend_name] = row
            server.close()
    print_json(figures)
    return figures


if __name__ == "__main__":
    main()
