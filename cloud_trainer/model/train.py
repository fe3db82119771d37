"""Training the modular model with module dropout, and the module importance it records."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from cloud_trainer.model.modular import ModularNet


def sample_selection(
    net: ModularNet, rng: np.random.Generator, *, keep: float = 0.5, full: float = 0.25
) -> tuple[tuple[int, ...], ...]:
    """A random non-empty subset of modules per layer (the whole set with prob. ``full``)."""
    m = net.spec.modules_per_layer
    if rng.random() < full:
        return net.full_selection()
    chosen = []
    for _ in range(net.spec.layers):
        mask = rng.random(m) < keep
        if not mask.any():
            mask[rng.integers(m)] = True
        chosen.append(tuple(int(i) for i in np.flatnonzero(mask)))
    return tuple(chosen)


def router_losses(weights: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sharpness, balance): mean per-sample routing entropy, and minus the entropy of the
    batch's mean routing. Low sharpness makes modules specialise; low balance keeps all used.
    """
    sharp = torch.stack([-(w * torch.log(w + 1e-9)).sum(1).mean() for w in weights]).mean()
    mean = [w.mean(0) for w in weights]
    balance = torch.stack([(p * torch.log(p + 1e-9)).sum() for p in mean]).mean()
    return sharp, balance


def train_modular(
    net: ModularNet,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int = 25,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    router_weight: float = 0.1,
    progress: bool = False,
) -> ModularNet:
    """Train with module dropout and router regularisation; return the net in eval mode.
    (A decomposed net is fine-tuned by ``sandwich.train_sandwich`` instead.)"""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    loss_fn = nn.CrossEntropyLoss()
    epoch_iter = range(epochs)
    if progress:
        from tqdm import tqdm

        epoch_iter = tqdm(epoch_iter, desc="train modular", unit="epoch", leave=False)
    net.train()
    for _ in epoch_iter:
        order = torch.from_numpy(rng.permutation(len(xs)))
        for start in range(0, len(xs), batch_size):
            idx = order[start : start + batch_size]
            weights: list[torch.Tensor] = []
            logits = net.head(net.trunk(xs[idx], sample_selection(net, rng), weights))
            sharp, balance = router_losses(weights)
            loss = loss_fn(logits, ys[idx]) + router_weight * (sharp + balance)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    return net.eval()


def distillation(
    logits: torch.Tensor, teacher: nn.Module, x: torch.Tensor, temperature: float
) -> torch.Tensor:
    """T^2 * KL(teacher || student) of the softened distributions."""
    with torch.no_grad():
        target = teacher.eval()(x)
    return soft_loss(logits, target, temperature)


def soft_loss(student: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(target || student) of the softened distributions (``target`` detached), so
    that the gradients keep their scale whatever the temperature."""
    t = torch.log_softmax(target.detach() / temperature, dim=1)
    s = torch.log_softmax(student / temperature, dim=1)
    return nn.functional.kl_div(s, t, reduction="batchmean", log_target=True) * temperature**2


@torch.no_grad()
def module_importance(net: ModularNet, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Mean router weight of each module for each class: shape (layers, modules, classes).

    Computed on the full model; for a domain, pass that domain's samples.
    """
    spec = net.spec
    weights: list[torch.Tensor] = []
    net.trunk(torch.from_numpy(x), None, weights)
    out = np.zeros((spec.layers, spec.modules_per_layer, spec.num_classes), np.float64)
    for c in range(spec.num_classes):
        rows = y == c
        if rows.any():
            for layer, w in enumerate(weights):
                out[layer, :, c] = w[torch.from_numpy(rows)].mean(0).numpy()
    return out


@torch.no_grad()
def accuracy(net: nn.Module, x: np.ndarray, y: np.ndarray, selection=None) -> float:
    logits = (
        net(torch.from_numpy(x), selection) if selection is not None else net(torch.from_numpy(x))
    )
    return float((logits.argmax(1).numpy() == y).mean())
