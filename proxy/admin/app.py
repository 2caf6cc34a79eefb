"""`/health`, `/usage`, `/metrics` and `/dashboard`: what an operator, a load balancer, a
scraper and a test suite ask the proxy.

No usage rows are written for these requests, and their answers hold counts and states
only (error texts can quote upstreams, and so keys).  Errors come in the shape the
client's SDK understands, like every other answer of the proxy.
"""

from __future__ import annotations

import hmac
import html
import ipaddress
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from werkzeug.exceptions import HTTPException
from werkzeug.routing import Map, Rule
from werkzeug.wrappers import Request

from .. import formats
from ..errors import (BadRequest, Forbidden, MethodNotAllowed, NotFound, ProxyError,
                      ReportUnavailable, Unauthenticated)
from ..keys.policy import ClientKey
from ..redact import request_credentials
from ..limits import MemoryBudget
from ..pipeline.replies import StartResponse, reason_phrase
from ..routing import Breakers
from ..text import loggable
from ..store import StoreFault
from ..tracker import NullTracker, Tracker

log = logging.getLogger("proxy.admin")

ADMIN_PATHS = frozenset({"/health", "/usage", "/metrics", "/dashboard", "/dashboard/login",
                         "/dashboard/data", "/dashboard/app.js", "/dashboard/app.css"})
