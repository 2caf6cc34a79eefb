"""Admit: read and check a client request, open its usage record, decide its route.

Everything a client can get wrong in a request for a known endpoint is found here and
answered with a 4xx in the endpoint's own error shape before anything goes upstream (the
proxy app refuses unknown paths and methods itself): a body too large, cut short, too
slow or too costly to parse, JSON that is not an object, a missing model, a header that
cannot be forwarded.  Every request the proxy handles,
refused or not, gets a usage record here, under its request id, before any check runs.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from typing import Callable, Mapping

from werkzeug.wrappers import Request

from .. import formats
from ..config import Config
from ..errors import BadRequest, NotConfigured, Overloaded, PayloadTooLarge, RequestTimeout
from ..formats import ANTHROPIC, Format
from ..formats.translate.bridge import Bridges
from ..limits import MemoryBudget, json_parse_cost
from ..metrics import Metrics
from ..pricing import PriceTable
from ..redact import Redactor, client_key_id, request_credentials
from ..routing import Deployment, Route, Router, pass_through_route
from ..sessions import session_of
from ..text import loggable
from ..upstream import encode_json_body, forwardable_headers
from ..keys.policy import ClientKey
from .dedup import DedupTickets
from .finalize import InFlight, RequestRecord, RowSink
from .gate import Gate
from .replies import COST_COMMENT_HEADER
from .request import ProxyRequest


@dataclass(frozen=True)
class Endpoint:
    name: str
    fmt: Format
    bills_usage: bool = True  # count_tokens answers with an estimate, not billed usage
    needs_model: bool = True
    may_stream: bool = True
    translates: bool = True  # may be routed to a provider of another format


ENDPOINTS: dict[str, Endpoint] = {
    "/v1/messages": Endpoint("anthropic", formats.ANTHROPIC),
    "/v1/messages/count_tokens": Endpoint("count_tokens", formats.ANTHROPIC, bills_usage=False,
                                          may_stream=False, translates=False),
    "/v1/chat/completions": Endpoint("openai-chat", formats.OPENAI_CHAT),
    "/v1/responses": Endpoint("openai-responses", formats.OPENAI_RESPONSES, translates=False),
}
MODELS_PATH = "/v1/models"


def new_request_id() -> str:
    return "req_" + secrets.token_hex(12)


def format_for(path: str | None, headers: Mapping[str, str]) -> Format:
    """The error shape of an endpoint, or the one its client speaks when the path says nothing."""
    endpoint = ENDPOINTS.get(path) if path else None
    return endpoint.fmt if endpoint else formats.for_client(headers)


@dataclass(frozen=True)
class AdmitDeps:
    config: Config
    router: Router
    bridges: Bridges
    continues: Callable[[Deployment], bool]  # may a broken answer be continued there?
    prices: PriceTable
    secrets: Redactor  # every configured provider key; each request adds its own credential
    budget: MemoryBudget
    inflight: InFlight
    rows: Callable[[], RowSink]  # this process's usage writer (started on first use)
    key_secret: Callable[[], bytes]  # keys client key ids (read on first use)
    dedup: DedupTickets  # which requests may share an answer, and their keys
    gate: Gate  # proxy keys and their limits (keys mode)
    metrics: Metrics | None = None  # what finished requests add to /metrics


@dataclass
class Opened:
    """A request the proxy answers: its id, the secrets to mask and its usage record."""

    request_id: str
    redactor: Redactor
    record: RequestRecord
    credential_ids: tuple[str, ...] = ()  # of every credential the request carries (dedup)
    key: ClientKey | None = None  # the proxy key it carries (keys mode)


class Admission:
    """Opens each request's id and record, then checks the request and decides its route."""

    def __init__(self, deps: AdmitDeps) -> None:
        self.deps = deps

    def open(self, headers: Mapping[str, str], endpoint: str, bytes_in: int = 0) -> Opened:
        """A request id and a usage record, counted in flight until it is finished."""
        request_id = new_request_id()
        credentials = request_credentials(headers)
        redactor = self.deps.secrets.with_secrets(*credentials)
        ids = tuple(client_key_id(c, self.deps.key_secret()) for c in credentials if c)
        key_id = ids[0] if ids else None
        record = RequestRecord(self.deps.rows(), self.deps.prices, request_id=request_id,
                               endpoint=endpoint, client_key_id=key_id, bytes_in=bytes_in,
                               redactor=redactor, on_finish=self.deps.inflight.done,
                               metrics=self.deps.metrics)
        self.deps.inflight.add(record)
        return Opened(request_id, redactor, record, ids)

    def identify(self, opened: Opened, headers: Mapping[str, str]) -> None:
        """Keys mode: the request's proxy key, known (401) and live (403), named on its row;
        checked before the body is read."""
        key = self.deps.gate.identify(headers)
        if key is not None:
            opened.key = key
            opened.record.keyed(key.id, key.name)
            self.deps.gate.check_live(key, time.time())

    def admit(self, request: Request, endpoint: Endpoint, opened: Opened) -> ProxyRequest:
        """The checked request and its route; raises the ProxyError the client gets."""
        headers = forwardable_headers(list(request.headers.items()))
        body = self._read_body(request)
        opened.record.received(len(body))
        payload, reservation = self._parse_within_budget(opened.record, body)
        model = endpoint.fmt.model_of(payload)
        opened.record.model_named(model)
        opened.record.in_session(session_of(request.headers, payload))
        if endpoint.needs_model and not (model or "").strip():
            raise BadRequest("`model` is required and must be a non-empty string")
        self.deps.gate.check_model(opened.key, model)
        stream_options = payload.get("stream_options")  # as the client sent them (dedup)
        facts = endpoint.fmt.request_facts(payload, endpoint.may_stream)
        opened.record.admitted(stream=facts.stream,
                               usage_format=endpoint.fmt if endpoint.bills_usage else None)
        route = self._any_route(facts.model) if endpoint.name == "count_tokens" else None
        estimate = route is not None and self._cannot_count(route)
        if not estimate:
            route = self._route(facts.model, endpoint)
        if facts.edited:
            body = encode_json_body(payload)
        stitch = self._stitch(endpoint, payload, facts.stream, route)
        # A continuation is built from the parsed request: it stays, within the budget.
        keeps_payload = estimate or stitch is not None or any(
            d.edits_body or self._crosses(endpoint.fmt, d.provider) for d in route.deployments)
        dedup = None if estimate else self.deps.dedup.ticket(
            endpoint.name, path_and_query(request), payload, body, keeps_payload, facts.stream, stream_options, route,
            opened.credential_ids, request.headers, opened.redactor.data,
            endpoint.fmt.name)
        preq = ProxyRequest(
            request_id=opened.request_id, endpoint=endpoint.name, fmt=endpoint.fmt, route=route,
            method="POST", path=path_and_query(request), body=body,
            payload=payload if keeps_payload else None, headers=headers, model=facts.model,
            stream=facts.stream, strip_usage_chunk=facts.strip_usage_chunk,
            keepalive=self._keepalive(route), client_socket=client_socket(request.environ),
            writes_directly=writes_directly(request.environ),
            redactor=opened.redactor, estimate_locally=estimate, stitch=stitch, dedup=dedup,
            cost_comment=self._wants_cost_comment(request.headers, route))
        hold = self.deps.gate.reserve(opened.key, preq, payload,
                                      billed=endpoint.bills_usage and not estimate)
        if hold is not None:
            opened.record.holds(hold)
        if not keeps_payload:
            reservation.shrink(len(body))  # the parsed object is gone; the body stays
        return preq

    def admit_model_list(self, request: Request, fmt: Format, opened: Opened) -> ProxyRequest:
        """`GET /v1/models`: passed to the provider of the client's own API, untouched."""
        provider = self._provider(fmt)
        return ProxyRequest(
            request_id=opened.request_id, endpoint="models", fmt=fmt,
            route=pass_through_route(provider), method="GET", path=path_and_query(request),
            body=b"", headers=forwardable_headers(list(request.headers.items())),
            client_socket=client_socket(request.environ), redactor=opened.redactor)

    # -- the checks ----------------------------------------------------------------------
    def _read_body(self, request: Request) -> bytes:
        """The whole body, or a clear 4xx: too large, cut short, badly framed, too slow."""
        limit = self.deps.config.max_body_bytes
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

    def _parse_within_budget(self, record: RequestRecord, body: bytes):
        """Parse the body if this worker's memory budget allows what parsing it costs; the
        reservation is held until the request is finished."""
        budget = self.deps.budget
        cost = len(body) + json_parse_cost(body)
        if cost > budget.total:
            raise PayloadTooLarge(f"the request body would take about {cost >> 20} MiB to parse, "
                                  f"more than this proxy allows ({budget.total >> 20} MiB); "
                                  "send fewer, larger JSON values")
        reservation = budget.reserve(cost)
        if reservation is None:
            raise Overloaded("the proxy holds as much request data as it may right now; "
                             "retry shortly")
        self.deps.inflight.hold(record, reservation)
        return parse_json_object(body), reservation

    def _route(self, model: str | None, endpoint: Endpoint) -> Route:
        """The route's deployments this endpoint can use: any provider a bridge reaches, or
        only those of its own format (Responses, count_tokens)."""
        fmt, providers = endpoint.fmt, self.deps.config.providers
        if endpoint.translates:
            usable = lambda name: self.deps.bridges.reaches(fmt, name)  # noqa: E731
        else:
            usable = lambda name: providers[name].format == fmt.provider_format  # noqa: E731
        return self.deps.router.route_for(model, self._provider(fmt), usable)

    def _stitch(self, endpoint: Endpoint, payload: dict, stream: bool, route: Route):
        """A stream that may be continued if it breaks mid-answer gets its stitch (and keeps
        its parsed payload); an unrouted model has its one try, and a route of deployments
        that never continue has nowhere to go."""
        if not stream or self.deps.config.max_continuations <= 0 or not route.routed:
            return None
        if not any(self.deps.continues(d) for d in route.deployments):
            return None
        return endpoint.fmt.stitch(payload)

    def _crosses(self, fmt: Format, provider: str) -> bool:
        return self.deps.bridges.between(fmt, provider) is not None

    def _any_route(self, model: str | None) -> Route:
        return self.deps.router.route_for(model, self._provider(ANTHROPIC), lambda name: True)

    def _cannot_count(self, route: Route) -> bool:
        """count_tokens for a model routed first to a provider that cannot count (a Chat
        upstream has no such endpoint): the proxy answers with its own estimate."""
        first = self.deps.config.providers[route.deployments[0].provider]
        return first.format != ANTHROPIC.provider_format

    def _provider(self, fmt: Format) -> str:
        provider = self.deps.config.provider_for(fmt.provider_format)
        if provider is None:
            raise NotConfigured(f"this proxy has no {fmt.provider_format} provider configured")
        return provider.name

    def _wants_cost_comment(self, headers: Mapping[str, str], route: Route) -> bool:
        """The stream's cost in a trailing SSE comment: asked for by the request, or set
        for every stream whose client takes comments (a provider with `keepalive = false`
        has clients that cannot parse them)."""
        asked = (headers.get(COST_COMMENT_HEADER) or "").strip().lower()
        if asked in ("1", "true", "yes", "on"):
            return True
        return self.deps.config.cost_comment and self._keepalive(route)

    def _keepalive(self, route: Route) -> bool:
        """Keepalive comments, unless turned off (for all, or for the first deployment's
        provider: a client that cannot parse SSE comments)."""
        first = self.deps.config.providers.get(route.deployments[0].provider)
        return self.deps.config.keepalive and (first is None or first.keepalive)


def parse_json_object(body: bytes) -> dict:
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


def path_and_query(request: Request) -> str:
    query = request.query_string.decode("latin-1")
    return request.path + (f"?{query}" if query else "")


def client_socket(environ):
    return environ.get("gunicorn.socket") or environ.get("werkzeug.socket")


# Servers whose WSGI `write` callable is a plain write to the client's socket, which the
# heartbeat may call between two of the stream's own writes (under the writer's lock).
DIRECT_WRITE_SERVERS = ("gunicorn.socket", "werkzeug.socket")
QUEUE_WRITES = "llm_proxy.queue_writes"  # an environ key that asks for the queued writer


def writes_directly(environ) -> bool:
    """May a stream be written through the server's `write` callable from the heartbeat
    too?  Only for servers known to allow it, over HTTP/1 (an HTTP/2 write may wait for
    the peer's flow control); any other server, and a middleware that sets
    `llm_proxy.queue_writes` (one that rewrites bodies, say), gets the queued writer and a
    stream thread."""
    return (not environ.get(QUEUE_WRITES)
            and environ.get("SERVER_PROTOCOL") in ("HTTP/1.0", "HTTP/1.1")
            and any(key in environ for key in DIRECT_WRITE_SERVERS))
