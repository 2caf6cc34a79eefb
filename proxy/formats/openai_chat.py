"""OpenAI Chat Completions: data-only chunks, `data: [DONE]` at the end."""

from __future__ import annotations

from typing import Any

from ..errors import ProxyError
from ..usage import is_usage_only_chunk
from .base import EventKind, Format, StreamView, compact_json
from .openai_common import openai_error_object

DONE_MARKER = "[DONE]"


def is_role_only_chunk(obj: dict) -> bool:
    """The opening chunk that only announces the assistant role (no content yet)."""
    choices = obj.get("choices")
    if not choices or obj.get("usage"):
        return False
    for choice in choices:
        delta = choice.get("delta") or {}
        if choice.get("finish_reason") or delta.get("tool_calls") or delta.get("function_call"):
            return False
        if delta.get("content") or delta.get("refusal"):
            return False
    return True


class ChatView(StreamView):
    """Chat streams may end without `[DONE]` (some OpenAI-compatible servers do): such an
    answer is whole when every choice it opened has its finish reason."""

    def __init__(self, fmt: Format, **kwargs: Any) -> None:
        super().__init__(fmt, **kwargs)
        self.open_choices: set[int] = set()
        self.finished_choices: set[int] = set()

    def note_choices(self, choices: Any) -> None:
        if not isinstance(choices, list):
            return
        for choice in choices:
            if isinstance(choice, dict) and isinstance(choice.get("index"), int):
                self.open_choices.add(choice["index"])
                if choice.get("finish_reason"):
                    self.finished_choices.add(choice["index"])


class ChatFormat(Format):
    name = "openai-chat"
    provider_format = "openai"

    def stream_view(self, **kwargs: Any) -> StreamView:
        return ChatView(self, **kwargs)

    def complete_without_end_marker(self, view: StreamView) -> bool:
        assert isinstance(view, ChatView)
        return bool(view.open_choices) and view.open_choices <= view.finished_choices

    def classify(self, name: str | None, obj: Any, view: StreamView) -> EventKind:
        if obj == DONE_MARKER:
            return EventKind.DONE
        if not isinstance(obj, dict):
            return EventKind.CONTENT
        if obj.get("error"):
            return EventKind.UPSTREAM_ERROR
        if isinstance(view, ChatView):
            view.note_choices(obj.get("choices"))
        if view.strip_usage_chunk and is_usage_only_chunk(obj):
            return EventKind.SKIP
        if is_role_only_chunk(obj):
            return EventKind.PREAMBLE
        return EventKind.CONTENT

    def error_body(self, err: ProxyError, request_id: str | None = None) -> dict:
        return {"error": openai_error_object(err)}

    def terminal_error(self, err: ProxyError, view: StreamView) -> bytes:
        return b"data: " + compact_json({"error": openai_error_object(err)}) + b"\n\n"
