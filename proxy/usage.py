"""Token usage: what each API format reports, normalised to one shape.

Everything here is pure: parsers take SSE events (name and raw data string) or decoded JSON
bodies and return values. No sockets, threads, clocks or logging, so every rule can be tested
with byte-exact transcripts (protocols.md §2.3, §3.1, §4.2, §7).

Normalised meaning of the token fields, whatever the upstream format:

- ``input_tokens``: uncached input, billed at the plain input price. Anthropic already reports
  it that way; OpenAI's ``prompt_tokens`` / ``input_tokens`` *include* cached (and cache-write)
  tokens, so those are subtracted here, once, instead of in every report.
- ``output_tokens``: all output, reasoning included.
- ``cache_read_tokens`` / ``cache_write_tokens``: prompt-cache hits and cache creation.
- ``reasoning_tokens``: the part of ``output_tokens`` spent thinking (informational; never add
  it to output again).

``None`` means "not reported", which is different from 0 and must stay different: a stream cut
before its final usage has unknown output, not zero output.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Mapping

FORMATS = ("anthropic", "openai-chat", "openai-responses")

END_REASONS = (
    "complete",
    "client_gone",
    "upstream_error",
    "idle_timeout",
    "first_token_timeout",
    "connect_error",
    "rejected",
    "replayed",
    "shutdown",
)

# Terminal Responses events that carry the final ``response`` object. ``response.done`` is not
# documented by OpenAI but is sent by Codex-style backends (protocols.md §4.1); reading its usage
# costs nothing and loses nothing.
_RESPONSES_TERMINAL = (
    "response.completed",
    "response.incomplete",
    "response.failed",
    "response.done",
)


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

    def has_tokens(self) -> bool:
        """True when any token count was reported (a rejected request has none)."""
        return any(v is not None for v in _token_values(self))


def _token_values(obj: Any) -> tuple:
    return (
        obj.input_tokens,
        obj.output_tokens,
        obj.cache_read_tokens,
        obj.cache_write_tokens,
        obj.reasoning_tokens,
    )


# ---------------------------------------------------------------------------------------------
# Small JSON helpers. Upstreams (and OpenAI-compatible vendors) send odd shapes; none of these
# raise, because accounting must never break the relay.


def _loads(data: str | bytes) -> Any:
    """Decode one SSE data payload; ``None`` for ``[DONE]``, empty or malformed data."""
    try:
        return json.loads(data)
    except (TypeError, ValueError):
        return None


def _get(obj: Any, *keys: str) -> Any:
    """Nested dict lookup that yields None instead of raising on a missing or odd level."""
    for key in keys:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def _int(value: Any) -> int | None:
    """A token count, or None; bools and non-numbers are not counts."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _uncached(total: int | None, *parts: int | None) -> int | None:
    """OpenAI input minus the cached parts it includes, never below zero."""
    if total is None:
        return None
    return max(total - sum(p or 0 for p in parts), 0)


# ---------------------------------------------------------------------------------------------
# Normalisers: one per format, from that format's raw usage object.


def _anthropic_cache_write(u: dict) -> int | None:
    """``cache_creation_input_tokens``, or the sum of its per-TTL breakdown if only that came."""
    total = _int(u.get("cache_creation_input_tokens"))
    if total is not None:
        return total
    split = u.get("cache_creation")
    if not isinstance(split, dict):
        return None
    parts = [_int(v) for v in split.values()]
    parts = [p for p in parts if p is not None]
    return sum(parts) if parts else None


def anthropic_usage(u: Any) -> Usage:
    """Anthropic ``usage``: input already excludes cache; thinking is a subset of output."""
    if not isinstance(u, dict):
        return Usage()
    return Usage(
        input_tokens=_int(u.get("input_tokens")),
        output_tokens=_int(u.get("output_tokens")),
        cache_read_tokens=_int(u.get("cache_read_input_tokens")),
        cache_write_tokens=_anthropic_cache_write(u),
        reasoning_tokens=_int(_get(u, "output_tokens_details", "thinking_tokens")),
    )


