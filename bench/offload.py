"""Collaborative inference: what offloading to the cloud's full model buys a small device.

What offloading buys a device on its smallest sub-model, and what it costs in bytes and
latency.

On held-out samples of one domain (``--domain``, cloud_trainer/model/domains.py) a device
serves the smallest module set the rpi4 plan offers, as LiteRT fp32 programs. Offline (the
real programs, the real frame codec, ``ModularNet.suffix``): accuracy and bytes up per
sample for local only, raw samples to the cloud (float32 frames), features at each split
point always (int8 frames), and margin-gated offload at a few target shares (threshold
tuned on the first half of the samples, measured on the second). Online (a real Mosquitto,
the service's ``OffloadServer``, the agent's ``Offloader`` on its runner): per-sample
latency p50/p99 of local and gated serving, then the same with the cloud stopped half-way
(predictions dropped and p99 against the deadline). Writes offload.png to ``--out``; ends
with one JSON line.

    PYTHONPATH=. python bench/offload.py --model runs/model --store runs/artifacts
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import model_args, print_json  # noqa: E402


def device_runner(model_dir: Path, store: Path):
    """A ModularRunner serving the smallest module set of the rpi4 plan (LiteRT)."""
    from cloud_trainer.export.plan import plan_device_modular
    from device_profiles import load_profile
    from edge_runtime.artifacts import ArtifactStore
    from edge_runtime.backends import get_backend
    from edge_runtime.monitor import Reading
    from edge_runtime.runner import ModularRunner

    profile = load_profile("rpi4")
    options, refs = plan_device_modular(model_dir, store, profile)
    refs = [r for r in refs if r.format == "tflite"]
    backend = get_backend("litert", threads=1)
    smallest = options[-1]
    runner = ModularRunner(
        "litert", backend, ArtifactStore(store), refs, (smallest,), profile.budget, Reading(1e6)
    )
    return runner, smallest, profile


def scenario_samples(x, y, n: int):
    """The first ``n`` samples of one device's stream in the adaptation scenario: clean
    stretches and shifts (noise, rotate, contrast) in turn, label mixes that drift."""
    import numpy as np

    from eclm_lab.scenario import ModelMemory, ScenarioSpec, build

    spec = ScenarioSpec(devices=1, steps=-(-n // ScenarioSpec.batch))
    # memory readings are not used here: any model size states them
    (stream,) = build(spec, x, y, ModelMemory(full_kb=4.0, smallest_kb=1.0))
    steps = list(stream)
    xs, ys = np.concatenate([s.x for s in steps]), np.concatenate([s.y for s in steps])
    return xs[:n].astype(np.float32), ys[:n]


def offline(net, runner, x, y, shares) -> dict:
    """Accuracy and bytes per sample of each way of answering, one sample per request."""
    import numpy as np
    import torch

    from eclm_wire import features
    from edge_runtime.offload import tune_threshold, unsure

    def suffix(h, split):
        with torch.no_grad():
            return net.suffix(torch.from_numpy(h), split).numpy()

    local = runner.predict(x)
    with torch.no_grad():
        full = net(torch.from_numpy(x)).numpy()
    raw = np.mean(
        [len(features.encode("r-1", 0, x[i : i + 1], dtype="float32")) for i in range(len(x))]
    )
    half = len(x) // 2  # gated thresholds are tuned on the first half; all rows measure the second
    rows = {
        "local": (local[half:], 0.0, None),
        "full model (cloud)": (full[half:], 0.0, None),
        "raw samples to the cloud": (full[half:], raw, None),
    }
    split_bytes, cloud = {}, {}
    for split in range(runner.splits):
        frames = [
            features.encode("r-1", split, runner.prefix(x[i : i + 1], split)) for i in range(len(x))
        ]
        h = np.concatenate([features.decode(f).tensor for f in frames])
        split_bytes[split] = float(np.mean([len(f) for f in frames]))
        cloud[split] = suffix(h, split)[half:]
        rows[f"features at split {split}, always"] = (cloud[split], split_bytes[split], 1.0)
    split = min(split_bytes, key=lambda k: (split_bytes[k], k))  # what the offloader picks
    for share in shares:
        threshold = tune_threshold(local[:half], share, "margin")
        ask = unsure(local[half:], "margin", threshold)
        out = np.where(ask[:, None], cloud[split], local[half:])
        rows[f"gated {share:.0%} (margin < {threshold:.3f})"] = (
            out,
            split_bytes[split] * ask.mean(),
            float(ask.mean()),
        )
    table = {}
    for name, (scores, size, share) in rows.items():
        table[name] = {
            "accuracy": round(float((scores.argmax(1) == y[half:]).mean()), 4),
            "bytes_per_sample": round(float(size), 1),
            "offloaded": round(share, 3) if share is not None else None,
        }
    return {"rows": table, "split": split, "raw_bytes": float(raw)}


def online(net, runner, x, threshold: float, deadline_ms: float) -> dict:
    """Per-sample latency through Mosquitto: local, gated with the cloud, then gated with
    the cloud stopped half-way."""
    import logging

    import numpy as np

    from broker import Broker
    from cloud_trainer.service.offload import OffloadServer
    from eclm_wire.mqtt import BrokerAddress, connect, make_client
    from edge_runtime.offload import OffloadConfig, Offloader

    logging.disable(logging.WARNING)
    out = {}
    with Broker(kind="mosquitto", data_dir=Path(tempfile.mkdtemp())) as broker:
        address = BrokerAddress.parse(broker.url)
        client = make_client("bench-device", address)
        connect(client, address)
        client.loop_start()
        client.subscribe("eclm/v1/devices/bench-device/answer", qos=0)
        gated = OffloadConfig(policy="gated", threshold=threshold, deadline_ms=deadline_ms)

        def serve(name, predict, stop_at=None, server=None):
            times, answered = [], 0
            for i in range(len(x)):
                if i == stop_at:
                    server.shutdown()
                start = time.perf_counter()
                scores = predict(x[i : i + 1])
                times.append((time.perf_counter() - start) * 1e3)
                answered += scores.shape == (1, net.spec.num_classes)
            out[name] = {
                "p50_ms": round(float(np.percentile(times, 50)), 2),
                "p99_ms": round(float(np.percentile(times, 99)), 2),
                "dropped": len(x) - answered,
            }
            return times

        traces = {"local": serve("local", runner.predict)}
        for name, stop_at in (("gated", None), ("gated, cloud stopped half-way", len(x) // 2)):
            server = OffloadServer(net, address, client_id=f"bench-cloud-{stop_at}").start()
            server.subscribed.wait(10)
            offloader = Offloader(client, "bench-device", gated, deadline_ms)
            traces[name] = serve(
                name, lambda b, o=offloader: o.predict(runner, b, runner.predict), stop_at, server
            )
            out[name] |= {
                k: offloader.counts[k] for k in ("answered", "late", "skipped", "late_answers")
            }
            if stop_at is None:
                server.shutdown()
        client.loop_stop()
        client.disconnect()
    out["deadline_ms"] = deadline_ms
    return {"latency": out, "traces": traces}


def plot(rows: dict, traces: dict, deadline_ms: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, r in rows.items():
        left.scatter(max(r["bytes_per_sample"], 1), r["accuracy"], label=name)
    left.set_xscale("log")
    left.set_xlabel("bytes up per sample (log; local at 1)")
    left.set_ylabel("accuracy")
    left.legend(fontsize=7)
    for name, t in traces.items():
        right.plot(t, label=name, linewidth=0.8)
    right.axhline(deadline_ms, color="grey", linestyle=":", label="deadline")
    right.set_xlabel("sample")
    right.set_ylabel("latency (ms)")
    right.legend(fontsize=7)
    fig.suptitle("collaborative inference: the smallest sub-model and the cloud's full model")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_args(parser)
    parser.add_argument("--store", type=Path, help="artifact store (exported into if missing)")
    parser.add_argument(
        "--domain",
        default="noise",
        help="shift applied to the test samples, or 'scenario': the samples in the order one "
        "device's adaptation-scenario stream shows them (clean stretches and shifts in turn)",
    )
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--shares", default="0.05,0.1,0.2")
    parser.add_argument("--deadline-ms", type=float, default=0.0, help="0: the profile's")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    args = parser.parse_args(argv)
    if not args.model:
        parser.error("--model DIR: a trained model (eclm cloud train)")

    import numpy as np

    from cloud_trainer.model.checkpoint import load_model
    from cloud_trainer.model.domains import apply
    from edge_runtime.offload import tune_threshold

    net = load_model(args.model)
    store = args.store or Path(tempfile.mkdtemp(prefix="offload-store-"))
    runner, smallest, profile = device_runner(args.model, store)
    test = np.load(args.model / "test.npz")
    if args.domain == "scenario":
        x, y = scenario_samples(test["x"], test["y"], args.samples)
    else:
        x = apply(args.domain, test["x"][: args.samples]).astype(np.float32)
        y = test["y"][: args.samples]
    shares = [float(s) for s in args.shares.split(",")]
    figures = offline(net, runner, x, y, shares)
    deadline = args.deadline_ms or profile.budget.latency_ms
    half = len(x) // 2
    threshold = tune_threshold(runner.predict(x[:half]), max(shares), "margin")
    measured = online(net, runner, x[half:], threshold, deadline)
    print(f"device: {smallest.selection} ({smallest.memory_kb:.0f} KB), domain {args.domain}")
    print(f"{'':44} {'accuracy':>8} {'bytes/sample':>12} {'offloaded':>9}")
    for name, r in figures["rows"].items():
        share = "" if r["offloaded"] is None else f"{r['offloaded']:.1%}"
        print(f"{name:44} {r['accuracy']:8.4f} {r['bytes_per_sample']:12.1f} {share:>9}")
    print(f"\n{'':34} {'p50 ms':>7} {'p99 ms':>7} {'dropped':>7}  (deadline {deadline} ms)")
    for name, r in measured["latency"].items():
        if isinstance(r, dict):
            print(f"{name:34} {r['p50_ms']:7.2f} {r['p99_ms']:7.2f} {r['dropped']:7d}  {r}")
    args.out.mkdir(parents=True, exist_ok=True)
    plot(figures["rows"], measured["traces"], deadline, args.out / "offload.png")
    print(f"plot: {args.out / 'offload.png'}")
    result = {
        "bench": "offload",
        "domain": args.domain,
        "selection": [list(layer) for layer in smallest.selection],
        **{k: v for k, v in figures.items() if k != "rows"},
        "rows": figures["rows"],
        "latency": measured["latency"],
    }
    print_json(result)
    return result


if __name__ == "__main__":
    main()
