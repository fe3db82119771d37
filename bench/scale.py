"""The project's benches on models of real size: a CIFAR-class preset and a decomposed network.

    python bench/scale.py [--model DIR ...] [--preset cifar] [--quick]

Runs each bench the project ships (export, inference, hotswap, edge_memory, adapter,
rollout) as its own process on each model, exactly as a user would, and gathers their JSON
lines into one table: export time and size per part and variant, composed/fused and eager
at batch 1 and 32 on both backends, p99 during hot swaps over p99 without, peak RSS of an
edge process per backend with the sub-model loaded, adapter steps/s, and a rollout of the
sub-model's bytes to 50 agents against raw fan-out. Ends with one line of JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import load_or_init, print_json  # noqa: E402


def run_bench(name: str, *args: str) -> dict:
    """Run ``bench/<name>.py`` in its own process; its last line of JSON."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    print(f"  bench/{name}.py {' '.join(args)}", flush=True)
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / f"{name}.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise SystemExit(f"bench/{name}.py failed ({done.returncode}):\n" + "\n".join(tail))
    print(f"    done in {time.perf_counter() - start:.0f}s", flush=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def sub_model_bytes(figures: dict, net) -> int:
    """Bytes of the fp32 .tflite programs of half the modules (the benches' sub-model)."""
    kinds = figures["kinds"]
    per_module = kinds["block/tflite-fp32"]["bytes"]
    fixed = sum(v["bytes"] for k, v in kinds.items() if k.endswith("/tflite-fp32"))
    fixed -= per_module
    half = len(range(0, net.spec.modules_per_layer, 2)) * net.spec.layers
    return fixed + per_module * half


def measure(model: list[str], quick: bool) -> dict:
    """Every bench on one model (``--model DIR`` or ``--preset NAME``)."""
    net = load_or_init(Path(model[1]) if model[0] == "--model" else None, model[-1])
    rounds = ["--rounds", "3" if quick else "10"]
    out = {
        "params_mb": round(sum(p.numel() for p in net.parameters()) * 4 / 1e6, 2),
        "export": run_bench("export", *model),
        "inference": run_bench("inference", *model, "--batches", "1,32", *rounds),
        "hotswap": run_bench("hotswap", *model, "--seconds", "2" if quick else "4"),
        "edge_memory": run_bench("edge_memory", *model),
        "adapter": run_bench("adapter", *model, *rounds),
    }
    size_kb = max(1, sub_model_bytes(out["export"], net) // 1024)
    out["sub_model_kb"] = size_kb
    out["rollout"] = run_bench("rollout", "--devices", "50", "--size-kb", str(size_kb))
    return out


def print_table(name: str, f: dict) -> None:
    print(f"\n== {name}: {f['params_mb']} MB of fp32 weights")
    for kind, row in sorted(f["export"]["kinds"].items()):
        print(f"  export {kind:<24} {row['seconds']:>7.2f} s {row['bytes'] / 1024:>9.0f} KB")
    for key, row in sorted(f["inference"].items()):
        if isinstance(row, dict):
            print(
                f"  {key:<16} composed/fused {row['composed_over_fused']:>5.2f}  "
                f"fused {row['fused']:>9.0f} us  eager {row['eager']:>9.0f} us"
            )
    for backend in ("executorch", "litert"):
        ratio = f["hotswap"][backend]["p99_ratio"]
        print(f"  {backend:<11} p99 during swaps / without {ratio:>5.2f}")
    bare = f["edge_memory"]["bare_python"]["peak_rss_mb"]
    for backend in ("executorch", "litert"):
        rss = f["edge_memory"][backend]["peak_rss_mb"]
        print(f"  {backend:<11} edge peak RSS {rss:>6.1f} MB ({rss - bare:+.1f} over bare Python)")
    steps = 1e6 / f["adapter"]["numpy"]["us_per_step"]
    print(f"  adapter steps/s (numpy, batch 32) {steps:>8.0f}")
    print(f"  rollout of {f['sub_model_kb']} KB to 50 agents: {json.dumps(f['rollout'])[:160]}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, action="append", default=[], help="model dirs")
    parser.add_argument("--preset", default="cifar", help="a fresh preset network to measure")
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    args = parser.parse_args(argv)
    models = {f"preset {args.preset}": ["--preset", args.preset]}
    models.update({str(m): ["--model", str(m)] for m in args.model})
    figures = {}
    for name, model in models.items():
        print(f"measuring {name}", flush=True)
        figures[name] = measure(model, args.quick)
    for name, f in figures.items():
        print_table(name, f)
    print_json(figures)
    return figures


if __name__ == "__main__":
    main()
