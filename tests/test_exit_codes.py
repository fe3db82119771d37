"""Every documented exit code is reachable, and every error the packages raise on purpose
ends a command with one of them (eclm/exits.py); anything else is a bug: exit 1."""

import ast
import builtins
import importlib
from pathlib import Path

import pytest

from eclm.cli import _failed
from eclm.exits import EXIT_CODES, exit_code_for
from eclm_common.exit_codes import ExitCode

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ["eclm", "eclm_common", "eclm_wire", "edge_runtime", "cloud_trainer", "broker",
           "device_profiles", "eclm_lab"]  # fmt: skip
# Built-in errors that mean a bug or are caught where they are raised, never a user's error.
BUILTIN_OK = {"RuntimeError", "TypeError", "AttributeError", "SystemExit", "NotImplementedError"}
CAUGHT_WHERE_RAISED = {("eclm_wire/message.py", "ValueError")}  # json's parse_constant hook


def _raised():
    """(file, class) of every ``raise X(...)`` in the shipped packages, X resolved."""
    for package in SHIPPED:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.name == "__main__.py":
                continue
            module = importlib.import_module(
                ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            )
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                    func = node.exc.func
                    name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
                    if name:
                        yield str(path.relative_to(ROOT)), name, module


def test_every_code_but_ok_and_error_comes_from_the_table():
    assert {code for _, code in EXIT_CODES} | {ExitCode.OK, ExitCode.ERROR} == set(ExitCode)


def test_every_error_raised_on_purpose_maps_to_an_exit_code():
    unmapped = []
    for where, name, module in _raised():
        cls = getattr(module, name, None) or getattr(builtins, name, None) or _local(name)
        if cls is None or not isinstance(cls, type) or not issubclass(cls, BaseException):
            continue  # re-raising a variable, or a factory
        if cls.__module__ == "builtins":
            if name not in BUILTIN_OK and (where, name) not in CAUGHT_WHERE_RAISED:
                unmapped.append(f"{where}: raise {name} (use the package's error)")
        elif exit_code_for(cls.__new__(cls)) is None:
            unmapped.append(f"{where}: raise {name} maps to no exit code")

    assert not unmapped, "\n".join(sorted(set(unmapped)))


def _local(name: str):
    """A class imported inside a function: look for it in the packages' error modules."""
    for package in SHIPPED:
        try:
            errors = importlib.import_module(f"{package}.errors")
        except ImportError:
            continue
        if hasattr(errors, name):
            return getattr(errors, name)
    return None


def test_an_unexpected_error_is_exit_1_with_the_traceback_under_verbose(capsys):
    try:
        {}["missing"]
    except KeyError as exc:
        bug = exc

    assert _failed(bug, verbose=False) == ExitCode.ERROR
    quiet = capsys.readouterr().err
    assert _failed(bug, verbose=True) == ExitCode.ERROR
    loud = capsys.readouterr().err

    assert "a bug: KeyError" in quiet and "-v shows the traceback" in quiet
    assert "Traceback" not in quiet
    assert "Traceback" in loud and "test_exit_codes.py" in loud


@pytest.mark.parametrize("cls, code", EXIT_CODES)
def test_each_entry_says_why_in_one_line(cls, code, capsys):
    exc = cls.__new__(cls)
    exc.args = ("the reason",)

    assert _failed(exc, verbose=False) == code
    err = capsys.readouterr().err
    assert err == ("" if code == ExitCode.INTERRUPTED else "eclm: the reason\n")


def test_the_readme_documents_every_code():
    readme = (ROOT / "README.md").read_text()

    for code in ExitCode:
        assert f"| {int(code)} | " in readme, code
