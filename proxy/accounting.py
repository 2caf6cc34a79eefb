"""Per-request accounting: builds the usage record and finalizes it exactly once.

The relay hands every forwarded event (or a copy of a JSON body) to the request's
`Accounting`; whatever way the request ends, `finish()` is called and only its first call
counts.  The record goes to the tracker's queue (never to the database from a request
thread) and one log line says how the request ended, without any credential.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from .limits import Reservation, parse_upstream_json
from .redact import Redactor
from .text import loggable
from .usage import RECORD_FIELDS, Usage, UsageRecord, parse_body, stream_parser

log = logging.getLogger("proxy.requests")

BODY_COPY_LIMIT = 16 * 1024 * 1024  # larger JSON bodies are passed through but not parsed


class Accounting:
    def __init__(self, tracker, prices, *, request_id: str, endpoint: str, usage_format: str | None,
                 model: str | None, deployment: str | None, stream: bool, client_key_id: str | None,
                 bytes_in: int, redactor: Redactor | None = None,
                 on_finish: Callable[["Accounting"], None] | None = None) -> None:
        self._tracker = tracker
        self._prices = prices
        self._redactor = redactor or Redactor()
        self._on_finish = on_finish
        self._usage_format = usage_format
        self._t0 = time.monotonic()
        self._lock = threading.Lock()
        self._finished = False
        self._parser = stream_parser(usage_format) if usage_format and stream else None
        self._body = bytearray()
        self.body_bytes = 0
        self.record = UsageRecord(
            request_id=request_id, started_at=time.time(), endpoint=endpoint,
            model_requested=model, deployment=deployment, stream=stream,
            client_key_id=client_key_id, bytes_in=bytes_in)

    # -- observations ------------------------------------------------------------------
    def start_stream_parser(self) -> None:
        """The request turned out to be a stream: usage will come from its events."""
        if self._usage_format and self._parser is None:
            self._parser = stream_parser(self._usage_format)

    def begin_attempt(self, deployment: str) -> None:
        """A new upstream try: usage seen on a failed one is not this answer's usage."""
        self.record.deployment = deployment
        if self._parser is not None:
            self._parser = stream_parser(self._usage_format)
        self._body.clear()
        self.body_bytes = 0

    def attempt_input_tokens(self) -> int | None:
        """Input tokens a failed try had reported (the provider may bill them)."""
        return self._parser.result().input_tokens if self._parser is not None else None

    def set_attempt_log(self, plan) -> None:
        from .routing import attempt_log_json
        self.record.attempt_log = attempt_log_json(plan)

    def first_byte(self) -> None:
        if self.record.ttfb_ms is None:
            self.record.ttfb_ms = self._elapsed_ms()

    def first_token(self) -> None:
        if self.record.ttft_ms is None:
            self.record.ttft_ms = self._elapsed_ms()

    def observe_event(self, name: str | None, payload: object) -> None:
        """A forwarded event's decoded data (decoded once, by the relay)."""
        if self._parser is not None:
            self._parser.feed_object(name, payload)

    def add_body_copy(self, chunk: bytes) -> None:
        self.body_bytes += len(chunk)
        if len(self._body) < BODY_COPY_LIMIT:
            self._body += chunk

    def body_error_message(self, fmt) -> str | None:
        body = self._decoded_body_json()
        return fmt.upstream_error_message(body) if body is not None else None

    # -- the end ---------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return self._finished

    def finish(self, status: int, end_reason: str, *, error: str | None = None,
               bytes_out: int = 0) -> None:
        """Record how the request ended; only the first call counts, and it never raises."""
        with self._lock:
            if self._finished:
                return
            self._finished = True
        try:
            rec = self.record
            rec.ended_at = time.time()
            rec.status = status
            rec.end_reason = end_reason
            rec.error = error
            rec.bytes_out = bytes_out
            try:
                self._apply_usage(self._usage(status))
            except Exception:  # odd usage must not cost the row
                log.exception("request %s: usage could not be read", rec.request_id)
            self._mask_secrets(rec)
            self._tracker.record(rec)
            self._log(rec)
        finally:
            if self._on_finish is not None:
                self._on_finish(self)

    def _mask_secrets(self, rec: UsageRecord) -> None:
        """Upstream text (error messages, an echoed model name) may quote a key."""
        if not self._redactor:
            return
        for name in RECORD_FIELDS:
            value = getattr(rec, name)
            if isinstance(value, str):
                setattr(rec, name, self._redactor.text(value))

    def _usage(self, status: int) -> Usage | None:
        if self._parser is not None:
            return self._parser.result()
        if self._usage_format and 200 <= status < 300 and self._body:
            body = self._decoded_body_json()
            if isinstance(body, dict):
                return parse_body(self._usage_format, body)
        return None

    def _apply_usage(self, usage: Usage | None) -> None:
        rec = self.record
        if usage is None:
            return
        rec.apply_usage(usage)
        if _has_tokens(usage):
            self._prices.price_record(rec)

    def _decoded_body_json(self):
        try:
            return parse_upstream_json(bytes(self._body))
        except ValueError:
            return None

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
        if rec.end_reason == "complete":
            log.info("%s", line)
        else:
            log.warning("%s cause=%s", line, loggable(rec.error, 1000))


def _has_tokens(usage: Usage) -> bool:
    return any(v for v in (usage.input_tokens, usage.output_tokens, usage.cache_read_tokens,
                           usage.cache_write_tokens))


class InFlight:
    """Requests whose usage row is not recorded yet, and the memory they hold.

    A worker that stops waits here until its stream threads have finished their rows (so
    the tracker is closed after the last of them), and records any straggler itself."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._live: dict[Accounting, Reservation | None] = {}

    def add(self, acct: Accounting) -> None:
        with self._cond:
            self._live[acct] = None

    def hold(self, acct: Accounting, reservation: Reservation) -> None:
        """Memory the request holds until it is finished."""
        with self._cond:
            if acct in self._live:
                self._live[acct] = reservation
                return
        reservation.release()

    def done(self, acct: Accounting) -> None:
        with self._cond:
            reservation = self._live.pop(acct, None)
            self._cond.notify_all()
        if reservation is not None:
            reservation.release()

    def count(self) -> int:
        with self._cond:
            return len(self._live)

    def wait_until_empty(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: not self._live, max(timeout, 0.0))

    def finish_remaining(self, status: int, end_reason: str, error: str) -> int:
        """Record every request still open (at shutdown, when its thread did not make it)."""
        with self._cond:
            remaining = list(self._live)
        for acct in remaining:
            acct.finish(status, end_reason, error=error)
        return len(remaining)
