"""Which desired states a device accepts: signed by the cloud's ed25519 key, not expired,
aimed at this board's profile, and with a serial newer than any it accepted before.

The signature covers the desired state's canonical JSON with an empty ``signature``
field. The highest accepted serial and the digest of that state are kept in a small file
in the device's store, so a replayed older state is refused across restarts, while the
state already accepted is applied again after a restart.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import eclm_wire as wire
from eclm_wire import signed_bytes
from eclm_wire.enums import EventCode
from eclm_wire.errors import ProtocolError
from edge_runtime.artifacts import atomic_write
from edge_runtime.errors import ConfigError

log = logging.getLogger(__name__)


def load_public_key(path: Path):
    """The cloud's ed25519 public key from a PEM file; ConfigError naming the file if not."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError, UnsupportedAlgorithm) as exc:  # a damaged key type OID
        raise ConfigError(f"{path}: not a readable PEM public key ({exc})") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path}: expected an ed25519 public key, got {type(key).__name__}")
    return key


class Gate:
    """Checks desired states against the trust rules and remembers what it accepted.

    ``public_key`` None accepts unsigned states (development only; the agent says so).
    ``floor`` is the serial of the state the device serves: if ``state_path`` is ever
    unreadable, nothing at or below it is accepted again.
    """

    def __init__(
        self,
        public_key,
        state_path: Path,
        profile: str,
        *,
        floor: int = -1,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.public_key = public_key
        self.floor = floor
        self.state_path = Path(state_path)
        self.profile = profile
        self.clock = clock
        self.serial, self.digest = self._load()

    def _load(self) -> tuple[int, str]:
        try:
            data = json.loads(self.state_path.read_text())
            serial, digest = int(data["serial"]), str(data["digest"])
        except FileNotFoundError:
            return self.floor, ""  # first start (floor -1), or the file is gone
        except (OSError, ValueError, KeyError, TypeError, OverflowError, RecursionError) as exc:
            # Unreadable memory of past serials: the active state's serial is what we can prove.
            log.error(
                "%s is unreadable (%s); accepting only serials above %d, the active state's",
                self.state_path,
                exc,
                self.floor,
            )
            return self.floor, ""
        if serial < self.floor:  # it once accepted the state it serves: the file is wrong
            log.error(
                "%s says serial %d, below the active state's %d; accepting only serials above %d",
                self.state_path,
                serial,
                self.floor,
                self.floor,
            )
            return self.floor, ""
        return serial, digest

    def check(self, desired: wire.DesiredState) -> bool:
        """ProtocolError (with a code) if ``desired`` must be refused. Returns True if it is
        the state accepted last (apply it again only if it is not applied yet)."""
        if self.public_key is not None:
            self._verify(desired)
        if desired.expires and desired.expires < self.clock():
            raise ProtocolError(
                f"expired at {desired.expires:.0f} (now {self.clock():.0f})",
                field="expires",
                code=EventCode.EXPIRED,
            )
        if (desired.target or self.public_key is not None) and desired.target != self.profile:
            raise ProtocolError(
                f"targets profile {desired.target!r}, this device is {self.profile!r}",
                field="target",
                code=EventCode.WRONG_TARGET,
            )
        digest = hashlib.sha256(signed_bytes(desired)).hexdigest()
        if desired.serial == self.serial and digest == self.digest:
            return True
        if desired.serial <= self.serial:
            raise ProtocolError(
                f"serial {desired.serial} is not newer than {self.serial}, accepted before",
                field="serial",
                code=EventCode.REPLAYED,
            )
        return False

    def check_offer(self, offer: wire.AdapterOffer) -> None:
        """ProtocolError (with a code) if an adapter offer is unsigned, forged or expired."""
        if self.public_key is not None:
            self._verify(offer)
        if offer.expires and offer.expires < self.clock():
            raise ProtocolError(
                f"expired at {offer.expires:.0f}", field="expires", code=EventCode.EXPIRED
            )

    def _verify(self, desired: wire.DesiredState | wire.AdapterOffer) -> None:
        from cryptography.exceptions import InvalidSignature

        if not desired.signature:
            raise ProtocolError("this device accepts only signed states", code=EventCode.UNSIGNED)
        try:
            self.public_key.verify(bytes.fromhex(desired.signature), signed_bytes(desired))
        except InvalidSignature:
            raise ProtocolError(
                "does not verify with the provisioned key",
                field="signature",
                code=EventCode.BAD_SIGNATURE,
            ) from None

    def accept(self, desired: wire.DesiredState) -> None:
        """Remember ``desired`` as the newest accepted state (on disk before it is used)."""
        digest = hashlib.sha256(signed_bytes(desired)).hexdigest()
        atomic_write(
            self.state_path, json.dumps({"serial": desired.serial, "digest": digest}).encode()
        )
        self.serial, self.digest = desired.serial, digest
