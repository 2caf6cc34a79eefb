"""OpenAI Responses: named events with sequence numbers, a terminal `response.*` event that
carries the whole `response` object and its usage (protocols.md §4)."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import ProxyError
from ..usage import Usage
from .base import EventKind, Format, StreamView, compact_json
from .openai_common import bearer, openai_error_object, openai_error_type, openai_usage
from .stitch import ResponsesStitch
from .usage_fields import DeliveredOutput, get, text

PREAMBLE_EVENTS = {"response.created", "response.in_progress", "response.queued"}
DONE_EVENTS = {"response.completed", "response.incomplete"}
ERROR_EVENTS = {"error", "response.failed"}
# Terminal events that carry the final ``response`` object. ``response.done`` is not
# documented by OpenAI but is sent by Codex-style backends (protocols.md §4.1); reading its
# usage costs nothing and loses nothing.
USAGE_EVENTS = {"response.completed", "response.incomplete", "response.failed", "response.done"}


class ResponsesFormat(Format):
    name = "openai-responses"
    provider_format = "openai"

    def credential_headers(self, key: str) -> list[tuple[str, str]]:
        return bearer(key)

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

    def stitch(self, payload: dict) -> ResponsesStitch | None:
        reasoning = payload.get("reasoning")
        if isinstance(reasoning, dict) and reasoning.get("effort") not in (None, "none"):
            return None  # reasoning cannot be prefilled
        return ResponsesStitch()

    def usage_parser(self) -> "ResponsesStreamUsage":
        return ResponsesStreamUsage()

    def body_usage(self, obj: Any) -> Usage:
        return response_object_usage(obj) if isinstance(obj, dict) else Usage()

    def upstream_error_type(self, body: Any) -> str | None:
        """Under `error` (an error answer), else an `error` event's `code`, else the code
        of a failed response."""
        found = super().upstream_error_type(body)
        if found or not isinstance(body, dict):
            return found
        code = body.get("code") if body.get("type") == "error" else get(body, "response", "error", "code")
        return code if isinstance(code, str) else None

    def error_type(self, err: ProxyError) -> str:
        return openai_error_type(err)

    def error_body(self, err: ProxyError, request_id: str | None = None) -> dict:
        return {"error": openai_error_object(err)}

    def terminal_error(self, err: ProxyError, view: StreamView) -> bytes:
        error = openai_error_object(err)
        sequence = 0 if view.last_sequence is None else view.last_sequence + 1
        payload = {"type": "error", "code": error["code"] or error["type"],
                   "message": err.message, "param": None, "sequence_number": sequence}
        return b"event: error\ndata: " + compact_json(payload) + b"\n\n"


def responses_usage(u: Any) -> Usage:
    """OpenAI ``ResponseUsage``: ``input_tokens`` includes cached and cache-write."""
    return openai_usage(u, "input_tokens", "output_tokens")


def response_object_usage(response: dict, fallback_model: str | None = None) -> Usage:
    """Usage of a Responses ``response`` object; the stop reason is its status or why."""
    usage = responses_usage(response.get("usage"))
    usage.model = text(response.get("model")) or fallback_model
    usage.stop_reason = (
        text(get(response, "incomplete_details", "reason")) or text(response.get("status"))
    )
    usage.complete = isinstance(response.get("usage"), dict)
    return usage


class ResponsesStreamUsage:
    """Responses stream: usage only arrives on the terminal event's ``response`` object."""

    def __init__(self) -> None:
        self._result = Usage()
        self._delivered = DeliveredOutput()

    def feed(self, event_name: str | None, obj: Any) -> None:
        """Take one decoded event; the model comes from any lifecycle event, usage from the
        terminal one."""
        if not isinstance(obj, dict):
            return
        kind = obj.get("type") or event_name
        if isinstance(kind, str) and kind.endswith(".delta"):
            self._delivered.add(obj.get("delta"))  # text, reasoning, tool arguments
            return
        response = obj.get("response")
        if not isinstance(response, dict):
            return
        if kind in USAGE_EVENTS:
            self._result = response_object_usage(response, fallback_model=self._result.model)
        else:
            self._result.model = text(response.get("model")) or self._result.model

    def result(self) -> Usage:
        return self._delivered.floor_output(dataclasses.replace(self._result))
