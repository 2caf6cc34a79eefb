"""Relay: the answer to the client, streamed through the locked writer or passed through.

A streaming request runs its tries in a stream thread that frames events into the locked
writer, while the server thread waits on the commit rule (`commit.py`): the first content
from a deployment (or its 200, when there is nowhere else to go), a refusal, or
`commit_delay` seconds of waiting so that keepalives can flow.

Before content, preamble events are held back while another deployment remains, so a
stall, cut or error event can move the request on without the client noticing.  Before
the commit an upstream error reaches the client with its real status and body; after it,
every failure becomes one terminal error event in the client's protocol.  Plain requests
(JSON bodies, model lists) make their tries in the server thread and pass through.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from ..errors import (ClientGone, ProxyError, ShuttingDown, UntranslatableAnswer, UpstreamBroken,
                      UpstreamErrorEvent, UpstreamTimeout, UpstreamUnreachable)
from ..formats import EventKind, StreamView
from ..formats.base import compact_json
from ..formats.translate.anthropic_chat import estimate_input_tokens
from ..formats.translate.bridge import Bridge, EventTranslator, status_of_error_type
from ..heartbeat import Exchange, Heartbeat
from ..limits import MemoryBudget, Reservation, TooComplex, parse_upstream_json
from ..routing import Attempt
from ..sse import Event, EventTooLarge, SSEFramer
from ..upstream import UpstreamResponse, shutdown_quietly
from ..writer import DirectWriter, LockedWriter
from .attempt import Outcome, TryDeps, TryLoop
from .commit import Answer, CommitRule, Phase
from .fanout import LiveCall, LiveCalls, Member
from .finalize import RequestRecord
from .replies import (SSE_CONTENT_TYPE, DEPLOYMENT_HEADER, StartResponse,
                      committed_stream_headers, cost_comment, cost_headers, error_response,
                      proxy_headers, reason_phrase, reply_response, safe_reason,
                      stream_headers)
from .request import ProxyRequest

# A successful JSON answer up to this size is read whole before the client's headers, so
# they can carry its cost; a larger one streams through without them.
WHOLE_ANSWER_LIMIT = 2 * 1024 * 1024

# Error events an upstream sends mid-answer that are worth a continuation (it was busy or
# failed inside); anything else (an invalid request, a refusal) would only come back.
TRANSIENT_ERROR_TYPES = frozenset({"overloaded_error", "api_error", "server_error",
                                   "internal_server_error", "timeout_error", "service_unavailable"})


def is_continuable(failure: ProxyError) -> bool:
    """A failure of the upstream's stream itself, one another call may not repeat."""
    return isinstance(failure, (UpstreamBroken, UpstreamTimeout, UpstreamUnreachable)) \
        and not isinstance(failure, UntranslatableAnswer)

log = logging.getLogger("proxy.relay")

TRANSLATED_BODY_LIMIT = 16 * 1024 * 1024  # a JSON answer to translate is read whole
# After an answer's end, a stream read by the server thread reads what follows (the chunked
# body's last chunk) for this long in all and this much at most, so its connection can be
# reused without holding the client's end of the body back.
DRAIN_AFTER_END = 0.02
DRAIN_LIMIT = 64 * 1024


@dataclass(frozen=True)
class RelayDeps:
    tries: TryDeps
    heartbeat: Heartbeat
    stream_threads: Executor  # pooled: starting a thread per request costs ~0.3 ms
    commit_delay: float
    max_event_bytes: int
    max_continuations: int = 0  # continuations per request after a stream broke mid-answer
    live_calls: LiveCalls = field(default_factory=LiveCalls)  # streams others may join
    budget: MemoryBudget | None = None  # JSON answers read whole count against it


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


# -- plain requests ----------------------------------------------------------------------
def serve_plain(deps: RelayDeps, preq: ProxyRequest, record: RequestRecord,
                start_response: StartResponse) -> Iterable[bytes]:
    """A request whose answer is not an event stream: try deployments, then pass through."""
    exchange = Exchange(preq.client_socket, None, on_end=lambda err: None)
    deps.heartbeat.register(exchange)
    taken: list[Answer | TranslatedBody] = []
    held: list[Reservation] = []  # the memory of a JSON answer read whole

    def take(resp: UpstreamResponse, attempt: Attempt, bridge: Bridge | None) -> Outcome:
        try:
            if bridge is not None:  # read whole and rewritten, or this try fails
                taken.append(TranslatedBody.read(resp, bridge, record, attempt.deployment.name))
            else:  # an unreadable body fails this try, before any header goes out
                held[:] = read_answer(resp, deps.budget)
                taken.append(Answer(resp, attempt.deployment.name))
        except ProxyError as err:
            resp.close()
            return Outcome.failed(err)
        exchange.content_arrived()
        return Outcome.taken()

    outcome = TryLoop(deps.tries, preq, record, exchange).run(take)
    if outcome.answered and isinstance(taken[0], Answer):
        return PassThrough(deps.heartbeat, preq, record, exchange, taken[0],
                           held[0] if held else None).respond(start_response)
    deps.heartbeat.unregister(exchange)
    if outcome.answered:
        return taken[0].respond(preq, record, start_response)
    return render_refusal(preq, record, outcome, start_response)


