import logging

import pytest

from device_profiles import ProfileError, list_profiles, load_profile, parse_profile, profile_names
from device_profiles.profile import BOARDS_DIR, PROFILE_PATH_ENV

GOOD = (BOARDS_DIR / "rpi4.toml").read_text()


def test_every_shipped_profile_loads_and_covers_the_board_classes():
    names = {p.name for p in list_profiles()}

    assert {
        "rpi-zero-2w",
        "rpi4",
        "rpi5",
        "jetson-orin-nano",
        "android-phone",
        "x86-64-linux",
    } <= names
    for profile in list_profiles():
        # what is left after the OS and the runtime, of which the application keeps half
        assert 0 < profile.budget.model_memory_mb < profile.ram_mb / 2
        assert profile.budget.model_memory_kb == profile.budget.model_memory_mb * 1024
        assert 1.0 <= profile.budget.latency_ms <= 100.0  # per inference an app asks for
        assert profile.backends


def test_load_by_path_and_by_name_agree(tmp_path):
    path = tmp_path / "board.toml"
    path.write_text(GOOD)

    assert load_profile(path) == load_profile("rpi4")


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        ("ram_mb = 4096", 'ram_mb = "4096"', "ram_mb"),
        ("ram_mb = 4096\n", "", "ram_mb"),
        ("cores = 4", "cores = 0", "cores"),
        ('backends = ["litert", "executorch"]', 'backends = ["onnx"]', "backends"),
        ("has_battery = false", "has_battery = 1", "has_battery"),
        ("speed_factor = 0.25", "speed_factor = true", "speed_factor"),
        ("latency_ms = 33.0", "latency_ms = -1.0", "budget.latency_ms"),
        ("latency_ms = 33.0", "latency_ms = inf", "budget.latency_ms"),
        ("speed_factor = 0.25", "speed_factor = nan", "speed_factor"),
        ("model_memory_mb = 1781", "model_memory_mb = 1781\nflash_kb = 3", "budget.flash_kb"),
        ("model_memory_mb = 1781", "model_memory_mb = 0", "budget.model_memory_mb"),
        ("model_memory_mb = 1781", 'model_memory_mb = "1781"', "budget.model_memory_mb"),
        ("model_memory_mb = 1781\n", "", "budget.model_memory_mb"),
        ("model_memory_mb = 1781", "model_memory_kb = 0", "budget.model_memory_kb"),
        ("model_memory_mb = 1781", "model_memory_kb = 2.5", "budget.model_memory_kb"),
        ("model_memory_mb = 1781", f"model_memory_kb = {10**400}", "budget.model_memory_kb"),
        (
            "model_memory_mb = 1781",
            "model_memory_mb = 1781\nmodel_memory_kb = 512",
            "budget.model_memory_kb",
        ),
        ('arch = "aarch64"', 'arch = "sparc"', "arch"),
        ('python = "3.11"', 'python = "3.9"', "os.python"),
        ('python = "3.11"', "python = 3.11", "os.python"),  # a float: 3.10 would be 3.1
        ('glibc = "2.36"', 'glibc = "2.12"', "os.glibc"),
        ('glibc = "2.36"', 'glibc = "musl"', "os.glibc"),
        ('image = "Raspberry Pi OS (64-bit) bookworm (Debian 12)"', 'image = " "', "os.image"),
        ('glibc = "2.36"', 'glibc = "2.36"\nkernel = "6.6"', "os.kernel"),
    ],
)
def test_a_bad_field_is_named_with_the_file(old, new, field):
    assert old in GOOD

    with pytest.raises(ProfileError) as info:
        parse_profile(GOOD.replace(old, new), source="boards/x.toml")

    assert info.value.field == field
    assert "boards/x.toml" in str(info.value) and field in str(info.value)


def test_every_shipped_profile_names_its_os_image_python_and_glibc():
    images = {p.name: (p.os.python, p.os.glibc) for p in list_profiles()}

    # JetPack 6 is Ubuntu 22.04; Raspberry Pi OS bookworm is Debian 12; Ubuntu 24.04.
    assert images["jetson-orin-nano"] == ("3.10", "2.35")
    assert images["rpi4"] == images["rpi5"] == images["rpi-zero-2w"] == ("3.11", "2.36")
    assert images["x86-64-linux"] == ("3.12", "2.39")
    assert "JetPack 6" in load_profile("jetson-orin-nano").os.image


def test_missing_os_table_is_refused():
    with pytest.raises(ProfileError, match=r"missing table \[os\]"):
        parse_profile(GOOD.split("# The image the bundle")[0])


def test_missing_budget_table_and_broken_toml_are_refused():
    with pytest.raises(ProfileError, match="budget"):
        parse_profile(GOOD.split("[budget]")[0])
    with pytest.raises(ProfileError, match="not valid TOML"):
        parse_profile("name = ")


def test_unknown_profile_name_lists_the_known_ones():
    with pytest.raises(ProfileError, match="rpi4"):
        load_profile("no-such-board")


def test_an_old_profile_in_kb_loads_converted_and_warns_once(tmp_path, caplog):
    old = tmp_path / "old-board.toml"
    old.write_text(GOOD.replace("model_memory_mb = 1781", "model_memory_kb = 512"))

    with caplog.at_level(logging.WARNING, logger="device_profiles.profile"):
        first, again = load_profile(old), load_profile(old)

    assert first.budget.model_memory_mb == 0.5 and first.budget.model_memory_kb == 512
    assert first == again
    warned = [r.getMessage() for r in caplog.records if "model_memory_kb" in r.getMessage()]
    assert len(warned) == 1 and "model_memory_mb = 0.5" in warned[0] and str(old) in warned[0]


def test_a_sites_own_boards_are_found_by_name_on_the_profile_path(tmp_path, monkeypatch):
    from budgets import board_file

    board_file(tmp_path / "site", "lab-zero", memory_mb=0.25)
    with pytest.raises(ProfileError, match="no such profile"):
        load_profile("lab-zero")
    monkeypatch.setenv(PROFILE_PATH_ENV, str(tmp_path / "site"))

    board = load_profile("lab-zero")

    assert board.name == "lab-zero" and board.budget.model_memory_mb == 0.25
    assert "lab-zero" in profile_names() and "rpi4" in profile_names()
    assert load_profile("rpi4").budget.model_memory_mb == 1781  # shipped ones still found
