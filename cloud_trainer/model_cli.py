"""``eclm cloud train|decompose|export|select|integrate``: the model and its programs.
Heavy imports happen inside the handlers."""

from __future__ import annotations

import argparse
from pathlib import Path

from eclm_common.errors import UsageError
from eclm_common.exit_codes import ExitCode

MODEL = Path("runs/model")
ARTIFACTS = Path("runs/artifacts")


def add_parser(cmds: argparse._SubParsersAction) -> None:
    """train, export, select, integrate: the model and its programs."""
    train = cmds.add_parser(
        "train", help="train the modular model on digits (default) or on --data"
    )
    train.add_argument(
        "--data",
        help="digits, rgb-digits, an image folder (one sub-folder per class), a CIFAR-10/100 "
        "python batch folder or an .npz with x (N, C, H, W) and y (default: digits)",
    )
    train.add_argument(
        "--out",
        type=Path,
        default=MODEL,
        help="where model.pt, metrics.json, importance.npz and test.npz go (default: %(default)s)",
    )
    train.add_argument(
        "--preset",
        default="digits",
        help="the network: digits (8x8, 0.6 MB), cifar (32x32 RGB, 9.6 MB), cifar-small (cifar "
        "at half width, 1.7 MB), mobile (96x96 RGB, inverted-residual modules); channels and "
        "classes come from the data",
    )
    train.add_argument("--epochs", type=int, default=25)
    train.add_argument("--seed", type=int, default=0)
    train.set_defaults(func=_train)

    _decompose_parser(cmds)

    export = cmds.add_parser(
        "export",
        help="export every module as .pte and .tflite, fp32 and int8",
    )
    export.add_argument("--model", type=Path, default=MODEL)
    export.add_argument(
        "--out",
        type=Path,
        default=ARTIFACTS,
        help="content-addressed artifact store (default: %(default)s)",
    )
    export.add_argument(
        "--variants",
        default="pte-fp32,pte-int8,tflite-fp32,tflite-int8",
        help="comma list of FORMAT-QUANT (default: %(default)s)",
    )
    export.set_defaults(func=_export)

    select = cmds.add_parser("select", help="pick a device's modules under its budget")
    select.add_argument("--model", type=Path, default=MODEL)
    select.add_argument("--profile", required=True, help="board profile name or .toml path")
    select.add_argument("--histogram", help="comma list of label counts (default: uniform)")
    select.add_argument("--domain", help="use the importance recorded for this data domain")
    select.add_argument("--quant", choices=("fp32", "int8"), default="fp32")
    select.set_defaults(func=_select)

    integrate = cmds.add_parser(
        "integrate",
        help="re-train the head on the cloud's data in the devices' domains, pulled toward "
        "their aggregate adapters (torch.distributed over --workers processes)",
    )
    integrate.add_argument("--model", type=Path, default=MODEL)
    integrate.add_argument(
        "--aggregates", type=Path, help="npz of DOMAIN/weight, DOMAIN/bias, DOMAIN/samples"
    )
    integrate.add_argument("--domains", default="", help="comma list of more domains to train for")
    integrate.add_argument("--workers", type=int, default=1, help="processes (gloo, DDP)")
    integrate.add_argument("--epochs", type=int, default=200, help="full-batch steps")
    integrate.add_argument("--pull", type=float, default=0.01)
    integrate.add_argument(
        "--out", type=Path, help="new head (default: MODEL/head-integrated.safetensors)"
    )
    integrate.set_defaults(func=_integrate)


def _decompose_parser(cmds: argparse._SubParsersAction) -> None:
    dec = cmds.add_parser("decompose", help="ResNet/MobileNetV2 as modules, fine-tuned")
    dec.add_argument("--arch", required=True, choices=("resnet18", "resnet34", "mobilenet_v2"))
    dec.add_argument("--weights", default="none", help="torchvision-layout state dict, or none")
    dec.add_argument("--modules", type=int, default=4, help="modules per block (default: 4)")
    dec.add_argument(
        "--data",
        help="digits, rgb-digits, an image folder, CIFAR batches or .npz (default: digits)",
    )
    dec.add_argument("--epochs", type=int, default=5)
    dec.add_argument("--width", type=float, default=1.0, help="channel multiplier (default: 1)")
    dec.add_argument("--seed", type=int, default=0)
    dec.add_argument("--out", type=Path, default=MODEL)
    dec.set_defaults(func=_decompose)


def _histogram(text: str | None):
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"--histogram: expected comma-separated numbers, got {text!r}") from None


