"""What every API format provides to the relay."""

from __future__ import annotations

import enum
import json
from typing import Any

from ..errors import ProxyError


class EventKind(enum.Enum):
    PREAMBLE = "preamble"  # no content yet: message_start, ping, response.created, role chunk
    CONTENT = "content"  # part of the answer
    DONE = "done"  # the protocol's own end of a complete answer
    UPSTREAM_ERROR = "upstream_error"  # the upstream ended the stream with an error event
    SKIP = "skip"  # forwarded to nobody (the usage chunk the proxy asked for itself)
    OTHER = "other"  # comments and events that carry nothing (forwarded as they are)


def compact_json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


class StreamView:
    """Per-stream state a format needs to classify events and render its terminal error."""

    def __init__(self, fmt: "Format", *, strip_usage_chunk: bool = False) -> None:
        self.format = fmt
        self.strip_usage_chunk = strip_usage_chunk
        self.last_sequence: int | None = None

    def classify(self, name: str | None, obj: Any) -> EventKind:
        if isinstance(obj, dict) and isinstance(obj.get("sequence_number"), int):
            self.last_sequence = obj["sequence_number"]
        return self.format.classify(name, obj, self)

    def terminal_error(self, err: ProxyError) -> bytes:
        return self.format.terminal_error(err, self)

    def complete_without_end_marker(self) -> bool:
        """Is the answer whole though the stream ended without its protocol's end event?"""
        return self.format.complete_without_end_marker(self)


class Format:
    """Base: subclasses set `name`, `provider_format` and implement the hooks."""

    name = ""
    provider_format = ""

    def stream_view(self, **kwargs: Any) -> StreamView:
        return StreamView(self, **kwargs)

    def classify(self, name: str | None, obj: Any, view: StreamView) -> EventKind:
        raise NotImplementedError

    def complete_without_end_marker(self, view: StreamView) -> bool:
        return False

    def status_of(self, err: ProxyError) -> int:
        """The HTTP status this API uses for the error."""
        return err.status

    def error_body(self, err: ProxyError, request_id: str | None = None) -> dict:
        raise NotImplementedError

    def terminal_error(self, err: ProxyError, view: StreamView) -> bytes:
        raise NotImplementedError

    def upstream_error_message(self, body: Any) -> str | None:
        """The message inside an upstream's JSON error body, if it has one."""
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            message = body["error"].get("message")
            return message if isinstance(message, str) else None
        return None
