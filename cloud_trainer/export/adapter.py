"""The adapter's training program as an ExecuTorch joint forward-backward graph.

A runtime loads it with ``executorch.extension.training``, calls ``forward_backward`` on
a batch of (features, labels) and steps an SGD optimizer over its live parameters.

Exports do not build it and boards do not train with it: at the adapter's real size
(512 features, 10 classes, batches of 32) numpy's step is about 5x faster
(``bench/adapter.py``), so every board trains in numpy. It stays for that benchmark
(and the tests that keep both trainers' SGD identical), should the head grow.
"""

from __future__ import annotations

import torch
from torch import nn

from cloud_trainer.errors import ExportError
from cloud_trainer.export.programs import quiet_native_output

TRAIN_BATCH = 32


class AdapterTrainStep(nn.Module):
    """Wraps the adapter head; returns (loss, predicted classes)."""

    def __init__(self, head: nn.Linear) -> None:
        super().__init__()
        self.net = head
        self.loss = nn.CrossEntropyLoss()

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        logits = self.net(x)
        return self.loss(logits, y), logits.detach().argmax(1)


def export_adapter_training(head: nn.Linear, *, batch: int = TRAIN_BATCH) -> bytes:
    """The training ``.pte`` for a copy of ``head`` (batch fixed at ``batch``)."""
    from executorch.exir import to_edge
    from torch.export.experimental import _export_forward_backward

    step = AdapterTrainStep(nn.Linear(head.in_features, head.out_features))
    step.net.load_state_dict(head.state_dict())
    x = torch.zeros(batch, head.in_features)
    y = torch.zeros(batch, dtype=torch.long)
    try:
        with quiet_native_output():
            joint = _export_forward_backward(torch.export.export(step, (x, y), strict=True))
            return bytes(to_edge(joint).to_executorch().buffer)
    except Exception as exc:  # export raises many unrelated types
        raise ExportError("adapter", "executorch-train", f"{type(exc).__name__}: {exc}") from exc
