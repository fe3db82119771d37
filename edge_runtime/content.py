"""Fetching artifacts from a content server: plain HTTPS GET of ``<source>/<sha256>``,
resumed with ``Range`` after a cut. Standard library only (http.client, ssl).

The signed desired state names the server (``source``); ``eclm cloud serve`` is one, and
so is any static file server or S3-compatible store holding the content-addressed
objects. The server need not be trusted: each file is taken only if its sha256 matches
the signed state. TLS and the device's token (``Authorization: Bearer``) keep it private.
A download runs on its own thread (the agent's worker keeps handling messages); a
server that fails ``attempts`` times in a row leaves the artifacts to MQTT.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import eclm_wire as wire
from edge_runtime.artifacts import ArtifactStore
from edge_runtime.errors import ConfigError, ContentError

log = logging.getLogger(__name__)
BLOCK = 64 * 1024


@dataclass(frozen=True)
class ContentAccess:
    """How this device reaches content servers: its token and the CA it trusts."""

    token: str = ""  # sent as ``Authorization: Bearer <token>`` ("" = none)
    cafile: Path | None = None  # the server's CA (None: the system's)
    timeout: float = 30.0  # seconds without a byte before a connection counts as cut
    attempts: int = 5  # cuts in a row (each resumed with Range) before MQTT takes over

    def __post_init__(self) -> None:
        if len(self.token) > 1024 or any(c.isspace() or not c.isprintable() for c in self.token):
            raise ConfigError("content token: at most 1024 printable characters, no spaces")
        if not self.timeout > 0 or self.attempts < 1:
            raise ConfigError(f"content: timeout > 0 and attempts >= 1, got {self}")

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cafile) if self.cafile else None)


class HttpFetch:
    """Downloads ``refs`` from ``source`` into ``store`` on a thread of its own."""

    def __init__(
        self,
        store: ArtifactStore,
        refs: list[wire.ArtifactRef],
        source: str,
        access: ContentAccess,
    ) -> None:
        self.store, self.refs, self.access = store, list(refs), access
        url = urllib.parse.urlsplit(source)
        if url.scheme != "https" or not url.hostname:
            raise ContentError(f"content source must be an https:// URL, got {source[:200]!r}")
        self.host, self.port = url.hostname, url.port or 443
        self.base = url.path.rstrip("/")
        self.received = 0  # bytes that came over HTTPS
        self.resumed = 0  # requests that resumed a cut download with Range
        self.error = ""  # why the server was given up ("" while it works)
        self.finished = threading.Event()
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, name="content-fetch", daemon=True)

    def start(self) -> HttpFetch:
        self._thread.start()
        return self

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def ok(self) -> bool:
        return self.finished.is_set() and not self.error

    def _run(self) -> None:
        try:
            for ref in self.refs:
                if not self.store.has(ref.sha256):
                    self._fetch(ref)
        except ContentError as exc:
            self.error = str(exc)
            log.warning("content server given up: %s", exc)
        finally:
            self.finished.set()

    def _fetch(self, ref: wire.ArtifactRef) -> None:
        part = self.store.root / "partial" / f"{ref.sha256}.http"
        cuts = 0
        while not self._cancel.is_set():
            have = part.stat().st_size if part.exists() else 0
            if have >= ref.size:
                if self._finish(ref, part):
                    return
                cuts += 1  # a file that does not match: start again from nothing
            else:
                try:
                    self._get(ref, part, have)
                    continue
                except (OSError, http.client.HTTPException) as exc:
                    cuts += 1
                    log.info("content %s cut at %d bytes: %s", ref.name, have, exc)
            if cuts >= self.access.attempts:
                raise ContentError(f"{ref.name}: {cuts} attempts failed")
            time.sleep(min(5.0, 0.2 * 2**cuts))
        raise ContentError("cancelled")

    def _get(self, ref: wire.ArtifactRef, part: Path, have: int) -> None:
        """One GET from byte ``have`` on, appended to ``part``; OSError if it is cut."""
        conn = http.client.HTTPSConnection(
            self.host, self.port, timeout=self.access.timeout, context=self.access.context()
        )
        headers = {"Range": f"bytes={have}-"} if have else {}
        if self.access.token:
            headers["Authorization"] = f"Bearer {self.access.token}"
        try:
            conn.request("GET", f"{self.base}/{ref.sha256}", headers=headers)
            response = conn.getresponse()
            if response.status in (401, 403, 404):
                raise ContentError(f"{ref.name}: the server answered {response.status}")
            if response.status == 206 and have:
                self.resumed += 1
                mode = "ab"
            elif response.status == 200:
                mode = "wb"  # no Range support: from the start
            else:
                raise http.client.HTTPException(f"unexpected status {response.status}")
            with open(part, mode) as fh:
                while block := response.read(BLOCK):
                    if self._cancel.is_set():
                        return
                    fh.write(block)
                    self.received += len(block)
                    if fh.tell() > ref.size:
                        raise ContentError(f"{ref.name}: the server sends more than its size")
        finally:
            conn.close()

    def _finish(self, ref: wire.ArtifactRef, part: Path) -> bool:
        """Move a whole, matching file into the store; drop one that does not match."""
        digest = hashlib.sha256()
        with open(part, "rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
            os.fsync(fh.fileno())
        if digest.hexdigest() != ref.sha256 or part.stat().st_size != ref.size:
            log.warning("content %s does not match its sha256: fetching it again", ref.name)
            part.unlink(missing_ok=True)
            return False
        os.replace(part, self.store.path(ref.sha256))
        return True
