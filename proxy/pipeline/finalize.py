"""Finalize: a request's usage record, written through one object and queued exactly once.

Every stage tells the request's `RequestRecord` what happened through a named method; the
first of the ending methods (`complete`, `failed`, `upstream_error`) parses the usage from
the copy of the answer, prices it, masks secrets, queues the row on the tracker (never the
database, from a request thread) and logs one line.  After that the record is sealed: a
late write from another thread (a stream thread finishing its bookkeeping after a client
hung up) changes nothing, so the row that was queued is the row that is stored.

`InFlight` counts the records not finished yet and the memory their requests hold, so a
stopping worker can wait for its stream threads' rows and record any straggler itself.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Iterator, Protocol

from ..errors import ProxyError
from ..flag import Flag
from ..formats import Format, UsageParser
from ..limits import Reservation, parse_upstream_json
from ..metrics import Metrics, StreamTiming
from ..pricing import PriceTable
from ..redact import Redactor
from ..text import loggable
from ..usage import RECORD_FIELDS, EndReason, Usage, UsageRecord

log = logging.getLogger("proxy.requests")

BODY_COPY_LIMIT = 16 * 1024 * 1024  # larger JSON bodies are passed through but not parsed
ESTIMATE_DEPLOYMENT = "proxy-estimate"  # the row's deployment when the proxy answered itself


class RowSink(Protocol):
    """Where finished rows go: the tracker's queue (or nowhere, with tracking off)."""

    def record(self, rec: UsageRecord) -> None: ...


