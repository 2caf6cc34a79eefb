"""OpenAI Chat Completions: data-only chunks, `data: [DONE]` at the end; usage only when
asked for (`stream_options.include_usage`), and then on a chunk of its own (protocols.md §3)."""

from __future__ import annotations

from typing import Any

from ..errors import BadRequest, ProxyError
from ..usage import Usage
from .base import EventKind, Format, RequestFacts, StreamView, compact_json, json_type
from .openai_common import bearer, openai_error_object, openai_error_type, openai_usage
from .stitch import ChatStitch
from .usage_fields import DeliveredOutput, get, text

DONE_MARKER = "[DONE]"


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

    def request_facts(self, payload: dict, may_stream: bool = True) -> RequestFacts:
        """A stream whose client did not ask for usage gets it asked for anyway (the row
        needs it); the usage chunk that brings is then kept from the client."""
        facts = super().request_facts(payload, may_stream)
        options = payload.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise BadRequest(f"`stream_options` must be an object, not a JSON {json_type(options)}")
        if not facts.stream or (options or {}).get("include_usage") is True:
            return facts
        payload["stream_options"] = {**(options or {}), "include_usage": True}
        return RequestFacts(facts.model, facts.stream, strip_usage_chunk=True, edited=True)

    def credential_headers(self, key: str) -> list[tuple[str, str]]:
        return bearer(key)

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

    def stitch(self, payload: dict) -> ChatStitch | None:
        if payload.get("reasoning_effort") or (payload.get("n") or 1) > 1:
            return None  # thinking cannot be prefilled; several choices are not one answer
        return ChatStitch()

    def usage_parser(self) -> "ChatStreamUsage":
        return ChatStreamUsage()

    def body_usage(self, obj: Any) -> Usage:
        if not isinstance(obj, dict):
            return Usage()
        usage = chat_usage(obj.get("usage"))
        usage.stop_reason = _finish_reason(obj.get("choices"))
        usage.model = text(obj.get("model"))
        usage.complete = isinstance(obj.get("usage"), dict)
        return usage

    def error_type(self, err: ProxyError) -> str:
        return openai_error_type(err)

    def error_body(self, err: ProxyError, request_id: str | None = None) -> dict:
        return {"error": openai_error_object(err)}

    def terminal_error(self, err: ProxyError, view: StreamView) -> bytes:
        return b"data: " + compact_json({"error": openai_error_object(err)}) + b"\n\n"


def is_role_only_chunk(obj: dict) -> bool:
    """The opening chunk that only announces the assistant role (no content yet)."""
    choices = obj.get("choices")
    if not choices or obj.get("usage") or not isinstance(choices, list):
        return False  # odd shapes are content: the client's SDK judges them, not the proxy
    for choice in choices:
        delta = choice.get("delta") if isinstance(choice, dict) else "odd"
        if delta is not None and not isinstance(delta, dict):
            return False
        delta = delta or {}
        if choice.get("finish_reason") or delta.get("tool_calls") or delta.get("function_call"):
            return False
        if delta.get("content") or delta.get("refusal"):
            return False
    return True


def is_usage_only_chunk(obj: Any) -> bool:
    """A chunk that only carries usage: the proxy strips it when it injected include_usage.

    A chunk with choices *and* usage (Gemini's style) carries content and must be forwarded.
    """
    return isinstance(obj, dict) and not obj.get("choices") and isinstance(obj.get("usage"), dict)


def chat_usage(u: Any) -> Usage:
    """OpenAI chat ``CompletionUsage``: ``prompt_tokens`` includes cached and cache-write."""
    return openai_usage(u, "prompt_tokens", "completion_tokens")


class ChatStreamUsage:
    """Chat Completions stream: the last chunk with a non-null ``usage`` wins.

    OpenAI puts usage on an extra empty-``choices`` chunk (only with ``include_usage``); vLLM
    sends ``choices: null``; Gemini's compatible endpoint puts it on the last content chunk.
    """

    def __init__(self) -> None:
        self._usage: dict | None = None
        self._stop_reason: str | None = None
        self._model: str | None = None
        self._delivered = DeliveredOutput()

    def feed(self, event_name: str | None, obj: Any) -> None:
        """Take one decoded chunk; ``[DONE]``, error chunks and garbage change nothing."""
        if not isinstance(obj, dict):
            return
        self._model = text(obj.get("model")) or self._model
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
        arguments = [get(call, "function", "arguments") for call in calls] \
            if isinstance(calls, list) else []
        self._delivered.add(delta.get("content"), delta.get("reasoning_content"),
                            delta.get("reasoning"), delta.get("refusal"), *arguments)

    def result(self) -> Usage:
        usage = chat_usage(self._usage)
        usage.stop_reason = self._stop_reason
        usage.model = self._model
        usage.complete = self._usage is not None
        return self._delivered.floor_output(usage)


def _finish_reason(choices: Any) -> str | None:
    """The last non-null ``finish_reason`` among the chunk's choices."""
    if not isinstance(choices, list):
        return None
    reasons = [text(c.get("finish_reason")) for c in choices if isinstance(c, dict)]
    reasons = [r for r in reasons if r]
    return reasons[-1] if reasons else None
