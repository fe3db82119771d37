"""The dashboard on the service's HTTP port: the page (``/``, plain files in
``dashboard/``) and the JSON API under ``/api/v1/`` it reads.

The page's files hold no fleet data and are served to anyone who can reach the port (a
browser cannot send a header when the address is typed); every API call needs a token
(:mod:`cloud_trainer.service.access`): 401 with an empty body without one, 403 for a
read-only token on a POST.

    GET  /api/v1/devices?profile=&label=&phase=&status=&q=&sort=&order=&page=&size=
    GET  /api/v1/devices/{id}
    GET  /api/v1/rollouts        POST /api/v1/rollouts {rollout_id, profile?, label?}
    POST /api/v1/rollouts/{id}/abort
    GET  /api/v1/rounds          GET  /api/v1/versions        GET /api/v1/whoami
"""

from __future__ import annotations

import json
import logging
from importlib import resources
from urllib.parse import parse_qsl, unquote, urlsplit

from cloud_trainer.service import views
from cloud_trainer.service.access import Access, Role

log = logging.getLogger(__name__)
PREFIX = "/api/v1/"
BODY_MAX = 4096  # bytes of a POST body
STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/dashboard/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/dashboard/style.css": ("style.css", "text/css; charset=utf-8"),
}
HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
PAGE_POLICY = "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'"


class Api:
    """Routes one request of ``metrics.serve_http``'s handler; False if it is not ours."""

    def __init__(self, service, access: Access) -> None:
        self.service, self.access = service, access
        self._files = {path: _read(name) for path, (name, _) in STATIC.items()}

    def handle(self, handler, method: str) -> bool:
        url = urlsplit(handler.path)
        if method == "GET" and url.path in STATIC:
            kind = STATIC[url.path][1]
            extra = {"Content-Security-Policy": PAGE_POLICY} if url.path == "/" else {}
            _send(handler, 200, self._files[url.path], kind, extra)
            return True
        if not url.path.startswith(PREFIX):
            return False
        role = self.access.role(handler.headers.get("Authorization"))
        if role is Role.NONE:
            _send(handler, 401, b"", "text/plain", {"WWW-Authenticate": "Bearer"})
            return True
        parts = [unquote(p) for p in url.path[len(PREFIX) :].split("/") if p]
        try:
            if method == "GET":
                status, body = self._get(parts, dict(parse_qsl(url.query)), role)
            elif role < Role.OPERATE:
                status, body = 403, {"error": "an operator token is needed"}
            else:
                status, body = self._post(parts, handler)
        except Exception as exc:  # a failing view must not take the HTTP thread down
            log.exception("dashboard API %s %s failed", method, url.path[:200])
            status, body = 500, {"error": type(exc).__name__}
        _send(handler, status, json.dumps(body).encode(), "application/json")
        return True

    def _get(self, parts: list[str], query: dict[str, str], role: Role) -> tuple[int, dict]:
        s = self.service
        match parts:
            case ["devices"]:
                return 200, views.devices(s, query)
            case ["devices", device_id]:
                found = views.device(s, device_id)
                return (200, found) if found else (404, {"error": "no such device"})
            case ["rollouts"]:
                return 200, views.rollouts(s)
            case ["rounds"]:
                return 200, views.rounds(s)
            case ["versions"]:
                return 200, views.versions(s)
            case ["whoami"]:
                return 200, {"role": role.name.lower(), "worker": s.config.worker}
        return 404, {"error": "no such resource"}

    def _post(self, parts: list[str], handler) -> tuple[int, dict]:
        length = handler.headers.get("Content-Length", "0")
        if not length.isdigit() or int(length) > BODY_MAX:
            return 413, {"error": f"a body of at most {BODY_MAX} bytes"}
        raw = handler.rfile.read(int(length))
        match parts:
            case ["rollouts"]:
                try:
                    body = json.loads(raw or b"{}")
                except (ValueError, RecursionError):
                    return 400, {"error": "the body is not JSON"}
                return self.service.actions.start(body)
            case ["rollouts", rollout_id, "abort"]:
                return self.service.actions.abort(rollout_id)
        return 404, {"error": "no such action"}


def _read(name: str) -> bytes:
    return (resources.files("cloud_trainer.service") / "dashboard" / name).read_bytes()


def _send(handler, status: int, body: bytes, kind: str, extra: dict | None = None) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", kind)
    handler.send_header("Content-Length", str(len(body)))
    for name, value in (HEADERS | (extra or {})).items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(body)
