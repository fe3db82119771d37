"""Export time and program size per artifact kind, then the same export again from cache.

    python bench/export.py [--model runs/model]

Ends with one line of JSON.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from bench._common import inputs_for, load_or_init, model_args, print_json  # noqa: E402


def kind_of(part: str) -> str:
    return part.split(".")[-1].rstrip("0123456789") if "." in part else part


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_args(parser)
    args = parser.parse_args(argv)

    from cloud_trainer.export.modular import export_modular
    from edge_runtime.artifacts import ArtifactStore

    net = load_or_init(args.model, args.preset)
    calib = inputs_for(net, 64)
    groups: dict[tuple[str, str], list] = defaultdict(list)
    with tempfile.TemporaryDirectory() as tmp:
        store = ArtifactStore(tmp)
        start = time.perf_counter()
        records = export_modular(
            net,
            calib,
            store,
            on_record=lambda r: print(
                f"  {r.part:<14} {r.variant:<11} {r.seconds:5.2f}s", flush=True
            ),
        )
        total = time.perf_counter() - start
        start = time.perf_counter()
        again = export_modular(net, calib, store)
        cached = time.perf_counter() - start
    for r in records:
        groups[(kind_of(r.part), r.variant)].append(r)
    print(f"\n{'kind':<8} {'variant':<11} {'count':>5} {'seconds each':>12} {'bytes each':>11}")
    figures: dict = {
        "total_seconds": round(total, 2),
        "cached_seconds": round(cached, 3),
        "programs": len(records),
        "all_cached": all(r.cached for r in again),
        "kinds": {},
    }
    for (kind, variant), rs in sorted(groups.items()):
        secs = statistics.mean(r.seconds for r in rs)
        size = statistics.mean(r.ref.size for r in rs)
        print(f"{kind:<8} {variant:<11} {len(rs):>5} {secs:>12.2f} {size:>11.0f}")
        figures["kinds"][f"{kind}/{variant}"] = {"seconds": round(secs, 3), "bytes": int(size)}
    print(
        f"\n{len(records)} programs in {total:.1f}s; again from cache in {cached:.3f}s "
        f"({total / max(cached, 1e-9):.0f}x faster)"
    )
    print_json(figures)
    return figures


if __name__ == "__main__":
    main()
