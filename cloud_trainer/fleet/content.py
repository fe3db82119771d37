"""The cloud's content server: artifacts by sha256 over HTTPS, with ``Range`` for resume.

``GET /<sha256>`` (under ``prefix``) answers the whole object (200) or, with ``Range:
bytes=a-[b]``, the part asked for (206). Each device sends its own token (``Authorization:
Bearer <device>.<hmac>``), derived from one secret the server keeps, so no token list is
stored and one device's token can be revoked by rotating the secret. Devices check every
hash against the signed desired state: what serves the bytes need not be trusted, so a
static file server or an S3-compatible store holding ``<base>/<sha256>`` does as well.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cloud_trainer.errors import ConfigError
from edge_runtime.artifacts import ArtifactStore

log = logging.getLogger(__name__)
_OBJECT = re.compile(r"^/([0-9a-f]{64})$")
_RANGE = re.compile(r"^bytes=(\d{1,15})-(\d{0,15})$")


def load_secret(path: Path) -> bytes:
    """The token secret in ``path``, created (0600) if there is none."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
    secret = path.read_text().strip()
    if len(secret) < 32:
        raise ConfigError(f"content.secret_file: {path} holds fewer than 32 characters")
    return secret.encode()


def device_token(secret: bytes, device_id: str) -> str:
    """The bearer token of ``device_id``: ``<device_id>.<hmac-sha256 hex>``."""
    mac = hmac.new(secret, device_id.encode(), hashlib.sha256).hexdigest()
    return f"{device_id}.{mac}"


def token_device(secret: bytes, token: str) -> str | None:
    """The device a token was made for, or None if it is not one of ours."""
    device_id, _, _ = token.rpartition(".")
    if device_id and hmac.compare_digest(device_token(secret, device_id), token):
        return device_id
    return None


UNSATISFIABLE = (-1, -1)


def _span(header: str | None, size: int) -> tuple[int, int] | None:
    """``(first, last)`` byte of a ``Range`` header (whole object: None), or
    :data:`UNSATISFIABLE` for a range that cannot be served (416)."""
    if not header:
        return None
    match = _RANGE.fullmatch(header.strip())
    if not match:
        return UNSATISFIABLE
    first, last = int(match[1]), int(match[2]) if match[2] else size - 1
    if first >= size or last < first:
        return UNSATISFIABLE
    return first, min(last, size - 1)


def serve_content(
    store: ArtifactStore,
    host: str,
    port: int,
    *,
    cert: Path,
    key: Path,
    secret: bytes | None,
) -> ThreadingHTTPServer:
    """Serve ``store`` over HTTPS on a daemon thread (``server_port`` says where); with
    ``secret``, only to devices whose token it made."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            auth = self.headers.get("Authorization", "")
            token = auth[7:] if auth.startswith("Bearer ") else ""
            if secret is not None and token_device(secret, token) is None:
                return self._fail(401, "a device token is required")
            found = _OBJECT.match(self.path)
            if not found or not store.has(found[1]):
                return self._fail(404, "no such object")
            path = store.path(found[1])
            size = path.stat().st_size
            span = _span(self.headers.get("Range"), size)
            if span == UNSATISFIABLE:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            first, last = span or (0, size - 1)
            self.send_response(206 if span else 200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(last - first + 1))
            if span:
                self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
            self.end_headers()
            with open(path, "rb") as fh:
                fh.seek(first)
                _copy(fh, self.wfile, last - first + 1)
            return None

        def _fail(self, status: int, why: str) -> None:
            body = f"{why}\n".encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt, *args) -> None:
            log.debug("content: " + fmt, *args)

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        server.server_close()
        raise ConfigError(f"content: cannot load {cert} / {key}: {exc}") from exc
    # the handshake happens on the request's own thread, not in the accept loop
    server.socket = context.wrap_socket(
        server.socket, server_side=True, do_handshake_on_connect=False
    )
    threading.Thread(target=server.serve_forever, name="content", daemon=True).start()
    return server


def _copy(src, dst, count: int) -> None:
    """``count`` bytes from ``src`` to ``dst`` (a client that hangs up ends it)."""
    try:
        while count > 0:
            block = src.read(min(count, 256 * 1024))
            if not block:
                return
            dst.write(block)
            count -= len(block)
    except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
        return