def _train(args: argparse.Namespace) -> int:
    import json

    from cloud_trainer.model.checkpoint import train_model

    result = train_model(
        args.out,
        epochs=args.epochs,
        seed=args.seed,
        progress=True,
        preset_name=args.preset,
        data=args.data,
    )
    print(
        f"trained in {result.seconds:.1f}s: held-out accuracy {result.accuracy:.4f} "
        f"(every other module: {result.half_accuracy:.4f})"
    )
    data = json.loads((args.out / "metrics.json").read_text())["data"]
    print(
        f"data: {data['source']}, {data['channels']}x{data['image_size']}x{data['image_size']}, "
        f"{len(data['classes'])} classes, {data['train_samples']} train / "
        f"{data['test_samples']} held out"
    )
    print(f"wrote {args.out}/model.pt, metrics.json, importance.npz, test.npz")
    return ExitCode.OK


def _decompose(args: argparse.Namespace) -> int:
    from cloud_trainer.model.datasets import load_split
    from cloud_trainer.model.finetune import decompose_model

    data = None
    if args.data is not None:  # the networks take RGB at 32x32 here; grey is repeated
        data = load_split(args.data, image_size=32, channels=3, seed=args.seed)
        print(f"data: {len(data.y_train)} training and {len(data.y_test)} held-out samples")
    weights = None if args.weights == "none" else Path(args.weights)
    result = decompose_model(
        args.out, arch=args.arch, modules=args.modules, weights=weights, data=data,
        epochs=args.epochs, width=args.width, seed=args.seed, progress=True,
    )  # fmt: skip
    print(result.summary())
    return ExitCode.OK


def _export(args: argparse.Namespace) -> int:
    from cloud_trainer.export.modular import VARIANTS, variant_name
    from cloud_trainer.export.plan import export_model

    known = {variant_name(f, q): (f, q) for f, q in VARIANTS}
    asked = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in asked if v not in known]
    if unknown:
        raise UsageError(f"--variants: unknown {unknown}; known: {', '.join(known)}")
    records = export_model(args.model, args.out, variants=[known[v] for v in asked], progress=True)
    for r in records:
        state = "cached" if r.cached else f"{r.seconds:5.1f}s"
        print(
            f"{r.part:<14} {r.variant:<12} {r.ref.size:>8} B  {state:>6}  "
            f"objects/{r.ref.sha256[:16]}"
        )
    fresh = sum(not r.cached for r in records)
    print(
        f"{len(records)} programs ({fresh} exported, {len(records) - fresh} from cache) "
        f"in {args.out}; index: {args.out}/modular.json"
    )
    return ExitCode.OK


def _select(args: argparse.Namespace) -> int:
    from cloud_trainer.export.plan import select_for
    from device_profiles import load_profile

    profile = load_profile(args.profile)
    choice = select_for(
        args.model, profile, _histogram(args.histogram), domain=args.domain, quant=args.quant
    )
    print(
        f"profile {profile.name}: budget {profile.budget.model_memory_mb:g} MB, "
        f"{profile.budget.latency_ms:g} ms"
    )
    for layer, modules in enumerate(choice.modules):
        print(f"  layer {layer}: modules {', '.join(map(str, modules))}")
    print(
        f"size {choice.cost.memory_kb / 1024:.2f} MB, estimated latency "
        f"{choice.cost.latency_ms:.3f} ms, expected importance {choice.importance:.3f}"
    )
    return ExitCode.OK


def _integrate(args: argparse.Namespace) -> int:

    from safetensors.numpy import save_file

    from cloud_trainer.federation.distributed import (
        evaluate_head,
        load_aggregates,
        run_integration,
    )
    from cloud_trainer.model.checkpoint import head_weights, load_model
    from cloud_trainer.model.datasets import load_model_split

    net = load_model(args.model)
    aggregates = load_aggregates(args.aggregates) if args.aggregates else {}
    extra = [d.strip() for d in args.domains.split(",") if d.strip()]
    split = load_model_split(args.model)  # the split the model was trained on
    result = run_integration(
        net,
        aggregates,
        (split.x_train, split.y_train),
        epochs=args.epochs,
        pull=args.pull,
        world_size=args.workers,
        domains=extra,
    )
    for w in result.workers:
        print(f"rank {w.rank}: pid {w.pid}, {w.samples} samples, {w.seconds:.1f}s")
    print(f"loss {result.loss_before:.4f} -> {result.loss_after:.4f} in {result.seconds:.1f}s")
    held_out = (split.x_test, split.y_test)
    domains = ["clean", *sorted((set(aggregates) | set(extra)) - {"clean"})]
    old = evaluate_head(net, head_weights(net), held_out, domains)
    new = evaluate_head(net, result.weights, held_out, domains)
    for domain in domains:
        print(f"{domain:<10} held-out accuracy {old[domain]:.4f} -> {new[domain]:.4f}")
    out = args.out or args.model / "head-integrated.safetensors"
    save_file(result.weights, str(out))
    print(f"wrote {out}")
    return ExitCode.OK
