"""On-device adapter training throughput: numpy and ExecuTorch trainers vs eager torch.

    python bench/adapter.py [--rounds 15]

All three run plain SGD on the model's head (512->10 for digits) and the same batches of 32,
measured round-robin in one process. Ends with one line of JSON.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench._common import load_or_init, model_args, print_json, time_interleaved  # noqa: E402

BATCH = 32


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    model_args(parser)
    args = parser.parse_args(argv)

    from cloud_trainer.export.adapter import export_adapter_training
    from edge_runtime.adapter import NumpyTrainer
    from edge_runtime.backends.executorch import ExecuTorchTrainer

    torch.set_num_threads(1)
    fc = load_or_init(args.model, args.preset).head.fc
    weight, bias = fc.weight.detach().numpy(), fc.bias.detach().numpy()
    rng = np.random.default_rng(0)
    x = rng.random((BATCH, weight.shape[1]), dtype=np.float32)
    y = rng.integers(0, weight.shape[0], BATCH)
    numpy_t = NumpyTrainer(weight, bias, lr=0.01)
    et_t = ExecuTorchTrainer(export_adapter_training(fc), weight, bias, lr=0.01, batch=BATCH)
    eager = torch.nn.Linear(weight.shape[1], weight.shape[0])
    eager.load_state_dict(fc.state_dict())
    opt = torch.optim.SGD(eager.parameters(), lr=0.01)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    def eager_step():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(eager(xt), yt).backward()
        opt.step()

    us = time_interleaved(
        {
            "numpy": lambda: numpy_t.step(x, y),
            "executorch": lambda: et_t.step(x, y),
            "eager_torch": eager_step,
        },
        rounds=args.rounds,
        inner=200,
    )
    figures = {
        name: {"us_per_step": round(t, 1), "samples_per_s": round(BATCH / t * 1e6)}
        for name, t in us.items()
    }
    for name in ("numpy", "executorch"):
        figures[name]["vs_eager"] = round(us["eager_torch"] / us[name], 2)
    print(f"{'trainer':<12} {'us/step':>9} {'samples/s':>10} {'x eager':>8}")
    for name, row in figures.items():
        print(
            f"{name:<12} {row['us_per_step']:>9.1f} {row['samples_per_s']:>10} "
            f"{row.get('vs_eager', 1.0):>8.2f}"
        )
    print_json(figures)
    return figures


if __name__ == "__main__":
    main()
