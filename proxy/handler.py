"""One proxied request from the upstream call to the last byte (design.md section 2).

Streaming requests run the upstream side in a stream thread that frames events into the
locked writer, while the server thread waits for the commit: the upstream's 200, or
`commit_after` seconds of waiting so that keepalives can flow.  Before the commit an
upstream error reaches the client with its real status and body; after it, every failure
becomes one terminal error event in the client's protocol.  Everything else (JSON bodies,
errors, model lists) streams through unchanged, keeping the upstream's Content-Length.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from .accounting import Accounting
from .config import Provider
from .errors import ClientGone, ProxyError, UpstreamBroken, UpstreamHTTPError
from .formats import EventKind, Format
from .relay import Exchange, LockedWriter
from .sse import Event, SSEFramer
from .upstream import UpstreamResponse

log = logging.getLogger("proxy.handler")

StartResponse = Callable[..., object]
REQUEST_ID_HEADER = "x-llm-proxy-request-id"
# Headers the proxy owns on an event stream: decoded bytes have no length or encoding,
# and intermediaries must neither buffer nor transform them.
_STREAM_DROP = frozenset({"content-length", "content-encoding", "cache-control", "x-accel-buffering"})
SSE_HEADERS = [("Cache-Control", "no-cache, no-transform"), ("X-Accel-Buffering", "no")]


@dataclass
class ProxyRequest:
    """What the app decided about a client request before anything went upstream."""

    request_id: str
    endpoint: str
    fmt: Format
    provider: Provider
    method: str
    url: str
    headers: list[tuple[str, str]]
    body: bytes
    model: str | None = None
    stream: bool = False
    strip_usage_chunk: bool = False
    usage_format: str | None = None
    client_socket: socket.socket | None = None
    client_key_id: str | None = None
    extra: dict = field(default_factory=dict)


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
    from http import HTTPStatus
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def stream_headers(upstream_headers: list[tuple[str, str]], request_id: str) -> list[tuple[str, str]]:
    kept = [(k, v) for k, v in upstream_headers if k.lower() not in _STREAM_DROP]
    return kept + SSE_HEADERS + [(REQUEST_ID_HEADER, request_id)]


def committed_stream_headers(request_id: str) -> list[tuple[str, str]]:
    return stream_headers([("Content-Type", "text/event-stream; charset=utf-8")], request_id)


def abort_client_connection(sock: socket.socket | None) -> None:
    """Make a half-sent body fail loudly at the client instead of ending cleanly."""
    if sock is None:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def error_from_upstream(resp: UpstreamResponse, fmt: Format) -> UpstreamHTTPError:
    """Turn an upstream error response into the error a committed stream reports."""
    raw = resp.read_limited(64 * 1024)
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    message = fmt.upstream_error_message(body) or f"the upstream answered HTTP {resp.status}"
    kind = body.get("error", {}).get("type") if isinstance(body, dict) and isinstance(body.get("error"), dict) else None
    return UpstreamHTTPError(resp.status, message, kind if isinstance(kind, str) else None)


def decode_event_data(event: Event) -> object | None:
    """The event's JSON payload ("[DONE]" stays a string); a payload that is not JSON is an
    upstream fault: forwarding it would crash the client's SDK mid-answer."""
    if not event.data_lines:
        return None
    data = event.data
    if data.strip() == "[DONE]":
        return "[DONE]"
    try:
        return json.loads(data)
    except ValueError:
        raise UpstreamBroken("the upstream sent a malformed event (data is not JSON)") from None


class PassThrough:
    """A non-event-stream upstream response, streamed through with its own headers."""

    def __init__(self, ctx, preq: ProxyRequest, acct: Accounting, exchange: Exchange,
                 resp: UpstreamResponse) -> None:
        self.ctx, self.preq, self.acct, self.exchange, self.resp = ctx, preq, acct, exchange, resp

    def respond(self, start_response: StartResponse) -> Iterable[bytes]:
        headers = self.resp.headers + [(REQUEST_ID_HEADER, self.preq.request_id)]
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


