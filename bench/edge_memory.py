"""Peak RSS of an edge process serving a sub-model, per backend, next to a bare Python.

    python bench/edge_memory.py

Each measurement is its own process, started the same way: it imports what a board runs
(the edge runtime and one backend), loads the sub-model's programs, serves 2,000
inferences and reports its peak RSS. Ends with one line of JSON. Goal: LiteRT <= 80 MB.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import FORMATS, export_parts, load_or_init, model_args, print_json  # noqa: E402

SERVE = """
import json, sys
import numpy as np
if sys.argv[1] != "bare":
    from edge_runtime.artifacts import ArtifactStore
    from edge_runtime.backends import get_backend
    from edge_runtime.composer import Layout
    from edge_runtime.hotswap import SubModelServer
    parts = json.loads(sys.argv[3])
    store = ArtifactStore(sys.argv[2])
    shape, layout = json.loads(sys.argv[5]), json.loads(sys.argv[6])
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    layout = Layout(tuple(layout["posts"]), layout["pool"], tuple(layout["shortcuts"]))
    backend = get_backend(sys.argv[1], threads=1)
    server = SubModelServer(backend, store.read, smoke_input=x, layout=layout)
    server.swap(parts, json.loads(sys.argv[4]))
    for _ in range(2000):
        server.predict(x)
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "executorch"))[:1]
else:
    heavy = []
# VmHWM, not ru_maxrss: on Linux the latter keeps the forking parent's peak across exec.
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"peak_rss_mb": int(hwm.split()[1]) / 1024, "torch_loaded": bool(heavy)}))
"""


def measure(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", SERVE, *args], capture_output=True, text=True, check=True, cwd=ROOT
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    import argparse
    from dataclasses import asdict

    from edge_runtime.artifacts import ArtifactStore
    from edge_runtime.composer import part_names

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_args(parser)
    args = parser.parse_args(argv)
    net = load_or_init(args.model, args.preset)
    m = net.spec.modules_per_layer
    selection = tuple(tuple(range(0, m, 2)) for _ in range(net.spec.layers))  # half the modules
    spec = net.spec
    shape = json.dumps([1, spec.in_channels, spec.image_size, spec.image_size])
    layout = json.dumps(asdict(net.layout()))
    figures = {"bare_python": measure("bare")}
    with tempfile.TemporaryDirectory() as tmp:
        store = ArtifactStore(tmp)
        for backend in FORMATS:
            parts = export_parts(net, store, backend)
            chosen = {p: parts[p] for p in part_names(selection, net.layout())}
            figures[backend] = measure(
                backend, tmp, json.dumps(chosen), json.dumps(selection), shape, layout
            )
    print(f"{'process':<12} {'peak RSS MB':>12} {'torch loaded':>13}")
    for name, row in figures.items():
        print(f"{name:<12} {row['peak_rss_mb']:>12.1f} {str(row['torch_loaded']):>13}")
    print_json(figures)
    return figures


if __name__ == "__main__":
    main()