def chat_usage(u: Any) -> Usage:
    """OpenAI chat ``CompletionUsage``: ``prompt_tokens`` includes cached and cache-write."""
    if not isinstance(u, dict):
        return Usage()
    cached = _int(_get(u, "prompt_tokens_details", "cached_tokens"))
    written = _int(_get(u, "prompt_tokens_details", "cache_write_tokens"))
    return Usage(
        input_tokens=_uncached(_int(u.get("prompt_tokens")), cached, written),
        output_tokens=_int(u.get("completion_tokens")),
        cache_read_tokens=cached,
        cache_write_tokens=written,
        reasoning_tokens=_int(_get(u, "completion_tokens_details", "reasoning_tokens")),
    )


def responses_usage(u: Any) -> Usage:
    """OpenAI ``ResponseUsage``: ``input_tokens`` includes cached and cache-write."""
    if not isinstance(u, dict):
        return Usage()
    cached = _int(_get(u, "input_tokens_details", "cached_tokens"))
    written = _int(_get(u, "input_tokens_details", "cache_write_tokens"))
    return Usage(
        input_tokens=_uncached(_int(u.get("input_tokens")), cached, written),
        output_tokens=_int(u.get("output_tokens")),
        cache_read_tokens=cached,
        cache_write_tokens=written,
        reasoning_tokens=_int(_get(u, "output_tokens_details", "reasoning_tokens")),
    )


# ---------------------------------------------------------------------------------------------
# Stream parsers. Each sees a copy of every SSE event the relay forwards.


