"""Which exit code each error ends an ``eclm`` command with: one table, first match wins.

An error no entry matches is a bug: exit code 1, with the traceback under ``-v``.
"""

from __future__ import annotations

from broker.errors import BrokerError
from broker.errors import ConfigError as BrokerConfigError
from cloud_trainer.errors import (
    ConfigError,
    ExportError,
    FleetError,
    JobError,
    RolloutAborted,
    ServiceError,
    StateError,
)
from device_profiles import ProfileError
from eclm.errors import BundleError
from eclm_common.errors import UsageError
from eclm_common.exit_codes import ExitCode
from eclm_lab.errors import SettingsError
from eclm_wire.errors import AddressError, BrokerUnreachable, ProtocolError
from edge_runtime.errors import ArtifactError, BackendError, ContentError, NotServing
from edge_runtime.errors import ConfigError as EdgeConfigError

EXIT_CODES: tuple[tuple[type[BaseException], ExitCode], ...] = (
    (KeyboardInterrupt, ExitCode.INTERRUPTED),
    (UsageError, ExitCode.USAGE),
    (BrokerUnreachable, ExitCode.BROKER_UNREACHABLE),
    (RolloutAborted, ExitCode.ABORTED),
    (FleetError, ExitCode.TIMEOUT),
    (StateError, ExitCode.STATE),
    (ServiceError, ExitCode.SERVICE),
    (ExportError, ExitCode.BUILD),
    (JobError, ExitCode.BUILD),
    (BundleError, ExitCode.BUILD),
    (BrokerConfigError, ExitCode.CONFIG),  # before BrokerError, its base
    (BrokerError, ExitCode.BROKER),
    (ProfileError, ExitCode.CONFIG),
    (ConfigError, ExitCode.CONFIG),  # SelectionError too
    (EdgeConfigError, ExitCode.CONFIG),  # DataError too: a data set that cannot be read
    (ProtocolError, ExitCode.CONFIG),  # an id or a stored message that does not validate
    (AddressError, ExitCode.CONFIG),
    (SettingsError, ExitCode.CONFIG),
    (ArtifactError, ExitCode.CONFIG),
    (BackendError, ExitCode.CONFIG),  # BackendUnavailable says what to install
    (ContentError, ExitCode.BROKER_UNREACHABLE),  # a content server that cannot serve
    (NotServing, ExitCode.ERROR),  # predicting before installing: the caller's bug
)


def exit_code_for(exc: BaseException) -> ExitCode | None:
    """The exit code ``exc`` ends a command with; None for an error nobody raises on
    purpose (a bug)."""
    for cls, code in EXIT_CODES:
        if isinstance(exc, cls):
            return code
    return None
