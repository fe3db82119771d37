"""The service's config file (TOML): one frozen dataclass per section.

An unknown section or key, or a value of the wrong type, stops start-up with a
:class:`ConfigError` that names it (``aggregation.quorum: expected int, got str``).
``eclm cloud serve --print-config`` prints the defaults as a starting point.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

from cloud_trainer.errors import ConfigError
from device_profiles import toml as tomllib


@dataclass(frozen=True)
class BrokerSection:
    url: str = "mqtt://127.0.0.1:1883"  # a password left out comes from $ECLM_BROKER_PASSWORD
    cafile: str = ""
    shared_group: str = ""  # several workers: "eclm-cloud" (Mosquitto shared subscriptions)


@dataclass(frozen=True)
class StateSection:
    database: str = "sqlite:///runs/cloud/state.db"  # or postgresql://user@host:5432/eclm


@dataclass(frozen=True)
class ModelSection:
    dir: str = "runs/model"  # eclm cloud train --out
    artifacts: str = "runs/artifacts"
    signing_key: str = "runs/keys/signing.key"
    formats: list[str] = field(default_factory=lambda: ["tflite", "pte"])


@dataclass(frozen=True)
class FleetSection:
    auto_assign: bool = True  # a device that reports without a desired state gets one
    ttl_days: float = 7.0  # desired states expire after this
    # a device whose reported label mix moved so far that the modules selected for the new
    # mix have this much more expected importance (relative) gets them (0: never re-select)
    reselect_gain: float = 0.5


@dataclass(frozen=True)
class AggregationSection:
    strategy: str = "trimmed-mean"  # mean, class-mean, median, trimmed-mean, krum, multi-krum
    trim: float = 0.2  # share cut from each end by trimmed-mean
    malicious: float = 0.2  # krum, multi-krum: the share of updates assumed hostile
    keep: float = 0.0  # multi-krum: the share of best-scored updates averaged (0: all but those)
    # where samples weigh (mean, class-mean, multi-krum): an update counts at most this many
    # times the round's median samples, so a lying count cannot take the round (0: no cap)
    cap: float = 1.0
    clip: float = 0.0  # max L2 norm of an update's change to the head (0: no clipping)
    max_norm: float = 100.0  # an update tensor above this norm is refused
    quorum: int = 4  # devices whose updates close a round
    deadline: float = 600.0  # seconds after which a round closes with what it has
    max_staleness: int = 2  # model versions an update may lag; older ones are refused
    # carry: a round's aggregate also counts each device's latest update of the domain from
    # earlier rounds (within max_staleness), so it speaks for every device that adapted to
    # the domain, not only those heard since the last round closed; with quorum = 1 every
    # update closes a round at the next tick and warm starts follow the fleet at once
    carry: bool = False

    def make_strategy(self):
        """The configured strategy with the parameters it takes; ValueError naming a bad one."""
        from cloud_trainer.federation.strategies import STRATEGIES, make_strategy

        taken = {f.name for f in dataclasses.fields(STRATEGIES[self.strategy])}
        params = {k: getattr(self, k) for k in ("clip", "cap", "trim", "malicious", "keep")}
        return make_strategy(self.strategy, **{k: v for k, v in params.items() if k in taken})


@dataclass(frozen=True)
class IntegrationSection:
    enabled: bool = True  # a clean-domain round makes a new head and rolls it out
    # clean-domain updates stored since the last new head before a closed clean round makes
    # the next one (0: every clean round does); with quorum = 1 a round per update would
    # otherwise roll out a head per upload, faster than devices adapt to it
    min_updates: int = 0
    blend: float = 0.5  # without retrain: how far the head moves toward the round's aggregate
    # retrain: train the head on the cloud's own data of every domain devices adapted to,
    # pulled toward each domain's latest aggregate, in `workers` torch.distributed processes
    retrain: bool = False
    workers: int = 1
    epochs: int = 200
    pull: float = 0.01


@dataclass(frozen=True)
class RolloutSection:
    canary: int = 1
    waves: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0])
    max_failure_rate: float = 0.2
    min_reports: int = 2
    wave_timeout: float = 120.0


@dataclass(frozen=True)
class LimitsSection:
    """Per device: messages a second and the burst allowed at once, per kind (rate 0: no
    limit). Far above what a device sends; the excess is dropped and counted."""

    updates_per_s: float = 2.0  # adapter uploads: a device sends one per shift or schedule
    updates_burst: int = 60
    events_per_s: float = 10.0
    events_burst: int = 200
    fetches_per_s: float = 200.0  # one per artifact chunk asked for
    fetches_burst: int = 2000
    reports_per_s: float = 10.0  # reported and status
    reports_burst: int = 100

    def limiter(self):
        from cloud_trainer.fleet.ratelimit import Kind, Limit, RateLimiter

        names = {Kind.UPDATES: "updates", Kind.EVENTS: "events"}
        names |= {Kind.FETCHES: "fetches", Kind.REPORTS: "reports"}
        return RateLimiter(
            {
                kind: Limit(getattr(self, f"{n}_per_s"), getattr(self, f"{n}_burst"))
                for kind, n in names.items()
            }
        )


@dataclass(frozen=True)
class HttpSection:
    host: str = "127.0.0.1"
    port: int = 9108  # /metrics (Prometheus) and /healthz; 0 picks a free port


@dataclass(frozen=True)
class DashboardSection:
    """The page and JSON API on the HTTP port (``/``, ``/api/v1/...``). A token is its
    own value (``token``) or the contents of a file (``token_file``, mode 600, made with a
    random token at start if missing); the read-only one sees, the operator one may also
    start and abort rollouts."""

    enabled: bool = True
    token: str = ""  # the read-only token itself (overrides token_file)
    token_file: str = "runs/cloud/dashboard.token"
    operator_token: str = ""  # the operator token itself (overrides operator_token_file)
    operator_token_file: str = "runs/cloud/operator.token"
    stale_after: float = 60.0  # seconds without a report after which a device shows stale
    history: int = 120  # resource readings kept per device (a ring) for its plot


@dataclass(frozen=True)
class ContentSection:
    """An HTTPS content server for artifacts, named in every desired state (off: MQTT only)."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 9443  # 0 picks a free port
    url: str = ""  # the base URL devices reach it by ("" = https://host:port)
    cert: str = ""  # PEM certificate and key, e.g. the broker access dir's server.pem/.key
    key: str = ""
    secret_file: str = "runs/keys/content.secret"  # device tokens are HMACs with it ("" = none)

    def check(self) -> None:
        if not self.enabled:
            return
        if not self.cert or not self.key:
            raise ConfigError("content: cert and key are required when enabled")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"content.port: must be 0..65535, got {self.port}")
        if self.url and (not self.url.startswith("https://") or len(self.url) > 512):
            raise ConfigError(f"content.url: must be an https:// URL, got {self.url[:80]!r}")