class RequestRecord:
    """The usage row of one request, and everything it is built from."""

    def __init__(self, sink: RowSink, prices: PriceTable, *, request_id: str, endpoint: str,
                 client_key_id: str | None, bytes_in: int, redactor: Redactor | None = None,
                 on_finish: Callable[["RequestRecord"], None] | None = None,
                 metrics: Metrics | None = None) -> None:
        self._sink = sink
        self._metrics = metrics
        # The stream's content events and chunks, for the metrics (None: metrics are off,
        # and the relay times nothing).
        self.timing = StreamTiming() if metrics is not None and metrics.enabled else None
        self._upstream_at: float | None = None  # when the first upstream call went out
        self._received_at: float | None = None  # when the client's body was read
        self._prices = prices
        self._redactor = redactor or Redactor()
        self._on_finish = on_finish
        self._t0 = time.monotonic()
        self._lock = threading.Lock()
        self._finished = False
        self._written = Flag()
        self._report_later = False  # log line and metrics after the answer's bytes
        self._unreported: UsageRecord | None = None
        self._usage_format: Format | None = None  # None: this endpoint bills nothing
        self._parser: UsageParser | None = None
        self._body = bytearray()
        self.body_bytes = 0
        self._earlier_calls: list[Usage] = []  # of an answer continued after a break
        self._answer = None  # a StoredAnswer to keep for replay, if this one completes
        self._keep: Callable | None = None
        self._hold = None  # the key's reservation, settled with the row (pipeline/gate)
        self.row = UsageRecord(request_id=request_id, started_at=time.time(), endpoint=endpoint,
                               client_key_id=client_key_id, bytes_in=bytes_in)

    # -- facts, as the stages learn them ---------------------------------------------
    def model_named(self, model: str | None) -> None:
        """The model the client asked for (known before the request is fully checked)."""
        self._set(model_requested=model)

    def in_session(self, session_id: str | None) -> None:
        """The client's session (proxy/sessions.py), for the report's session view."""
        if session_id is not None:
            self._set(session_id=session_id)

    def keyed(self, key_id: str, key_name: str) -> None:
        """The request carries this proxy key: rows are the key's, by id and by name."""
        self._set(client_key_id=key_id, key_name=key_name)

    def holds(self, hold) -> None:
        """The key's reservation for this request, settled to the real cost at the end."""
        with self._lock:
            if not self._finished:
                self._hold = hold
                return
        self._written.wait(5.0)  # finished meanwhile (shutdown): once its row is complete
        hold.settle(self.row)

    def received(self, bytes_in: int) -> None:
        """The client's body arrived whole (the proxy's own time starts now: the upload
        is the client's)."""
        self._received_at = time.monotonic()
        self._set(bytes_in=bytes_in)

    def admitted(self, *, stream: bool, usage_format: Format | None) -> None:
        """The request was parsed and checked: how its usage will be read."""
        self._set(stream=stream)
        self._usage_format = usage_format
        if usage_format is not None and stream:
            self._parser = usage_format.usage_parser()

    def try_started(self, deployment: str, upstream: Format | None = None,
                    continuation: bool = False, new_break: bool = False) -> None:
        """A new upstream try (the row names the deployment of the last one, which is the
        one that answered, if any): usage seen on a failed try is not this answer's usage.
        `upstream` is the format the try's answer comes in (another than the client's when
        it is translated): the row keeps the upstream's own usage, in its own terms.

        A continuation is a call of its own that completes an answer the client has in
        part: the usage of the call before it (what it reported, and at least the output
        the client got) is kept, to be added up with it, each priced for its own model.
        `new_break`: the first continuation try after a break (the row counts breaks
        continued, not the tries it took)."""
        if self._upstream_at is None:
            self._upstream_at = time.monotonic()
        if continuation:
            self._keep_earlier_call(new_break)
        self._set(deployment=deployment)
        if self._usage_format is not None and upstream is not None:
            self._usage_format = upstream
        if self._parser is not None:
            self._parser = self._usage_format.usage_parser()
        self._body.clear()
        self.body_bytes = 0

    def estimated_locally(self) -> None:
        """The proxy answered with its own estimate (count_tokens): no deployment was asked."""
        self._set(deployment=ESTIMATE_DEPLOYMENT, attempts=0)

    def _keep_earlier_call(self, new_break: bool) -> None:
        with self._lock:
            if self._finished or self._parser is None:
                return
            self._earlier_calls.append(self._parser.result())
            self.row.continuations += new_break

    def tries_so_far(self, attempts: int, fallbacks: int, attempt_log: str | None) -> None:
        self._set(attempts=attempts, fallbacks=fallbacks, attempt_log=attempt_log)

    def first_byte(self) -> None:
        if self.row.ttfb_ms is None:
            self._set(ttfb_ms=self._elapsed_ms())

    def first_token(self) -> None:
        if self.row.ttft_ms is None:
            self._set(ttft_ms=self._elapsed_ms())

    def content_event(self) -> None:
        """A content event went to the client (the metrics' time per chunk)."""
        if self.timing is not None:
            self.timing.content_event(time.monotonic())

    # -- copies of the answer ------------------------------------------------------------
    def observe_event(self, name: str | None, payload: Any) -> None:
        """A forwarded event's decoded data (decoded once, by the relay)."""
        if self._parser is not None:
            self._parser.feed(name, payload)

    def add_body_copy(self, chunk: bytes) -> None:
        self.body_bytes += len(chunk)
        if len(self._body) < BODY_COPY_LIMIT:
            self._body += chunk

    def attempt_input_tokens(self) -> int | None:
        """Input tokens a failed try had reported (the provider may bill them)."""
        return self._parser.result().input_tokens if self._parser is not None else None

    def body_error_message(self, fmt: Format) -> str | None:
        body = self._decoded_body()
        return fmt.upstream_error_message(body) if body is not None else None

    # -- dedup -------------------------------------------------------------------------------
    def keep_answer(self, answer, keep: Callable) -> None:
        """Should this request complete, `keep(answer)` (with its usage) is called before
        the row is queued: a duplicate finds the answer as soon as the row is stored."""
        with self._lock:
            if not self._finished:
                self._answer, self._keep = answer, keep

    @property
    def ended(self) -> bool:
        """Is the row written (its end reason, status and usage all set)?  Sealing comes
        first; a thread that reads the row of another must wait for this."""
        return self._written.is_set()

    def deduped(self, reason: EndReason, paid_by: str, usage: dict, status: int,
                bytes_out: int) -> None:
        """Answered without an upstream call (replayed, or joined to another request's):
        the paying request's tokens are kept for the report; this request cost nothing and
        saved what the answer cost the one that paid."""
        self._usage_format = self._parser = None
        fields = {name: usage.get(name) for name in ("input_tokens", "output_tokens",
                                                     "cache_read_tokens", "cache_write_tokens",
                                                     "reasoning_tokens", "stop_reason",
                                                     "upstream_model", "deployment")}
        self._set(**fields, usage_complete=bool(usage.get("usage_complete")), attempts=0,
                  paid_by=paid_by, cost_usd=0.0, priced=True,
                  saved_cost_usd=usage.get("cost_usd") if usage.get("priced") else None)
        self._finish(status, reason, None, bytes_out)

    def shared_failure(self, source: UsageRecord, status: int, bytes_out: int) -> None:
        """A joined request whose shared upstream call failed: it ends as that call did
        (nothing complete was delivered, so nothing was saved)."""
        self._usage_format = self._parser = None
        self._set(deployment=source.deployment, attempts=0)
        self._finish(status, EndReason(source.end_reason), source.error, bytes_out)

    # -- the end: the first of these counts --------------------------------------------------
    def complete(self, status: int, bytes_out: int) -> None:
        self._finish(status, EndReason.COMPLETE, None, bytes_out)

    def failed(self, status: int, err: ProxyError, bytes_out: int = 0) -> None:
        """Ended by one of the proxy's errors; the error says why (its end reason)."""
        self._finish(status, err.end_reason, err.message, bytes_out)

    def upstream_error(self, status: int, message: str | None, bytes_out: int = 0) -> None:
        """The upstream answered with an error (a status, or an error event) in its own words."""
        self._finish(status, EndReason.UPSTREAM_ERROR, message, bytes_out)

    def _finish(self, status: int, reason: EndReason, error: str | None, bytes_out: int) -> None:
        """Seal, complete and queue the row; never raises."""
        with self._lock:
            if self._finished:
                return
            self._finished = True
        try:
            rec = self.row
            rec.ended_at = time.time()
            rec.status, rec.end_reason, rec.error, rec.bytes_out = status, reason, error, bytes_out
            try:
                self._apply_usage(self._usage(status))
            except Exception:  # odd usage must not cost the row
                log.exception("request %s: usage could not be read", rec.request_id)
            self._mask_secrets(rec)
            if self._hold is not None:
                self._settle(rec)
            if self._answer is not None and reason is EndReason.COMPLETE and 200 <= status < 300:
                self._keep_answer(rec)
            self._sink.record(rec)
            self._written.set()
            with self._lock:
                later, self._unreported = self._report_later, rec
            if not later:
                self.report()
        finally:
            self._written.set()
            if self._on_finish is not None:
                self._on_finish(self)

    def report_after_answer(self) -> None:
        """The answer goes out whole after the row is queued: its log line and metrics
        wait until the server has written it (see `reported_after`), which takes them off
        the client's wait (~0.1 ms of a request)."""
        with self._lock:
            self._report_later = True

    def reported_after(self, body: list[bytes]) -> "ReportedAfter":
        """The answer's bytes, then its report, when the server asks for more after
        writing them (or closes the iterable unread)."""
        return ReportedAfter(body, self.report)

    def report(self) -> None:
        """The finished request's log line and metrics, once; never raises."""
        with self._lock:
            rec, self._unreported, self._report_later = self._unreported, None, False
        if rec is None:
            return
        try:
            self._log(rec)
            if self._metrics is not None:
                self._metrics.observe_request(rec, self.timing, self._overhead())
        except Exception:  # noqa: BLE001 - a log line must not cost the answer
            log.exception("request %s: its log line or metrics failed", rec.request_id)

    def _settle(self, rec: UsageRecord) -> None:
        try:
            self._hold.settle(rec)
        except Exception:  # the reservation stays (safe for the budget); the row must not go
            log.exception("request %s: its key's reservation could not be settled",
                          rec.request_id)
        self._hold = None

    def _keep_answer(self, rec: UsageRecord) -> None:
        try:
            self._keep(self._answer.settle(rec))
        except Exception:  # a cache: losing an entry must not cost the row
            log.exception("request %s: its answer could not be kept for replay", rec.request_id)
        self._answer = self._keep = None

    def _set(self, **fields: Any) -> None:
        with self._lock:
            if self._finished:
                return  # the row is queued: what it says stands
            for name, value in fields.items():
                setattr(self.row, name, value)

    def _mask_secrets(self, rec: UsageRecord) -> None:
        """Upstream text (error messages, an echoed model name) may quote a key."""
        if not self._redactor:
            return
        for name in RECORD_FIELDS:
            value = getattr(rec, name)
            if isinstance(value, str) and name != "end_reason":
                setattr(rec, name, self._redactor.text(value))

    def _usage(self, status: int) -> Usage | None:
        if self._parser is not None:
            return self._parser.result()
        if self._usage_format is not None and 200 <= status < 300 and self._body:
            body = self._decoded_body()
            if isinstance(body, dict):
                return self._usage_format.body_usage(body)
        return None

    def _apply_usage(self, usage: Usage | None) -> None:
        if self._earlier_calls:
            self._apply_calls(self._earlier_calls + [usage or Usage()])
            return
        if usage is None:
            return
        self.row.apply_usage(usage)
        if usage.bills_anything():
            self._prices.price_record(self.row)

    def _apply_calls(self, calls: list[Usage]) -> None:
        """A continued answer: every upstream call's tokens, each call priced for its own
        model; what the continuations' prompts cost is also kept apart."""
        total = Usage(model=next((c.model for c in reversed(calls) if c.model), None),
                      stop_reason=calls[-1].stop_reason, complete=calls[-1].complete)
        for field in ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens",
                      "reasoning_tokens"):
            counts = [getattr(c, field) for c in calls if getattr(c, field) is not None]
            setattr(total, field, sum(counts) if counts else None)
        self.row.apply_usage(total)
        fallback = self.row.upstream_model or self.row.model_requested
        billed = [call for call in calls if call.bills_anything()]
        costs = [self._prices.cost(call, model=call.model or fallback) for call in billed]
        known = [c for c in costs if c is not None]
        self.row.cost_usd = sum(known) if known else None
        # Priced only when every call that used tokens is: a part-priced row would make the
        # report's spend look whole (it counts the row as unpriced instead).
        self.row.priced = bool(known) and len(known) == len(costs)
        prompts = [p for p in (self._prices.cost(_prompt_of(c), model=c.model or fallback)
                               for c in calls[1:]) if p is not None]
        self.row.continuation_cost_usd = sum(prompts) if prompts else None  # unpriced: unknown

    def _decoded_body(self):
        try:
            return parse_upstream_json(bytes(self._body))
        except ValueError:
            return None

    def _overhead(self) -> float | None:
        """The proxy's own time before the upstream call: from the request's arrival (or,
        with a body, from its last byte) to the call (parsing, keys, routing, dedup)."""
        if self._upstream_at is None:
            return None
        return self._upstream_at - (self._received_at or self._t0)

    def _elapsed_ms(self) -> float:
        return round((time.monotonic() - self._t0) * 1000.0, 3)

    def _log(self, rec: UsageRecord) -> None:
        """One line per request; every field that a client or an upstream chose is escaped
        and capped, so none can forge a line or flood the log."""
        duration = (rec.ended_at - rec.started_at) * 1000.0
        cost = f"${rec.cost_usd:.6f}" if rec.cost_usd is not None else "unpriced"
        line = (f"request {rec.request_id} {rec.endpoint} status={rec.status} end={rec.end_reason} "
                f"model={loggable(rec.model_requested, 256)} deployment={loggable(rec.deployment, 128)} "
                f"upstream_model={loggable(rec.upstream_model, 256)} in={rec.input_tokens} "
                f"out={rec.output_tokens} cache_read={rec.cache_read_tokens} "
                f"cache_write={rec.cache_write_tokens} cost={cost} duration_ms={duration:.1f}")
        if rec.paid_by is not None:
            line += f" paid_by={rec.paid_by}"
        if rec.key_name is not None:
            line += f" key={loggable(rec.key_name, 128)}"
        if rec.end_reason in (EndReason.COMPLETE, EndReason.REPLAY, EndReason.JOINED):
            log.info("%s", line)
        else:
            log.warning("%s cause=%s", line, loggable(rec.error, 1000))


