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
                   start_response: StartResponse) -> list[bytes]:
    """The endpoint's own JSON error shape, with the error's status."""
    body = json.dumps(fmt.error_body(err, request_id)).encode("utf-8")
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
               (REQUEST_ID_HEADER, request_id)]
    if err.retry_after:
        headers.append(("Retry-After", err.retry_after))
    start_response(f"{err.status} {_reason(err.status)}", headers)
    return [body]


def _reason(status: int) -> str:
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
                   start_response: StartResponse) -> list[bytes]:
    """An upstream's error answer with its real status, headers and body.

    After the proxy has retried it, `x-should-retry: false` keeps the client's SDK from
    multiplying the attempts (protocols.md section 6)."""
    headers = [(k, v) for k, v in reply.headers if k.lower() != "x-should-retry"]
    headers += [("Content-Length", str(len(reply.body)))] + proxy_headers(request_id, reply.deployment)
    if retried:
        headers.append(("x-should-retry", "false"))
    start_response(f"{reply.status} {reply.reason or _reason(reply.status)}", headers)
    return [reply.body]


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
        headers = self.resp.headers + proxy_headers(self.preq.request_id, self.acct.record.deployment)
        self.acct.set_body_encoding(self.resp.header("content-encoding"))
        start_response(f"{self.resp.status} {self.resp.reason or _reason(self.resp.status)}", headers)
        return self._body()

    def _body(self) -> Iterator[bytes]:
        failure: ProxyError | None = None
        sent_all = False
        try:
            for chunk in self.resp.raw_chunks():
                self.acct.add_body_copy(chunk)
                yield chunk
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