def serve_plain(ctx, preq: ProxyRequest, acct: Accounting,
                start_response: StartResponse) -> Iterable[bytes]:
    """A request whose answer is not an event stream: wait for headers, then pass through."""
    exchange = Exchange(preq.client_socket, None, on_end=lambda err: None)
    ctx.heartbeat.register(exchange)
    try:
        resp = ctx.upstream.send(preq.method, preq.url, preq.headers, preq.body, exchange.handle)
    except ProxyError as err:
        ctx.heartbeat.unregister(exchange)
        err = exchange.end_error or err
        acct.finish(err.status, err.end_reason, error=err.message)
        return error_response(preq.fmt, err, preq.request_id, start_response)
    acct.first_byte()
    return PassThrough(ctx, preq, acct, exchange, resp).respond(start_response)


class StreamRelay:
    """A streaming request: stream thread + locked writer + the commit rule."""

    def __init__(self, ctx, preq: ProxyRequest, acct: Accounting) -> None:
        self.ctx, self.preq, self.acct = ctx, preq, acct
        self.view = preq.fmt.stream_view(strip_usage_chunk=preq.strip_usage_chunk)
        keepalive = ctx.config.keepalive and preq.provider.keepalive
        self.writer = LockedWriter(keepalive=keepalive)
        self.exchange = Exchange(preq.client_socket, self.writer, on_end=self._ended_from_outside)
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._committed = False
        self._resp: UpstreamResponse | None = None
        self._open_error: ProxyError | None = None
        self._protocol_end: EventKind | None = None
        self._framer = SSEFramer()
        self._content_started = False

    # -- server thread -------------------------------------------------------------
    def respond(self, start_response: StartResponse) -> Iterable[bytes]:
        self.ctx.heartbeat.register(self.exchange)
        threading.Thread(target=self._run, name=f"stream-{self.preq.request_id}", daemon=True).start()
        self._ready.wait(self.ctx.config.commit_delay)
        with self._lock:
            if not self._ready.is_set():
                self._committed = True
        if self._committed:
            start_response("200 OK", committed_stream_headers(self.preq.request_id))
            return self._frames(b"")
        if self._open_error is not None:
            return self._reject(self._open_error, start_response)
        resp = self._resp
        assert resp is not None
        if resp.status == 200 and resp.is_event_stream:
            start_response("200 OK", stream_headers(resp.headers, self.preq.request_id))
            return self._frames(b"")
        return PassThrough(self.ctx, self.preq, self.acct, self.exchange, resp).respond(start_response)

    def _reject(self, err: ProxyError, start_response: StartResponse) -> Iterable[bytes]:
        self.ctx.heartbeat.unregister(self.exchange)
        err = self.exchange.end_error or err
        self.acct.finish(err.status, err.end_reason, error=err.message)
        return error_response(self.preq.fmt, err, self.preq.request_id, start_response)

    def _frames(self, first: bytes) -> Iterator[bytes]:
        """The WSGI body: one yield per frame (b"" makes gunicorn send the headers now)."""
        drained = False
        try:
            yield first
            yield from self.writer.frames()
            drained = True
        finally:
            if not drained:
                self.exchange.end(ClientGone("the client went away while the stream was written"))

    def _ended_from_outside(self, err: ProxyError) -> None:
        """Client gone or shutdown: a committed stream gets the terminal error, if renderable."""
        if isinstance(err, ClientGone) or not self._committed_or_streaming():
            self.writer.close()
        else:
            self.writer.close(self.view.terminal_error(err))

    def _committed_or_streaming(self) -> bool:
        with self._lock:
            return self._committed or self._resp is not None

    # -- stream thread ---------------------------------------------------------------
    def _run(self) -> None:
        try:
            resp = self.ctx.upstream.send(self.preq.method, self.preq.url, self.preq.headers,
                                          self.preq.body, self.exchange.handle)
        except ProxyError as err:
            self._open_failed(err)
            return
        except Exception as exc:  # never leave the server thread waiting
            log.exception("request %s: stream thread failed", self.preq.request_id)
            self._open_failed(UpstreamBroken(f"internal error: {type(exc).__name__}"))
            return
        self.acct.first_byte()
        is_stream = resp.status == 200 and resp.is_event_stream
        with self._lock:
            committed = self._committed
            if not committed:
                self._resp = resp
                self._ready.set()
        if is_stream:
            self._pump(resp)
        elif committed:
            self._conclude(error_from_upstream(resp, self.preq.fmt), status=200)
            resp.close()
        # otherwise the server thread passes the response through itself

    def _open_failed(self, err: ProxyError) -> None:
        with self._lock:
            if not self._committed:
                self._open_error = err
                self._ready.set()
                return
        self._conclude(err, status=200)

    def _pump(self, resp: UpstreamResponse) -> None:
        framer = self._framer
        failure: ProxyError | None = None
        try:
            for chunk in resp.decoded_chunks():
                for event in framer.feed(chunk):
                    self._forward(event)
                if self._protocol_end is not None and not self.writer.closed:
                    self._close_after_split_crlf()
                if self.writer.closed and self._protocol_end is None:
                    break
        except ProxyError as err:
            failure = err
        except Exception as exc:
            log.exception("request %s: relay failed", self.preq.request_id)
            failure = UpstreamBroken(f"internal error: {type(exc).__name__}")
        finally:
            resp.close()
        self._conclude(failure, status=200, leftover=framer.pending_bytes())

    def _forward(self, event: Event) -> None:
        if self._protocol_end is not None:
            return  # anything after the protocol's end is not part of the answer
        payload = decode_event_data(event)
        kind = self.view.classify(event.event, payload) if payload is not None else EventKind.OTHER
        if payload is not None:
            self.acct.observe_event(event.event, event.data)
        if kind is EventKind.SKIP:
            return
        if kind is EventKind.CONTENT and not self._content_started:
            self._content_started = True
            self.acct.first_token()
        if not self.writer.write_event(event.raw, event.has_id):
            return
        if kind in (EventKind.DONE, EventKind.UPSTREAM_ERROR):
            self._end_by_protocol(kind, payload)

    def _end_by_protocol(self, kind: EventKind, payload: object) -> None:
        """The upstream finished (or failed) in its own words: record it, then end the body,
        so a client that has seen the end can rely on the row being queued."""
        self._protocol_end = kind
        if kind is EventKind.DONE:
            self.acct.finish(200, "complete", bytes_out=self.writer.bytes_out)
        else:
            self.acct.finish(200, "upstream_error", error=_error_message(payload),
                             bytes_out=self.writer.bytes_out)
        if not self._framer.ends_in_split_crlf:
            self.writer.close()
        # else: the LF of the final CRLF is still on its way; the next read (or EOF) ends it

    def _close_after_split_crlf(self) -> None:
        carry = self._framer.take_carry()
        if carry:
            self.writer.write_event(carry)
        if carry or not self._framer.ends_in_split_crlf:
            self.writer.close()

    def _conclude(self, failure: ProxyError | None, status: int, leftover: bytes = b"") -> None:
        """End the body the one right way and finalize the record (first finish wins)."""
        try:
            if self._protocol_end is not None:
                self._close_after_split_crlf()
                self.writer.close()  # recorded when the protocol's end went out
                return
            outside = self.exchange.end_error
            if outside is not None:
                self.writer.close()
                self.acct.finish(499 if isinstance(outside, ClientGone) else status,
                                 outside.end_reason, error=outside.message,
                                 bytes_out=self.writer.bytes_out)
                return
            failure = failure or UpstreamBroken(
                "the upstream ended the stream before the answer was complete"
                + (" (an event was cut off)" if leftover.strip() else ""))
            frame = self.view.terminal_error(failure)
            self.acct.finish(status, failure.end_reason, error=failure.message,
                             bytes_out=self.writer.bytes_out + len(frame))
            self.writer.close(frame)
        finally:
            self.ctx.heartbeat.unregister(self.exchange)


def _error_message(payload: object) -> str:
    if isinstance(payload, dict):
        err = payload.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"]
        if isinstance(payload.get("message"), str):
            return payload["message"]
        response = payload.get("response")
        if isinstance(response, dict) and isinstance(response.get("error"), dict):
            return str(response["error"].get("message"))
    return "the upstream sent an error event"
