"""The cloud side: model, export, federation, fleet control and the service.

Names load on first use so that ``eclm`` starts without importing torch.
"""

from __future__ import annotations

from eclm_common.lazy import lazy_exports

_EXPORTS = {
    "CloudError": "cloud_trainer.errors",
    "ExportError": "cloud_trainer.errors",
    "FleetError": "cloud_trainer.errors",
    "ConfigError": "cloud_trainer.errors",
    "StateError": "cloud_trainer.errors",
    "Service": "cloud_trainer.service.worker",
    "ServiceConfig": "cloud_trainer.service.config",
    "load_config": "cloud_trainer.service.config",
    "CloudState": "cloud_trainer.service.state",
    "Database": "cloud_trainer.service.database",
    "DomainAggregator": "cloud_trainer.federation.aggregation",
    "Strategy": "cloud_trainer.federation.strategies",
    "make_strategy": "cloud_trainer.federation.strategies",
    "FleetCoordinator": "cloud_trainer.fleet.coordinator",
    "Split": "cloud_trainer.model.data",
    "load_digits_split": "cloud_trainer.model.data",
    "load_split": "cloud_trainer.model.datasets",
    "load_model_split": "cloud_trainer.model.datasets",
    "make_rgb_digits": "cloud_trainer.model.rgbdigits",
    "ModularNet": "cloud_trainer.model.modular",
    "ModularSpec": "cloud_trainer.model.modular",
    "SubModel": "cloud_trainer.model.modular",
    "train_modular": "cloud_trainer.model.train",
    "module_importance": "cloud_trainer.model.train",
    "select_modules": "cloud_trainer.model.selection",
    "Selection": "cloud_trainer.model.selection",
    "export_modular": "cloud_trainer.export.modular",
    "export_adapter_training": "cloud_trainer.export.adapter",
    "select_for": "cloud_trainer.export.plan",
    "export_executorch": "cloud_trainer.export.programs",
    "export_litert": "cloud_trainer.export.programs",
    "train_model": "cloud_trainer.model.checkpoint",
    "load_model": "cloud_trainer.model.checkpoint",
    "plan_fleet": "cloud_trainer.fleet.deploy",
    "deploy_fleet": "cloud_trainer.fleet.deploy",
    "wait_for_fleet": "cloud_trainer.fleet.deploy",
    "export_model": "cloud_trainer.export.plan",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
