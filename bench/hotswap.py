"""Inference latency with no swaps and during continuous module swaps, per backend.

    python bench/hotswap.py [--seconds 4] [--gap-ms 1] [--swap-every-ms 20]

A serving thread calls the sub-model at a steady pace (a 1 ms gap, like a request
stream); in the swapping phase a loader thread swaps between two module sets without end
(every 20 ms by default; 0 swaps back to back, a stress case). The two phases alternate
in ``--rounds`` short windows, so that load from elsewhere on the machine falls on both
alike. Ends with one line of JSON. The goal: p99 during swaps at most 1.5x p99 without.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from bench._common import (  # noqa: E402
    FORMATS,
    export_parts,
    inputs_for,
    load_or_init,
    model_args,
    percentile,
    print_json,
)


def swap_pair(net) -> tuple[tuple, tuple]:
    """Two module sets the swapper alternates between: the first half of every layer's
    modules, and the second half plus the first module."""
    m = net.spec.modules_per_layer
    a = tuple(tuple(range(max(1, m // 2))) for _ in range(net.spec.layers))
    b = tuple(tuple(sorted({0, *range(m // 2, m)})) for _ in range(net.spec.layers))
    return a, b


def serve(
    server, x, seconds: float, gap: float, swapping: bool, swap_every: float, pair
) -> tuple[list[float], int]:
    """Latencies (us) of calls made for ``seconds``, and how many swaps happened meanwhile."""
    from edge_runtime.composer import part_names

    stop = threading.Event()
    swaps = [0]
    parts = server.bench_parts

    def swapper():
        while not stop.is_set():
            selection = pair[swaps[0] % 2]
            server.swap({p: parts[p] for p in part_names(selection, server.layout)}, selection)
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
    parser.add_argument(
        "--rounds", type=int, default=8, help="windows per phase, alternating (default: 8)"
    )
    parser.add_argument("--gap-ms", type=float, default=1.0, help="idle time between calls")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument(
        "--swap-every-ms",
        type=float,
        default=20.0,
        help="pause between swaps in the swapping phase (0: back to back)",
    )
    model_args(parser)
    args = parser.parse_args(argv)

    from edge_runtime.artifacts import ArtifactStore
    from edge_runtime.backends import get_backend
    from edge_runtime.composer import part_names
    from edge_runtime.hotswap import SubModelServer

    net = load_or_init(args.model, args.preset)
    x = inputs_for(net, args.batch)
    pair = swap_pair(net)
    figures: dict = {}
    print(f"{'backend':<11} {'phase':<10} {'calls':>6} {'swaps':>6} {'p50 us':>8} {'p99 us':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        store = ArtifactStore(tmp)
        for backend_name in FORMATS:
            parts = export_parts(net, store, backend_name)
            server = SubModelServer(
                get_backend(backend_name, threads=1),
                store.read,
                smoke_input=x,
                layout=net.layout(),
            )
            server.bench_parts = parts
            server.swap({p: parts[p] for p in part_names(pair[0], net.layout())}, pair[0])
            latencies: dict[str, list[float]] = {"steady": [], "swapping": []}
            swaps = dict.fromkeys(latencies, 0)
            for _ in range(args.rounds):
                for phase in latencies:
                    lat, n = serve(
                        server,
                        x,
                        args.seconds / args.rounds,
                        args.gap_ms / 1e3,
                        phase == "swapping",
                        args.swap_every_ms / 1e3,
                        pair,
                    )
                    latencies[phase] += lat
                    swaps[phase] += n
            row = {}
            for phase, lat in latencies.items():
                p50, p99 = percentile(lat, 50), percentile(lat, 99)
                print(
                    f"{backend_name:<11} {phase:<10} {len(lat):>6} {swaps[phase]:>6} "
                    f"{p50:>8.1f} {p99:>8.1f}"
                )
                row[phase] = {
                    "calls": len(lat),
                    "swaps": swaps[phase],
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
