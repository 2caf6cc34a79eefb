"""Anthropic Messages: named events, `event: error` mid-stream, `message_stop` at the end."""

from __future__ import annotations

from typing import Any

from ..errors import ProxyError
from .base import EventKind, Format, StreamView, compact_json

PREAMBLE_EVENTS = {"message_start", "ping"}


class AnthropicFormat(Format):
    name = "anthropic"
    provider_format = "anthropic"

    def classify(self, name: str | None, obj: Any, view: StreamView) -> EventKind:
        kind = name or (obj.get("type") if isinstance(obj, dict) else None)
        if kind in PREAMBLE_EVENTS:
            return EventKind.PREAMBLE
        if kind == "message_stop":
            return EventKind.DONE
        if kind == "error":
            return EventKind.UPSTREAM_ERROR
        return EventKind.CONTENT

    def status_of(self, err: ProxyError) -> int:
        return err.anthropic_status or err.status  # 529 for overloaded, as Anthropic does

    def error_body(self, err: ProxyError, request_id: str | None = None) -> dict:
        body: dict = {"type": "error", "error": {"type": err.anthropic_type, "message": err.message}}
        if request_id:
            body["request_id"] = request_id
        return body

    def terminal_error(self, err: ProxyError, view: StreamView) -> bytes:
        payload = {"type": "error", "error": {"type": err.anthropic_type, "message": err.message}}
        return b"event: error\ndata: " + compact_json(payload) + b"\n\n"