class ReportedAfter:
    """A WSGI body that calls `report` once its bytes are written: when the server asks
    for more after the last piece, or closes it (WSGI servers must), read or not."""

    __slots__ = ("_body", "_report")

    def __init__(self, body: list[bytes], report: Callable[[], None]) -> None:
        self._body, self._report = body, report

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._body
        finally:  # also when a wrapper that iterates it is closed early
            self._report()

    def close(self) -> None:
        self._report()


def _prompt_of(usage: Usage) -> Usage:
    """The input side of a call's usage (what sending the prompt again costs)."""
    return Usage(input_tokens=usage.input_tokens, cache_read_tokens=usage.cache_read_tokens,
                 cache_write_tokens=usage.cache_write_tokens, model=usage.model)


class InFlight:
    """Requests whose usage row is not recorded yet, and the memory they hold.

    A worker that stops waits here until its stream threads have finished their rows (so
    the tracker is closed after the last of them), and records any straggler itself."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._live: dict[RequestRecord, Reservation | None] = {}

    def add(self, record: RequestRecord) -> None:
        with self._cond:
            self._live[record] = None

    def hold(self, record: RequestRecord, reservation: Reservation) -> None:
        """Memory the request holds until it is finished."""
        with self._cond:
            if record in self._live:
                self._live[record] = reservation
                return
        reservation.release()

    def done(self, record: RequestRecord) -> None:
        with self._cond:
            reservation = self._live.pop(record, None)
            self._cond.notify_all()
        if reservation is not None:
            reservation.release()

    def wait_until_empty(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: not self._live, max(timeout, 0.0))

    def finish_remaining(self, err: ProxyError) -> int:
        """Record every request still open (at shutdown, when its thread did not make it)."""
        with self._cond:
            remaining = list(self._live)
        for record in remaining:
            record.failed(err.status, err)
        return len(remaining)
