"""The WSGI application: routing, request checks and the error boundary.

A plain WSGI callable, so it runs under gunicorn (the supported way), any other WSGI
server, or legacy WSGI infrastructure.  Every failure before a response has started is
rendered in the endpoint's own error format with the right status; nothing a client sends
can kill a worker.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import threading
from http import HTTPStatus
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable

from werkzeug.wrappers import Request

from . import formats
from .accounting import Accounting
from .config import ANTHROPIC_FORMAT, OPENAI_FORMAT, Config, load_config
from .errors import (BadRequest, MethodNotAllowed, NotFound, PayloadTooLarge, ProxyError,
                     ShuttingDown)
from .formats import Format
from .handler import ProxyRequest, StreamRelay, serve_plain
from .pricing import PriceTable
from .relay import Heartbeat
from .replies import REQUEST_ID_HEADER, StartResponse, error_response
from .routing import Breakers, Deployment, Route, Router, pass_through_route
from .tracker import NullTracker, Tracker
from .upstream import UpstreamClient, is_hop_by_hop_header

log = logging.getLogger("proxy.app")

# Never forwarded upstream: framing the proxy redoes, and client addresses that the
# provider has no business seeing.
_REQUEST_DROP = frozenset({"host", "content-length", "x-forwarded-for", "x-forwarded-host",
                           "x-forwarded-proto", "x-forwarded-port", "x-real-ip", "forwarded"})


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


def new_request_id() -> str:
    return "req_" + secrets.token_hex(12)


def client_key_id(headers) -> str | None:
    """A stable, non-reversible id for the client's key: reports group by it, logs show it."""
    key = headers.get("x-api-key")
    auth = headers.get("authorization", "")
    if not key and auth.lower().startswith("bearer "):
        key = auth[7:].strip()
    if not key:
        return None
    return "key_" + hashlib.sha256(key.encode("utf-8", "replace")).hexdigest()[:16]


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
        self._tracker = None
        self._tracker_pid = None
        self._tracker_lock = threading.Lock()
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
        tracker = Tracker(self.config.db_path, batch_size=self.config.batch_size,
                          flush_interval=self.config.flush_interval, queue_max=self.config.queue_max)
        tracker.start()
        return tracker

    def begin_shutdown(self) -> None:
        """SIGTERM: refuse new requests, let live streams run `shutdown_grace`, then end them."""
        self.shutting_down = True
        self.heartbeat.begin_shutdown(
            self.config.shutdown_grace,
            lambda: ShuttingDown("the proxy is shutting down; retry the request"))

    def close(self, timeout: float = 10.0) -> None:
        """Worker exit: drain the usage queue."""
        if self._tracker is not None and self._tracker_pid == os.getpid():
            self._tracker.close(timeout)

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
                raise NotFound(f"no route for {request.method} {path}")
            if request.method != "POST":
                raise MethodNotAllowed(f"{path} accepts POST only")
            return self._proxy(request, endpoint, start_response)
        except ProxyError as err:
            log.info("rejected %s %s: %s %s", request.method, path, err.status, err.message)
            return error_response(self._format_for(path, request), err, new_request_id(), start_response)
        except Exception:  # a bug must cost one request, never the worker
            log.exception("internal error on %s %s", request.method, path)
            err = ProxyError("internal error in the proxy")
            return error_response(self._format_for(path, request), err, new_request_id(), start_response)

    @staticmethod
    def _format_for(path: str, request: Request) -> Format:
        return ENDPOINTS[path].fmt if path in ENDPOINTS else format_for_unknown(request.headers)

    # -- proxied endpoints -----------------------------------------------------------------
    def _proxy(self, request: Request, endpoint: Endpoint, start_response) -> Iterable[bytes]:
        request_id = new_request_id()
        provider = self.config.provider_for(endpoint.provider_format)
        acct = Accounting(self.tracker, self.prices, request_id=request_id, endpoint=endpoint.name,
                          usage_format=endpoint.usage_format, model=None, deployment=None,
                          stream=False, client_key_id=client_key_id(request.headers),
                          bytes_in=request.content_length or 0)
        try:
            body = self._read_body(request)
            acct.record.bytes_in = len(body)
            preq = self._build_request(request, endpoint, provider, request_id, body,
                                       acct.record.client_key_id)
        except ProxyError as err:
            acct.finish(err.status, "rejected", error=err.message)
            return error_response(endpoint.fmt, err, request_id, start_response)
        acct.record.model_requested = preq.model
        acct.record.stream = preq.stream
        if preq.stream:
            acct.start_stream_parser()
        if self.shutting_down:
            err = ShuttingDown("the proxy is shutting down; retry the request")
            acct.finish(err.status, "rejected", error=err.message)
            return error_response(endpoint.fmt, err, request_id, start_response)
        try:
            if preq.stream:
                return StreamRelay(self, preq, acct).respond(start_response)
            return serve_plain(self, preq, acct, start_response)
        except Exception as exc:
            acct.finish(500, "upstream_error", error=f"internal error: {type(exc).__name__}")
            raise

    def _build_request(self, request: Request, endpoint: Endpoint, provider, request_id: str,
                       body: bytes, key_id: str | None) -> ProxyRequest:
        payload = _parse_json_object(body)
        model = payload.get("model")
        if endpoint.needs_model and (not isinstance(model, str) or not model.strip()):
            raise BadRequest("`model` is required and must be a non-empty string")
        stream = endpoint.may_stream and payload.get("stream") is True
        strip_usage = False
        if endpoint.name == "openai-chat" and stream and not _asked_for_usage(payload):
            payload["stream_options"] = {**(payload.get("stream_options") or {}), "include_usage": True}
            body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
            strip_usage = True
        route = self.router.route_for(
            model, provider.name,
            lambda name: self.config.providers[name].format == endpoint.provider_format)
        return ProxyRequest(
            request_id=request_id, endpoint=endpoint.name, fmt=endpoint.fmt, route=route,
            method="POST", path=_path_and_query(request), body=body, payload=payload,
            headers=_end_to_end_headers(request), model=model, stream=stream,
            strip_usage_chunk=strip_usage, usage_format=endpoint.usage_format,
            client_socket=_client_socket(request.environ), client_key_id=key_id)

    def _models(self, request: Request, start_response) -> Iterable[bytes]:
        if request.method != "GET":
            raise MethodNotAllowed("/v1/models accepts GET only")
        fmt = format_for_unknown(request.headers)
        provider = self.config.provider_for(fmt.provider_format)
        request_id = new_request_id()
        preq = ProxyRequest(
            request_id=request_id, endpoint="models", fmt=fmt, route=pass_through_route(provider.name),
            method="GET", path=_path_and_query(request), body=b"", headers=_end_to_end_headers(request),
            client_socket=_client_socket(request.environ), client_key_id=client_key_id(request.headers))
        acct = Accounting(self.tracker, self.prices, request_id=request_id, endpoint="models",
                          usage_format=None, model=None, deployment=provider.name, stream=False,
                          client_key_id=preq.client_key_id, bytes_in=0)
        return serve_plain(self, preq, acct, start_response)

    # -- used by the handler for each upstream try --------------------------------------
    def upstream_request(self, preq: ProxyRequest, deployment: Deployment):
        """URL, headers and body of one try: the deployment's provider, key and body edits."""
        provider = self.config.providers[deployment.provider]
        body = preq.body
        if deployment.edits_body and preq.payload is not None:
            body = json.dumps(deployment.rewrite(preq.payload), ensure_ascii=False).encode("utf-8")
        headers = _with_credentials(preq.headers, provider) + [(REQUEST_ID_HEADER, preq.request_id)]
        return provider.base_url + preq.path, headers, body

    def keepalive_for(self, route: Route) -> bool:
        first = self.config.providers.get(route.deployments[0].provider)
        return self.config.keepalive and (first is None or first.keepalive)

    def _read_body(self, request: Request) -> bytes:
        limit = self.config.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise PayloadTooLarge(f"request body is {request.content_length} bytes; the limit is {limit}")
        body = request.stream.read(limit + 1)
        if len(body) > limit:
            raise PayloadTooLarge(f"request body is larger than the limit of {limit} bytes")
        return body

    # -- proxy's own endpoints -------------------------------------------------------------
    def _health(self, request: Request, start_response) -> Iterable[bytes]:
        tracker = self._tracker if self._tracker_pid == os.getpid() else None
        if tracker is not None and request.args.get("flush"):
            tracker.flush(5.0)  # lets tests and operators wait for queued rows to be written
        # 503 while shutting down, so a load balancer stops sending new requests here.
        status = 503 if self.shutting_down else 200
        body = {"status": "shutting_down" if self.shutting_down else "ok", "pid": os.getpid(),
                "live_exchanges": self.heartbeat.live_count(),
                "breakers": self.router.breakers.snapshot(),
                "tracker": tracker.stats() if tracker is not None else None}
        return _json_response(start_response, status, body)

    def _usage(self, request: Request, start_response) -> Iterable[bytes]:
        from . import report
        self.tracker.flush(2.0)
        if not os.path.exists(self.config.db_path):
            return _json_response(start_response, 200, {"totals": {"requests": 0}, "by_day": [],
                                                        "by_model": [], "by_client_key": []})
        try:
            summary = report.summarize(self.config.db_path, since=request.args.get("since"),
                                       until=request.args.get("until"))
        except ValueError as exc:
            raise BadRequest(f"bad since/until: {exc}") from None
        return _json_response(start_response, 200, summary)


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
    if not isinstance(payload, dict):
        raise BadRequest("the request body must be a JSON object")
    return payload


def _asked_for_usage(payload: dict) -> bool:
    options = payload.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _path_and_query(request: Request) -> str:
    query = request.query_string.decode("latin-1")
    return request.path + (f"?{query}" if query else "")


def _end_to_end_headers(request: Request) -> list[tuple[str, str]]:
    """The client's headers minus hop-by-hop ones and those the proxy must not forward."""
    raw = list(request.headers.items())
    listed = frozenset(t.strip().lower() for k, v in raw if k.lower() == "connection"
                       for t in v.split(","))
    headers = [(k, v) for k, v in raw
               if k.lower() not in _REQUEST_DROP and not is_hop_by_hop_header(k, listed)]
    if not any(k.lower() == "accept-encoding" for k, _ in headers):
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
