"""What the end-to-end tests expect of the proxy's answers, per protocol.

`PROTOS`: one complete upstream transcript per protocol with the request that asks for it,
where the content ends, a malformed event and an upstream error event; the checks of an
event stream's headers, of one terminal error in the protocol's own words, of nothing
fabricated after a failure, and of each endpoint's JSON error shape.
"""

from __future__ import annotations

import json

from support.builders import (anthropic_error_event, anthropic_stream, chat_error_event, chat_stream,
                              responses_error_event, responses_stream)
from support.rawhttp import RawResponse
from support.sse import parse

def assert_event_stream_headers(r: RawResponse) -> None:
    assert r.status == 200, (r.status, r.headers)
    assert (r.header("content-type") or "").startswith("text/event-stream"), r.headers
    assert r.header_all("cache-control") == ["no-cache, no-transform"], r.headers
    assert r.header_all("x-accel-buffering") == ["no"], r.headers
    assert r.header("content-length") is None and r.header("content-encoding") is None, r.headers


# ---------------------------------------------------------------------------
# The three protocols
# ---------------------------------------------------------------------------

class Proto:
    def __init__(self, name, path, body, events, content, malformed, error_event, final_marks):
        self.name, self.path, self.body = name, path, body
        self.events = events  # a complete upstream transcript, one bytes per event
        self.content = events[:content]  # what goes out before the trouble (content included)
        self.malformed = malformed
        self.error_event = error_event
        self.final_marks = final_marks  # bytes a fabricated protocol end would contain


PROTOS = {
    "anthropic": Proto(
        "anthropic", "/v1/messages",
        {"model": "claude-sonnet-4-5", "max_tokens": 32, "stream": True,
         "messages": [{"role": "user", "content": "hi"}]},
        anthropic_stream(), 4,
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"ty\n\n',
        anthropic_error_event("overloaded_error", "Overloaded (upstream)"),
        [b"message_stop", b"message_delta"]),
    "chat": Proto(
        "chat", "/v1/chat/completions",
        {"model": "gpt-4o", "stream": True, "stream_options": {"include_usage": True},
         "messages": [{"role": "user", "content": "hi"}]},
        chat_stream(), 3,
        b'data: {"id":"chatcmpl-fake01","choices":[{"index":0,"delta":{"content":\n\n',
        chat_error_event("The server had an error (upstream)"),
        [b"[DONE]", b'"finish_reason":"stop"']),
    "responses": Proto(
        "responses", "/v1/responses",
        {"model": "gpt-4.1", "input": "hi", "stream": True},
        responses_stream(), 5,
        b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",oops\n\n',
        responses_error_event("server_error", "The server had an error (upstream)", sequence_number=5),
        [b"response.completed", b"response.incomplete"]),
}
PROTO_NAMES = sorted(PROTOS)


def check_terminal_error(proto: str, event: bytes, *, anthropic_type: str | None = None,
                         sequence_number: int | None = None) -> dict:
    """One terminal error event in the protocol's own words; returns its payload."""
    parsed = parse(event)
    assert len(parsed) == 1, f"not exactly one event: {event!r}"
    name, data = parsed[0].type, parsed[0].data  # the type a WHATWG parser dispatches
    obj = json.loads(data)
    if proto == "anthropic":
        assert event.startswith(b"event: error\n"), event
        assert name == "error" and obj["type"] == "error", obj
        assert obj["error"]["type"] in ("overloaded_error", "api_error", "timeout_error",
                                        "rate_limit_error", "invalid_request_error",
                                        "authentication_error", "permission_error",
                                        "not_found_error"), obj
        if anthropic_type is not None:
            assert obj["error"]["type"] == anthropic_type, obj
        assert isinstance(obj["error"]["message"], str) and obj["error"]["message"], obj
        return obj["error"]
    if proto == "chat":
        assert event.startswith(b"data: "), event
        assert name == "message" and set(obj) == {"error"}, obj
        err = obj["error"]
        assert isinstance(err["message"], str) and err["message"], err
        assert isinstance(err["type"], str) and err["type"], err
        assert "code" in err, err
        return err
    assert event.startswith(b"event: error\n"), event
    assert name == "error" and obj["type"] == "error", obj
    assert isinstance(obj["message"], str) and obj["message"], obj
    assert "code" in obj and isinstance(obj["sequence_number"], int), obj
    if sequence_number is not None:
        assert obj["sequence_number"] == sequence_number, obj
    return obj


def assert_nothing_fabricated(proto: Proto, body: bytes) -> None:
    for mark in proto.final_marks:
        assert mark not in body, f"{mark!r} fabricated in {body[-400:]!r}"


def last_sequence(events: list[bytes]) -> int:
    return max(json.loads(parse(e)[0].data)["sequence_number"] for e in events)


def assert_anthropic_error(body: dict, error_type: str | None = None) -> None:
    assert body["type"] == "error", body
    assert isinstance(body["error"]["type"], str) and isinstance(body["error"]["message"], str), body
    assert body["error"]["message"], body
    if error_type:
        assert body["error"]["type"] == error_type, body


def assert_openai_error(body: dict) -> None:
    assert set(body) == {"error"}, body
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"], body
    assert isinstance(err["type"], str) and err["type"], body
    assert "code" in err and "param" in err, body


def assert_error_shape(name: str, body: dict, anthropic_type: str | None = None) -> None:
    if name == "anthropic":
        assert_anthropic_error(body, anthropic_type)
    else:
        assert_openai_error(body)