@dataclass(frozen=True)
class BroadcastSection:
    """When shared fetch requests for one artifact are sent as one broadcast."""

    gather: float = 0.2  # seconds without a new request before the broadcast starts
    gather_max: float = 2.0  # at most this long after the first request
    enabled: bool = True  # false: every device gets its own copy on its own topic


@dataclass(frozen=True)
class OffloadSection:
    """Collaborative inference: devices send boundary features on ``infer``, a worker
    runs the rest of the full model on a batch of them and answers on ``answer``. On by
    default: it costs one idle MQTT connection and thread until a device asks."""

    enabled: bool = True
    window_ms: float = 5.0  # how long a batch waits for more requests after the first
    max_batch: int = 64  # samples a batch runs at most
    max_frame_bytes: int = 1 << 20  # a larger request is refused
    queue: int = 1024  # requests waiting at most; beyond, they are dropped and counted

    def check(self) -> None:
        if not 0 <= self.window_ms <= 1000:  # not: nan too
            raise ConfigError(f"offload.window_ms: must be 0..1000, got {self.window_ms}")
        if not 1 <= self.max_batch <= 4096:
            raise ConfigError(f"offload.max_batch: must be 1..4096, got {self.max_batch}")
        if not 64 <= self.max_frame_bytes <= 1 << 21:
            raise ConfigError("offload.max_frame_bytes: must be 64..2097152")
        if self.queue < 1:
            raise ConfigError(f"offload.queue: must be >= 1, got {self.queue}")


