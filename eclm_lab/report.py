"""The adaptation scenario's outputs: a table, a JSON report and a plot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

COLUMNS = (
    ("accuracy", "accuracy", "{:.2%}"),
    ("after_shift", "after shifts", "{:.2%}"),
    ("recovery_steps", "recovery", "{:.1f} steps"),
    ("bytes_up", "bytes up", "{:,}"),
    ("bytes_down", "bytes down", "{:,}"),
    ("swaps", "swaps", "{}"),
    ("budget_violations", "violations", "{}"),
)


def table(methods: dict[str, dict]) -> str:
    """One row per method, the columns of :data:`COLUMNS`."""
    rows = [["method", *(title for _, title, _ in COLUMNS)]]
    for name, figures in methods.items():
        rows.append(
            [name]
            + [
                "-" if figures.get(key) is None else fmt.format(figures[key])
                for key, _, fmt in COLUMNS
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def headline(report: dict, adaptive: str) -> dict:
    """The figures the issue asks for, from one report."""
    m = report["methods"]
    a = m[adaptive]
    fed = m["FedAvg"]
    fed_bytes = fed["bytes_up"] + fed["bytes_down"]
    own_bytes = a["bytes_up"] + a["bytes_down"]
    ratios = newcomer_ratios(report["newcomer"])
    reached = [r for r in ratios.values() if r is not None]
    return {
        "accuracy": a["accuracy"],
        "over_on_device_only": 100 * (a["accuracy"] - m["on-device only"]["accuracy"]),
        "over_static_sub_model": 100 * (a["accuracy"] - m["static sub-model"]["accuracy"]),
        "vs_fedavg_points": 100 * (a["accuracy"] - fed["accuracy"]),
        "fedavg_bytes_ratio": fed_bytes / max(own_bytes, 1),
        "budget_violations": a["budget_violations"],
        # the worst domain; None if a warm start never got there (or no domain needed labels)
        "newcomer_sample_ratio": max(reached) if reached and len(reached) == len(ratios) else None,
        "newcomer_mean_ratio": float(np.mean(reached)) if reached else None,
        "newcomer_ratios": ratios,
    }


def newcomer_ratios(newcomer: dict) -> dict[str, float | None]:
    """Per domain a new device needs labels in alone: labels it needs with the warm start
    over labels alone (None: with it, it never reached the mark in the labels it had)."""
    return {
        domain: None if v["samples_warm"] is None else v["samples_warm"] / v["samples_alone"]
        for domain, v in newcomer.items()
        if v["samples_alone"]
    }


def write(report: dict, out: Path) -> tuple[Path, Path]:
    """``report.json`` and ``adaptation.png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.json"
    path.write_text(json.dumps(report, indent=2))
    return path, plot(report, out / "adaptation.png")


def plot(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bars) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [2.2, 1]})
    shifted = np.array(report["shifted_share"])
    steps = np.arange(len(shifted))
    ax.fill_between(
        steps, 0, shifted, color="0.85", step="mid", label="devices in a shifted domain"
    )
    for name, curve in report["curves"].items():
        smooth = np.convolve(curve, np.ones(5) / 5, mode="valid")  # mean of the last 5 steps
        ax.plot(steps[4:], smooth, label=name, lw=2 if "ECLM" in name else 1.2)
    if "adapting_share" in report:  # the rest serve the cloud's head (see Learner)
        ax.plot(
            steps,
            report["adapting_share"],
            color="k",
            ls=":",
            lw=1,
            drawstyle="steps-mid",
            label="ECLM devices serving their adapter",
        )
    ax.set(xlabel="stream step", ylabel="prequential accuracy (mean over devices)", ylim=(0, 1))
    ax.legend(loc="lower left", fontsize=8)
    names = list(report["methods"])
    up = [report["methods"][n]["bytes_up"] for n in names]
    down = [report["methods"][n]["bytes_down"] for n in names]
    ypos = np.arange(len(names))
    bars.barh(ypos + 0.2, up, height=0.4, label="up")
    bars.barh(ypos - 0.2, down, height=0.4, label="down")
    bars.set_yticks(ypos, names, fontsize=8)
    bars.set_xscale("log")
    bars.set_xlim(left=1e3)
    bars.set(xlabel="bytes through the broker, stream only")
    bars.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
