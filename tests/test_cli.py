import subprocess
import sys

import pytest

from eclm.cli import build_parser, main
from eclm_common.exit_codes import HELP, ExitCode, epilog


def subcommand_paths(parser, prefix=()):
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            for name, sub in action.choices.items():
                yield (*prefix, name)
                yield from subcommand_paths(sub, (*prefix, name))


PATHS = list(subcommand_paths(build_parser()))


def test_the_commands_the_issues_name_exist():
    assert {
        ("demo",),
        ("broker", "run"),
        ("profiles", "list"),
        ("profiles", "show"),
        ("edge", "run"),
        ("edge", "status"),
        ("cloud", "train"),
        ("cloud", "export"),
        ("cloud", "deploy"),
        ("cloud", "keys", "init"),
        ("cloud", "rollout", "start"),
        ("cloud", "rollout", "status"),
        ("cloud", "rollout", "abort"),
        ("cloud", "serve"),
        ("cloud", "integrate"),
        ("edge", "bundle"),
    } <= set(PATHS)


@pytest.mark.parametrize("path", PATHS, ids=" ".join)
def test_every_subcommand_has_help(path, capsys):
    with pytest.raises(SystemExit) as info:
        main([*path, "--help"])

    assert info.value.code == 0
    assert "usage: eclm " + " ".join(path) in capsys.readouterr().out


def test_every_exit_code_is_documented_in_help():
    assert set(HELP) == set(ExitCode)
    for code in ExitCode:
        assert f"{int(code):>3}  {HELP[code]}" in epilog()


def test_a_service_config_with_an_unknown_key_exits_3_naming_it(tmp_path, capsys):
    config = tmp_path / "cloud.toml"
    config.write_text("[aggregation]\nquorom = 3\n")

    assert main(["cloud", "serve", "--config", str(config)]) == ExitCode.CONFIG
    assert "aggregation.quorom: unknown key" in capsys.readouterr().err


def test_a_corrupt_state_database_exits_7_saying_so(tmp_path, capsys):
    from cloud_trainer.fleet.keys import init_keys
    from cloud_trainer.model.checkpoint import train_model

    train_model(tmp_path / "model", epochs=1)
    private, _ = init_keys(tmp_path / "keys")
    (tmp_path / "state.db").write_bytes(b"\xff" * 4096)
    config = tmp_path / "cloud.toml"
    config.write_text(
        f'log_format = "text"\n[state]\ndatabase = "sqlite:///{tmp_path}/state.db"\n'
        f'[model]\ndir = "{tmp_path}/model"\nsigning_key = "{private}"\n'
    )

    assert main(["cloud", "serve", "--config", str(config)]) == ExitCode.STATE
    assert "corrupt" in capsys.readouterr().err


def test_profiles_show_prints_the_fields(capsys):
    assert main(["profiles", "show", "rpi-zero-2w"]) == 0
    out = capsys.readouterr().out
    assert "ram_mb" in out and "512" in out and "budget.model_memory_mb" in out


def test_a_bad_profile_file_exits_3_naming_the_field(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n')

    assert main(["profiles", "show", str(bad)]) == ExitCode.CONFIG
    assert "field 'title'" in capsys.readouterr().err


def test_edge_status_without_state_says_so(tmp_path, capsys):
    assert main(["edge", "status", "--device-id", "d", "--store", str(tmp_path)]) == 3
    assert "has not run there yet" in capsys.readouterr().out


def test_edge_run_without_a_trust_key_refuses_to_start(tmp_path):
    cmd = [sys.executable, "-m", "eclm", "edge", "run", "--profile", "rpi4"]
    cmd += ["--device-id", "pi4-nokey", "--store", str(tmp_path), "--broker", "mqtt://127.0.0.1:9"]
    refused = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    insecure = subprocess.run([*cmd, "--insecure"], capture_output=True, text=True, timeout=60)

    assert refused.returncode == ExitCode.CONFIG
    assert "no trust key" in refused.stderr and "--insecure" in refused.stderr
    assert insecure.returncode == ExitCode.BROKER_UNREACHABLE  # it got as far as connecting
    assert "runs INSECURE" in insecure.stderr


def test_a_closed_pipe_ends_a_command_quietly(tmp_path):
    import eclm_wire as wire

    report = wire.ReportedState("d", "rpi4", ("litert",), 3, "active", detail="x" * 900)
    (tmp_path / "reported.json").write_bytes(report.encode())
    cmd = f"{sys.executable} -m eclm edge status --device-id d --store {tmp_path} | head -n 1"
    for _ in range(3):  # head may or may not close the pipe before eclm writes
        out = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=60)
        assert out.stdout.startswith("device    d")
        assert out.stderr == "", out.stderr


def test_eclm_starts_without_importing_torch():
    code = (
        "import sys; from eclm.cli import build_parser; build_parser(); "
        "print([m for m in sys.modules if m.startswith(('torch', 'executorch'))])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_cloud_select_prints_the_choice_and_refuses_bad_input(modular, tmp_path, capsys):
    select = ["cloud", "select", "--model", str(modular["model_dir"])]

    assert main([*select, "--profile", "rpi-zero-2w", "--histogram", "0,0,5,9,0,0,0,0,0,1"]) == 0
    out = capsys.readouterr().out
    assert "layer 0: modules" in out and "layer 1: modules" in out and " MB" in out

    assert main([*select, "--profile", "rpi4", "--histogram", "1,2"]) == ExitCode.CONFIG
    assert "histogram" in capsys.readouterr().err

    from budgets import board_file

    tiny = board_file(tmp_path, "tiny", base="rpi4", memory_mb=0.02)
    assert main([*select, "--profile", str(tiny)]) == ExitCode.CONFIG
    assert "smallest possible is" in capsys.readouterr().err


def test_keys_init_refuses_to_replace_a_key_and_deploy_needs_one(tmp_path, capsys):
    assert main(["cloud", "keys", "init", "--dir", str(tmp_path)]) == ExitCode.OK
    assert "signing.pub" in capsys.readouterr().out
    assert main(["cloud", "keys", "init", "--dir", str(tmp_path)]) == ExitCode.CONFIG
    assert "--force" in capsys.readouterr().err

    missing = tmp_path / "nowhere.key"
    deploy = ["cloud", "deploy", "--device", "a=rpi4", "--signing-key", str(missing)]
    assert main(deploy) == ExitCode.CONFIG
    assert str(missing) in capsys.readouterr().err
