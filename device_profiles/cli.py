"""``eclm profiles list|show``."""

from __future__ import annotations

import argparse
from dataclasses import asdict

from device_profiles.profile import list_profiles, load_profile


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("profiles", help="list and show device profiles")
    cmds = parser.add_subparsers(dest="profiles_cmd", required=True)
    cmds.add_parser("list", help="one line per shipped board profile").set_defaults(func=_list)
    show = cmds.add_parser("show", help="every field of one profile")
    show.add_argument("name", help="profile name (see `eclm profiles list`) or a .toml path")
    show.set_defaults(func=_show)


def _list(args: argparse.Namespace) -> int:
    print(
        f"{'name':<18} {'arch':<8} {'RAM':>7} {'cores':>5}  {'backends':<18} "
        f"{'model mem':>9} {'latency':>8}  title"
    )
    for p in list_profiles():
        print(
            f"{p.name:<18} {p.arch:<8} {p.ram_mb:>5}MB {p.cores:>5}  "
            f"{','.join(p.backends):<18} {p.budget.model_memory_mb:>7g}MB "
            f"{p.budget.latency_ms:>6.1f}ms  {p.title}"
        )
    return 0


def _show(args: argparse.Namespace) -> int:
    profile = load_profile(args.name)
    for key, value in asdict(profile).items():
        if isinstance(value, dict):
            for sub_key, sub_value in value.items():
                print(f"{key}.{sub_key:<16} {sub_value}")
        else:
            print(f"{key:<23} {value if not isinstance(value, tuple) else ', '.join(value)}")
    return 0
