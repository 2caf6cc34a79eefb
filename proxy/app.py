"""The WSGI application: routing, request checks and the error boundary.

A plain WSGI callable, so it runs under gunicorn (the supported way), any other WSGI
server, or legacy WSGI infrastructure.  Every failure before a response has started is
rendered in the endpoint's own error format with the right status; nothing a client sends
can kill a worker.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
from http import HTTPStatus
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable

from werkzeug.wrappers import Request

from . import formats
from .accounting import Accounting, InFlight
from .config import ANTHROPIC_FORMAT, OPENAI_FORMAT, Config, load_config
from .errors import (BadRequest, MethodNotAllowed, NotFound, Overloaded, PayloadTooLarge,
                     ProxyError, ReportUnavailable, RequestTimeout, ShuttingDown)
from .formats import Format
from .handler import ProxyRequest, StreamRelay, serve_plain
from .limits import MemoryBudget, Reservation, json_parse_cost
from .pricing import PriceTable
from .redact import Redactor, client_key_id, installation_secret, request_credentials
from .request_framing import Head
from .relay import Heartbeat
from .replies import REQUEST_ID_HEADER, StartResponse, error_response
from .routing import Breakers, Deployment, Route, Router, pass_through_route
from .text import loggable
from .store import StoreFault
from .tracker import NullTracker, Tracker
from .upstream import UpstreamClient, header_problem, is_hop_by_hop_header

log = logging.getLogger("proxy.app")

# Never forwarded upstream: framing the proxy redoes, client addresses that the provider has
# no business seeing, and the client's Accept-Encoding (the proxy reads every body it relays,
# to mask echoed keys and to cap decompression, so it asks upstreams for identity).
_REQUEST_DROP = frozenset({"host", "content-length", "x-forwarded-for", "x-forwarded-host",
                           "x-forwarded-proto", "x-forwarded-port", "x-real-ip", "forwarded",
                           "accept-encoding"})


@dataclass(frozen=True)
class Endpoint:
    name: str
    fmt: Format
    provider_format: str
    usage_format: str | None
    needs_model: bool = True
    may_stream: bool = True


ENDPOINTS: dict[str, Endpoint] = {
    "/v1/messages": Endpoint("anthropic", formats.ANTHROPIC, ANTHROPIC_FORMAT, "anthropic"),
    "/v1/messages/count_tokens": Endpoint("count_tokens", formats.ANTHROPIC, ANTHROPIC_FORMAT,
                                          None, may_stream=False),
    "/v1/chat/completions": Endpoint("openai-chat", formats.OPENAI_CHAT, OPENAI_FORMAT, "openai-chat"),
    "/v1/responses": Endpoint("openai-responses", formats.OPENAI_RESPONSES, OPENAI_FORMAT,
                              "openai-responses"),
}


ADMIN_PATHS = frozenset({"/health", "/usage"})  # the proxy's own endpoints: no usage rows


def new_request_id() -> str:
    return "req_" + secrets.token_hex(12)


def format_for_unknown(headers) -> Format:
    """Pick the error shape a client will understand when the path tells us nothing."""
    if headers.get("anthropic-version") or headers.get("x-api-key"):
        return formats.ANTHROPIC
    return formats.OPENAI_CHAT


class App:
    """The proxy as a WSGI callable."""

    def __init__(self, config: Config | None = None) -> None:
        self.config = config or load_config()
        self.upstream = UpstreamClient(self.config.connect_timeout, self.config.idle_timeout)
        self.heartbeat = Heartbeat(self.config.heartbeat_interval, self.config.client_probe_interval)
        self.prices = PriceTable(self.config.prices)
        self.router = Router(self.config.routes, Breakers(self.config.breaker_policy))
        # Stream threads are pooled: starting a thread per request costs ~0.3 ms of latency.
        self.stream_threads = ThreadPoolExecutor(max_workers=4096, thread_name_prefix="stream")
        # Every configured provider key; each request adds its own credential.
        self.secrets = Redactor(p.api_key for p in self.config.providers.values())
        self.budget = MemoryBudget(self.config.memory_budget)
        self.inflight = InFlight()
        self._tracker = None
        self._tracker_pid = None
        self._tracker_lock = threading.Lock()
        self._key_secret: bytes | None = None
        self._flush_lock = threading.Lock()
        self.shutting_down = False

    # -- lifecycle -------------------------------------------------------------------
    @property
    def tracker(self):
        """Started on first use, in the process that uses it (gunicorn forks workers)."""
        pid = os.getpid()
        if self._tracker is None or self._tracker_pid != pid:
            with self._tracker_lock:
                if self._tracker is None or self._tracker_pid != pid:
                    self._tracker = self._make_tracker()
                    self._tracker_pid = pid
        return self._tracker

    def _make_tracker(self):
        if not self.config.enabled:
            return NullTracker()
        tracker = Tracker(self.config.db_path, spill_dir=self.config.spill_path,
                          batch_size=self.config.batch_size,
                          flush_interval=self.config.flush_interval,
                          queue_max=self.config.queue_max, spill_after=self.config.spill_after)
        tracker.start()
        return tracker

    @property
    def key_secret(self) -> bytes:
        """The installation secret that keys client key ids (created on first start)."""
        if self._key_secret is None:
            try:
                self._key_secret = installation_secret(self.config.secret_path)
            except (OSError, ValueError) as exc:
                log.error("cannot use the installation secret %s (%s); client key ids of this "
                          "process will not match other processes'", self.config.secret_path,
                          loggable(exc))
                self._key_secret = secrets.token_hex(32).encode("ascii")
        return self._key_secret

    def start(self) -> None:
        """Worker start: the usage writer and the key secret, before the first request."""
        self.tracker
        self.key_secret

    def begin_shutdown(self) -> None:
        """SIGTERM: refuse new requests, let live streams run `shutdown_grace`, then end them."""
        self.shutting_down = True
        self.heartbeat.begin_shutdown(
            self.config.shutdown_grace,
            lambda: ShuttingDown("the proxy is shutting down; retry the request"))

    def close(self, timeout: float = 10.0) -> None:
        """Worker exit: wait for the usage rows of requests still finishing (stream threads
        record theirs after the client got its last byte), record the stragglers, then
        drain the usage queue; all within `timeout`."""
        deadline = time.monotonic() + timeout
        if not self.inflight.wait_until_empty((deadline - time.monotonic()) / 2):
            count = self.inflight.finish_remaining(
                503, "shutdown", "the proxy stopped before the request ended")
            log.warning("recorded %d requests that were still running at exit", count)
        if self._tracker is not None and self._tracker_pid == os.getpid():
            self._tracker.close(max(deadline - time.monotonic(), 0.1))

    # -- WSGI --------------------------------------------------------------------------
    def __call__(self, environ, start_response: StartResponse) -> Iterable[bytes]:
        request = Request(environ)
        path = request.path
        try:
            if path == "/health":
                return self._health(request, start_response)
            if path == "/usage":
                return self._usage(request, start_response)
            if path == "/v1/models":
                return self._models(request, start_response)
            endpoint = ENDPOINTS.get(path)
            if endpoint is None:
                raise NotFound(f"no route for {loggable(request.method, 32)} {loggable(path, 200)}")
            if request.method != "POST":
                raise MethodNotAllowed(f"{path} accepts POST only")
            return self._proxy(request, endpoint, start_response)
        except ProxyError as err:
            return self._refuse(request, path, err, start_response)
        except Exception:  # a bug must cost one request, never the worker
            log.exception("internal error on %s %s", loggable(request.method, 32), loggable(path))
            err = ProxyError("internal error in the proxy")
            return error_response(self._format_for(path, request), err, new_request_id(), start_response)

    def _refuse(self, request: Request, path: str, err: ProxyError,
                start_response: StartResponse) -> Iterable[bytes]:
        """A request refused before it reached an endpoint (unknown path, wrong method): the
        error in the shape its client speaks, and, but for the proxy's own admin paths, a
        usage row like any other request."""
        log.info("rejected %s %s: %s %s", loggable(request.method, 32), loggable(path),
                 err.status, loggable(err.message))
        fmt = self._format_for(path, request)
        if path in ADMIN_PATHS:
            return error_response(fmt, err, new_request_id(), start_response)
        endpoint = ENDPOINTS[path].name if path in ENDPOINTS else "other"
        request_id, redactor, acct = self._begin(request, endpoint, None)
        acct.finish(fmt.status_of(err), err.end_reason, error=err.message)
        return error_response(fmt, err, request_id, start_response, redactor)

    @staticmethod
    def _format_for(path: str, request: Request) -> Format:
        return ENDPOINTS[path].fmt if path in ENDPOINTS else format_for_unknown(request.headers)

    # -- proxied endpoints -----------------------------------------------------------------
    def _proxy(self, request: Request, endpoint: Endpoint, start_response) -> Iterable[bytes]:
        request_id, redactor, acct = self._begin(request, endpoint.name, endpoint.usage_format)
        try:
            headers = _forwardable_headers(request)
            body = self._read_body(request)
            acct.record.bytes_in = len(body)
            payload, held = self._parse_within_budget(acct, body)
            preq = self._build_request(request, endpoint, request_id, body, payload, headers,
                                       acct, redactor)
            if preq.payload is None:
                held.shrink(len(preq.body))  # the parsed object is gone; the body stays
            if self.shutting_down:
                raise ShuttingDown("the proxy is shutting down; retry the request")
        except ProxyError as err:
            acct.finish(endpoint.fmt.status_of(err), err.end_reason, error=err.message)
            return error_response(endpoint.fmt, err, request_id, start_response, redactor)
        if preq.stream:
            acct.start_stream_parser()
        try:
            if preq.stream:
                return StreamRelay(self, preq, acct).respond(start_response)
            return serve_plain(self, preq, acct, start_response)
        except Exception as exc:  # a bug costs this request (with its row, under its id)
            log.exception("request %s: internal error", request_id)
            err = ProxyError(f"internal error in the proxy: {type(exc).__name__}")
            acct.finish(500, "upstream_error", error=err.message)
            return error_response(endpoint.fmt, err, request_id, start_response, redactor)

    def _new_accounting(self, request_id: str, endpoint: str, usage_format: str | None,
                        credentials: list[str], redactor: Redactor, bytes_in: int,
                        deployment: str | None = None) -> Accounting:
        """A request's usage record, counted in flight until it is finished."""
        acct = Accounting(self.tracker, self.prices, request_id=request_id, endpoint=endpoint,
                          usage_format=usage_format, model=None, deployment=deployment,
                          stream=False, client_key_id=client_key_id(
                              credentials[0] if credentials else None, self.key_secret),
                          bytes_in=bytes_in, redactor=redactor, on_finish=self.inflight.done)
        self.inflight.add(acct)
        return acct

    def _begin(self, request: Request, endpoint: str, usage_format: str | None,
               deployment: str | None = None) -> tuple[str, Redactor, Accounting]:
        """Request id, secrets to mask and usage record of a request the proxy handles."""
        request_id = new_request_id()
        credentials = request_credentials(request.headers)
        redactor = self.secrets.with_secrets(*credentials)
        acct = self._new_accounting(request_id, endpoint, usage_format, credentials, redactor,
                                    request.content_length or 0, deployment)
        return request_id, redactor, acct

    def _parse_within_budget(self, acct: Accounting, body: bytes) -> tuple[dict, Reservation]:
        """Parse the body if this worker's memory budget allows what parsing it costs; the
        reservation is held until the request is finished."""
        cost = len(body) + json_parse_cost(body)
        if cost > self.budget.total:
            raise PayloadTooLarge(f"the request body would take about {cost >> 20} MiB to parse, "
                                  f"more than this proxy allows ({self.budget.total >> 20} MiB); "
                                  "send fewer, larger JSON values")
        reservation = self.budget.reserve(cost)
        if reservation is None:
            raise Overloaded("the proxy holds as much request data as it may right now; "
                             "retry shortly")
        self.inflight.hold(acct, reservation)
        return _parse_json_object(body), reservation

    def _build_request(self, request: Request, endpoint: Endpoint, request_id: str,
                       body: bytes, payload: dict, headers: list[tuple[str, str]],
                       acct: Accounting, redactor: Redactor) -> ProxyRequest:
        model = payload.get("model")
        if isinstance(model, str):
            acct.record.model_requested = model
        if endpoint.needs_model and (not isinstance(model, str) or not model.strip()):
            raise BadRequest("`model` is required and must be a non-empty string")
        stream = _wants_stream(endpoint, payload)
        acct.record.stream = stream
        provider = self.config.provider_for(endpoint.provider_format)
        strip_usage = False
        if endpoint.name == "openai-chat" and stream and not _asked_for_usage(payload):
            payload["stream_options"] = {**(payload.get("stream_options") or {}), "include_usage": True}
            body = encode_json_body(payload)
            strip_usage = True
        route = self.router.route_for(
            model, provider.name,
            lambda name: self.config.providers[name].format == endpoint.provider_format)
        edits = any(d.edits_body for d in route.deployments)
        return ProxyRequest(
            request_id=request_id, endpoint=endpoint.name, fmt=endpoint.fmt, route=route,
            method="POST", path=_path_and_query(request), body=body,
            payload=payload if edits else None, headers=headers, model=model, stream=stream,
            strip_usage_chunk=strip_usage, usage_format=endpoint.usage_format,
            client_socket=_client_socket(request.environ), client_key_id=acct.record.client_key_id,
            redactor=redactor)

    def _models(self, request: Request, start_response) -> Iterable[bytes]:
        if request.method != "GET":
            raise MethodNotAllowed("/v1/models accepts GET only")
        fmt = format_for_unknown(request.headers)
        provider = self.config.provider_for(fmt.provider_format)
        request_id, redactor, acct = self._begin(request, "models", None, provider.name)
        try:
            headers = _forwardable_headers(request)
        except ProxyError as err:
            acct.finish(fmt.status_of(err), err.end_reason, error=err.message)
            return error_response(fmt, err, request_id, start_response, redactor)
        preq = ProxyRequest(
            request_id=request_id, endpoint="models", fmt=fmt, route=pass_through_route(provider.name),
            method="GET", path=_path_and_query(request), body=b"", headers=headers,
            client_socket=_client_socket(request.environ), client_key_id=acct.record.client_key_id,
            redactor=redactor)
        return serve_plain(self, preq, acct, start_response)

    # -- used by the handler for each upstream try --------------------------------------
    def upstream_request(self, preq: ProxyRequest, deployment: Deployment):
        """URL, headers and body of one try: the deployment's provider, key and body edits."""
        provider = self.config.providers[deployment.provider]
        body = preq.body
        if deployment.edits_body and preq.payload is not None:
            body = encode_json_body(deployment.rewrite(preq.payload))
        headers = _with_credentials(preq.headers, provider) + [(REQUEST_ID_HEADER, preq.request_id)]
        return provider.base_url + preq.path, headers, body

    def keepalive_for(self, route: Route) -> bool:
        first = self.config.providers.get(route.deployments[0].provider)
        return self.config.keepalive and (first is None or first.keepalive)

    def _read_body(self, request: Request) -> bytes:
        """The whole body, or a clear 4xx: too large, cut short, badly framed, too slow."""
        limit = self.config.max_body_bytes
        length = request.content_length
        if length is not None and length > limit:
            raise PayloadTooLarge(f"request body is {length} bytes; the limit is {limit}")
        try:
            body = request.stream.read(limit + 1)
        except TimeoutError:
            raise RequestTimeout("the request body did not arrive in time") from None
        except Exception as exc:  # the server's framing errors: bad chunks, EOF, trailers
            raise BadRequest(f"the request body could not be read: {type(exc).__name__}: "
                             f"{loggable(exc, 200)}") from None
        if len(body) > limit:
            raise PayloadTooLarge(f"request body is larger than the limit of {limit} bytes")
        if length is not None and len(body) < length:
            raise BadRequest(f"the request body ended after {len(body)} of its {length} bytes")
        return body

    # -- requests the server answers itself ---------------------------------------------
    def refuse_unread(self, err: ProxyError, head: Head | None
                      ) -> tuple[int, list[tuple[str, str]], bytes]:
        """A request the server refuses before it reaches the application (bad framing, too
        slow, too large): its usage row, and the answer, in the endpoint's error shape, as
        (status, headers, body) for the server to send.

        `head` is what could be read of the request's head.  Bytes that never made a
        request line (a TLS hello, a port scan, a connection that trickles its first line)
        are not a request to account for: they get the answer and a log line only."""
        headers = {name.lower(): value for name, value in (head.headers if head else [])}
        endpoint = ENDPOINTS.get(head.path) if head else None
        fmt = endpoint.fmt if endpoint else format_for_unknown(headers)
        request_id = new_request_id()
        credentials = request_credentials(headers)
        redactor = self.secrets.with_secrets(*credentials)
        status = fmt.status_of(err)
        log.info("refused %s %s %s: %s %s", request_id, loggable(head.method if head else None, 32),
                 loggable(head.target if head else None), status, loggable(err.message))
        if head is not None:
            acct = self._new_accounting(request_id, endpoint.name if endpoint else "other", None,
                                        credentials, redactor, bytes_in=0)
            acct.finish(status, err.end_reason, error=err.message)
        body = redactor.data(json.dumps(fmt.error_body(err, request_id)).encode("utf-8"))
        return status, [("Content-Type", "application/json"), (REQUEST_ID_HEADER, request_id)], body

    # -- proxy's own endpoints -------------------------------------------------------------
    def _health(self, request: Request, start_response) -> Iterable[bytes]:
        tracker = self._tracker if self._tracker_pid == os.getpid() else None
        if tracker is not None and request.args.get("flush"):
            self._flush_unless_degraded(tracker, 5.0)  # tests and operators wait for rows
        # 503 while shutting down, so a load balancer stops sending new requests here.
        status = 503 if self.shutting_down else 200
        stats = tracker.stats() if tracker is not None else None
        state = "degraded" if stats and stats.get("state") == "degraded" else "ok"
        # Counts and states only: error texts can quote upstreams (and so, keys).
        body = {"status": "shutting_down" if self.shutting_down else state, "pid": os.getpid(),
                "live_exchanges": self.heartbeat.live_count(),
                "breakers": self.router.breakers.snapshot(), "tracker": stats,
                "memory_budget": {"used": self.budget.used, "total": self.budget.total}}
        return _json_response(start_response, status, body)

    def _flush_unless_degraded(self, tracker, timeout: float) -> None:
        """Wait for queued rows, one caller at a time and not while the store refuses them:
        anyone may call these endpoints, and each wait holds a thread."""
        if not self._flush_lock.acquire(blocking=False):
            return  # someone is already waiting for the same rows
        try:
            if tracker.stats().get("state") != "degraded":
                tracker.flush(timeout)
        finally:
            self._flush_lock.release()

    def _usage(self, request: Request, start_response) -> Iterable[bytes]:
        """The usage summary, bounded whatever the database holds: a period of at most
        USAGE_MAX_DAYS (the last USAGE_DEFAULT_DAYS unless `since` says otherwise) and the
        `top` models and client keys (USAGE_TOP by default)."""
        from . import report
        since, until, top = _usage_bounds(request.args)
        self._flush_unless_degraded(self.tracker, 2.0)
        try:
            summary = report.summarize(self.config.db_path, since=since, until=until, top=top)
        except ValueError as exc:
            raise BadRequest(f"bad since/until: {exc}") from None
        except StoreFault as exc:
            raise ReportUnavailable(f"the usage database cannot be read now ({exc.kind})") from None
        return _json_response(start_response, 200, summary)