def read_answer(resp: UpstreamResponse, budget: MemoryBudget | None) -> list[Reservation]:
    """Read a JSON answer whole when the worker's memory budget has room for it (so its
    cost can go out in the headers), else only its start; the memory it holds, if any.
    Raises the ProxyError that fails the try.  (A plain request has no first-token
    deadline: reading its body whole is no race against one.)"""
    reservation = budget.reserve(WHOLE_ANSWER_LIMIT) if budget is not None else None
    if budget is not None and reservation is None:
        resp.prefetch()  # a worker short of memory streams it through, without the headers
        return []
    try:
        resp.prefetch_answer(WHOLE_ANSWER_LIMIT)
    except BaseException:
        if reservation is not None:
            reservation.release()
        raise
    if reservation is None:
        return []
    if not resp.whole:  # only its start was read: it streams through
        reservation.release()
        return []
    reservation.shrink(len(resp.whole_body))
    return [reservation]


def render_refusal(preq: ProxyRequest, record: RequestRecord, outcome: Outcome,
                   start_response: StartResponse) -> Iterable[bytes]:
    """No deployment answered: the last upstream error answer, or the proxy's own error."""
    retried = record.row.attempts > 1
    if outcome.reply is not None and outcome.reply.source is preq.fmt:
        reply = outcome.reply
        record.upstream_error(reply.status, reply.message(), bytes_out=len(reply.body))
        return reply_response(reply, preq.request_id, retried, start_response, preq.redactor)
    err = outcome.as_error(preq.fmt)
    if outcome.reply is not None:  # an upstream of another format: told in the client's terms
        err.retry_after = outcome.reply.header("retry-after")
        extra = [(DEPLOYMENT_HEADER, outcome.reply.deployment)]
        if retried:
            extra.append(("x-should-retry", "false"))
        body = error_response(preq.fmt, err, preq.request_id, start_response, preq.redactor, extra)
        record.upstream_error(preq.fmt.status_of(err), err.message, bytes_out=len(body[0]))
        return body
    record.failed(preq.fmt.status_of(err), err)
    return error_response(preq.fmt, err, preq.request_id, start_response, preq.redactor)


ESTIMATE_HEADER = "x-llm-proxy-estimate"


def serve_estimate(preq: ProxyRequest, record: RequestRecord,
                   start_response: StartResponse) -> list[bytes]:
    """count_tokens answered by the proxy itself (its route's first provider cannot count):
    an estimate, said so in a header and in the row, and never billed."""
    body = compact_json({"input_tokens": estimate_input_tokens(preq.payload or {})})
    record.estimated_locally()
    record.complete(200, len(body))
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                              (ESTIMATE_HEADER, "true")] + proxy_headers(preq.request_id, None))
    return [body]


@dataclass(frozen=True)
class TranslatedBody:
    """A JSON answer from an upstream of another format, read whole and rewritten for the
    client; the usage row reads the upstream's own body."""

    body: bytes
    status: int
    deployment: str

    @classmethod
    def read(cls, resp: UpstreamResponse, bridge: Bridge, record: RequestRecord,
             deployment: str) -> "TranslatedBody":
        """Raises the ProxyError that fails the try (nothing has reached the client)."""
        data = resp.read_limited(TRANSLATED_BODY_LIMIT + 1)
        resp.close()
        if len(data) > TRANSLATED_BODY_LIMIT:
            raise UpstreamBroken(f"the upstream's answer is larger than the {TRANSLATED_BODY_LIMIT >> 20} "
                                 "MiB the proxy translates")
        record.add_body_copy(data)
        try:
            answer = parse_upstream_json(data)
        except ValueError:
            raise UpstreamBroken("the upstream answered with a body that is not JSON") from None
        try:
            translated = bridge.answer(answer, int(time.time()))
        except (AttributeError, TypeError, KeyError, ValueError) as exc:  # JSON of odd shapes
            raise UntranslatableAnswer(f"the upstream's answer cannot be translated "
                                       f"({type(exc).__name__})") from None
        return cls(compact_json(translated), resp.status, deployment)

    def respond(self, preq: ProxyRequest, record: RequestRecord,
                start_response: StartResponse) -> Iterable[bytes]:
        body = preq.redactor.data(self.body)
        record.report_after_answer()
        pending = preq.dedup.pending if preq.dedup is not None else None
        if pending is not None:
            pending.status, pending.content_type = self.status, "application/json"
            pending.add(body)
        record.complete(self.status, len(body))  # queued before the client has the answer
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        start_response(f"{self.status} {reason_phrase(self.status)}",
                       headers + proxy_headers(preq.request_id, self.deployment)
                       + cost_headers(record.row))
        return record.reported_after([body])


