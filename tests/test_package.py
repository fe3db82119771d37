"""The package boundaries STYLE.md asks for, and the arrows the README draws."""

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMPORT = re.compile(r"^\s*(?:from|import)\s+([\w.]+)", re.MULTILINE)
PACKAGES = [
    "eclm_common",
    "eclm_wire",
    "device_profiles",
    "edge_runtime",
    "broker",
    "cloud_trainer",
    "eclm_lab",
    "eclm",
]
# What each package may import of ours (besides itself): the README's arrows.
ALLOWED = {
    "eclm_common": set(),
    "eclm_wire": set(),
    "device_profiles": {"eclm_common"},
    "edge_runtime": {"eclm_common", "eclm_wire", "device_profiles"},
    "broker": {"eclm_common", "eclm_wire"},
    "cloud_trainer": {"eclm_common", "eclm_wire", "device_profiles", "edge_runtime"},
    "eclm_lab": {
        "eclm_common",
        "eclm_wire",
        "device_profiles",
        "edge_runtime",
        "broker",
        "cloud_trainer",
    },
    "eclm": set(PACKAGES),
}
# The cloud's rooms, each importing only those before it (cli.py and __init__.py any).
ROOMS = ["model", "export", "federation", "fleet", "service"]


def _imports(path: Path) -> set[str]:
    return set(IMPORT.findall(path.read_text()))


def _sources(package: str):
    return [p for p in (ROOT / package).rglob("*.py")]


@pytest.mark.parametrize("package", PACKAGES)
def test_public_names_exist(package):
    module = importlib.import_module(package)

    assert module.__all__
    for name in module.__all__:
        assert getattr(module, name) is not None, f"{package}.{name}"


@pytest.mark.parametrize("package", PACKAGES)
def test_packages_import_only_along_the_arrows(package):
    ours = set(PACKAGES)
    for path in _sources(package):
        used = {m.split(".")[0] for m in _imports(path)} & ours - {package}

        assert used <= ALLOWED[package], (
            f"{path.relative_to(ROOT)} imports {used - ALLOWED[package]}"
        )


def test_the_cloud_rooms_import_one_way():
    for i, room in enumerate(ROOMS):
        later = {f"cloud_trainer.{r}" for r in ROOMS[i + 1 :]} | {"cloud_trainer.cli"}
        for path in _sources(f"cloud_trainer/{room}"):
            wrong = {
                m for m in _imports(path) if any(m == x or m.startswith(x + ".") for x in later)
            }

            assert not wrong, f"{path.relative_to(ROOT)} imports {wrong}"


def test_torch_only_in_the_executorch_backend_and_third_parties_where_named():
    for path in _sources("edge_runtime"):
        modules = {m.split(".")[0] for m in _imports(path)}
        if path.name != "executorch.py":
            assert not modules & {"torch", "executorch"}, path
    for path in _sources("eclm_wire"):
        modules = {m.split(".")[0] for m in _imports(path)}
        assert "paho" not in modules or path.name == "mqtt.py", path
        numpy_ok = path.name in ("codec.py", "features.py")  # the two tensor codecs
        assert not modules & {"numpy", "safetensors"} or numpy_ok, path


def test_the_wire_contract_imports_no_agent_paho_or_numpy():
    code = (
        "import sys, eclm_wire; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'edge_runtime', 'cloud_trainer', 'paho', 'numpy', 'torch'}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_cli_modules_hold_no_library_functions():
    """Every public function of a CLI module is ``add_parser`` or ``main``: other modules
    never import a CLI for its helpers."""
    for path in [*ROOT.glob("*/cli.py")]:
        public = re.findall(r"^def ([a-z]\w*)\(", path.read_text(), re.MULTILINE)

        assert set(public) <= {"add_parser", "main", "build_parser", "run_command"}, (path, public)


def test_files_and_functions_stay_small():
    """STYLE.md's sizes, as limits: no module over 500 lines, no function over 80, and
    no more than 6 modules at the top of cloud_trainer/ (the rest live in its rooms)."""
    import ast

    big = []
    for package in PACKAGES:
        for path in _sources(package):
            text = path.read_text()
            where = path.relative_to(ROOT)
            if text.count("\n") > 500:
                big.append(f"{where}: {text.count(chr(10))} lines")
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    length = node.end_lineno - node.lineno + 1
                    if length > 80:
                        big.append(f"{where}: {node.name} is {length} lines")

    assert not big, "\n".join(big)
    assert len(list((ROOT / "cloud_trainer").glob("*.py"))) <= 6
