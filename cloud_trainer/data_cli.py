"""``eclm cloud data make-rgb|show``: the data sets ``--data`` reads, written and inspected."""

from __future__ import annotations

import argparse
from pathlib import Path

from eclm_common.exit_codes import ExitCode


def add_parser(cmds: argparse._SubParsersAction) -> None:
    data = cmds.add_parser("data", help="write the RGB digits; show what --data reads")
    data_cmds = data.add_subparsers(dest="data_cmd", required=True)
    make = data_cmds.add_parser(
        "make-rgb",
        help="write the RGB digits (sklearn's digits over patches of its two sample photos, "
        "3x32x32, MNIST-M style) as an image folder or an .npz",
    )
    make.add_argument("--out", type=Path, required=True, help="folder (or .npz path)")
    make.add_argument("--format", choices=("folder", "npz"), default="folder")
    make.add_argument("--seed", type=int, default=0, help="same seed, same images")
    make.set_defaults(func=_make_rgb)
    show = data_cmds.add_parser("show", help="read a data set as --data would and describe it")
    show.add_argument("data", help="digits, rgb-digits, an image folder, a CIFAR folder or .npz")
    show.add_argument("--seed", type=int, default=0)
    show.set_defaults(func=_show)


def _make_rgb(args: argparse.Namespace) -> int:
    from cloud_trainer.model.rgbdigits import write_rgb_digits

    written = write_rgb_digits(args.out, fmt=args.format, seed=args.seed)
    print(f"wrote the RGB digits (seed {args.seed}) to {written}")
    print(f"train on them: eclm cloud train --data {written}")
    return ExitCode.OK


def _show(args: argparse.Namespace) -> int:
    from cloud_trainer.model.datasets import describe, load_split

    record = describe(load_split(args.data, seed=args.seed), seed=args.seed)
    names = record.pop("classes")
    for key, value in record.items():
        print(f"{key:<14} {value}")
    shown = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
    print(f"{'classes':<14} {shown}")
    return ExitCode.OK
