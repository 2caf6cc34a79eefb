"""What goes back to the client when the answer is not a relayed event stream.

JSON errors in the endpoint's own shape, upstream error answers that were read whole, and
upstream bodies passed through as they arrive with their own headers and Content-Length.
"""

from __future__ import annotations

import json
import logging
import socket
from http import HTTPStatus
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

from .accounting import Accounting
from .attempts import DEPLOYMENT_HEADER, ErrorReply
from .errors import ClientGone, ProxyError
from .formats import Format
from .redact import Redactor
from .relay import Exchange
from .upstream import UpstreamResponse, shutdown_quietly

if TYPE_CHECKING:
    from .handler import ProxyRequest

log = logging.getLogger("proxy.replies")

StartResponse = Callable[..., object]
REQUEST_ID_HEADER = "x-llm-proxy-request-id"
# Headers the proxy owns on an event stream: decoded bytes have no length or encoding,
# and intermediaries must neither buffer nor transform them.
_STREAM_DROP = frozenset({"content-length", "content-encoding", "cache-control", "x-accel-buffering"})
SSE_HEADERS = [("Cache-Control", "no-cache, no-transform"), ("X-Accel-Buffering", "no")]


def error_response(fmt: Format, err: ProxyError, request_id: str,
                   start_response: StartResponse, redactor: Redactor | None = None) -> list[bytes]:
    """The endpoint's own JSON error shape, with the error's status (its message may quote
    an upstream, so it is masked like anything else relayed)."""
    body = json.dumps(fmt.error_body(err, request_id)).encode("utf-8")
    if redactor:
        body = redactor.data(body)
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
               (REQUEST_ID_HEADER, request_id)]
    if err.retry_after:
        headers.append(("Retry-After", err.retry_after))
    status = fmt.status_of(err)
    start_response(f"{status} {reason_phrase(status)}", headers)
    return [body]


def reason_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


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
    reason = _safe_reason(redactor.text(reply.reason)) or reason_phrase(reply.status)
    start_response(f"{reply.status} {reason}", headers)
    return [body]


def _safe_reason(reason: str) -> str:
    """An upstream's reason phrase, if it is one gunicorn can send."""
    return reason if reason.isascii() and reason.isprintable() else ""


def committed_stream_headers(request_id: str) -> list[tuple[str, str]]:
    return stream_headers([("Content-Type", "text/event-stream; charset=utf-8")], request_id)


def abort_client_connection(sock: socket.socket | None) -> None:
    """Make a half-sent body fail loudly at the client instead of ending cleanly."""
    shutdown_quietly(sock)


class PassThrough:
    """A non-event-stream upstream response, streamed through with its own headers."""

    def __init__(self, ctx, preq: ProxyRequest, acct: Accounting, exchange: Exchange,
                 resp: UpstreamResponse) -> None:
        self.ctx, self.preq, self.acct, self.exchange, self.resp = ctx, preq, acct, exchange, resp

    def respond(self, start_response: StartResponse) -> Iterable[bytes]:
        headers = (self.preq.redactor.headers(self.resp.headers)
                   + proxy_headers(self.preq.request_id, self.acct.record.deployment))
        status = self.resp.status
        reason = _safe_reason(self.preq.redactor.text(self.resp.reason)) or reason_phrase(status)
        start_response(f"{status} {reason}", headers)
        return self._body()

    def _body(self) -> Iterator[bytes]:
        """The decoded body, echoed keys masked (a key split between two reads included)."""
        failure: ProxyError | None = None
        sent_all = False
        masking = self.preq.redactor.stream()
        try:
            for chunk in self.resp.decoded_chunks():
                self.acct.add_body_copy(chunk)
                out = masking.feed(chunk)
                if out:
                    yield out
            rest = masking.flush()
            if rest:
                yield rest
            sent_all = True
        except ProxyError as err:
            failure = self.exchange.end_error or err
            abort_client_connection(self.preq.client_socket)
        finally:
            self.resp.close()
            self.ctx.heartbeat.unregister(self.exchange)
            self._finish(sent_all, failure)

    def _finish(self, sent_all: bool, failure: ProxyError | None) -> None:
        status = self.resp.status
        if sent_all:
            reason = "complete" if status < 400 else "upstream_error"
            self.acct.finish(status, reason, bytes_out=self.acct.body_bytes,
                             error=None if status < 400 else self.acct.body_error_message(self.preq.fmt))
            return
        err = failure or self.exchange.end_error or ClientGone("the client went away during the body")
        self.acct.finish(status, err.end_reason, error=err.message, bytes_out=self.acct.body_bytes)


