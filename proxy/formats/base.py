"""What every API format provides: the one interface the pipeline asks about a protocol.

A format module owns everything about its protocol: the facts of a request (model, stream,
usage options), the credential header its upstreams expect, how its stream events are
classified, how its usage is reported, how its upstreams describe an error, and how the
proxy's own errors look in it (status, error type, JSON body, terminal event).  Adding a
protocol means adding a module; error classes stay protocol-free (`errors.py`).
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import BadRequest, ProxyError
from ..usage import Usage

if TYPE_CHECKING:
    from .stitch import Stitch


class EventKind(enum.Enum):
    PREAMBLE = "preamble"  # no content yet: message_start, ping, response.created, role chunk
    CONTENT = "content"  # part of the answer
    DONE = "done"  # the protocol's own end of a complete answer
    UPSTREAM_ERROR = "upstream_error"  # the upstream ended the stream with an error event
    SKIP = "skip"  # forwarded to nobody (the usage chunk the proxy asked for itself)
    OTHER = "other"  # comments and events that carry nothing (forwarded as they are)


# One encoder for every event the proxy writes: `json.dumps` with options builds a new one
# per call, ~1.5 µs of a translated event's ~6 µs of encoding.
_COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def compact_json(obj: Any) -> bytes:
    return _COMPACT.encode(obj).encode("utf-8")


class Frame(bytes):
    """One SSE event the proxy wrote itself, as the client gets it, that also remembers its
    name and decoded data (so a later stage, the continuation's stitching, need not parse it
    again)."""

    name: str | None
    data: Any

    @classmethod
    def of(cls, name: str | None, data: Any) -> "Frame":
        body = data.encode() if isinstance(data, str) else compact_json(data)
        head = b"event: " + name.encode() + b"\n" if name else b""
        frame = cls(head + b"data: " + body + b"\n\n")
        frame.name, frame.data = name, data
        return frame


@dataclass(frozen=True)
class RequestFacts:
    """What a format reads from (and adds to) a client's JSON body."""

    model: str | None
    stream: bool
    # The proxy asked for usage the client did not ask for: that chunk goes to nobody.
    strip_usage_chunk: bool = False
    edited: bool = False  # the payload was changed: the body must be encoded again


class UsageParser(Protocol):
    """Sees a decoded copy of every event relayed; says what usage the stream reported."""

    def feed(self, event_name: str | None, obj: Any) -> None: ...

    def result(self) -> Usage: ...


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
    provider_format = ""  # the provider family whose upstreams speak this format

    # -- requests ----------------------------------------------------------------------
    def model_of(self, payload: dict) -> str | None:
        return _model(payload)

    def request_facts(self, payload: dict, may_stream: bool = True) -> RequestFacts:
        """Model and stream as the API defines them (a string "true" is an error, not a
        guess); a format may edit `payload` (and says so)."""
        stream = _stream_flag(payload)  # checked even where the endpoint never streams
        return RequestFacts(model=_model(payload), stream=may_stream and stream)

    def credential_headers(self, key: str) -> list[tuple[str, str]]:
        """The header(s) this format's upstreams take a key in."""
        raise NotImplementedError

    # -- streams -----------------------------------------------------------------------
    def stream_view(self, **kwargs: Any) -> StreamView:
        return StreamView(self, **kwargs)

    def classify(self, name: str | None, obj: Any, view: StreamView) -> EventKind:
        raise NotImplementedError

    def complete_without_end_marker(self, view: StreamView) -> bool:
        return False

    def encode_event(self, name: str | None, data: Any) -> bytes:
        """An event the proxy writes itself (a rewritten continuation event)."""
        return Frame.of(name, data)

    def stitch(self, payload: dict) -> "Stitch | None":
        """What splices a continuation into this request's stream, or None when its answer
        cannot be continued (the format has no stitching, or the request asks for thinking,
        which cannot be prefilled)."""
        return None

    # -- usage -------------------------------------------------------------------------
    def usage_parser(self) -> UsageParser:
        raise NotImplementedError

    def body_usage(self, obj: Any) -> Usage:
        """Usage of a non-streaming JSON answer."""
        raise NotImplementedError

    # -- errors ------------------------------------------------------------------------
    def status_of(self, err: ProxyError) -> int:
        """The HTTP status this API uses for the error."""
        return err.status

    def error_type(self, err: ProxyError) -> str:
        raise NotImplementedError

    def error_body(self, err: ProxyError, request_id: str | None = None) -> dict:
        raise NotImplementedError

    def terminal_error(self, err: ProxyError, view: StreamView) -> bytes:
        raise NotImplementedError

    def upstream_error_message(self, body: Any) -> str | None:
        """The message inside an upstream's JSON error body, if it has one."""
        error = body.get("error") if isinstance(body, dict) else None
        message = error.get("message") if isinstance(error, dict) else None
        return message if isinstance(message, str) else None

    def upstream_error_type(self, body: Any) -> str | None:
        """The error type inside an upstream's JSON error body, if it has one."""
        error = body.get("error") if isinstance(body, dict) else None
        kind = error.get("type") if isinstance(error, dict) else None
        return kind if isinstance(kind, str) else None

    def event_error_message(self, payload: Any) -> str:
        """The message of an upstream's error event, wherever its protocol puts it: under
        `error` (Anthropic, chat), at the top (a Responses `error` event) or under
        `response.error` (`response.failed`)."""
        if isinstance(payload, dict):
            for found in (self.upstream_error_message(payload), payload.get("message"),
                          self.upstream_error_message(payload.get("response"))):
                if isinstance(found, str):
                    return found
        return "the upstream sent an error event"


def _model(payload: dict) -> str | None:
    model = payload.get("model")
    return model if isinstance(model, str) else None


def _stream_flag(payload: dict) -> bool:
    value = payload.get("stream")
    if value is not None and not isinstance(value, bool):
        raise BadRequest(f"`stream` must be true or false, not a JSON {json_type(value)}")
    return value is True


def json_type(value: object) -> str:
    return {str: "string", int: "number", float: "number", list: "array", dict: "object"}.get(
        type(value), "value")
