"""One proxied request from the first upstream try to the last byte (design.md section 2).

Streaming requests run their upstream tries in a stream thread that frames events into the
locked writer, while the server thread waits for the commit: the first content from a
deployment (or its 200, when there is nowhere else to go), a final answer, or
`commit_after` seconds of waiting so that keepalives can flow.

Before content, preamble events are held back while another deployment remains, so a
stall, cut or error event can move the request on without the client noticing.  Before
the commit an upstream error reaches the client with its real status and body; after it,
every failure becomes one terminal error event in the client's protocol.  Plain requests
(JSON bodies, model lists) make their tries in the server thread and stream through.
"""

from __future__ import annotations

import logging
import socket
import threading
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from .accounting import Accounting
from .attempts import AnsweredThenFailed, AttemptRunner, Final
from .errors import ClientGone, ProxyError, UpstreamBroken
from .formats import EventKind, Format
from .limits import TooComplex, parse_upstream_json
from .redact import Redactor
from .relay import Exchange, LockedWriter
from .replies import (PassThrough, StartResponse, committed_stream_headers, error_response,
                      reply_response, stream_headers)
from .routing import Attempt, Route
from .sse import Event, EventTooLarge, SSEFramer
from .upstream import UpstreamResponse

log = logging.getLogger("proxy.handler")


@dataclass
class ProxyRequest:
    """What the app decided about a client request before anything went upstream."""

    request_id: str
    endpoint: str
    fmt: Format
    route: Route
    method: str
    path: str  # path and query string, appended to each deployment's base URL
    headers: list[tuple[str, str]]  # the client's end-to-end headers
    body: bytes  # the client's body (with the proxy's own additions)
    payload: dict | None = None  # the parsed body, for deployments that edit it
    model: str | None = None
    stream: bool = False
    strip_usage_chunk: bool = False
    usage_format: str | None = None
    client_socket: socket.socket | None = None
    client_key_id: str | None = None
    redactor: Redactor = field(default_factory=Redactor)  # masks credentials in what is relayed


def decode_event_data(event: Event) -> object | None:
    """The event's JSON payload ("[DONE]" stays a string); a payload that is not JSON (or
    would take unreasonable memory to parse) is an upstream fault: forwarding it would
    crash the client's SDK mid-answer."""
    if not event.data_lines:
        return None
    data = event.data
    if data.strip() == "[DONE]":
        return "[DONE]"
    try:
        return parse_upstream_json(data)
    except TooComplex as exc:
        raise UpstreamBroken(f"the upstream sent an event the proxy will not parse: {exc}") from None
    except ValueError:
        raise UpstreamBroken("the upstream sent a malformed event (data is not JSON)") from None


def serve_plain(ctx, preq: ProxyRequest, acct: Accounting,
                start_response: StartResponse) -> Iterable[bytes]:
    """A request whose answer is not an event stream: try deployments, then pass through."""
    exchange = Exchange(preq.client_socket, None, on_end=lambda err: None)
    ctx.heartbeat.register(exchange)
    taken: list[UpstreamResponse] = []

    def take(resp: UpstreamResponse, attempt: Attempt) -> ProxyError | None:
        try:
            resp.prefetch()  # an unreadable body fails this try, before any header goes out
        except ProxyError as err:
            resp.close()
            return err
        exchange.content_arrived()
        taken.append(resp)
        return None

    final = AttemptRunner(ctx, preq, acct, exchange).run(take)
    if final.answered:
        return PassThrough(ctx, preq, acct, exchange, taken[0]).respond(start_response)
    ctx.heartbeat.unregister(exchange)
    return render_final(preq, acct, final, start_response)


def render_final(preq: ProxyRequest, acct: Accounting, final: Final,
                 start_response: StartResponse) -> Iterable[bytes]:
    """No deployment answered: the last upstream error answer, or the proxy's own error."""
    if final.reply is not None:
        reply = final.reply
        acct.finish(reply.status, "upstream_error", error=reply.message(preq.fmt),
                    bytes_out=len(reply.body))
        return reply_response(reply, preq.request_id, acct.record.attempts > 1, start_response,
                              preq.redactor)
    err = final.error or UpstreamBroken("no deployment answered")
    acct.finish(preq.fmt.status_of(err), err.end_reason, error=err.message)
    return error_response(preq.fmt, err, preq.request_id, start_response, preq.redactor)


