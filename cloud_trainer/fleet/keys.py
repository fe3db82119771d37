"""The cloud's ed25519 signing key: created once, private part readable by its owner only.

``signing.key`` (PKCS#8 PEM, mode 0600) stays with the cloud; ``signing.pub`` (PEM) is
provisioned onto every device, which accepts only desired states signed with the pair.
"""

from __future__ import annotations

import os
import stat
from dataclasses import replace
from pathlib import Path

from cloud_trainer.errors import ConfigError
from eclm_wire import signed_bytes

PRIVATE_NAME, PUBLIC_NAME = "signing.key", "signing.pub"


def init_keys(directory: Path, *, force: bool = False) -> tuple[Path, Path]:
    """Create a new key pair in ``directory``; FileExistsError rather than replace one
    unless ``force`` (devices provisioned with the old key would refuse everything)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    directory = Path(directory)
    private, public = directory / PRIVATE_NAME, directory / PUBLIC_NAME
    if private.exists() and not force:
        raise ConfigError(f"{private} exists; pass --force to replace the signing key")
    directory.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    tmp = private.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, private)
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private, public


def load_signing_key(path: Path):
    """The private key; ValueError naming the file if it is unreadable, not ed25519, or
    readable by others than its owner."""
    from cryptography.exceptions import InternalError, UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    path = Path(path)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        key = load_pem_private_key(path.read_bytes(), password=None)
    # a damaged key type OID: unknown (UnsupportedAlgorithm), or Ed448's with an Ed25519
    # key's 32 bytes, which OpenSSL refuses as "key setup failed" (InternalError)
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm, InternalError) as exc:
        raise ConfigError(f"{path}: not a readable PEM private key ({exc})") from exc
    if mode & 0o077:
        raise ConfigError(f"{path}: mode {mode:o} lets others read the signing key; chmod 600 it")
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path}: expected an ed25519 key, got {type(key).__name__}")
    return key


def sign(message, key):
    """``message`` (a DesiredState or an AdapterOffer) with its signature filled in."""
    return replace(message, signature=key.sign(signed_bytes(message)).hex())