class DeliveredOutput:
    """What reached the client of an answer's output (text, thinking, tool arguments).

    OpenAI streams report usage only at the very end and Anthropic's ``message_start``
    says ``output_tokens: 1``, so a stream that breaks after content would be recorded
    with no output at all, though the client got (and the provider bills) part of an
    answer.  The estimate is the common rule of thumb, a token per 4 characters, and never
    less than one token per content delta; reported counts always win over it.
    """

    def __init__(self) -> None:
        self.chars = 0
        self.deltas = 0

    def add(self, *pieces: Any) -> None:
        counted = False
        for piece in pieces:
            if isinstance(piece, str) and piece:
                self.chars += len(piece)
                counted = True
        self.deltas += counted

    def estimate(self) -> int | None:
        if not self.deltas:
            return None
        return max(self.deltas, -(-self.chars // 4))


def _with_estimate(usage: Usage, delivered: DeliveredOutput) -> Usage:
    """A stream that ended without its final usage: output is at least what was delivered."""
    estimate = delivered.estimate()
    if not usage.complete and estimate is not None:
        usage.output_tokens = max(usage.output_tokens or 0, estimate)
    return usage


class AnthropicStreamParser:
    """Messages stream: usage from ``message_start``, overwritten by each ``message_delta``.

    Counts in ``message_delta.usage`` are cumulative totals, so a present field replaces the
    earlier value and is never added (server tools can raise ``input_tokens`` mid-stream).
    """

    def __init__(self) -> None:
        self._usage: dict = {}
        self._stop_reason: str | None = None
        self._model: str | None = None
        self._complete = False
        self._delivered = DeliveredOutput()

    def feed(self, event_name: str | None, data: str | bytes) -> None:
        """Take one event; unknown types, pings, errors and garbage change nothing."""
        self.feed_object(event_name, _loads(data))

    def feed_object(self, event_name: str | None, obj: Any) -> None:
        """The same, for an event whose data the relay has already decoded."""
        if not isinstance(obj, dict):
            return
        kind = obj.get("type") or event_name
        if kind == "message_start":
            self._on_start(obj.get("message"))
        elif kind == "message_delta":
            self._on_delta(obj)
        elif kind == "message_stop":
            self._complete = True
        elif kind == "content_block_delta":
            delta = obj.get("delta")
            if isinstance(delta, dict):
                self._delivered.add(delta.get("text"), delta.get("thinking"),
                                    delta.get("partial_json"))

    def _on_start(self, message: Any) -> None:
        if not isinstance(message, dict):
            return
        self._model = _str(message.get("model")) or self._model
        self._overwrite(message.get("usage"))

    def _on_delta(self, obj: dict) -> None:
        self._stop_reason = _str(_get(obj, "delta", "stop_reason")) or self._stop_reason
        if isinstance(obj.get("usage"), dict):
            self._overwrite(obj["usage"])
            self._complete = True

    def _overwrite(self, usage: Any) -> None:
        if isinstance(usage, dict):
            self._usage.update({k: v for k, v in usage.items() if v is not None})

    def result(self) -> Usage:
        """What was seen so far; ``complete`` only once the final counts arrived."""
        usage = anthropic_usage(self._usage)
        usage.stop_reason = self._stop_reason
        usage.model = self._model
        usage.complete = self._complete
        return _with_estimate(usage, self._delivered)


class ChatStreamParser:
    """Chat Completions stream: the last chunk with a non-null ``usage`` wins.

    OpenAI puts usage on an extra empty-``choices`` chunk (only with ``include_usage``); vLLM
    sends ``choices: null``; Gemini's compatible endpoint puts it on the last content chunk.
    """

    def __init__(self) -> None:
        self._usage: dict | None = None
        self._stop_reason: str | None = None
        self._model: str | None = None
        self._delivered = DeliveredOutput()

    def feed(self, event_name: str | None, data: str | bytes) -> None:
        """Take one event; ``[DONE]``, error chunks and garbage change nothing."""
        self.feed_object(event_name, _loads(data))

    def feed_object(self, event_name: str | None, obj: Any) -> None:
        """The same, for an event whose data the relay has already decoded."""
        if not isinstance(obj, dict):
            return
        self._model = _str(obj.get("model")) or self._model
        self._stop_reason = _finish_reason(obj.get("choices")) or self._stop_reason
        if isinstance(obj.get("usage"), dict):
            self._usage = obj["usage"]
        if isinstance(obj.get("choices"), list):
            for choice in obj["choices"]:
                self._note_delta(choice.get("delta") if isinstance(choice, dict) else None)

    def _note_delta(self, delta: Any) -> None:
        if not isinstance(delta, dict):
            return
        calls = delta.get("tool_calls")
        arguments = [_get(call, "function", "arguments") for call in calls] \
            if isinstance(calls, list) else []
        self._delivered.add(delta.get("content"), delta.get("reasoning_content"),
                            delta.get("reasoning"), delta.get("refusal"), *arguments)

    def result(self) -> Usage:
        usage = chat_usage(self._usage)
        usage.stop_reason = self._stop_reason
        usage.model = self._model
        usage.complete = self._usage is not None
        return _with_estimate(usage, self._delivered)


def _finish_reason(choices: Any) -> str | None:
    """The last non-null ``finish_reason`` among the chunk's choices."""
    if not isinstance(choices, list):
        return None
    reasons = [_str(c.get("finish_reason")) for c in choices if isinstance(c, dict)]
    reasons = [r for r in reasons if r]
    return reasons[-1] if reasons else None


class ResponsesStreamParser:
    """Responses stream: usage only arrives on the terminal event's ``response`` object."""

    def __init__(self) -> None:
        self._result = Usage()
        self._delivered = DeliveredOutput()

    def feed(self, event_name: str | None, data: str | bytes) -> None:
        """Take one event; the model comes from any lifecycle event, usage from the last one."""
        self.feed_object(event_name, _loads(data))

    def feed_object(self, event_name: str | None, obj: Any) -> None:
        """The same, for an event whose data the relay has already decoded."""
        if not isinstance(obj, dict):
            return
        kind = obj.get("type") or event_name
        if isinstance(kind, str) and kind.endswith(".delta"):
            self._delivered.add(obj.get("delta"))  # text, reasoning, tool arguments
            return
        response = obj.get("response")
        if not isinstance(response, dict):
            return
        if kind in _RESPONSES_TERMINAL:
            self._result = _response_object_usage(response, fallback_model=self._result.model)
        else:
            self._result.model = _str(response.get("model")) or self._result.model

    def result(self) -> Usage:
        return _with_estimate(dataclasses.replace(self._result), self._delivered)


def _response_object_usage(response: dict, fallback_model: str | None = None) -> Usage:
    """Usage of a Responses ``response`` object; the stop reason is its status or why."""
    usage = responses_usage(response.get("usage"))
    usage.model = _str(response.get("model")) or fallback_model
    usage.stop_reason = (
        _str(_get(response, "incomplete_details", "reason")) or _str(response.get("status"))
    )
    usage.complete = isinstance(response.get("usage"), dict)
    return usage


_PARSERS = {
    "anthropic": AnthropicStreamParser,
    "openai-chat": ChatStreamParser,
    "openai-responses": ResponsesStreamParser,
}


def stream_parser(fmt: str):
    """A fresh usage parser for one stream of ``fmt`` (one of ``FORMATS``)."""
    try:
        return _PARSERS[fmt]()
    except KeyError:
        raise ValueError(f"unknown API format {fmt!r}; expected one of {FORMATS}") from None


# ---------------------------------------------------------------------------------------------
# Non-streaming bodies.


def _anthropic_body(obj: dict) -> Usage:
    usage = anthropic_usage(obj.get("usage"))
    usage.stop_reason = _str(obj.get("stop_reason"))
    usage.model = _str(obj.get("model"))
    usage.complete = isinstance(obj.get("usage"), dict)
    return usage


def _chat_body(obj: dict) -> Usage:
    usage = chat_usage(obj.get("usage"))
    usage.stop_reason = _finish_reason(obj.get("choices"))
    usage.model = _str(obj.get("model"))
    usage.complete = isinstance(obj.get("usage"), dict)
    return usage


_BODY_PARSERS = {
    "anthropic": _anthropic_body,
    "openai-chat": _chat_body,
    "openai-responses": _response_object_usage,
}


def parse_body(fmt: str, obj: Any) -> Usage:
    """Usage of a non-streaming JSON body (Anthropic message, chat.completion, response).

    Not for count_tokens bodies: those are estimates, not billed usage.
    """
    if fmt not in _BODY_PARSERS:
        raise ValueError(f"unknown API format {fmt!r}; expected one of {FORMATS}")
    if not isinstance(obj, dict):
        return Usage()
    return _BODY_PARSERS[fmt](obj)


def is_usage_only_chunk(obj: Any) -> bool:
    """A chat chunk that only carries usage: the proxy strips it when it injected include_usage.

    A chunk with choices *and* usage (Gemini's style) carries content and must be forwarded.
    """
    return (
        isinstance(obj, dict)
        and not obj.get("choices")
        and isinstance(obj.get("usage"), dict)
    )


# ---------------------------------------------------------------------------------------------
# The stored record.


@dataclass
class UsageRecord:
    """One row per request, whatever happened to it (design.md §4).

    Every field has a default so the request path can fill it in as facts become known;
    ``finalize`` then hands it to the tracker exactly once.
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
    end_reason: str = "complete"
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

    def has_tokens(self) -> bool:
        return any(v is not None for v in _token_values(self))

    def to_row(self) -> dict:
        """A flat dict of plain values, for SQL parameters and the JSON spill file.

        Every field is already a plain value, so no deep copy (dataclasses.asdict costs
        ~20 us per row, on the request thread)."""
        return {name: getattr(self, name) for name in RECORD_FIELDS}

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
    "request_id": 64, "endpoint": 64, "end_reason": 64, "client_key_id": 64,
    "model_requested": 256, "deployment": 256, "upstream_model": 256, "stop_reason": 128,
    "error": 2000, "attempt_log": 64 * 1024,
}
DEFAULT_TEXT_LIMIT = 1024