@dataclass(frozen=True)
class ServiceConfig:
    worker: str = "cloud-1"  # this worker's name: its MQTT client id and its rows' owner
    log_format: str = "json"  # json or text
    broker: BrokerSection = BrokerSection()
    state: StateSection = StateSection()
    model: ModelSection = ModelSection()
    fleet: FleetSection = FleetSection()
    aggregation: AggregationSection = AggregationSection()
    integration: IntegrationSection = IntegrationSection()
    rollout: RolloutSection = RolloutSection()
    limits: LimitsSection = LimitsSection()
    http: HttpSection = HttpSection()
    dashboard: DashboardSection = DashboardSection()
    content: ContentSection = ContentSection()
    broadcast: BroadcastSection = BroadcastSection()
    offload: OffloadSection = OffloadSection()

    def __post_init__(self) -> None:
        if self.log_format not in ("json", "text"):
            raise ConfigError(f"log_format: expected json or text, got {self.log_format!r}")
        a = self.aggregation
        from cloud_trainer.federation.strategies import STRATEGIES

        if a.strategy not in STRATEGIES:
            known = ", ".join(STRATEGIES)
            raise ConfigError(f"aggregation.strategy: unknown {a.strategy!r} (known: {known})")
        try:
            a.make_strategy()
        except ValueError as exc:
            raise ConfigError(f"aggregation: {exc}") from None
        if a.quorum < 1 or a.deadline <= 0:
            raise ConfigError("aggregation: quorum >= 1, deadline > 0")
        if self.integration.workers < 1:
            raise ConfigError("integration.workers: must be >= 1")
        if self.integration.min_updates < 0:
            raise ConfigError("integration.min_updates: must be >= 0")
        if not self.fleet.reselect_gain >= 0:  # not: nan too
            raise ConfigError("fleet.reselect_gain: must be >= 0 (0: never re-select)")
        try:
            self.limits.limiter()
        except ValueError as exc:
            raise ConfigError(f"limits: {exc}") from None
        self._check_dashboard()
        self.content.check()
        self.offload.check()
        self.broadcast_policy()

    def _check_dashboard(self) -> None:
        d = self.dashboard
        if not 0 <= self.http.port <= 65535:
            raise ConfigError(f"http.port: must be in [0, 65535], got {self.http.port}")
        if not d.stale_after > 0:
            raise ConfigError("dashboard.stale_after: must be > 0 seconds")
        if not 1 <= d.history <= 10_000:
            raise ConfigError("dashboard.history: must be in [1, 10000] readings")
        for key in ("token", "operator_token"):
            value = getattr(d, key)
            if value and (len(value) < 16 or not value.isascii() or not value.isprintable()):
                raise ConfigError(f"dashboard.{key}: at least 16 printable ASCII characters")
        if d.token and d.token == d.operator_token:
            raise ConfigError("dashboard: token and operator_token must differ")
        if d.enabled and not (d.token or d.token_file):
            raise ConfigError("dashboard: a token or a token_file is required")
        if d.enabled and not (d.operator_token or d.operator_token_file):
            raise ConfigError("dashboard: an operator_token or an operator_token_file is required")

    def broadcast_policy(self):
        """The broadcast section as a policy (None: off); ConfigError if out of range."""
        from cloud_trainer.fleet.broadcast import BroadcastPolicy

        b = self.broadcast
        return BroadcastPolicy(b.gather, b.gather_max) if b.enabled else None


def load_config(path: str | Path) -> ServiceConfig:
    """The config in ``path``; ConfigError naming the file and key if it is not valid."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        # ValueError: TOMLDecodeError, bytes that are not UTF-8, an integer past Python's
        # 4,300-digit limit; RecursionError: arrays or tables nested thousands deep
        raise ConfigError(f"{path}: {exc}") from exc
    try:
        return _build(ServiceConfig, data, "")
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _build(cls, data: dict, where: str):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            raise ConfigError(f"{where}{key}: unknown key (known: {', '.join(sorted(known))})")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}{key}: expected a [{key}] table")
            kwargs[key] = _build(hint, value, f"{where}{key}.")
        else:
            kwargs[key] = _check(value, hint, f"{where}{key}")
    return cls(**kwargs)


def _check(value, hint, name: str):
    if typing.get_origin(hint) is list:
        (inner,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{name}: expected a list, got {type(value).__name__}")
        return [_check(v, inner, f"{name}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            raise ConfigError(f"{name}: {len(str(value))}-digit integer, beyond a float") from None
    if hint is float and isinstance(value, float) and math.isnan(value):
        # TOML's nan passes every range check (nan <= 0 is false): a deadline that never comes
        raise ConfigError(f"{name}: expected a number, got nan")
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{name}: expected {hint.__name__}, got {type(value).__name__}")
    return value


def example() -> str:
    """The defaults as a TOML file."""
    lines = [f'worker = "{ServiceConfig.worker}"', f'log_format = "{ServiceConfig.log_format}"']
    for f in dataclasses.fields(ServiceConfig):
        section = getattr(ServiceConfig(), f.name)
        if not dataclasses.is_dataclass(section) or isinstance(section, type):
            continue
        lines.append(f"\n[{f.name}]")
        for key, value in dataclasses.asdict(section).items():
            lines.append(f"{key} = {_toml(value)}")
    return "\n".join(lines) + "\n"


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)
