"""Who may use the broker: a CA and server certificate for TLS, and per-device passwords
that the ACL patterns (``broker/templates/acl``) bind to each device's own topics.

An access directory holds::

    ca.pem, ca.key           the CA devices trust (ca.key: 0600, keep it off the broker)
    server.pem, server.key   the broker's certificate for the names it is reached by
    passwd                   the devices' Mosquitto password file (hashed by mosquitto_passwd)
    cloud-passwd             the cloud's: its users log in on the cloud's own listener
    credentials/<user>.json  the plain password of each user (0600), to hand to the board

A device's user is its client id on the broker (``use_username_as_clientid``), so device
ids may not start with ``eclm-``, which the cloud's own client ids do.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
import secrets
import shutil
import subprocess
from pathlib import Path

from broker.config import TLSFiles
from broker.errors import ConfigError

CLOUD_USER = "cloud"
CLOUD_PREFIX = "eclm-"  # the cloud's client ids (eclm-<worker>, eclm-cloud, eclm-cli-<pid>)
_USER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # a device id, as on the wire


def check_user(username: str) -> str:
    if not _USER.match(username):
        raise ConfigError(f"user {username!r}: must be 1-64 letters, digits, '_', '.', '-'")
    return username


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


class Access:
    """An access directory: TLS files, the password file and users' credentials."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)

    @property
    def tls(self) -> TLSFiles:
        return TLSFiles(self.dir / "ca.pem", self.dir / "server.pem", self.dir / "server.key")

    @property
    def password_file(self) -> Path:
        return self.dir / "passwd"

    @property
    def cloud_password_file(self) -> Path:
        return self.dir / "cloud-passwd"

    def check(self) -> Access:
        """ValueError naming what is missing if the directory is not set up."""
        files = (*vars(self.tls).values(), self.password_file)
        missing = [p.name for p in files if not p.is_file()]
        if missing:
            raise ConfigError(f"{self.dir}: missing {missing}; run `eclm broker access init`")
        if not self.cloud_password_file.is_file():  # set up before the cloud had its own
            raise ConfigError(
                f"{self.dir}: no {self.cloud_password_file.name}; run `eclm broker access add "
                f"{CLOUD_USER}` (the cloud now logs in on its own listener)"
            )
        return self

    def init(self, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"), force: bool = False):
        """Create the CA, a server certificate valid for ``hosts`` and the cloud's user."""
        if (self.dir / "ca.pem").exists() and not force:
            raise ConfigError(f"{self.dir} is set up already; pass --force to start over")
        self.dir.mkdir(parents=True, exist_ok=True)
        ca_key, ca_cert = _make_cert("eclm fleet CA", None, hosts=())
        server_key, server_cert = _make_cert(hosts[0], (ca_key, ca_cert), hosts=hosts)
        for name, key, cert in (("ca", ca_key, ca_cert), ("server", server_key, server_cert)):
            _write_private(self.dir / f"{name}.key", _pem_key(key))
            (self.dir / f"{name}.pem").write_bytes(_pem_cert(cert))
        self.password_file.unlink(missing_ok=True)
        self.cloud_password_file.unlink(missing_ok=True)
        self.add_user(CLOUD_USER)
        self._passwd(self.password_file, [])  # no device yet
        return self

    def add_user(self, username: str, *, cloud: bool | None = None) -> str:
        """Give ``username`` a new random password and return it: a device, or with
        ``cloud`` (default: for the user ``cloud``) a user of the cloud's listener."""
        check_user(username)
        cloud = username == CLOUD_USER if cloud is None else cloud
        if not cloud and username.startswith(CLOUD_PREFIX):
            raise ConfigError(f"user {username!r}: device ids may not start with {CLOUD_PREFIX!r}")
        password = secrets.token_urlsafe(24)
        path = self.cloud_password_file if cloud else self.password_file
        self._passwd(path, [username, password])
        (self.dir / "credentials").mkdir(mode=0o700, exist_ok=True)
        creds = {"username": username, "password": password}
        _write_private(self.credentials_file(username), json.dumps(creds).encode())
        return password

    def _passwd(self, path: Path, user_password: list[str]) -> None:
        """Add (or replace) a user in a Mosquitto password file; with no user, create
        an empty one if there is none."""
        if not user_password:
            if not path.exists():
                _write_private(path, b"")
            return
        tool = shutil.which("mosquitto_passwd")
        if tool is None:
            raise ConfigError("mosquitto_passwd is not installed (apt-get install -y mosquitto)")
        create = [] if path.exists() else ["-c"]
        # -b takes the password as an argument: a short-lived child of ours, seen in the
        # process list only by this user and root for a few milliseconds
        command = [tool, *create, "-b", str(path), *user_password]
        subprocess.run(command, check=True, capture_output=True)
        os.chmod(path, 0o600)

    def credentials_file(self, username: str) -> Path:
        """Where ``username``'s plain password is kept (0600)."""
        return self.dir / "credentials" / f"{check_user(username)}.json"

    def password(self, username: str) -> str:
        path = self.credentials_file(username)
        try:
            return json.loads(path.read_text())["password"]
        except FileNotFoundError:
            raise ConfigError(f"no credentials for {username!r} in {self.dir}") from None


def _make_cert(common_name: str, issuer, *, hosts: tuple[str, ...]):
    """A new EC key and its certificate: self-signed CA when ``issuer`` is None, else a
    server certificate for ``hosts`` signed by ``issuer`` (key, cert)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)  # datetime.UTC is 3.11+
    issuer_key, issuer_cert = issuer or (key, None)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_cert.subject if issuer_cert else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650 if issuer is None else 825))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is None:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        names = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return key, builder.sign(issuer_key, hashes.SHA256())


def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def _pem_cert(cert) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)