class PassThrough:
    """A non-event-stream upstream answer, streamed through with its own headers."""

    def __init__(self, heartbeat: Heartbeat, preq: ProxyRequest, record: RequestRecord,
                 exchange: Exchange, answer: Answer,
                 reservation: Reservation | None = None) -> None:
        self.heartbeat, self.preq, self.record, self.exchange = heartbeat, preq, record, exchange
        self.resp, self.deployment = answer.response, answer.deployment
        self.reservation = reservation  # the memory of a body read whole

    def respond(self, start_response: StartResponse) -> Iterable[bytes]:
        redactor = self.preq.redactor
        headers = redactor.headers(self.resp.headers) + proxy_headers(self.preq.request_id,
                                                                      self.deployment)
        status = self.resp.status
        reason = safe_reason(redactor.text(self.resp.reason)) or reason_phrase(status)
        if self.resp.whole:
            return self._whole(f"{status} {reason}", headers, start_response)
        start_response(f"{status} {reason}", headers)
        return self._body()

    def _whole(self, status: str, headers: list[tuple[str, str]],
               start_response: StartResponse) -> Iterable[bytes]:
        """A JSON answer read whole: its row is finished first, so its cost goes out in
        the headers (and the row is queued before the client has the answer); its log
        line and metrics follow the answer."""
        self.record.report_after_answer()
        try:
            body = self.preq.redactor.data(self.resp.whole_body)
            self.record.add_body_copy(body)
            pending = self._pending()
            if pending is not None:
                pending.add(body)
            self._finish(sent_all=True)
        finally:
            self.resp.close()
            self.heartbeat.unregister(self.exchange)
            if self.reservation is not None:
                self.reservation.release()  # the server holds the body from here on
        headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
        start_response(status, headers + [("Content-Length", str(len(body)))]
                       + cost_headers(self.record.row))
        return self.record.reported_after([body])

    def _pending(self):
        """The answer to keep for replay, if this request's is kept (see pipeline/dedup)."""
        pending = self.preq.dedup.pending if self.preq.dedup is not None else None
        if pending is not None:
            pending.status = self.resp.status
            pending.content_type = self.resp.header("content-type") or "application/json"
        return pending

    def _body(self) -> Iterator[bytes]:
        """The decoded body as it arrives, echoed keys masked (a key split between two
        reads included).

        The row is queued before the last bytes leave, so a client that has the whole
        answer can rely on its row, as it can on a stream's: with a Content-Length the last
        piece is known when it arrives; without one, each piece waits for the next."""
        failure: ProxyError | None = None
        recorded = False
        masking = self.preq.redactor.stream()
        length = self._declared_length()
        held = b""
        pending = self._pending()
        try:
            yield b""  # the status and headers go out now, whatever the body does
            for chunk in self.resp.decoded_chunks():
                self.record.add_body_copy(chunk)
                if pending is not None:
                    pending.add(chunk)
                out = masking.feed(chunk)
                if length is not None and self.record.body_bytes >= length:  # the last piece
                    out += masking.flush()
                    recorded = self._finish(sent_all=True)
                if length is not None or recorded:
                    if out:
                        yield out
                    continue
                if held and out:
                    yield held
                    held = b""
                held += out
            if not recorded:
                held += masking.flush()
                recorded = self._finish(sent_all=True)
            if held:
                yield held
        except ProxyError as err:
            failure = self.exchange.end_error or err
            # A half-sent body must fail loudly at the client instead of ending cleanly.
            shutdown_quietly(self.preq.client_socket)
        finally:
            self.resp.close()
            self.heartbeat.unregister(self.exchange)
            if not recorded:
                self._finish(sent_all=False, failure=failure)

    def _declared_length(self) -> int | None:
        """The body's length as sent to the client (none when it is relayed decoded)."""
        value = next((v for k, v in self.resp.headers if k.lower() == "content-length"), None)
        return int(value) if value is not None and value.strip().isdigit() else None

    def _finish(self, sent_all: bool, failure: ProxyError | None = None) -> bool:
        """Record how the body ended; True, for the caller that keeps track."""
        status, sent = self.resp.status, self.record.body_bytes
        if sent_all and status < 400:
            self.record.complete(status, sent)
        elif sent_all:
            self.record.upstream_error(status, self.record.body_error_message(self.preq.fmt), sent)
        else:
            err = failure or self.exchange.end_error or ClientGone("the client went away during the body")
            self.record.failed(status, err, sent)
        return True