class StreamRelay:
    """A streaming request: stream thread + locked writer + the commit rule."""

    def __init__(self, ctx, preq: ProxyRequest, acct: Accounting) -> None:
        self.ctx, self.preq, self.acct = ctx, preq, acct
        self.view = preq.fmt.stream_view(strip_usage_chunk=preq.strip_usage_chunk)
        self.writer = LockedWriter(keepalive=ctx.keepalive_for(preq.route), redactor=preq.redactor)
        self.exchange = Exchange(preq.client_socket, self.writer, on_end=self._ended_from_outside)
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._committed = False  # 200 went out before any deployment answered
        self._announced: tuple[UpstreamResponse, str] | None = None  # (response, deployment)
        self._final: Final | None = None
        self._protocol_end: EventKind | None = None
        # Per try: the framer, the preamble held back while another option remains, the try.
        self._framer = SSEFramer(ctx.config.max_event_bytes)
        self._held: list[Event] | None = None
        self._attempt: Attempt | None = None
        self._content_seen = False

    # -- server thread -------------------------------------------------------------
    def respond(self, start_response: StartResponse) -> Iterable[bytes]:
        self.ctx.heartbeat.register(self.exchange)
        self.ctx.stream_threads.submit(self._run)
        self._ready.wait(self.ctx.config.commit_delay)
        with self._lock:
            if not self._ready.is_set():
                self._committed = True
        if self._committed:
            start_response("200 OK", committed_stream_headers(self.preq.request_id))
            return self._frames()
        if self._final is not None:
            self.ctx.heartbeat.unregister(self.exchange)
            return render_final(self.preq, self.acct, self._final, start_response)
        resp, deployment = self._announced
        if resp.is_event_stream:
            headers = self.preq.redactor.headers(resp.headers)
            start_response("200 OK", stream_headers(headers, self.preq.request_id, deployment))
            return self._frames()
        return PassThrough(self.ctx, self.preq, self.acct, self.exchange, resp).respond(start_response)

    def _frames(self) -> Iterator[bytes]:
        """The WSGI body: one yield per frame (b"" first makes gunicorn send the headers now)."""
        drained = False
        try:
            yield b""
            yield from self.writer.frames()
            drained = True
        finally:
            if not drained:
                self.exchange.end(ClientGone("the client went away while the stream was written"))

    def _ended_from_outside(self, err: ProxyError) -> None:
        """Client gone or shutdown.  A committed stream gets the terminal error; before the
        commit (a preamble held back, or no headers yet) the server thread is woken at once
        to answer with the error's own status (503/529), or nothing for a client that left."""
        with self._lock:
            streaming = self._streaming()
            if not streaming:
                self._final = Final(error=err)
                self._ready.set()
        if isinstance(err, ClientGone) or not streaming:
            self.writer.close()
        else:
            self.writer.close(self.view.terminal_error(err))

    def _streaming(self) -> bool:
        """Called with self._lock held: has a 200 gone (or is it going) to the client?"""
        return self._committed or self._announced is not None

    # -- stream thread ---------------------------------------------------------------
    def _run(self) -> None:
        try:
            final = AttemptRunner(self.ctx, self.preq, self.acct, self.exchange).run(self._use_response)
        except Exception as exc:  # never leave the server thread waiting
            log.exception("request %s: stream thread failed", self.preq.request_id)
            final = Final(error=UpstreamBroken(f"internal error: {type(exc).__name__}"))
        if not final.answered:
            self._no_answer(final)

    def _use_response(self, resp: UpstreamResponse, attempt: Attempt
                      ) -> ProxyError | AnsweredThenFailed | None:
        """Relay one deployment's answer; an error means it failed before any content."""
        if not resp.is_event_stream:
            try:
                resp.prefetch()  # an unreadable body fails this try, before the commit
            except ProxyError as err:
                resp.close()
                return err
            if not self._announce(resp, attempt):  # the server thread passes it through
                resp.close()
                return UpstreamBroken("the upstream answered a streaming request with a "
                                      f"non-stream body ({resp.header('content-type')})")
            self.exchange.content_arrived()
            return None
        if not attempt.hold_preamble:
            self._announce(resp, attempt)
        return self._pump(resp, attempt)

    def _announce(self, resp: UpstreamResponse, attempt: Attempt) -> bool:
        """This deployment answers: let the server thread commit with its headers.

        False when the stream has already committed to `200 text/event-stream` and this
        answer is not an event stream: a JSON body cannot follow those headers."""
        with self._lock:
            if self._committed and not resp.is_event_stream:
                return False
            if self._final is not None:  # ended from outside meanwhile: its answer stands
                return False
            if self._announced is None:
                self._announced = (resp, attempt.deployment.name)
                self.acct.record.deployment = attempt.deployment.name
                self._ready.set()
            return True

    def _no_answer(self, final: Final) -> None:
        """Every try failed (or the client/shutdown ended the request) before any content."""
        with self._lock:
            if not self._committed:
                self._final = final
                self._ready.set()  # the server thread renders the real status and body
                return
        err = final.error or final.reply.as_error(self.preq.fmt)
        self._end_with_error(err, status=200)

    # -- relaying one deployment's event stream ---------------------------------------------
    def _pump(self, resp: UpstreamResponse, attempt: Attempt) -> ProxyError | AnsweredThenFailed | None:
        self._framer = SSEFramer(self.ctx.config.max_event_bytes)
        self._held = [] if attempt.hold_preamble else None
        self._attempt = attempt
        self._content_seen = False
        failure: ProxyError | None = None
        try:
            for chunk in resp.decoded_chunks():
                for event in self._frame(chunk):
                    self._forward(event, resp)
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
        if self._held is not None and self.exchange.end_error is None:
            # Nothing reached the client from this deployment: let the plan move on.
            return failure or UpstreamBroken("the upstream ended the stream before any content")
        broken = self._conclude(failure, self._framer.pending_bytes())
        return AnsweredThenFailed(broken) if broken is not None else None

    def _frame(self, chunk: bytes) -> list[Event]:
        try:
            return self._framer.feed(chunk)
        except EventTooLarge as exc:
            raise UpstreamBroken(f"the upstream sent {exc}") from None

    def _forward(self, event: Event, resp: UpstreamResponse) -> None:
        if self._protocol_end is not None:
            return  # anything after the protocol's end is not part of the answer
        payload = decode_event_data(event)
        kind = self.view.classify(event.event, payload) if payload is not None else EventKind.OTHER
        if payload is not None:
            self.acct.observe_event(event.event, payload)
        if kind is EventKind.SKIP:
            return
        if self._held is not None:
            if kind is EventKind.UPSTREAM_ERROR:
                raise UpstreamBroken(f"the upstream sent an error before any content: "
                                     f"{_error_message(payload)}")
            if kind in (EventKind.PREAMBLE, EventKind.OTHER):
                self._held.append(event)
                return
            self._release_held(resp)
        if kind is EventKind.CONTENT and not self._content_seen:
            self._content_seen = True
            self.exchange.content_arrived()
            self.acct.first_token()
        ends = kind in (EventKind.DONE, EventKind.UPSTREAM_ERROR)
        if not self.writer.write_event(event.raw, event.has_id, last=ends):
            return
        if ends:
            self._end_by_protocol(kind, payload)

    def _release_held(self, resp: UpstreamResponse) -> None:
        """Content arrived: this deployment answers; the held preamble goes out first."""
        held, self._held = self._held or [], None
        self._announce(resp, self._attempt)
        for event in held:
            if event.data_lines:  # comments were only the upstream's own keepalives
                self.writer.write_event(event.raw, event.has_id)

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

    def _conclude(self, failure: ProxyError | None, leftover: bytes = b"") -> ProxyError | None:
        """End the body the one right way and finalize the record (first finish wins);
        returns the upstream's failure, if the answer broke off."""
        if self._protocol_end is None and failure is None and not leftover.strip() \
                and self.view.complete_without_end_marker():
            # A chat stream whose every choice has its finish reason, ended cleanly without
            # `data: [DONE]` (some OpenAI-compatible servers): the answer is whole.
            self._end_by_protocol(EventKind.DONE, None)
        if self._protocol_end is not None:
            self._close_after_split_crlf()
            self.writer.close()  # recorded when the protocol's end went out
            self.ctx.heartbeat.unregister(self.exchange)
            return None
        failure = failure or UpstreamBroken(
            "the upstream ended the stream before the answer was complete"
            + (" (an event was cut off)" if leftover.strip() else ""))
        self._end_with_error(failure, status=200)
        return None if self.exchange.end_error is not None else failure

    def _end_with_error(self, failure: ProxyError, status: int) -> None:
        try:
            outside = self.exchange.end_error
            if outside is not None:
                self.writer.close()  # the terminal event, if any, went out with the end
                with self._lock:
                    streaming = self._streaming()
                if isinstance(outside, ClientGone):
                    status = 499
                elif not streaming:  # the server thread answers with the error's own status
                    status = self.preq.fmt.status_of(outside)
                self.acct.finish(status, outside.end_reason, error=outside.message,
                                 bytes_out=self.writer.bytes_out)
                return
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
