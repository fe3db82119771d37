"""Render Mosquitto configuration and ACL files from the templates."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from string import Template

from broker.errors import ConfigError

TEMPLATES = Path(__file__).parent / "templates"


@dataclass(frozen=True)
class TLSFiles:
    """Server certificate, key and the CA that signed them (PEM paths)."""

    cafile: Path
    certfile: Path
    keyfile: Path


@dataclass(frozen=True)
class BrokerConfig:
    """What the generated Mosquitto configuration says."""

    port: int
    host: str = "127.0.0.1"
    data_dir: Path = Path(".eclm/broker")
    max_packet_size: int = 256 * 1024
    password_file: Path | None = None
    cloud_user: str = "cloud"
    tls: TLSFiles | None = None
    # With logins: the cloud's own listener (default: port + 1) and the password file of
    # its users, which has no device (default: ``cloud-passwd`` beside ``password_file``).
    cloud_port: int | None = None
    cloud_password_file: Path | None = None

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"port: must be 1..65535, got {self.port}")
        if self.password_file:
            if self.cloud_port is None:
                object.__setattr__(self, "cloud_port", self.port + 1)
            if self.cloud_password_file is None:
                cloud = self.password_file.with_name("cloud-passwd")
                object.__setattr__(self, "cloud_password_file", cloud)
        if self.cloud_port is not None and not 0 < self.cloud_port < 65536:
            raise ConfigError(f"cloud_port: must be 1..65535, got {self.cloud_port}")
        if self.cloud_port == self.port:
            raise ConfigError(f"cloud_port: must differ from port {self.port}")
        if self.max_packet_size < 1024:
            raise ConfigError(f"max_packet_size: must be >= 1024, got {self.max_packet_size}")


def render_acl(config: BrokerConfig) -> str:
    return Template((TEMPLATES / "acl").read_text()).substitute(cloud_user=config.cloud_user)


def render_mosquitto_conf(config: BrokerConfig) -> str:
    """The text of ``mosquitto.conf``; with a password file, ``acl`` goes beside it.

    With logins there are two listeners. On the devices' one, ``use_username_as_clientid``
    makes a device's session its user's: a device that connects with another's client id
    gets its own session (its own id) and cannot close or take over the other's, nor
    receive what is queued for it. The cloud's workers and tools log in on their own
    listener, where several client ids per user are fine and only cloud users exist."""
    tls = ""
    if config.tls:
        tls = (
            f"cafile {config.tls.cafile.resolve()}\ncertfile {config.tls.certfile.resolve()}\n"
            f"keyfile {config.tls.keyfile.resolve()}\nrequire_certificate false"
        )
    auth = cloud = ""
    if config.password_file and config.cloud_password_file:
        acl = (config.data_dir / "acl").resolve()
        auth = (
            f"password_file {config.password_file.resolve()}\nacl_file {acl}\n"
            "use_username_as_clientid true"
        )
        cloud = (
            "\n# The cloud's workers and tools: cloud users only, any client id.\n"
            f"listener {config.cloud_port} {config.host}\n{tls}\nallow_anonymous false\n"
            f"password_file {config.cloud_password_file.resolve()}\nacl_file {acl}"
        )
    return Template((TEMPLATES / "mosquitto.conf").read_text()).substitute(
        generated_at=time.strftime("%Y-%m-%d %H:%M:%S"),
        # Mosquitto started as root drops to user "mosquitto", who cannot write our data_dir.
        user_line="user root" if os.geteuid() == 0 else "",
        port=config.port,
        host=config.host,
        tls_block=tls,
        allow_anonymous="false" if config.password_file else "true",
        auth_block=auth,
        cloud_block=cloud,
        data_dir=config.data_dir.resolve(),
        max_packet_size=config.max_packet_size,
    )


def write_config(config: BrokerConfig) -> Path:
    """Write ``mosquitto.conf`` (and ``acl`` when authenticating) into ``data_dir``."""
    config.data_dir.mkdir(parents=True, exist_ok=True)
    if config.password_file:
        (config.data_dir / "acl").write_text(render_acl(config))
    path = config.data_dir / "mosquitto.conf"
    path.write_text(render_mosquitto_conf(config))
    return path
