"""Mosquitto configuration, credentials and a launcher with an embedded amqtt fallback."""

from broker.access import Access
from broker.config import BrokerConfig, TLSFiles, render_acl, render_mosquitto_conf, write_config
from broker.errors import BrokerError, ConfigError
from broker.launcher import Broker, find_mosquitto, free_port

__all__ = [
    "Access",
    "Broker",
    "BrokerConfig",
    "BrokerError",
    "ConfigError",
    "TLSFiles",
    "find_mosquitto",
    "free_port",
    "render_acl",
    "render_mosquitto_conf",
    "write_config",
]
