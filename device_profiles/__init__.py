"""TOML profiles of real board classes and the loader that validates them."""

from device_profiles.errors import ProfileError
from device_profiles.profile import (
    Budget,
    DeviceProfile,
    OsImage,
    list_profiles,
    load_profile,
    parse_profile,
    profile_names,
)

__all__ = [
    "Budget",
    "DeviceProfile",
    "OsImage",
    "ProfileError",
    "list_profiles",
    "load_profile",
    "parse_profile",
    "profile_names",
]
