"""Who may read the dashboard and who may act on the fleet: two bearer tokens.

A request names its token in ``Authorization: Bearer TOKEN`` (the page keeps it in the
tab's sessionStorage, never in a cookie, so another site cannot make the browser send it).
Tokens are compared with :func:`hmac.compare_digest`, so the time a wrong guess takes says
nothing of the right one. A token file that does not exist is made with a random token,
mode 600; one that others may read is refused, as ssh refuses such a key.
"""

from __future__ import annotations

import enum
import hmac
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from cloud_trainer.errors import ConfigError


class Role(enum.IntEnum):
    """What a token lets its bearer do; a higher role may do what a lower one may."""

    NONE = 0
    READ = 1  # the page and every GET of the API
    OPERATE = 2  # also POST: start and abort rollouts


@dataclass(frozen=True)
class Access:
    read_token: str
    operator_token: str
    read_file: Path | None = None  # where each came from (None: the config itself)
    operator_file: Path | None = None

    @classmethod
    def from_config(cls, section) -> Access:
        """The tokens of a :class:`~cloud_trainer.service.config.DashboardSection`;
        ConfigError if a token file is unreadable, empty or open to others."""
        read, read_file = _token(section.token, section.token_file, "token_file")
        operate, op_file = _token(
            section.operator_token, section.operator_token_file, "operator_token_file"
        )
        if hmac.compare_digest(read.encode(), operate.encode()):
            raise ConfigError("dashboard: the read-only and the operator token must differ")
        return cls(read, operate, read_file, op_file)

    def role(self, header: str | None) -> Role:
        """The role of a request's ``Authorization`` header (NONE if absent or wrong)."""
        if not header or not header.startswith("Bearer "):
            return Role.NONE
        given = header.removeprefix("Bearer ").strip().encode()
        # both compared every time: which one matched must not show in the timing either
        is_operator = hmac.compare_digest(given, self.operator_token.encode())
        is_reader = hmac.compare_digest(given, self.read_token.encode())
        if is_operator:
            return Role.OPERATE
        return Role.READ if is_reader else Role.NONE

    def where(self) -> str:
        """Where the tokens are, for the start-up line (never the tokens themselves)."""
        read = f"in {self.read_file}" if self.read_file else "as dashboard.token in the config"
        op = self.operator_file
        operate = f"in {op}" if op else "as dashboard.operator_token in the config"
        return f"read-only token {read}, operator token {operate}"


def _make(path: Path) -> None:
    """Write a random token to ``path``, mode 600, whole or not at all: written beside it,
    then linked into place, so a second worker starting at the same moment reads either
    no file or a whole one (and keeps the first one's token)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_urlsafe(32) + "\n")
        os.link(part, path)
    except FileExistsError:
        pass  # another worker made it first: its token it is
    finally:
        part.unlink(missing_ok=True)


def _token(value: str, file: str, key: str) -> tuple[str, Path | None]:
    if value:
        return value, None
    path = Path(file)
    try:
        if not path.exists():
            _make(path)
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                f"dashboard.{key}: {path} is mode {stat.S_IMODE(mode):o}; chmod 600 it"
            )
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"dashboard.{key}: {path}: {exc}") from None
    if len(token) < 16 or not token.isascii() or not token.isprintable():
        raise ConfigError(f"dashboard.{key}: {path} must hold 16 or more printable characters")
    return token, path
