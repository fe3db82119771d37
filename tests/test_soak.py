"""Soak, test-sized: bench/soak.py for a minute with two devices in two processes. The loop
runs (inference, swaps, uploads, rounds, a rollout) and, after the warm-up, no process
holds more file descriptors between bursts than at its start (an export's temp files come
and go) or grows its RSS by 20% or more.
The 30-minute run is ``python bench/soak.py --minutes 30``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parent.parent / "bench" / "soak.py"


@pytest.mark.slow
def test_a_minute_of_soak_keeps_descriptors_and_memory_flat(tmp_path, modular):
    cmd = [
        sys.executable,
        str(SOAK),
        "--minutes=1",
        "--devices=2",
        "--agent-procs=2",
        "--upload-every=8",  # an upload every 2 s per device: rounds close, heads roll out
        "--sample=2",
        f"--model-dir={modular['model_dir']}",
        f"--artifacts={modular['store']}",
        f"--out={tmp_path}",
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    print(run.stdout)
    result = json.loads(run.stdout.strip().splitlines()[-1])

    assert result["inferences"] > 0 and result["swaps"] > 0 and result["agent_errors"] == 0
    assert result["updates_stored"] > 0 and result["rollouts_succeeded"] >= 1
    assert set(result["growth"]) == {"service", "broker", "agents-0", "agents-1"}
    for name, g in result["growth"].items():
        assert g["fds"]["floor_end"] <= g["fds"]["floor_start"], (name, g)
        assert g["rss_mb"]["growth_pct"] < 20, (name, g)
    assert (tmp_path / "samples.csv").stat().st_size > 0 and (tmp_path / "soak.png").exists()
