"""The periodic integration job as a training job, on one process or on several.

The head is re-trained on the cloud's own training images in the clean domain and in
every domain devices adapted to (features of the frozen model, all modules), starting
from the current head and pulled toward the devices' aggregate adapters:

    loss = mean cross-entropy over every domain's samples
           + pull * sum_d share_d * ||head - aggregate_d||^2     (share_d: d's samples / all)

so what devices learned ends up in one head. Every step is a full-batch step: with
``world_size`` > 1 each process (torch.distributed, gloo, DistributedDataParallel) holds
an equal shard of every domain's samples, computes only their features, and DDP averages
the gradients, which equal the single-process gradient up to float rounding. Workers are
spawned, get numpy arrays only, and report their pid, shard size and time.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

from cloud_trainer.errors import ConfigError

Weights = dict[str, np.ndarray]


@dataclass(frozen=True)
class WorkerReport:
    """What one process did: its shard (samples over all domains) and its wall time."""

    rank: int
    pid: int
    samples: int
    seconds: float


@dataclass(frozen=True)
class Integration:
    """The new head, the objective before and after, and what each process did."""

    weights: Weights
    loss_before: float
    loss_after: float
    workers: tuple[WorkerReport, ...]
    seconds: float


@dataclass(frozen=True)
class _Job:
    """Everything a worker needs, as numpy arrays and plain values (it pickles to a
    spawned process)."""

    spec: dict
    state: Weights  # the frozen model; its head is where training starts
    images: dict[str, np.ndarray]  # domain -> the cloud's training images as seen there
    labels: np.ndarray
    anchors: tuple[tuple[Weights, float], ...]  # (aggregate adapter, its share of the pull)
    epochs: int
    lr: float
    pull: float


def run_integration(
    net,
    aggregates: dict[str, tuple[Weights, int]],
    data: tuple[np.ndarray, np.ndarray],
    *,
    epochs: int = 200,
    lr: float = 0.01,
    pull: float = 0.01,
    world_size: int = 1,
    seed: int = 0,
    domains: Iterable[str] = (),
) -> Integration:
    """Re-train ``net``'s head (``net`` is not changed) on ``data`` in the clean domain, each
    domain of ``aggregates`` and each of ``domains`` (no device adapters: no pull), the
    images shifted by ``domains.apply(domain, x, seed)``; ``epochs`` full-batch Adam steps
    at ``lr``, pulled toward the aggregates by ``pull``.

    ``world_size`` > 1 spawns that many processes on this machine (the caller's main
    module must be importable without side effects, as for any spawn: a script needs
    ``if __name__ == "__main__"``). ValueError names the argument that does not fit;
    CloudError if a worker process fails."""
    from cloud_trainer.model.domains import apply

    x, y = data
    if len(x) != len(y) or len(y) < 1:
        raise ConfigError(f"data: expected as many labels as images, got {len(y)} and {len(x)}")
    if epochs < 1 or lr <= 0 or pull < 0:
        raise ConfigError(f"epochs, lr, pull: expected >= 1, > 0, >= 0; got {epochs}, {lr}, {pull}")
    if not 1 <= world_size <= len(y):
        raise ConfigError(f"world_size: expected 1..{len(y)}, got {world_size}")
    anchors = _anchors(aggregates, net.head.fc)
    trained = ["clean", *sorted((set(aggregates) | set(domains)) - {"clean"})]
    job = _Job(
        spec=asdict(net.spec),
        state={k: v.detach().cpu().numpy() for k, v in net.state_dict().items()},
        images={d: apply(d, x, seed) for d in trained},
        labels=np.asarray(y, np.int64),
        anchors=anchors,
        epochs=epochs,
        lr=lr,
        pull=pull,
    )
    start = time.perf_counter()
    if world_size == 1:  # in this process: no process group, the same arithmetic
        weights, losses, report = _train(job, 0, 1)
        workers: tuple[WorkerReport, ...] = (report,)
    else:
        weights, losses, workers = _spawn(job, world_size)
    before, after = losses
    return Integration(weights, before, after, workers, time.perf_counter() - start)


def _anchors(aggregates: dict[str, tuple[Weights, int]], fc) -> tuple[tuple[Weights, float], ...]:
    like = {"weight": fc.weight, "bias": fc.bias}
    for domain, (weights, samples) in aggregates.items():
        if set(weights) != set(like):
            raise ConfigError(
                f"aggregates[{domain!r}]: expected {sorted(like)}, got {sorted(weights)}"
            )
        for key, value in weights.items():
            if np.shape(value) != tuple(like[key].shape) or not np.isfinite(value).all():
                raise ConfigError(
                    f"aggregates[{domain!r}].{key}: expected finite {tuple(like[key].shape)}, "
                    f"got {np.shape(value)}"
                )
        if samples < 1:
            raise ConfigError(f"aggregates[{domain!r}]: expected samples >= 1, got {samples}")
    total = sum(samples for _, samples in aggregates.values())
    return tuple(
        ({k: np.asarray(v, np.float32) for k, v in w.items()}, samples / total)
        for _, (w, samples) in sorted(aggregates.items())
    )


def _spawn(job: _Job, world_size: int):
    import torch.multiprocessing as mp

    from cloud_trainer.errors import JobError
    from eclm_common.lifeline import starter

    with tempfile.TemporaryDirectory(prefix="eclm-integrate-") as tmp:
        out = Path(tmp)
        try:
            args = (world_size, job, _free_port(), out, starter())
            mp.spawn(_worker, args=args, nprocs=world_size)
        # a worker that raised or died ends the others, and this job with a JobError
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
            raise JobError(f"integration on {world_size} processes failed: {exc}") from exc
        with np.load(out / "head.npz") as head:
            weights = {k: head[k] for k in head.files}
        reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world_size)]
    losses = tuple(reports[0]["losses"])
    workers = tuple(WorkerReport(**{k: v for k, v in r.items() if k != "losses"}) for r in reports)
    return weights, losses, workers


def _worker(
    rank: int, world_size: int, job: _Job, port: int, out: Path, parent: tuple[int, bool]
) -> None:
    """One spawned process: join the group, train its shard, write its report (rank 0
    also writes the head). It ends with ``parent`` (pid, started from its main thread)."""
    import torch
    import torch.distributed as dist

    from eclm_common.lifeline import die_with_parent

    die_with_parent(*parent)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(1, (cores or 1) // world_size))  # no oversubscription
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(minutes=5),
    )
    try:
        weights, losses, report = _train(job, rank, world_size)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        np.savez(out / "head.npz", **weights)
    (out / f"rank{rank}.json").write_text(json.dumps({**asdict(report), "losses": losses}))


def _train(job: _Job, rank: int, world_size: int):
    """Full-batch Adam on this rank's shard; DDP averages the gradients when
    ``world_size`` > 1. Returns (weights, (loss before, loss after), WorkerReport)."""
    import torch
    from torch import nn
    from torch.nn.functional import cross_entropy

    start = time.perf_counter()
    features, labels = _shard_features(job, rank, world_size)
    total = len(job.labels) * len(job.images)
    state = {k: torch.from_numpy(v) for k, v in job.state.items()}
    head = nn.Linear(features.shape[1], int(state["head.fc.bias"].shape[0]))
    head.load_state_dict({"weight": state["head.fc.weight"], "bias": state["head.fc.bias"]})
    model: nn.Module = head
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(head)
    anchors = [({k: torch.from_numpy(v) for k, v in w.items()}, share) for w, share in job.anchors]

    def objective(logits):
        # the shard's summed cross-entropy over all samples times world_size: DDP's mean
        # over ranks is then the mean over every sample, whatever the shards' sizes
        ce = cross_entropy(logits, labels, reduction="sum") * (world_size / total)
        prox = torch.zeros(())
        for w, share in anchors:
            prox = prox + share * (
                ((head.weight - w["weight"]) ** 2).sum() + ((head.bias - w["bias"]) ** 2).sum()
            )
        return ce, job.pull * prox

    opt = torch.optim.Adam(model.parameters(), lr=job.lr)
    before = None
    for _ in range(job.epochs):
        ce, prox = objective(model(features))
        if before is None:
            before = _global_loss(ce, prox, world_size)
        opt.zero_grad()
        (ce + prox).backward()
        opt.step()
    with torch.no_grad():
        ce, prox = objective(head(features))
        after = _global_loss(ce, prox, world_size)
    weights = {k: v.detach().numpy().copy() for k, v in head.state_dict().items()}
    report = WorkerReport(rank, os.getpid(), len(labels), time.perf_counter() - start)
    return weights, (before, after), report


def _global_loss(ce, prox, world_size: int) -> float:
    """The objective over every shard (each rank's ``ce`` is its share times world_size)."""
    value = ce.detach().clone()
    if world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(value)
    return float(value / world_size + prox.detach())


def _shard_features(job: _Job, rank: int, world_size: int):
    """Features of the frozen full model for this rank's shard of every domain's images."""
    import torch

    from cloud_trainer.model.modular import ModularNet, ModularSpec

    net = ModularNet(ModularSpec(**job.spec))
    net.load_state_dict({k: torch.from_numpy(v) for k, v in job.state.items()})
    net.eval()
    rows = np.array_split(np.arange(len(job.labels)), world_size)[rank]
    with torch.no_grad():
        features = [net.features(torch.from_numpy(x[rows])) for x in job.images.values()]
    labels = torch.from_numpy(np.tile(job.labels[rows], len(job.images)))
    return torch.cat(features), labels


def _free_port() -> int:
    """A port nobody listens on now, for rank 0's rendezvous on loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def evaluate_head(
    net,
    weights: Weights,
    data: tuple[np.ndarray, np.ndarray],
    domains: Iterable[str],
    *,
    seed: int = 1,
) -> dict[str, float]:
    """Accuracy of ``net``'s frozen features with head ``weights`` on ``data`` (held-out
    images and labels) as seen in each of ``domains``."""
    import torch

    from cloud_trainer.model.domains import apply

    scores = {}
    for domain in domains:
        with torch.no_grad():
            f = net.features(torch.from_numpy(apply(domain, data[0], seed))).numpy()
        predicted = (f @ weights["weight"].T + weights["bias"]).argmax(1)
        scores[domain] = float((predicted == data[1]).mean())
    return scores


def save_aggregates(path: Path, aggregates: dict[str, tuple[Weights, int]]) -> None:
    """Aggregates as one npz: ``DOMAIN/weight``, ``DOMAIN/bias``, ``DOMAIN/samples``."""
    arrays: dict[str, Any] = {}
    for domain, (weights, samples) in aggregates.items():
        arrays.update({f"{domain}/{k}": v for k, v in weights.items()})
        arrays[f"{domain}/samples"] = np.array(samples)
    np.savez(path, **arrays)


def load_aggregates(path: Path) -> dict[str, tuple[Weights, int]]:
    """What :func:`save_aggregates` wrote; ValueError on a key of another shape."""
    out: dict[str, tuple[Weights, int]] = {}
    with np.load(path) as data:
        for key in data.files:
            domain, _, name = key.partition("/")
            if not domain or not name:
                raise ConfigError(f"{path}: expected keys DOMAIN/weight|bias|samples, got {key!r}")
            weights, samples = out.setdefault(domain, ({}, 0))
            if name == "samples":
                out[domain] = (weights, int(data[key]))
            else:
                weights[name] = data[key]
    return out
