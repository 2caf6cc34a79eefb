"""OpenAI Responses: named events with sequence numbers, a terminal `response.*` event."""

from __future__ import annotations

from typing import Any

from ..errors import ProxyError
from .base import EventKind, Format, StreamView, compact_json
from .openai_common import openai_error_object

PREAMBLE_EVENTS = {"response.created", "response.in_progress", "response.queued"}
DONE_EVENTS = {"response.completed", "response.incomplete"}
ERROR_EVENTS = {"error", "response.failed"}


class ResponsesFormat(Format):
    name = "openai-responses"
    provider_format = "openai"

    def classify(self, name: str | None, obj: Any, view: StreamView) -> EventKind:
        kind = obj.get("type") if isinstance(obj, dict) else None
        kind = kind or name
        if kind in PREAMBLE_EVENTS:
            return EventKind.PREAMBLE
        if kind in DONE_EVENTS:
            return EventKind.DONE
        if kind in ERROR_EVENTS:
            return EventKind.UPSTREAM_ERROR
        return EventKind.CONTENT

    def error_body(self, err: ProxyError, request_id: str | None = None) -> dict:
        return {"error": openai_error_object(err)}

    def terminal_error(self, err: ProxyError, view: StreamView) -> bytes:
        sequence = 0 if view.last_sequence is None else view.last_sequence + 1
        payload = {"type": "error", "code": err.openai_code or err.openai_type,
                   "message": err.message, "param": None, "sequence_number": sequence}
        return b"event: error\ndata: " + compact_json(payload) + b"\n\n"
