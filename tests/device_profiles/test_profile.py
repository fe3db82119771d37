import pytest

from device_profiles import ProfileError, list_profiles, load_profile, parse_profile
from device_profiles.profile import BOARDS_DIR

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
        assert profile.budget.model_memory_kb * 1024 < profile.ram_mb * 1024 * 1024
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
        ("latency_ms = 10.0", "latency_ms = -1.0", "budget.latency_ms"),
        ("latency_ms = 10.0", "latency_ms = inf", "budget.latency_ms"),
        ("speed_factor = 0.25", "speed_factor = nan", "speed_factor"),
        ("model_memory_kb = 512", "model_memory_kb = 512\nflash_kb = 3", "budget.flash_kb"),
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
