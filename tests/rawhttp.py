"""A raw HTTP/1.1 client and the checks the end-to-end tests share.

`RawResponse` is a socket-level client that records the body exactly as it arrives (each
HTTP chunk separately), so tests can see keepalive comments, event boundaries, the chunked
terminator and header duplicates that a high-level client would hide.  Beside it: SSE
helpers, one complete transcript per protocol (`PROTOS`), and the checks of a terminal
error and of each endpoint's JSON error shape.
"""

from __future__ import annotations

import json
import re
import socket
import ssl
import time
from urllib.parse import urlsplit

import requests

from fakeupstream import (anthropic_error_event, anthropic_stream, chat_error_event, chat_stream,
                          responses_error_event, responses_stream)

RID = "x-llm-proxy-request-id"
KEEPALIVE = b": keepalive\n\n"


class RawResponse:
    """One request on its own socket; the response read by hand, chunk by chunk."""

    opened: list["RawResponse"] = []  # closed after each test by `_close_raw_clients`

    def __init__(self, base_url: str, path: str, body: bytes | dict | None = b"",
                 headers: list[tuple[str, str]] | dict | None = None, method: str = "POST",
                 timeout: float = 10.0, chunked: bool = False, cafile: str | None = None) -> None:
        """`cafile`: for an https `base_url`, the certificate to trust."""
        parts = urlsplit(base_url)
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode("utf-8")
        body = body or b""
        headers = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
        names = {k.lower() for k, _ in headers}
        lines = [f"{method} {path} HTTP/1.1", f"Host: {parts.netloc}"]
        if body and "content-type" not in names:
            lines.append("Content-Type: application/json")
        if chunked:  # the body as one chunk and the terminator: no length known up front
            lines.append("Transfer-Encoding: chunked")
            body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n"
        elif "content-length" not in names and (body or method == "POST"):
            lines.append(f"Content-Length: {len(body)}")
        lines += [f"{k}: {v}" for k, v in headers]
        self.sent_at = time.monotonic()
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
        if parts.scheme == "https":
            context = ssl.create_default_context(cafile=cafile)
            self.sock = context.wrap_socket(self.sock, server_hostname=parts.hostname)
        RawResponse.opened.append(self)
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        self.buf = b""
        self.status: int | None = None
        self.headers: list[tuple[str, str]] = []
        self.head_at: float | None = None
        self.chunks: list[tuple[float, bytes]] = []  # (arrival time, bytes) per HTTP chunk
        self.complete = False  # the body ended properly (chunked terminator / full length)
        self.eof_early = False  # the connection closed before the body was complete
        self._gen = None

    # -- reading -------------------------------------------------------------------
    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError
        self.buf += data

    def read_head(self) -> "RawResponse":
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = [tuple(p.strip() for p in line.split(":", 1)) for line in lines[1:]]
        self.head_at = time.monotonic()
        return self

    def header_all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def header(self, name: str) -> str | None:
        values = self.header_all(name)
        return values[0] if values else None

    @property
    def request_id(self) -> str:
        rid = self.header(RID)
        assert rid, f"no {RID} header in {self.headers}"
        return rid

    @property
    def body(self) -> bytes:
        return b"".join(c for _, c in self.chunks)

    def _chunks(self):
        if self.status is None:
            self.read_head()
        try:
            if "chunked" in (self.header("transfer-encoding") or "").lower():
                while True:
                    while b"\r\n" not in self.buf:
                        self._fill()
                    size_line, self.buf = self.buf.split(b"\r\n", 1)
                    size = int(size_line.split(b";")[0], 16)
                    while len(self.buf) < size + 2:
                        self._fill()
                    data, crlf, self.buf = self.buf[:size], self.buf[size:size + 2], self.buf[size + 2:]
                    assert crlf == b"\r\n", f"bad chunk framing: {crlf!r}"
                    if size == 0:
                        self.complete = True
                        return
                    self.chunks.append((time.monotonic(), data))
                    yield data
            elif self.header("content-length") is not None:
                remaining = int(self.header("content-length"))
                while remaining > 0:
                    if not self.buf:
                        self._fill()
                    data, self.buf = self.buf[:remaining], self.buf[remaining:]
                    remaining -= len(data)
                    self.chunks.append((time.monotonic(), data))
                    yield data
                self.complete = True
            else:
                while True:
                    if self.buf:
                        data, self.buf = self.buf, b""
                        self.chunks.append((time.monotonic(), data))
                        yield data
                    self._fill()
        except EOFError:
            self.eof_early = "chunked" in (self.header("transfer-encoding") or "").lower() \
                or self.header("content-length") is not None
            if not self.eof_early:
                self.complete = True
        finally:
            # one request per connection: an idle keep-alive connection would only delay
            # the shutdown of a private proxy (gunicorn waits for it)
            self.sock.close()

    def read_until(self, predicate, what: str = "the expected bytes") -> bytes:
        if self._gen is None:
            self._gen = self._chunks()
        if predicate(self.body):
            return self.body
        for _ in self._gen:
            if predicate(self.body):
                return self.body
        raise AssertionError(f"the body ended before {what}: {self.body!r}")

    def read_all(self) -> bytes:
        if self._gen is None:
            self._gen = self._chunks()
        for _ in self._gen:
            pass
        return self.body

    def json(self):
        return json.loads(self.read_all())

    def close(self) -> None:
        self.sock.close()


def close_raw_clients() -> None:
    while RawResponse.opened:
        RawResponse.opened.pop().close()


def proxy_port(server) -> int:
    return urlsplit(server.url).port


def health(server) -> dict:
    return requests.get(server.url + "/health", timeout=5).json()


# ---------------------------------------------------------------------------
# SSE helpers
# ---------------------------------------------------------------------------

def split_lf_stream(body: bytes) -> tuple[list[bytes], list[int]]:
    """Cut an LF-only event stream at its blank lines.

    Returns (events, keepalive_positions): each keepalive comment found on an event boundary
    is removed and its position recorded as the number of events before it.  A keepalive
    that landed inside an event is not on a boundary, so it stays inside that event's bytes
    and the event no longer equals the upstream's.
    """
    events: list[bytes] = []
    keepalives: list[int] = []
    pos = 0
    while pos < len(body):
        if body.startswith(KEEPALIVE, pos):
            keepalives.append(len(events))
            pos += len(KEEPALIVE)
            continue
        end = body.find(b"\n\n", pos)
        assert end >= 0, f"the stream ends inside an event: {body[pos:]!r}"
        events.append(body[pos:end + 2])
        pos = end + 2
    return events, keepalives


def parse_sse(body: bytes) -> list[tuple[str, str]]:
    """What a WHATWG parser (and the SDKs) dispatch: [(event type, data)], strict UTF-8."""
    text = body.decode("utf-8")
    if text.startswith("\ufeff"):
        text = text[1:]
    lines = re.split(r"\r\n|\r|\n", text)
    out: list[tuple[str, str]] = []
    data: list[str] = []
    name = None
    for line in lines[:-1]:  # the last piece is an unterminated line (must be empty)
        if line == "":
            if data:
                out.append((name or "message", "\n".join(data)))
            data, name = [], None
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "data":
            data.append(value)
        elif field == "event":
            name = value
    assert lines[-1] == "" and not data, f"an event is left open at the end: {text[-200:]!r}"
    return out


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
    parsed = parse_sse(event)
    assert len(parsed) == 1, f"not exactly one event: {event!r}"
    name, data = parsed[0]
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
    return max(json.loads(parse_sse(e)[0][1])["sequence_number"] for e in events)


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
