"""Anthropic Messages: named events, `event: error` mid-stream, `message_stop` at the end;
`x-api-key` credentials; usage that already excludes cached input (protocols.md §2)."""

from __future__ import annotations

from typing import Any

from ..errors import ProxyError
from ..usage import Usage
from .base import EventKind, Format, StreamView, compact_json
from .stitch import AnthropicStitch
from .usage_fields import DeliveredOutput, count, get, text

PREAMBLE_EVENTS = {"message_start", "ping"}

# The error type Anthropic's API uses for each of the proxy's own error codes.
_ERROR_TYPES = {
    "invalid_request": "invalid_request_error", "method_not_allowed": "invalid_request_error",
    "request_timeout": "invalid_request_error", "no_usable_deployment": "invalid_request_error",
    "not_found": "not_found_error", "request_too_large": "request_too_large",
    "proxy_overloaded": "overloaded_error", "proxy_shutting_down": "overloaded_error",
    "all_deployments_unavailable": "overloaded_error",
    "upstream_timeout": "timeout_error", "first_token_timeout": "timeout_error",
    "authentication_error": "authentication_error", "permission_denied": "permission_error",
    "rate_limit_exceeded": "rate_limit_error", "budget_exceeded": "billing_error",
    "limits_unavailable": "overloaded_error",
}
# ...and for an upstream's status, when an upstream error has to be told after the commit.
_ERROR_TYPES_BY_STATUS = {
    400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
    403: "permission_error", 404: "not_found_error", 409: "conflict_error",
    413: "request_too_large", 429: "rate_limit_error", 504: "timeout_error",
    529: "overloaded_error",
}
# The proxy itself is out of capacity or stopping: Anthropic says 529, which SDKs retry.
_OVERLOADED_CODES = frozenset({"proxy_overloaded", "proxy_shutting_down", "limits_unavailable"})


class AnthropicFormat(Format):
    name = "anthropic"
    provider_format = "anthropic"

    def credential_headers(self, key: str) -> list[tuple[str, str]]:
        return [("x-api-key", key)]

    def classify(self, name: str | None, obj: Any, view: StreamView) -> EventKind:
        kind = name or (obj.get("type") if isinstance(obj, dict) else None)
        if kind in PREAMBLE_EVENTS:
            return EventKind.PREAMBLE
        if kind == "message_stop":
            return EventKind.DONE
        if kind == "error":
            return EventKind.UPSTREAM_ERROR
        return EventKind.CONTENT

    def stitch(self, payload: dict) -> AnthropicStitch | None:
        thinking = payload.get("thinking")
        if isinstance(thinking, dict) and thinking.get("type") not in (None, "disabled"):
            return None  # Anthropic refuses a prefill with extended thinking
        return AnthropicStitch()

    def usage_parser(self) -> "AnthropicStreamUsage":
        return AnthropicStreamUsage()

    def body_usage(self, obj: Any) -> Usage:
        if not isinstance(obj, dict):
            return Usage()
        usage = anthropic_usage(obj.get("usage"))
        usage.stop_reason = text(obj.get("stop_reason"))
        usage.model = text(obj.get("model"))
        usage.complete = isinstance(obj.get("usage"), dict)
        return usage

    def status_of(self, err: ProxyError) -> int:
        return 529 if err.code in _OVERLOADED_CODES else err.status

    def error_type(self, err: ProxyError) -> str:
        if err.upstream_type:
            return err.upstream_type
        if err.upstream_status is not None:
            return _ERROR_TYPES_BY_STATUS.get(
                err.status, "api_error" if err.status >= 500 else "invalid_request_error")
        return _ERROR_TYPES.get(err.code, "api_error")

    def error_body(self, err: ProxyError, request_id: str | None = None) -> dict:
        body: dict = {"type": "error", "error": {"type": self.error_type(err), "message": err.message}}
        if request_id:
            body["request_id"] = request_id
        return body

    def terminal_error(self, err: ProxyError, view: StreamView) -> bytes:
        payload = {"type": "error", "error": {"type": self.error_type(err), "message": err.message}}
        return b"event: error\ndata: " + compact_json(payload) + b"\n\n"


def anthropic_usage(u: Any) -> Usage:
    """Anthropic ``usage``: input already excludes cache; thinking is a subset of output."""
    if not isinstance(u, dict):
        return Usage()
    return Usage(
        input_tokens=count(u.get("input_tokens")),
        output_tokens=count(u.get("output_tokens")),
        cache_read_tokens=count(u.get("cache_read_input_tokens")),
        cache_write_tokens=_cache_write(u),
        reasoning_tokens=count(get(u, "output_tokens_details", "thinking_tokens")),
    )


def _cache_write(u: dict) -> int | None:
    """``cache_creation_input_tokens``, or the sum of its per-TTL breakdown if only that came."""
    total = count(u.get("cache_creation_input_tokens"))
    if total is not None:
        return total
    split = u.get("cache_creation")
    if not isinstance(split, dict):
        return None
    parts = [p for p in (count(v) for v in split.values()) if p is not None]
    return sum(parts) if parts else None


class AnthropicStreamUsage:
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

    def feed(self, event_name: str | None, obj: Any) -> None:
        """Take one decoded event; unknown types, pings, errors and garbage change nothing."""
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
        self._model = text(message.get("model")) or self._model
        self._overwrite(message.get("usage"))

    def _on_delta(self, obj: dict) -> None:
        self._stop_reason = text(get(obj, "delta", "stop_reason")) or self._stop_reason
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
        return self._delivered.floor_output(usage)
