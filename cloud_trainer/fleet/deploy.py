"""Putting sub-models on devices from outside the service: plan each device's modules,
set its desired state, wait until the fleet reports it, and print where it stands."""

from __future__ import annotations

import time
from pathlib import Path

from eclm_common.errors import UsageError
from eclm_wire import Phase


def parse_devices(items: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for item in items:
        device_id, sep, profile = item.strip().partition("=")
        if not sep or not device_id or not profile:
            raise UsageError(f"expected ID=PROFILE, got {item!r}")
        pairs.append((device_id, profile))
    return pairs


def reporting(
    fc, profiles: list[str] | None, labels: list[str] | None, settle: float = 2.0
) -> list[tuple[str, str]]:
    """(device, profile) of every online device whose retained report names one of
    ``profiles`` (any, if None) and carries every one of ``labels``. Offline devices would
    only count as failures; they converge when they come back."""
    time.sleep(settle)  # retained reports and statuses arrive right after connecting
    return sorted(
        (d, r.profile)
        for d, r in fc.reported.items()
        if fc.online.get(d)
        and (not profiles or r.profile in profiles)
        and set(labels or ()) <= set(r.labels)
    )


def plan_fleet(model_dir: Path, store_dir: Path, devices: list[tuple[str, str]], *, modular: bool):
    """Select and export each device's sub-model: one fused program, or (``modular``)
    per-module programs and the module sets it may switch between as its resources
    change. Prints one line per device."""
    from cloud_trainer.export.plan import Target, plan_device, plan_device_modular
    from device_profiles import load_profile

    targets = {}
    for device_id, profile_name in devices:
        profile = load_profile(profile_name)
        budget = f"of {profile.budget.model_memory_mb:g} MB, {profile.budget.latency_ms:g} ms"
        if modular:
            options, refs = plan_device_modular(model_dir, store_dir, profile)
            sets = ", ".join(
                f"{[list(m.modules) for m in o.layers]} {o.memory_kb / 1024:.2f} MB"
                for o in options
            )
            print(f"{device_id} ({profile.name}) may run: {sets} {budget}", flush=True)
        else:
            selection, refs = plan_device(model_dir, store_dir, profile)
            options = ()
            modules = list(map(list, selection.modules))
            mb = selection.cost.memory_kb / 1024
            print(f"{device_id} ({profile.name}): modules {modules}, {mb:.2f} MB {budget}")
        targets[device_id] = Target(tuple(refs), tuple(options), profile.name)
    return targets


def deploy_fleet(
    fc, model_dir: Path, store_dir: Path, devices: list[tuple[str, str]], *, modular: bool = False
) -> dict[str, int]:
    """Plan each device's sub-model (see :func:`plan_fleet`) and set its desired state."""
    targets = plan_fleet(model_dir, store_dir, devices, modular=modular)
    return {d: s.serial for d, s in fc.assign_all(targets).items()}


def wait_for_fleet(fc, serials: dict[str, int], timeout: float) -> bool:
    """Wait until every device is active or failed on its serial; True if all are active."""

    def phase(c, device_id: str) -> str | None:
        report = c.reported.get(device_id)
        return report.phase if report and report.serial == serials[device_id] else None

    fc.wait_until(
        lambda c: all(phase(c, d) in (Phase.ACTIVE, Phase.FAILED) for d in serials), timeout
    )
    return all(phase(fc, d) == Phase.ACTIVE for d in serials)


def print_fleet(fc, devices: list[str]) -> None:
    """One line per device: profile, backend, phase, accuracy."""
    print(f"{'device':<14} {'profile':<18} {'backend':<11} {'phase':<12} accuracy")
    for device_id in devices:
        r = fc.reported.get(device_id)
        if r is None:
            print(f"{device_id:<14} (no report)")
            continue
        acc = "-" if r.accuracy is None else f"{100 * r.accuracy:.2f}%"
        print(f"{device_id:<14} {r.profile:<18} {r.backend or '-':<11} {r.phase:<12} {acc}")
