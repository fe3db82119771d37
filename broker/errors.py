"""Errors of the broker package.

BrokerError          the broker could not be started; the message says why and where its log is
└── ConfigError      a broker setting, user, ACL or TLS file that is missing or invalid
"""

from __future__ import annotations


class BrokerError(Exception):
    """The broker could not be started; the message says why and where its log is."""


class ConfigError(BrokerError, ValueError):
    """A broker setting, user, password, ACL or TLS file that is missing or invalid."""
