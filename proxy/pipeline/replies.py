"""What goes back to the client when the answer is not a relayed event stream: JSON errors
in the endpoint's own shape, and upstream error answers read whole (with their real
status, headers and body); plus the headers the proxy puts on every streamed answer."""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Callable

from ..errors import ProxyError
from ..formats import Format
from ..redact import Redactor
from ..upstream import REQUEST_ID_HEADER
from .attempt import ErrorReply

StartResponse = Callable[..., object]
DEPLOYMENT_HEADER = "x-llm-proxy-deployment"
# Headers the proxy owns on an event stream: decoded bytes have no length or encoding,
# and intermediaries must neither buffer nor transform them.
_STREAM_DROP = frozenset({"content-length", "content-encoding", "cache-control", "x-accel-buffering"})
SSE_HEADERS = [("Cache-Control", "no-cache, no-transform"), ("X-Accel-Buffering", "no")]
SSE_CONTENT_TYPE = ("Content-Type", "text/event-stream; charset=utf-8")


def error_response(fmt: Format, err: ProxyError, request_id: str,
                   start_response: StartResponse, redactor: Redactor | None = None,
                   extra_headers: list[tuple[str, str]] = ()) -> list[bytes]:
    """The endpoint's own JSON error shape, with the error's status (its message may quote
    an upstream, so it is masked like anything else relayed)."""
    status, headers, body = error_parts(fmt, err, request_id, redactor)
    headers.append(("Content-Length", str(len(body))))
    headers.extend(extra_headers)
    start_response(f"{status} {reason_phrase(status)}", headers)
    return [body]


def error_parts(fmt: Format, err: ProxyError, request_id: str, redactor: Redactor | None = None
                ) -> tuple[int, list[tuple[str, str]], bytes]:
    """(status, headers, body) of an error, for the app and for the server's own refusals."""
    body = json.dumps(fmt.error_body(err, request_id)).encode("utf-8")
    if redactor:
        body = redactor.data(body)
    headers = [("Content-Type", "application/json"), (REQUEST_ID_HEADER, request_id)]
    if err.retry_after:
        headers.append(("Retry-After", err.retry_after))
    if err.should_retry is False:
        headers.append(("x-should-retry", "false"))
    return fmt.status_of(err), headers, body


def reason_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def safe_reason(reason: str) -> str:
    """An upstream's reason phrase, if it is one gunicorn can send."""
    return reason if reason.isascii() and reason.isprintable() else ""


COST_HEADER = "x-llm-proxy-cost-usd"
USAGE_HEADER = "x-llm-proxy-usage"
COST_COMMENT_HEADER = "x-llm-proxy-cost-comment"  # a client asks for the stream's comment
_USAGE_PARTS = (("input", "input_tokens"), ("output", "output_tokens"),
                ("cache_read", "cache_read_tokens"), ("cache_write", "cache_write_tokens"),
                ("reasoning", "reasoning_tokens"))


def cost_headers(row) -> list[tuple[str, str]]:
    """What a non-streaming answer cost, for a caller that accounts per request: the
    dollars ("unpriced" for a model without a price) and the tokens, as its row has them
    (tokens in the proxy's terms: input is the uncached part)."""
    parts = [(name, getattr(row, field)) for name, field in _USAGE_PARTS]
    if all(count is None for _, count in parts):
        return []  # nothing billed, nothing to say (a model list, an error)
    cost = _dollars(row.cost_usd) if row.priced and row.cost_usd is not None else "unpriced"
    usage = "; ".join(f"{name}={count}" for name, count in parts if count is not None)
    return [(COST_HEADER, cost), (USAGE_HEADER, usage)]


def cost_comment(row, after_id: bool = False) -> bytes:
    """The stream's cost and tokens as one SSE comment, which every SDK ignores.  After an
    upstream `id:` field the comment ends without a blank line (protocols.md section 0)."""
    data = {"request_id": row.request_id,
            "cost_usd": row.cost_usd if row.priced else None, "priced": bool(row.priced),
            **{field: getattr(row, field) for _, field in _USAGE_PARTS},
            "usage_complete": bool(row.usage_complete)}
    text = json.dumps(data, separators=(",", ":"))
    return f": llm-proxy-usage {text}\n{'' if after_id else chr(10)}".encode("utf-8")


def _dollars(value: float) -> str:
    return f"{value:.10f}".rstrip("0").rstrip(".") or "0"


def proxy_headers(request_id: str, deployment: str | None) -> list[tuple[str, str]]:
    """What the proxy adds to every answer: the request id and the deployment that answered."""
    headers = [(REQUEST_ID_HEADER, request_id)]
    if deployment:
        headers.append((DEPLOYMENT_HEADER, deployment))
    return headers


def stream_headers(upstream_headers: list[tuple[str, str]], request_id: str,
                   deployment: str | None = None) -> list[tuple[str, str]]:
    kept = [(k, v) for k, v in upstream_headers if k.lower() not in _STREAM_DROP]
    return kept + SSE_HEADERS + proxy_headers(request_id, deployment)


def committed_stream_headers(request_id: str) -> list[tuple[str, str]]:
    """A stream that commits before any deployment answered: the proxy's own headers."""
    return stream_headers([SSE_CONTENT_TYPE], request_id)


def reply_response(reply: ErrorReply, request_id: str, retried: bool,
                   start_response: StartResponse, redactor: Redactor) -> list[bytes]:
    """An upstream's error answer with its real status, headers and body, echoed keys masked.

    After the proxy has retried it, `x-should-retry: false` keeps the client's SDK from
    multiplying the attempts (protocols.md section 6)."""
    body = redactor.data(reply.body)  # masks keep lengths
    headers = [(k, v) for k, v in redactor.headers(reply.headers) if k.lower() != "x-should-retry"]
    headers += [("Content-Length", str(len(body)))] + proxy_headers(request_id, reply.deployment)
    if retried:
        headers.append(("x-should-retry", "false"))
    reason = safe_reason(redactor.text(reply.reason)) or reason_phrase(reply.status)
    start_response(f"{reply.status} {reason}", headers)
    return [body]