# -- streams ----------------------------------------------------------------------------
class TryStream:
    """One deployment's event stream as the relay reads it: its framer, the view that
    classifies its events (in the upstream's format), the translator to the client's format
    when they differ, the preamble held back while another option remains, and whether its
    content has begun."""

    def __init__(self, resp: UpstreamResponse, attempt: Attempt, max_event_bytes: int,
                 view: StreamView, bridge: Bridge | None = None,
                 translator: EventTranslator | None = None) -> None:
        self.resp, self.attempt = resp, attempt
        self.framer = SSEFramer(max_event_bytes)
        self.view, self.bridge, self.translator = view, bridge, translator
        self.held: list[tuple[Event, object, EventKind]] | None = [] if attempt.hold_preamble else None
        self.content_seen = False
        self.last_event_sent = False  # the last event framed went to the client
        self.continuing = False  # it continues an answer: its events are rewritten (stitched)
        self.drained: int | None = None  # bytes read after the client's body closed
        self.drain_until = 0.0  # ... and until when (monotonic)

    def tail(self, final: bool) -> bytes | None:
        """What completes the last event on the wire (see `SSEFramer.settle`), or None while
        it may still arrive; nothing for an event the client never got (a stripped chunk),
        nor for translated events (the proxy writes those whole)."""
        if self.translator is not None or self.continuing:
            return b""
        tail = self.framer.finish() if final else self.framer.settle()
        return tail if tail is None or self.last_event_sent else b""

    def client_frames(self, event: Event, payload: object, kind: EventKind,
                      client_view: StreamView) -> list[bytes]:
        """What the client gets for one upstream event: the event as it came, or its
        translation (an upstream's error event becomes the client's terminal error)."""
        if self.translator is None:
            return [event.raw]
        if payload is None:
            return []  # the upstream's own comments: the proxy sends its own keepalives
        if kind is EventKind.UPSTREAM_ERROR:
            return [client_view.terminal_error(self.bridge.event_error(payload))]
        try:
            frames = self.translator.feed(event.event, payload)
            if kind is EventKind.DONE:
                frames += self.translator.finish()
        except (AttributeError, TypeError, KeyError, ValueError) as exc:  # JSON of odd shapes
            raise UntranslatableAnswer(f"the upstream sent an event the proxy cannot translate "
                                       f"({type(exc).__name__})") from None
        return frames

    def events(self, chunk: bytes) -> list[Event]:
        try:
            return self.framer.feed(chunk)
        except EventTooLarge as exc:
            raise UpstreamBroken(f"the upstream sent {exc}") from None


