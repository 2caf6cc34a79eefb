"""What the proxy records about a request: normalised token usage and the usage row.

The shapes only; how each API reports its usage is the business of its module in
`formats/`, which turns it into a `Usage`.  Normalised meaning of the token fields,
whatever the upstream format:

- ``input_tokens``: uncached input, billed at the plain input price. Anthropic already reports
  it that way; OpenAI's ``prompt_tokens`` / ``input_tokens`` *include* cached (and cache-write)
  tokens, so the OpenAI formats subtract those, once, instead of every report.
- ``output_tokens``: all output, reasoning included.
- ``cache_read_tokens`` / ``cache_write_tokens``: prompt-cache hits and cache creation.
- ``reasoning_tokens``: the part of ``output_tokens`` spent thinking (informational; never add
  it to output again).

``None`` means "not reported", which is different from 0 and must stay different: a stream cut
before its final usage has unknown output, not zero output.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any, Mapping


class EndReason(enum.StrEnum):
    """How a request ended, as stored in its row (`complete` is the only success)."""

    COMPLETE = "complete"
    CLIENT_GONE = "client_gone"
    UPSTREAM_ERROR = "upstream_error"
    IDLE_TIMEOUT = "idle_timeout"
    FIRST_TOKEN_TIMEOUT = "first_token_timeout"
    CONNECT_ERROR = "connect_error"
    REJECTED = "rejected"
    REPLAY = "replay"  # a duplicate answered with a finished answer kept for replay
    JOINED = "joined"  # a duplicate that shared a live upstream call
    SHUTDOWN = "shutdown"


END_REASONS = tuple(reason.value for reason in EndReason)
DEDUP_REASONS = (EndReason.REPLAY.value, EndReason.JOINED.value)  # served without paying


@dataclass
class Usage:
    """Usage of one upstream response, normalised across formats (see the module docstring)."""

    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_read_tokens: int | None = None
    cache_write_tokens: int | None = None
    reasoning_tokens: int | None = None
    stop_reason: str | None = None
    model: str | None = None
    complete: bool = False

    def bills_anything(self) -> bool:
        """Does any billed token count say more than zero?  (Only then is a row priced.)"""
        return any((self.input_tokens, self.output_tokens, self.cache_read_tokens,
                    self.cache_write_tokens))


@dataclass(slots=True)
class UsageRecord:
    """One row per request, whatever happened to it (design.md §4).

    Every field has a default; the request's `RequestRecord` (pipeline/finalize.py) is the
    one writer of these fields and hands the row to the tracker exactly once.
    """

    request_id: str = ""
    started_at: float = 0.0
    ended_at: float = 0.0
    ttfb_ms: float | None = None
    ttft_ms: float | None = None
    endpoint: str = ""
    model_requested: str | None = None
    deployment: str | None = None
    upstream_model: str | None = None
    attempts: int = 1
    fallbacks: int = 0
    status: int = 0
    end_reason: str = EndReason.COMPLETE
    stop_reason: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_read_tokens: int | None = None
    cache_write_tokens: int | None = None
    reasoning_tokens: int | None = None
    cost_usd: float | None = None
    priced: bool = False
    usage_complete: bool = False
    client_key_id: str | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    error: str | None = None
    stream: bool = False
    attempt_log: str | None = None  # JSON: the failed tries before the answer (routing)
    continuations: int = 0  # calls that continued the answer after a stream broke mid-answer
    continuation_cost_usd: float | None = None  # what sending the prompt again cost them
    paid_by: str | None = None  # a replayed or joined request: the request that paid
    saved_cost_usd: float | None = None  # ...and what its answer cost that request
    key_name: str | None = None  # the proxy key that made the request (keys mode)
    session_id: str | None = None  # the client's session (proxy/sessions.py), for reports

    def apply_usage(self, usage: Usage) -> None:
        """Copy parsed usage in; the upstream's own model name wins over the routed one."""
        self.input_tokens = usage.input_tokens
        self.output_tokens = usage.output_tokens
        self.cache_read_tokens = usage.cache_read_tokens
        self.cache_write_tokens = usage.cache_write_tokens
        self.reasoning_tokens = usage.reasoning_tokens
        self.stop_reason = usage.stop_reason
        self.usage_complete = usage.complete
        self.upstream_model = usage.model or self.upstream_model

    def to_row(self) -> dict:
        """A flat dict of plain values, for SQL parameters and the JSON spill file.

        Every field is already a plain value, so no deep copy (dataclasses.asdict costs
        ~20 us per row, on the request thread).  The end reason is stored as its text."""
        row = {name: getattr(self, name) for name in RECORD_FIELDS}
        row["end_reason"] = str(row["end_reason"])
        return row

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "UsageRecord":
        """Rebuild from a stored row; unknown columns are ignored, missing ones defaulted."""
        present = set(row.keys())
        data = {name: row[name] for name in RECORD_FIELDS if name in present}
        for name in _BOOL_FIELDS:
            if name in data:
                data[name] = bool(data[name])
        return cls(**data)


RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(UsageRecord))
_BOOL_FIELDS = ("priced", "usage_complete", "stream")

# Longest text stored per field (longer values are cut with a marker that says so): a client
# chooses the model name and an upstream its error message, and either can be megabytes.
TEXT_LIMITS = {
    "request_id": 64, "paid_by": 64, "key_name": 128, "session_id": 128, "endpoint": 64, "end_reason": 64, "client_key_id": 64,
    "model_requested": 256, "deployment": 256, "upstream_model": 256, "stop_reason": 128,
    "error": 2000, "attempt_log": 64 * 1024,
}
DEFAULT_TEXT_LIMIT = 1024