USAGE_TOP = 50
USAGE_MAX_TOP = 1000
USAGE_DEFAULT_DAYS = 31
USAGE_MAX_DAYS = 400


def _usage_bounds(args) -> tuple[float, float, int]:
    """(since, until, top) of a /usage request as epoch seconds, within the limits."""
    from .report import parse_when
    try:
        until = parse_when(args.get("until"), end=True) or time.time()
        since = parse_when(args.get("since"))
        top = int(args.get("top", USAGE_TOP))
    except ValueError as exc:
        raise BadRequest(f"bad since/until/top: {loggable(exc)}") from None
    if since is None:
        since = until - USAGE_DEFAULT_DAYS * 86400
    if until - since > USAGE_MAX_DAYS * 86400:
        raise BadRequest(f"the period is longer than {USAGE_MAX_DAYS} days; ask for less "
                         "(or use `llm-proxy usage` on the host)")
    if not 1 <= top <= USAGE_MAX_TOP:
        raise BadRequest(f"top must be between 1 and {USAGE_MAX_TOP}")
    return since, until, top


def _json_response(start_response, status: int, body: object) -> list[bytes]:
    data = json.dumps(body, default=str).encode("utf-8")
    start_response(f"{status} {HTTPStatus(status).phrase}", [("Content-Type", "application/json"),
                                    ("Content-Length", str(len(data)))])
    return [data]


