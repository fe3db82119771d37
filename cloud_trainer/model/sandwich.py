"""Fine-tuning a decomposed model by the sandwich rule, so that its sub-models work.

Plain module dropout trains one random subset per step; a decomposed network's small subsets
then see few steps each and, in a deep network (MobileNetV2's 17 layers), the errors of
halving every layer compound. The sandwich rule of slimmable networks and once-for-all
training instead accumulates, in every step, the gradients of

- the full set of modules (cross-entropy and distillation from the original, as before),
- the smallest set (one random module per layer),
- ``randoms`` random subsets (per layer a size drawn uniformly from 1..M, then the modules),

the sub-models distilled in place: their soft targets are the full model's logits of the
same step (detached), with a cross-entropy share. A layer's subset needs no rescaling here:
the router's softmax is taken over the present modules only (``modular.mix``, and the edge
composer the same way), so k kept modules get weights summing to one, and since each
module's output was scaled by M at decomposition, k uniform modules give (M / k) times their
partial sum - the dropout rescaling, already in the programs and the router.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cloud_trainer.model.modular import ModularNet
from cloud_trainer.model.train import distillation, router_losses, soft_loss


@dataclass(frozen=True)
class SandwichConfig:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    randoms: int = 2  # random subsets per step, besides the full and the smallest
    temperature: float = 4.0
    distill: float = 0.5  # share of the distillation term, (1 - distill) cross-entropy
    router_weight: float = 0.1


def smallest_selection(net: ModularNet, rng: np.random.Generator) -> tuple[tuple[int, ...], ...]:
    """One random module per layer: every module gets trained as a layer's only one."""
    m = net.spec.modules_per_layer
    return tuple((int(rng.integers(m)),) for _ in range(net.spec.layers))


def random_selection(net: ModularNet, rng: np.random.Generator) -> tuple[tuple[int, ...], ...]:
    """Per layer a size uniform in 1..M, then that many distinct modules."""
    m = net.spec.modules_per_layer
    return tuple(
        tuple(sorted(int(i) for i in rng.choice(m, int(rng.integers(1, m + 1)), replace=False)))
        for _ in range(net.spec.layers)
    )


def sandwich_step(
    net: ModularNet,
    teacher: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    rng: np.random.Generator,
    config: SandwichConfig,
) -> dict[str, float]:
    """Accumulate the gradients of one sandwich step into ``net``; the losses by name."""
    d, temp = config.distill, config.temperature
    weights: list[torch.Tensor] = []
    full = net.head(net.trunk(x, None, weights))
    sharp, balance = router_losses(weights)
    ce = nn.functional.cross_entropy(full, y)
    loss = (1 - d) * ce + d * distillation(full, teacher, x, temp)
    (loss + config.router_weight * (sharp + balance)).backward()
    losses = {"full": float(loss.detach())}
    subsets = [smallest_selection(net, rng)]
    subsets += [random_selection(net, rng) for _ in range(config.randoms)]
    for i, selection in enumerate(subsets):
        logits = net(x, selection)
        sub = (1 - d) * nn.functional.cross_entropy(logits, y) + d * soft_loss(logits, full, temp)
        sub.backward()
        losses["smallest" if i == 0 else f"random{i}"] = float(sub.detach())
    return losses


def train_sandwich(
    net: ModularNet,
    teacher: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    config: SandwichConfig = SandwichConfig(),
    *,
    progress: bool = False,
) -> ModularNet:
    """Fine-tune ``net`` (decomposed from ``teacher``) by sandwich steps; eval mode back."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    teacher.eval()
    opt = torch.optim.Adam(net.parameters(), lr=config.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, config.epochs))
    epochs = range(config.epochs)
    if progress:
        from tqdm import tqdm

        epochs = tqdm(epochs, desc="fine-tune (sandwich)", unit="epoch", leave=False)
    net.train()
    for _ in epochs:
        order = torch.from_numpy(rng.permutation(len(xs)))
        for start in range(0, len(xs), config.batch_size):
            idx = order[start : start + config.batch_size]
            opt.zero_grad()
            sandwich_step(net, teacher, xs[idx], ys[idx], rng, config)
            opt.step()
        sched.step()
    return net.eval()