STATIC = os.path.join(os.path.dirname(__file__), "static")
DASHBOARD_COOKIE = "llm_proxy_dashboard"
SESSION_SECONDS = 12 * 3600  # a dashboard session lasts this long
LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><link rel="icon" href="data:,">
<title>llm-proxy dashboard</title></head>
<body><h1>llm-proxy dashboard</h1><p>{message}</p>{form}</body></html>
"""
# The dashboard loads nothing but its own files, and no other site may frame it.
DASHBOARD_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; "
                    "connect-src 'self'; img-src 'self' data:; form-action 'self'; "
                    "frame-ancestors 'none'; base-uri 'none'")

USAGE_TOP = 50
USAGE_MAX_TOP = 1000
USAGE_DEFAULT_DAYS = 31
USAGE_MAX_DAYS = 400


@dataclass(frozen=True)
class AdminDeps:
    db_path: str
    started_tracker: Callable[[], Tracker | NullTracker | None]  # this process's, if it runs
    tracker: Callable[[], Tracker | NullTracker]  # ... started on demand
    shutting_down: Callable[[], bool]
    live_streams: Callable[[], int]
    breakers: Breakers
    budget: MemoryBudget
    dedup: Callable[[], dict] = lambda: {}  # this worker's kept answers and live shared calls
    admin_token: Callable[[], str | None] = lambda: None  # None: loopback is the admin
    client_key: Callable[[Mapping[str, str]], ClientKey | None] = lambda headers: None
    metrics_open: bool = False  # /metrics without the admin token (a scraper on the network)


# Headers a reverse proxy adds: a request that carries one came from elsewhere, whatever
# address it arrived from (nginx on the same host connects from loopback).
FORWARDING_HEADERS = ("x-forwarded-for", "forwarded", "x-real-ip")
ADMIN = "admin"


def from_loopback(environ) -> bool:
    """Did this request come from this host, directly?  Not when it carries a forwarding
    header, nor over a Unix socket (gunicorn's empty address: nginx in front, most likely).
    A caller in this very process (a test client, an embedding application) sets no
    address at all: that is as local as it gets."""
    if any(environ.get("HTTP_" + h.upper().replace("-", "_")) for h in FORWARDING_HEADERS):
        return False
    if "REMOTE_ADDR" not in environ:
        return True
    address = environ["REMOTE_ADDR"] or ""
    if not address:
        return False
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


class AdminApp:
    def __init__(self, deps: AdminDeps) -> None:
        self.deps = deps
        self.url_map = Map([Rule("/health", endpoint="health", methods=["GET"]),
                            Rule("/usage", endpoint="usage", methods=["GET"]),
                            Rule("/metrics", endpoint="metrics", methods=["GET"]),
                            Rule("/dashboard", endpoint="dashboard", methods=["GET"]),
                            Rule("/dashboard/login", endpoint="login", methods=["POST"]),
                            Rule("/dashboard/data", endpoint="dashboard_data",
                                 methods=["GET"]),
                            Rule("/dashboard/app.js", endpoint="static", methods=["GET"]),
                            Rule("/dashboard/app.css", endpoint="static", methods=["GET"])])
        self._flush_lock = threading.Lock()
        self._logins = LoginFailures()

    def __call__(self, environ, start_response: StartResponse) -> Iterable[bytes]:
        request = Request(environ)
        try:
            endpoint, _ = self.url_map.bind_to_environ(environ).match()
            return getattr(self, f"_{endpoint}")(request, start_response)
        except HTTPException as exc:
            err = _as_proxy_error(exc, request)
        except ProxyError as exc:
            err = exc
        except Exception:  # a bug must cost one request, never the worker (and never a row)
            log.exception("internal error on %s %s", loggable(request.method, 32),
                          loggable(request.path))
            err = ProxyError("internal error in the proxy")
        log.info("rejected %s %s: %s %s", loggable(request.method, 32), loggable(request.path),
                 err.status, loggable(err.message))
        # No request id: these requests have no usage row for one to point at.
        fmt = formats.for_client(request.headers)
        return _json_response(start_response, fmt.status_of(err), fmt.error_body(err))

    def authority(self, request: Request, session: bool = False) -> str | ClientKey | None:
        """Who asks: ADMIN (the admin token; or, with `session`, the dashboard's session
        cookie), a client key (keys mode: it may see its own usage), ADMIN again for
        loopback when no token is set, or nobody in particular."""
        token = self.deps.admin_token()
        credentials = request_credentials(request.headers)
        if token is not None:
            presented = token.encode("utf-8")
            if any(hmac.compare_digest(c.encode("utf-8"), presented) for c in credentials):
                return ADMIN
            if session and is_dashboard_session(request.cookies.get(DASHBOARD_COOKIE, ""),
                                                token, time.time()):
                return ADMIN
        key = self.deps.client_key(request.headers) if credentials else None
        if key is not None:  # a client asks as itself, wherever it runs
            return key
        return ADMIN if token is None and from_loopback(request.environ) else None

    def _admin_only(self, request: Request, what: str, session: bool = False) -> None:
        who = self.authority(request, session)
        if who == ADMIN:
            return
        if who is not None:
            raise Forbidden(f"{what} needs the admin token, not a client key")
        raise Unauthenticated(f"{what} needs the admin token (Authorization: Bearer ...)"
                              if self.deps.admin_token() is not None else
                              f"{what} answers on loopback only (set an admin token to "
                              "allow it from elsewhere)")

    def _health(self, request: Request, start_response) -> Iterable[bytes]:
        tracker = self.deps.started_tracker()
        if request.args.get("flush"):
            self._admin_only(request, "/health?flush=1")
        if tracker is not None and request.args.get("flush"):
            self._flush_unless_degraded(tracker, 5.0)  # tests and operators wait for rows
        stopping = self.deps.shutting_down()
        stats = tracker.stats() if tracker is not None else None
        state = "degraded" if stats and stats.get("state") == "degraded" else "ok"
        body = {"status": "shutting_down" if stopping else state, "pid": os.getpid(),
                "live_exchanges": self.deps.live_streams(),
                "breakers": self.deps.breakers.snapshot(), "tracker": stats,
                "memory_budget": {"used": self.deps.budget.used, "total": self.deps.budget.total},
                "dedup": self.deps.dedup()}
        # 503 while shutting down, so a load balancer stops sending new requests here.
        return _json_response(start_response, 503 if stopping else 200, body)

    def _usage(self, request: Request, start_response) -> Iterable[bytes]:
        """The usage summary, bounded whatever the database holds: a period of at most
        USAGE_MAX_DAYS (the last USAGE_DEFAULT_DAYS unless `since` says otherwise) and the
        `top` models and client keys (USAGE_TOP by default).  The admin sees every row;
        a client key (keys mode) sees its own.  With `view` (daily, monthly, session,
        blocks, models, keys; `model` and `key` filter), one of the report's views instead,
        over the same period."""
        from .. import report
        who = self.authority(request)
        if who is None:
            self._admin_only(request, "/usage")  # says why it is refused
        own_key = None if who == ADMIN else who.id  # a client key sees its own rows only
        view = request.args.get("view")
        since, until, top = usage_bounds(request.args, request.args.get("timezone") if view
                                         else None)
        if own_key is None:  # a client's call holds no thread waiting for rows
            self._flush_unless_degraded(self.deps.tracker(), 2.0)
        try:
            if view:  # one of the report's views (`llm-proxy usage VIEW`), as JSON
                filters = {k: v for k in ("model", "key") if (v := request.args.get(k))}
                summary = report.view(self.deps.db_path, view, since, until, filters=filters,
                                      top=top, client_key=own_key,
                                      zone=request.args.get("timezone"))
            else:
                summary = report.summarize(self.deps.db_path, since=since, until=until,
                                           top=top, client_key=own_key)
        except ValueError as exc:
            raise BadRequest(f"bad since/until/view: {loggable(exc)}") from None
        except StoreFault as exc:
            raise ReportUnavailable(f"the usage database cannot be read now ({exc.kind})") from None
        return _json_response(start_response, 200, summary)

    def _metrics(self, request: Request, start_response) -> Iterable[bytes]:
        """Prometheus' text format, for every worker of this host (proxy/metrics.py)."""
        if not self.deps.metrics_open:
            self._admin_only(request, "/metrics")
        from ..metrics import CONTENT_TYPE, exposition
        body = exposition()
        start_response("200 OK", [("Content-Type", CONTENT_TYPE),
                                  ("Content-Length", str(len(body)))])
        return [body]

    # -- the dashboard: a page, its script and style, and its data --------------------------------

    def _dashboard(self, request: Request, start_response) -> Iterable[bytes]:
        if self.authority(request, session=True) != ADMIN:
            return self._login_page(request, start_response, 401)
        return _file_response(start_response, "dashboard.html", "text/html; charset=utf-8")

    def _static(self, request: Request, start_response) -> Iterable[bytes]:
        """The page's script and style: no data in them, so anyone may load them."""
        name = request.path.rsplit("/", 1)[-1]
        kind = "text/javascript" if name.endswith(".js") else "text/css"
        return _file_response(start_response, name, f"{kind}; charset=utf-8")

    def _login(self, request: Request, start_response) -> Iterable[bytes]:
        """The admin token from the page's form: a browser cannot send a header, so a
        session cookie stands for it (dashboard_session: an expiry and its HMAC under the
        token, never the token)."""
        token = self.deps.admin_token()
        if self._logins.too_many(time.monotonic()):
            return self._login_page(request, start_response, 429, failed=True)
        given = request.form.get("token", "")
        if token is None or not hmac.compare_digest(given.encode("utf-8"),
                                                    token.encode("utf-8")):
            self._logins.failed(time.monotonic())
            log.warning("dashboard login refused (wrong token) from %s",
                        loggable(request.remote_addr, 64))
            return self._login_page(request, start_response, 401, failed=True)
        where = request.script_root + "/dashboard"
        secure = request.scheme == "https" or \
            request.headers.get("X-Forwarded-Proto", "").lower() == "https"
        value = dashboard_session(token, int(time.time()) + SESSION_SECONDS)
        cookie = (f"{DASHBOARD_COOKIE}={value}; Path={where}; Max-Age={SESSION_SECONDS}; "
                  f"HttpOnly; SameSite=Strict{'; Secure' if secure else ''}")
        start_response("303 See Other", [("Location", where), ("Set-Cookie", cookie),
                                         ("Content-Length", "0")])
        return [b""]

    def _login_page(self, request: Request, start_response, status: int,
                    failed: bool = False) -> Iterable[bytes]:
        if self.deps.admin_token() is None:
            message = ("The dashboard answers on loopback only: set an admin token "
                       "(LLM_PROXY_ADMIN_TOKEN) to open it from elsewhere.")
            form = ""
        else:
            message = ("Too many wrong tokens: try again in a minute." if status == 429 else
                       "Wrong token." if failed else "The dashboard needs the admin token.")
            action = html.escape(request.script_root + "/dashboard/login", quote=True)
            form = (f'<form method="post" action="{action}"><label>Admin token '
                    '<input type="password" name="token" autofocus></label> '
                    '<button type="submit">Open</button></form>')
        page = LOGIN_PAGE.format(message=message, form=form).encode("utf-8")
        start_response(f"{status} {reason_phrase(status)}",
                       [("Content-Type", "text/html; charset=utf-8"),
                        ("Content-Length", str(len(page))),
                        ("Content-Security-Policy", DASHBOARD_POLICY)])
        return [page]

    def _dashboard_data(self, request: Request, start_response) -> Iterable[bytes]:
        from .. import report
        self._admin_only(request, "/dashboard", session=True)
        filters = {name: request.args.get(name) or None for name in ("model", "key")}
        if any(v is not None and len(v) > 256 for v in filters.values()):
            raise BadRequest("model and key filters are 256 characters at most")
        try:
            data = report.dashboard_data(self.deps.db_path, request.args.get("period", "24h"),
                                         filters)
        except ValueError as exc:
            raise BadRequest(loggable(exc)) from None
        except StoreFault as exc:
            raise ReportUnavailable(f"the usage database cannot be read now ({exc.kind})") from None
        return _json_response(start_response, 200, data)

    def _flush_unless_degraded(self, tracker: Tracker | NullTracker, timeout: float) -> None:
        """Wait for queued rows, one caller at a time and not while the store refuses them:
        anyone may call these endpoints, and each wait holds a thread."""
        if not self._flush_lock.acquire(blocking=False):
            return  # someone is already waiting for the same rows
        try:
            if tracker.stats().get("state") != "degraded":
                tracker.flush(timeout)
        finally:
            self._flush_lock.release()


def usage_bounds(args, zone: str | None = None) -> tuple[float, float, int]:
    """(since, until, top) of a /usage request as epoch seconds, within the limits; bare
    dates are midnights in `zone` (a view's time zone), else in UTC."""
    from ..report import time_zone, zoned
    try:
        tz = time_zone(zone)
        until = zoned(args.get("until"), tz, end=True) or time.time()
        since = zoned(args.get("since"), tz)
        top = int(args.get("top", USAGE_TOP))
    except ValueError as exc:
        raise BadRequest(f"bad since/until/top: {loggable(exc)}") from None
    if since is None:  # on the hour: a database that keeps rollups reads no raw rows there
        since = (until - USAGE_DEFAULT_DAYS * 86400) // 3600 * 3600
    if until - since > USAGE_MAX_DAYS * 86400:
        raise BadRequest(f"the period is longer than {USAGE_MAX_DAYS} days; ask for less "
                         "(or use `llm-proxy usage` on the host)")
    if not 1 <= top <= USAGE_MAX_TOP:
        raise BadRequest(f"top must be between 1 and {USAGE_MAX_TOP}")
    return since, until, top


def dashboard_session(token: str, expires: int) -> str:
    """The dashboard's session cookie: when it expires, and a MAC of that under the admin
    token (a new token ends every session); useless as the token itself, and only good
    for the dashboard's own endpoints."""
    mac = hmac.new(token.encode("utf-8"), f"llm-proxy dashboard session {expires}".encode(),
                   "sha256").hexdigest()
    return f"{expires}.{mac}"


def is_dashboard_session(cookie: str, token: str, now: float) -> bool:
    expires, _, _ = cookie.partition(".")
    if not expires.isdigit() or int(expires) < now:
        return False
    return hmac.compare_digest(cookie.encode("utf-8"),
                               dashboard_session(token, int(expires)).encode("utf-8"))


class LoginFailures:
    """Wrong tokens at the dashboard's login, per worker: past LIMIT in a minute, logins
    are refused for the rest of it (a guessing loop gets nowhere, and holds no thread)."""

    LIMIT = 10
    WINDOW = 60.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._times: list[float] = []

    def failed(self, now: float) -> None:
        with self._lock:
            self._times = [t for t in self._times if now - t < self.WINDOW] + [now]

    def too_many(self, now: float) -> bool:
        with self._lock:
            return sum(1 for t in self._times if now - t < self.WINDOW) >= self.LIMIT


def _file_response(start_response, name: str, content_type: str) -> list[bytes]:
    with open(os.path.join(STATIC, name), "rb") as f:
        body = f.read()
    start_response("200 OK", [("Content-Type", content_type), ("Content-Length", str(len(body))),
                              ("Content-Security-Policy", DASHBOARD_POLICY),
                              ("X-Content-Type-Options", "nosniff"),
                              ("Cache-Control", "no-cache")])
    return [body]


def _as_proxy_error(exc: HTTPException, request: Request) -> ProxyError:
    if exc.code == 405:
        allowed = "POST" if request.path.endswith("/login") else "GET"
        return MethodNotAllowed(f"{request.path} accepts {allowed} only")
    return NotFound(f"no route for {loggable(request.method, 32)} {loggable(request.path, 200)}")


def _json_response(start_response, status: int, body: object) -> list[bytes]:
    data = json.dumps(body, default=str).encode("utf-8")
    start_response(f"{status} {reason_phrase(status)}", [("Content-Type", "application/json"),
                                                         ("Content-Length", str(len(data)))])
    return [data]
