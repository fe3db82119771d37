"""The package boundaries STYLE.md asks for."""

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMPORT = re.compile(r"^\s*(?:from|import)\s+([\w.]+)", re.MULTILINE)


@pytest.mark.parametrize(
    "package", ["edge_runtime", "cloud_trainer", "broker", "device_profiles", "eclm", "eclm_common"]
)
def test_public_names_exist(package):
    module = importlib.import_module(package)

    assert module.__all__
    for name in module.__all__:
        assert getattr(module, name) is not None, f"{package}.{name}"


def test_edge_runtime_never_imports_cloud_trainer_and_torch_only_in_its_backend():
    for path in (ROOT / "edge_runtime").rglob("*.py"):
        modules = {m.split(".")[0] for m in IMPORT.findall(path.read_text())}
        assert "cloud_trainer" not in modules, path
        if path.name != "executorch.py":
            assert not modules & {"torch", "executorch"}, path