class StreamRelay:
    """A streaming request: the stream thread, the locked writer and the commit rule."""

    def __init__(self, deps: RelayDeps, preq: ProxyRequest, record: RequestRecord) -> None:
        self.deps, self.preq, self.record = deps, preq, record
        self.view = preq.fmt.stream_view(strip_usage_chunk=preq.strip_usage_chunk)
        self.commit = CommitRule()
        self._protocol_end: EventKind | None = None
        self.stitch = preq.stitch  # None: this answer is never continued
        self.continuations_left = deps.max_continuations
        ticket = preq.dedup
        self.pending = ticket.pending if ticket is not None else None  # kept if it completes
        self.live: LiveCall | None = None
        self.writer: LockedWriter | DirectWriter | LiveCall
        if ticket is not None and ticket.shares:
            self._share(ticket)
        # else the writer is chosen in `respond`, where the server's `write` is known

    def _own_writer(self, writer: LockedWriter | DirectWriter) -> None:
        """A stream of one client: the writer is the client's own."""
        self.writer = self.client = writer
        self.exchange = Exchange(self.preq.client_socket, writer, on_end=self._ended_from_outside)

    def _share(self, ticket) -> None:
        """The upstream call is shared (README: "Never pay twice"): the stream thread writes
        into the live call, which hands each event to every client, this one first; the
        upstream's exchange has no client of its own."""
        self.exchange = Exchange(None, None, on_end=self._ended_from_outside)
        self.live = LiveCall(ticket.key, self.preq.request_id, self.commit, self.record,
                             self.exchange, self.deps.heartbeat, ticket.policy.orphan_grace,
                             ticket.history_limit, on_close=self.deps.live_calls.remove,
                             terminal=self.view.terminal_error)
        self.writer = self.live
        self.client = LockedWriter(keepalive=self.preq.keepalive, redactor=self.preq.redactor)
        self.member = Member(self.preq.request_id, None, self.client, self.preq.client_socket,
                             self.view.terminal_error)
        self.live.add(self.member)
        self.deps.live_calls.add(self.live)

    # -- server thread -------------------------------------------------------------
    def respond(self, start_response: StartResponse) -> Iterable[bytes]:
        if self.live is None and self.preq.writes_directly:
            return self._respond_here(start_response)
        if self.live is None:
            self._own_writer(LockedWriter(keepalive=self.preq.keepalive, redactor=self.preq.redactor))
        self.deps.heartbeat.register(self.exchange)
        try:
            self.deps.stream_threads.submit(self._run)
        except RuntimeError:  # the pool is shut down: the proxy was closed meanwhile
            self.deps.heartbeat.unregister(self.exchange)
            self.writer.close()
            raise ShuttingDown("the proxy is closed; retry the request") from None
        phase = self.commit.wait(self.deps.commit_delay)
        if phase is Phase.COMMITTED:
            start_response("200 OK", committed_stream_headers(self.preq.request_id))
            return self._frames()
        if phase is Phase.REFUSED:
            self.deps.heartbeat.unregister(self.exchange)
            if self.live is not None:
                self.live.close()  # every client of it answers the refusal itself
            return render_refusal(self.preq, self.record, self.commit.refusal, start_response)
        answer = self.commit.answer
        if not answer.response.is_event_stream:
            self.record.keep_answer(None, None)  # its events were not recorded: not kept
            if self.live is not None:  # a JSON body is read once: nobody else gets it
                self.live.close()
                self.deps.heartbeat.watch_client(self.exchange, self.preq.client_socket)
        if answer.response.is_event_stream:
            start_response("200 OK", self._answer_headers(answer))
            return self._frames()
        return PassThrough(self.deps.heartbeat, self.preq, self.record, self.exchange,
                           answer).respond(start_response)

    def _respond_here(self, start_response: StartResponse) -> Iterator[bytes]:
        """The stream read and written by this (the server's) thread: no stream thread and
        no hand-off per event.  The heartbeat sends the status line if no deployment
        answers within `commit_delay`, and keepalives through the same writer."""
        self._own_writer(DirectWriter(start_response, self._committed_head, self.preq.client_socket,
                                      keepalive=self.preq.keepalive, redactor=self.preq.redactor,
                                      on_client_gone=self._client_gone_while_writing))
        self.exchange.commit_at(time.monotonic() + self.deps.commit_delay, self._commit_by_delay)
        self.deps.heartbeat.register(self.exchange)
        return self._here(start_response)

    def _here(self, start_response: StartResponse) -> Iterator[bytes]:
        """The WSGI body of a stream read here: all of it is written through the writer,
        except an answer that is not a stream (a refusal, a JSON body), yielded as usual."""
        try:
            self._run()
            phase = self.commit.phase
            if phase is Phase.REFUSED:
                self.deps.heartbeat.unregister(self.exchange)
                yield from render_refusal(self.preq, self.record, self.commit.refusal, start_response)
            elif phase is Phase.ANSWERING and not self.commit.answer.response.is_event_stream:
                self.record.keep_answer(None, None)  # its events were not recorded: not kept
                yield from PassThrough(self.deps.heartbeat, self.preq, self.record, self.exchange,
                                       self.commit.answer).respond(start_response)
        finally:
            self.writer.finish()  # a terminal error another thread left goes out here

    def _committed_head(self) -> tuple[str, list[tuple[str, str]]] | None:
        """The status line and headers of a stream committed before any deployment
        answered; None while it is not (the writer asks when it has something to send)."""
        if self.commit.phase is not Phase.COMMITTED:
            return None
        return "200 OK", committed_stream_headers(self.preq.request_id)

    def _commit_by_delay(self) -> None:
        """From the heartbeat: no deployment answered within `commit_delay`, so the client
        gets `200 text/event-stream` now (unless the stream's thread is writing: then with
        its write) and keepalives from here on."""
        if self.commit.commit_if_waiting():
            self.writer.send_head(wait=False)

    def _client_gone_while_writing(self) -> None:
        """A write found the client gone: the exchange ends (its upstream is shut)."""
        self.exchange.end(ClientGone("the client went away while the stream was written"))

    def _frames(self) -> Iterator[bytes]:
        """The WSGI body: one yield per frame (b"" first makes gunicorn send the headers now)."""
        drained = False
        try:
            yield b""
            yield from self.client.frames()
            drained = True
        finally:
            if not drained:
                gone = ClientGone("the client went away while the stream was written")
                (self.member.exchange if self.live is not None else self.exchange).end(gone)

    def _ended_from_outside(self, err: ProxyError) -> None:
        """Client gone or shutdown.  A streaming response gets the terminal error; before
        the commit the server thread is woken at once to answer with the error's own
        status (503/529), or nothing for a client that left."""
        refused = self.commit.refuse(Outcome.failed(err))
        if isinstance(err, ClientGone) or refused:
            self.writer.close()
        else:
            self.writer.close(self.view.terminal_error(err))

    # -- stream thread ---------------------------------------------------------------
    def _run(self) -> None:
        """The stream thread; its one error boundary (a bug ends this request with a
        terminal error or a 500, and never leaves the server thread waiting)."""
        try:
            outcome = TryLoop(self.deps.tries, self.preq, self.record, self.exchange).run(self._take)
        except Exception as exc:
            log.exception("request %s: stream thread failed", self.preq.request_id)
            outcome = Outcome.failed(ProxyError(f"internal error in the proxy: {type(exc).__name__}"))
        if not outcome.answered and not self.commit.refuse(outcome):
            self._end_with_error(outcome.as_error(self.preq.fmt), status=200)
        elif not outcome.answered and self.live is not None:
            self.live.close()  # refused: its clients answer the refusal themselves

    def _take(self, resp: UpstreamResponse, attempt: Attempt, bridge: Bridge | None) -> Outcome:
        """Relay one deployment's answer; a failure here means it failed before content."""
        if not resp.is_event_stream and bridge is not None:
            resp.close()
            return Outcome.failed(UpstreamBroken(
                "the upstream answered a streaming request with a non-stream body"))
        if not resp.is_event_stream:
            try:
                # Only the start: the commit rule is waiting (a streaming request, answered
                # with JSON, gets it as it comes, without the cost headers).
                resp.prefetch()  # an unreadable body fails this try, before the commit
            except ProxyError as err:
                resp.close()
                return Outcome.failed(err)
            if not self._answer(resp, attempt):  # else the server thread passes it through
                resp.close()
                return Outcome.failed(UpstreamBroken(
                    "the upstream answered a streaming request with a non-stream body "
                    f"({resp.header('content-type')})"))
            self.exchange.content_arrived()
            return Outcome.taken()
        if not attempt.hold_preamble:
            self._answer(resp, attempt, translated=bridge is not None)
        return self._pump(self._try_stream(resp, attempt, bridge))

    def _try_stream(self, resp: UpstreamResponse, attempt: Attempt, bridge: Bridge | None) -> TryStream:
        continuing = self.stitch is not None and self.stitch.continuing
        if bridge is None:
            # A continuation's events are its own (sequence numbers from 0, its own choices):
            # the client's view counts only what the client got.
            view = self.preq.fmt.stream_view(strip_usage_chunk=self.preq.strip_usage_chunk) \
                if continuing else self.view
            current = TryStream(resp, attempt, self.deps.max_event_bytes, view)
        else:
            translator = bridge.events(self.preq.payload, include_usage=not self.preq.strip_usage_chunk,
                                       created=int(time.time()))
            current = TryStream(resp, attempt, self.deps.max_event_bytes,
                                bridge.upstream.stream_view(), bridge, translator)
        current.continuing = continuing
        return current

    def _answer(self, resp: UpstreamResponse, attempt: Attempt, translated: bool = False) -> bool:
        answered = self.commit.answer_with(resp, attempt.deployment.name, translated)
        if answered and isinstance(self.writer, DirectWriter) and resp.is_event_stream \
                and not self.writer.opened and self.commit.phase is Phase.ANSWERING:
            # This thread answers: the status line and headers go out now.
            self.writer.open("200 OK", self._answer_headers(self.commit.answer))
            self.writer.send_head()
        return answered

    def _answer_headers(self, answer: Answer) -> list[tuple[str, str]]:
        """A translated answer's headers are the proxy's own: the upstream's describe
        another API."""
        headers = [SSE_CONTENT_TYPE] if answer.translated else \
            self.preq.redactor.headers(answer.response.headers)
        return stream_headers(headers, self.preq.request_id, answer.deployment)

    # -- relaying one deployment's event stream ---------------------------------------------
    def _pump(self, current: TryStream) -> Outcome:
        failure: ProxyError | None = None
        try:
            timing = self.record.timing  # None: metrics are off
            for chunk in current.resp.decoded_chunks():
                began = time.perf_counter() if timing is not None else 0.0
                for event in current.events(chunk):
                    self._forward(event, current)
                if timing is not None:
                    timing.relayed(time.perf_counter() - began)
                if self._protocol_end is not None and not self.writer.closed:
                    self._end_body_once_settled(current)
                if self.writer.closed and self._after_the_end(current, len(chunk)):
                    break
        except ProxyError as err:
            failure = err
        finally:  # a bug goes on up to `_run`: the proxy's fault, not the deployment's
            current.resp.close()
        if current.held is not None and self.exchange.end_error is None:
            # Nothing reached the client from this deployment: let the plan move on.
            return Outcome.failed(failure or UpstreamBroken(
                "the upstream ended the stream before any content"))
        return self._conclude(current, failure)

    def _after_the_end(self, current: TryStream, read: int) -> bool:
        """The client's body is closed: stop reading now?  A stream thread reads the rest
        of an ended answer (its connection then goes back to the pool), a broken one never.
        A server thread that reads its stream itself must end the client's body first, so
        it reads on only for what comes at once (the last chunk, usually) and a little of it."""
        if self._protocol_end is None:
            return True
        if not isinstance(self.writer, DirectWriter):
            return False
        if current.drained is None:
            current.drained = 0
            current.drain_until = time.monotonic() + DRAIN_AFTER_END
            current.resp.handle.wait_at_most(DRAIN_AFTER_END)
        else:
            current.drained += read
        return current.drained > DRAIN_LIMIT or time.monotonic() > current.drain_until

    def _forward(self, event: Event, current: TryStream) -> None:
        current.last_event_sent = False
        if self._protocol_end is not None:
            return  # anything after the protocol's end is not part of the answer
        payload = decode_event_data(event)
        kind = current.view.classify(event.event, payload) if payload is not None else EventKind.OTHER
        if payload is not None:
            self.record.observe_event(event.event, payload)
        if kind is EventKind.SKIP:
            self._keep_hidden(event, current)
            return
        if kind is EventKind.UPSTREAM_ERROR and current.held is None and self._error_may_be_continued(
                current, payload):
            raise self._error_event(current, event, payload)
        if current.held is not None:
            if kind is EventKind.UPSTREAM_ERROR:
                raise UpstreamBroken("the upstream sent an error before any content: "
                                     + current.view.format.event_error_message(payload))
            if kind in (EventKind.PREAMBLE, EventKind.OTHER):
                current.held.append((event, payload, kind))
                return
            self._release_held(current)
        if kind is EventKind.CONTENT:
            if not current.content_seen:
                current.content_seen = True
                self.exchange.content_arrived()
                self.record.first_token()
            self.record.content_event()
        ends = kind in (EventKind.DONE, EventKind.UPSTREAM_ERROR)
        frames = self._stitched(current.client_frames(event, payload, kind, self.view), current,
                                event, payload)
        has_id = self._keeps_id(event, current)
        sent = self._write_end(frames, kind, payload, current, has_id) if ends else \
            self._write(frames, has_id)
        if not sent:
            return
        current.last_event_sent = True
        if ends:
            self._end_body_once_settled(current)

    @staticmethod
    def _keeps_id(event: Event, current: TryStream) -> bool:
        """The upstream's `id:` field goes out only with its own bytes."""
        return event.has_id and current.translator is None and not current.continuing

    def _stitched(self, frames: list[bytes], current: TryStream, event: Event | None = None,
                  payload: object = None) -> list[bytes]:
        """The client's frames, as the stitch sees them: watched on the first call (so a
        break knows what the client has), rewritten on a continuation (so the client gets
        one answer)."""
        if self.stitch is None:
            return frames
        try:
            return self._stitch_frames(frames, current, event, payload)
        except (AttributeError, TypeError, KeyError, ValueError) as exc:  # JSON of odd shapes
            if current.continuing:
                raise UntranslatableAnswer("the continuation could not be joined to the answer: "
                                           f"{type(exc).__name__}") from None
            log.info("request %s: an event of an odd shape; this answer will not be continued",
                     self.preq.request_id)
            self.stitch = None
            return frames

    def _stitch_frames(self, frames: list[bytes], current: TryStream, event: Event | None,
                       payload: object) -> list[bytes]:
        stitch = self.stitch
        passed_through = current.translator is None and event is not None
        if not current.continuing:  # the hot path: watch, write as they are
            if passed_through:
                if payload is not None:
                    stitch.observe(event.event, payload)
            else:
                for frame in frames:
                    data = getattr(frame, "data", None)
                    if data is not None:
                        stitch.observe(frame.name, data)
            return frames
        if passed_through:
            decoded = [(event.event, payload)] * len(frames)  # the upstream's event, as it came
        else:
            decoded = [(getattr(f, "name", None), getattr(f, "data", None)) for f in frames]
        out = []
        for frame, (name, data) in zip(frames, decoded):
            if data is None:  # a comment, or the proxy's own terminal error
                out.append(frame)
                continue
            for new_name, new_data in stitch.rewrite(name, data):
                stitch.observe(new_name, new_data)
                out.append(self.preq.fmt.encode_event(new_name, new_data))
                if isinstance(new_data, dict) and isinstance(new_data.get("sequence_number"), int):
                    self.view.last_sequence = new_data["sequence_number"]  # for a terminal error
        return out

    def _keep_hidden(self, event: Event, current: TryStream) -> None:
        """The usage chunk the client did not ask for: a JSON body of the answer has it."""
        if current.translator is not None or current.continuing:
            return
        if self.pending is not None:
            self.pending.add_hidden(event.raw)
        if self.live is not None:
            self.live.add_hidden(event.raw)

    def _remember(self, frames: list[bytes]) -> None:
        """The client's frames, for the answer kept for replay (dedup)."""
        if self.pending is not None:
            for frame in frames:
                self.pending.add(frame)

    def _write(self, frames: list[bytes], has_id: bool = False) -> bool:
        """One write per client event; False once the writer is closed."""
        self._remember(frames)
        return self._send(frames, has_id)

    def _write_end(self, frames: list[bytes], kind: EventKind, payload: object,
                   current: TryStream, has_id: bool = False) -> bool:
        """The answer's last frames: kept for replay and recorded (its row queued) before
        they go out, so the kept answer is whole when the row is, and a client that has
        seen the end can rely on its row."""
        self._remember(frames)
        self._record_end(kind, payload, current, frames)
        return self._send(frames, has_id, last=True)

    def _send(self, frames: list[bytes], has_id: bool, last: bool = False) -> bool:
        """The frames to the writer, the last one marked when they end the answer."""
        for number, frame in enumerate(frames, 1):
            if not self.writer.write_event(frame, has_id, last=last and number == len(frames)):
                return False
        return True

    def _release_held(self, current: TryStream) -> None:
        """Content arrived: this deployment answers; the held preamble goes out first."""
        held, current.held = current.held or [], None
        self._answer(current.resp, current.attempt, translated=current.translator is not None)
        for event, payload, kind in held:
            if event.data_lines:  # comments were only the upstream's own keepalives
                frames = current.client_frames(event, payload, kind, self.view)
                self._write(self._stitched(frames, current, event, payload),
                            self._keeps_id(event, current))

    def _record_end(self, kind: EventKind, payload: object, current: TryStream,
                    last_frames: list[bytes]) -> None:
        """The upstream finished (or failed) in its own words: record it before its last
        frames go out, so a client that has seen the end can rely on the row being queued
        (the thread that writes them may be the one that records).  A client already gone
        gets no end: its row says it left (see _end_with_error)."""
        if self.writer.closed:
            return
        self._protocol_end = kind
        sent = self.writer.bytes_out + sum(len(frame) for frame in last_frames)
        if kind is EventKind.DONE:
            self.record.complete(200, sent)
        else:
            self.record.upstream_error(200, current.view.format.event_error_message(payload), sent)

    def _tell_cost(self) -> None:
        """The opt-in comment with the stream's cost, once its row is finished and the last
        event is whole on the wire (never inside an event).  On a shared call it goes to
        the paying client's own writer only: the clients that joined paid nothing."""
        if self.preq.cost_comment and self.record.ended:
            self.client.write_event(cost_comment(self.record.row, self.client.saw_id))

    def _end_body_once_settled(self, current: TryStream) -> None:
        """Close the body once the last event is whole on the wire (see `SSEFramer.settle`)."""
        tail = current.tail(final=False)
        if tail is None:
            return  # the next read (or the end of the stream) completes it
        if tail:
            self.writer.write_event(tail)
        self._tell_cost()
        self.writer.close()

    def _conclude(self, current: TryStream, failure: ProxyError | None) -> Outcome:
        """End the body the one right way and finalize the record (the first end counts),
        or, when the answer broke off and can be continued, ask for its continuation."""
        leftover = current.framer.pending_bytes()
        if self._protocol_end is None and failure is None and not leftover.strip() \
                and current.view.complete_without_end_marker():
            # A chat stream whose every choice has its finish reason, ended cleanly without
            # `data: [DONE]` (some OpenAI-compatible servers): the answer is whole.
            failure = self._finish_translation(current)
            if failure is None:
                self._end_body_once_settled(current)
        if self._protocol_end is not None:
            tail = current.tail(final=True)
            if tail:
                self.writer.write_event(tail)
            if not self.writer.closed:
                self._tell_cost()
            self.writer.close()  # recorded when the protocol's end went out
            self.deps.heartbeat.unregister(self.exchange)
            return Outcome.taken()
        failure = failure or UpstreamBroken(
            "the upstream ended the stream before the answer was complete"
            + (" (an event was cut off)" if leftover.strip() else ""))
        if is_continuable(failure) and self._may_continue(current):
            return self._continue(failure)
        self._end_with_error(failure, status=200)
        return Outcome.taken(broke=None if self.exchange.end_error is not None else failure)

    # -- continuing a broken answer ------------------------------------------------------------
    def _may_continue(self, current: TryStream) -> bool:
        """Mid-answer, with a continuation left, the client still there, and an answer
        whose open part is text."""
        stitch = self.stitch
        return (stitch is not None and self.continuations_left > 0
                and (current.content_seen or stitch.continuing)
                and self.exchange.end_error is None and not self.writer.closed
                and stitch.continuable())

    def _error_may_be_continued(self, current: TryStream, payload: object) -> bool:
        kind = current.view.format.upstream_error_type(payload)
        return kind in TRANSIENT_ERROR_TYPES and self._may_continue(current)

    def _error_event(self, current: TryStream, event: Event, payload: object) -> UpstreamErrorEvent:
        """An upstream's error event as an error; if the answer is not continued after all,
        the client gets the event itself (or its translation) as the terminal error."""
        if current.bridge is not None:
            told = current.bridge.event_error(payload)
            err = UpstreamErrorEvent(told.message, told.status)
        else:
            kind = current.view.format.upstream_error_type(payload)
            err = UpstreamErrorEvent(current.view.format.event_error_message(payload),
                                     status_of_error_type(kind), kind)
        if not current.continuing:  # a continuation's own event would not fit the stitched answer
            err.client_frame = current.client_frames(event, payload, EventKind.UPSTREAM_ERROR,
                                                      self.view)[0]
        return err

    def _continue(self, failure: ProxyError) -> Outcome:
        """The request that continues the answer: the client's own, plus the text it has."""
        self.continuations_left -= 1
        # What the client saw: a key the upstream echoed never goes to the next deployment.
        prefill = self.preq.redactor.text(self.stitch.begin())
        base = self.preq.payload  # kept for this (see admit)
        # The failure's text may quote the upstream (and so a key): its kind is enough here.
        log.info("request %s: the stream broke mid-answer (%s); asking for a continuation after "
                 "%d characters",
                 self.preq.request_id, failure.end_reason, len(prefill))
        return Outcome.continue_with(failure, self.stitch.request(base, prefill))

    def _finish_translation(self, current: TryStream) -> ProxyError | None:
        """The translated answer's own end (its stop reason, usage and end marker), for an
        upstream that ended without its end marker; or why it cannot be ended.  The answer
        is recorded as complete before its last frames go out."""
        if current.translator is None:
            self._record_end(EventKind.DONE, None, current, [])
            return None
        try:
            frames = self._stitched(current.translator.finish(), current)
        except ProxyError as err:  # an unknown stop reason, say
            return err
        self._write_end(frames, EventKind.DONE, None, current)
        return None

    def _end_with_error(self, failure: ProxyError, status: int) -> None:
        try:
            if self._protocol_end is not None:  # the answer ended in its own words already
                self.writer.close()
                return
            outside = self.exchange.end_error
            if outside is None and getattr(self.writer, "client_gone", False):
                outside = ClientGone("the client went away while the stream was written")
            if outside is not None:
                self.writer.close()  # the terminal event, if any, went out with the end
                if isinstance(outside, ClientGone):
                    status = 499
                elif not self.commit.streaming:  # the server thread answers with its own status
                    status = self.preq.fmt.status_of(outside)
                self.record.failed(status, outside, self.writer.bytes_out)
                return
            frame = getattr(failure, "client_frame", None) or self.view.terminal_error(failure)
            self.record.failed(status, failure, self.writer.bytes_out + len(frame))
            self._tell_cost()  # before the terminal error, after which clients stop reading
            self.writer.close(frame)
        finally:
            self.deps.heartbeat.unregister(self.exchange)
