"""Composed per-module programs vs one fused program vs eager torch, per backend, in one run.

    python bench/inference.py [--model runs/model] [--batches 1,64]

Ends with one line of JSON. The goal is composed/fused <= 1.3 at a serving batch.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench._common import (  # noqa: E402
    FORMATS,
    export_parts,
    inputs_for,
    load_or_init,
    model_args,
    print_json,
    time_interleaved,
)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_args(parser)
    parser.add_argument("--batches", default="1,64", help="comma list of batch sizes")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)

    from cloud_trainer.export.modular import export_program
    from cloud_trainer.model.modular import SubModel
    from edge_runtime.artifacts import ArtifactStore
    from edge_runtime.backends import get_backend
    from edge_runtime.composer import ComposedModel

    torch.set_num_threads(1)
    net = load_or_init(args.model, args.preset)
    selection = tuple(
        tuple(range(0, net.spec.modules_per_layer, 2)) for _ in range(net.spec.layers)
    )
    sub = SubModel(net, selection).eval()
    calib = inputs_for(net, 64)
    figures: dict = {"selection": [list(s) for s in selection]}
    print(f"sub-model {selection}; times are median microseconds per call, 1 thread")
    print(
        f"{'backend':<11} {'batch':>5} {'composed':>10} {'fused':>10} {'eager':>10} "
        f"{'comp/fused':>10} {'calls':>6}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        store = ArtifactStore(tmp)
        for backend_name, fmt in FORMATS.items():
            backend = get_backend(backend_name, threads=1)
            programs = {
                part: backend.load(store.path(sha))
                for part, sha in export_parts(net, store, backend_name).items()
            }
            composed = ComposedModel(programs, selection, net.layout())
            fused = backend.load(
                export_program(
                    sub,
                    torch.from_numpy(calib[:2]),
                    fmt,
                    "fp32",
                    calib=torch.from_numpy(calib),
                    name="fused",
                )
            )
            for batch in (int(b) for b in args.batches.split(",")):
                x = inputs_for(net, batch, seed=batch)
                xt = torch.from_numpy(x)
                inner = max(1, 200 // batch)
                with torch.no_grad():
                    t = time_interleaved(
                        {
                            "composed": lambda c=composed, x=x: c.run(x),
                            "fused": lambda f=fused, x=x: f.run(x)[0],
                            "eager": lambda xt=xt: sub(xt),
                        },
                        rounds=args.rounds,
                        inner=inner,
                    )
                ratio = t["composed"] / t["fused"]
                print(
                    f"{backend_name:<11} {batch:>5} {t['composed']:>10.1f} {t['fused']:>10.1f} "
                    f"{t['eager']:>10.1f} {ratio:>10.2f} {len(composed.part_names()):>6}"
                )
                figures[f"{backend_name}_b{batch}"] = {
                    **{k: round(v, 1) for k, v in t.items()},
                    "composed_over_fused": round(ratio, 3),
                }
    print_json(figures)
    return figures


if __name__ == "__main__":
    main()