def _parse_json_object(body: bytes) -> dict:
    if not body:
        raise BadRequest("the request body is empty; a JSON object is required")
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest("the request body is nested too deeply") from None
    if not isinstance(payload, dict):
        raise BadRequest("the request body must be a JSON object")
    return payload


def _wants_stream(endpoint: Endpoint, payload: dict) -> bool:
    """`stream` as the API defines it: a boolean (a string "true" is an error, not a guess)."""
    value = payload.get("stream")
    if value is not None and not isinstance(value, bool):
        raise BadRequest(f"`stream` must be true or false, not a JSON {_json_type(value)}")
    if endpoint.name == "openai-chat":
        options = payload.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise BadRequest(f"`stream_options` must be an object, not a JSON {_json_type(options)}")
    return endpoint.may_stream and value is True


def _json_type(value: object) -> str:
    return {str: "string", int: "number", float: "number", list: "array", dict: "object"}.get(
        type(value), "value")


def encode_json_body(payload: dict) -> bytes:
    """The body as UTF-8 JSON; text JSON allowed but UTF-8 cannot carry (a lone surrogate
    such as "\\ud800") is sent escaped, exactly as the client wrote it."""
    try:
        return json.dumps(payload, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(payload).encode("ascii")


def _asked_for_usage(payload: dict) -> bool:
    options = payload.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _path_and_query(request: Request) -> str:
    query = request.query_string.decode("latin-1")
    return request.path + (f"?{query}" if query else "")


def _forwardable_headers(request: Request) -> list[tuple[str, str]]:
    """The client's end-to-end headers, each one sendable upstream; one that is not (a value
    that starts with a non-breaking space, a control character) is the client's fault, a 400,
    never a failed try that would count against the deployment."""
    raw = list(request.headers.items())
    listed = frozenset(t.strip().lower() for k, v in raw if k.lower() == "connection"
                       for t in v.split(","))
    headers = [(k, v) for k, v in raw
               if k.lower() not in _REQUEST_DROP and not is_hop_by_hop_header(k, listed)]
    for name, value in headers:
        problem = header_problem(name, value)
        if problem:
            raise BadRequest(f"request header {loggable(name, 64)!r} cannot be forwarded: {problem}")
    headers.append(("Accept-Encoding", "identity"))
    return headers


def _with_credentials(headers: list[tuple[str, str]], provider) -> list[tuple[str, str]]:
    """The provider's own key replaces the client's, in the header its API expects."""
    key = provider.api_key
    if not key:
        return list(headers)
    kept = [(k, v) for k, v in headers if k.lower() not in ("x-api-key", "authorization")]
    if provider.format == ANTHROPIC_FORMAT:
        return kept + [("x-api-key", key)]
    return kept + [("Authorization", f"Bearer {key}")]


def _client_socket(environ):
    return environ.get("gunicorn.socket") or environ.get("werkzeug.socket")
