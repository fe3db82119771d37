"""The PyTorch side: modular model, training, selection, export, fleet coordination.

Names load on first use so that ``eclm`` starts without importing torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "CloudError": "cloud_trainer.errors",
    "ExportError": "cloud_trainer.errors",
    "FleetError": "cloud_trainer.errors",
    "ConfigError": "cloud_trainer.errors",
    "StateError": "cloud_trainer.errors",
    "Service": "cloud_trainer.service",
    "ServiceConfig": "cloud_trainer.config",
    "load_config": "cloud_trainer.config",
    "CloudState": "cloud_trainer.state",
    "Database": "cloud_trainer.database",
    "DomainAggregator": "cloud_trainer.aggregation",
    "Strategy": "cloud_trainer.strategies",
    "make_strategy": "cloud_trainer.strategies",
    "FleetCoordinator": "cloud_trainer.coordinator",
    "Split": "cloud_trainer.data",
    "load_digits_split": "cloud_trainer.data",
    "ModularNet": "cloud_trainer.modular",
    "ModularSpec": "cloud_trainer.modular",
    "SubModel": "cloud_trainer.modular",
    "train_modular": "cloud_trainer.modular_train",
    "module_importance": "cloud_trainer.modular_train",
    "select_modules": "cloud_trainer.selection",
    "Selection": "cloud_trainer.selection",
    "export_modular": "cloud_trainer.modular_export",
    "export_adapter_training": "cloud_trainer.adapter_export",
    "select_for": "cloud_trainer.pipeline",
    "export_executorch": "cloud_trainer.export",
    "export_litert": "cloud_trainer.export",
    "train_model": "cloud_trainer.pipeline",
    "export_model": "cloud_trainer.pipeline",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cloud_trainer' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
