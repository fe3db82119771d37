"""How one device's agent runs: the settings the CLI, the fleet simulator and the tests
give :class:`~edge_runtime.agent.EdgeAgent`, checked when built."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import eclm_wire as wire
from device_profiles import DeviceProfile
from eclm_wire.mqtt import BrokerAddress
from edge_runtime.content import ContentAccess
from edge_runtime.download import RetryPolicy
from edge_runtime.errors import ConfigError
from edge_runtime.events import EventLimits
from edge_runtime.learning import LearnerConfig
from edge_runtime.offload import OffloadConfig


@dataclass(frozen=True)
class AgentConfig:
    """How one device runs. ``backend`` forces a backend instead of the profile's order."""

    device_id: str
    profile: DeviceProfile
    broker: BrokerAddress
    store_dir: Path
    eval_data: Path | None = None
    backend: str | None = None
    fetch_timeout: float = 10.0
    fetch_window: int = 2  # chunks asked for and not yet arrived: what a cut can cost
    # listen for a broadcast of what a desired state needs, until this many seconds pass
    # without a chunk, then fetch what is missing on the device's own topic (0: never listen)
    broadcast_wait: float = 5.0
    policy_interval: float = 5.0  # seconds between resource readings
    # seconds between reports of the latest reading: the cloud's view of an idle device
    health_interval: float = 10.0
    trust_key: Path | None = None  # the cloud's public key (required unless insecure)
    insecure: bool = False  # no trust key, on purpose: accepts unsigned desired states
    labels: tuple[str, ...] = ()  # key=value, for rollouts to pick devices by
    learning: LearnerConfig = LearnerConfig()  # the adapter heads trained on the device
    retry: RetryPolicy = RetryPolicy()  # files that fail their whole-file check
    events: EventLimits = EventLimits()  # the bound on events about refused messages
    scrub_interval: float = 3600.0  # seconds between re-hashes of the active set
    # "default": LiteRT's default delegates (XNNPACK), checked in a child process first
    # and dropped if they crash or disagree; "none": builtin kernels only (qemu, boards
    # whose XNNPACK build misbehaves). See edge_runtime/backends/delegates.py.
    litert_delegates: str = "default"
    content: ContentAccess = ContentAccess()  # token and CA for a content server (HTTPS)
    offload: OffloadConfig = OffloadConfig()  # collaborative inference with the cloud

    def __post_init__(self) -> None:
        wire.check_device_id(self.device_id)
        wire.check_labels(self.labels)
        if self.litert_delegates not in ("default", "none"):
            raise ConfigError(
                f"litert_delegates: 'default' or 'none', got {self.litert_delegates!r}"
            )
        if self.fetch_window < 1:
            raise ConfigError(f"fetch_window: must be >= 1, got {self.fetch_window}")
        if not 0 <= self.broadcast_wait <= 3600:  # not: nan too
            raise ConfigError(f"broadcast_wait: must be 0..3600 s, got {self.broadcast_wait}")
        if self.trust_key is None and not self.insecure:
            raise ConfigError(
                "no trust key: give the cloud's public key (--trust-key signing.pub), or "
                "--insecure to accept unsigned desired states (development only)"
            )
        if self.trust_key is not None and self.insecure:
            raise ConfigError("--insecure and --trust-key contradict each other: choose one")

    def backend_options(self, name: str) -> dict:
        """One thread (the agent shares the board); LiteRT's delegates as configured."""
        if name == "litert":
            return {"threads": 1, "delegates": self.litert_delegates}
        return {"threads": 1}
