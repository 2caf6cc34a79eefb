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
