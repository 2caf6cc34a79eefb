"""The step language of the fake upstream (tests/support/fake.py): what a script is made of.

A script is a list of steps run in order, each acting on the exchange of one request:
`Status` (status line and headers), `Send` (one write, one chunk), `Trickle` (bytes in small
timed pieces), `Sleep`, `WaitFor` (a threading.Event), `Stall` (nothing more until the client
leaves), `Reset` (TCP RST), `Cut` (close without the chunked terminator), `End`, `SendGzip`
(a gzip stream flushed piece by piece) and `Raw` (bytes outside any framing).  Scripts give
tests exact control over bytes and timing: an event split inside a UTF-8 character, a stall
after the preamble, a reset before the headers, a body cut before the chunked terminator.

`json_reply` and `sse_reply` build the common scripts; `default_script(request)` is the
canned reply the fake gives a request no test scripted (chosen by method, path and
`"stream"`), also usable from a script callable.

Standard library only.
"""

from __future__ import annotations

import threading
import zlib
from dataclasses import dataclass, field
from http import HTTPStatus

from support.builders import (DEFAULT_ANTHROPIC_MODEL, DEFAULT_CHAT_MODEL, DEFAULT_COUNT_TOKENS,
                              DEFAULT_RESPONSES_MODEL, DEFAULT_TEXT, DEFAULT_TEXT_PIECES,
                              DEFAULT_TOOL_INPUT, DEFAULT_TOOL_NAME, anthropic_error_body,
                              anthropic_message, anthropic_stream, chat_completion, chat_stream,
                              json_text, models_list, openai_error_body, responses_response,
                              responses_stream)

# ---------------------------------------------------------------------------
# Script steps
# ---------------------------------------------------------------------------

class ScriptError(Exception):
    """A script that cannot run as written (a bug in the test)."""


_BODY_MODES = ("chunked", "length", "close")


def _header_list(headers):
    if headers is None:
        return []
    if isinstance(headers, dict):
        return [(str(k), str(v)) for k, v in headers.items()]
    return [(str(k), str(v)) for k, v in headers]


def _merge_headers(defaults, overrides):
    """defaults + overrides as a list of pairs; a header named in overrides replaces the default."""
    overrides = _header_list(overrides)
    names = {k.lower() for k, _ in overrides}
    return [(k, v) for k, v in _header_list(defaults) if k.lower() not in names] + overrides


def _reason(code):
    try:
        return HTTPStatus(code).phrase
    except ValueError:
        return {529: "Overloaded"}.get(code, "Unknown")


@dataclass
class Status:
    """Status line and headers.

    body_mode: "chunked" (Transfer-Encoding: chunked), "length" (Content-Length:
    `content_length`, or the total of the following Send/Trickle/SendGzip steps when None),
    "close" (no length; End closes the connection). Defaults added unless the caller's
    headers name them: Content-Type (text/event-stream for 200, else application/json),
    Transfer-Encoding / Content-Length / Connection: close per body_mode.
    """
    code: int = 200
    headers: dict | list | None = None
    body_mode: str = "chunked"
    content_length: int | None = None
    reason: str | None = None

    def __post_init__(self):
        if self.body_mode not in _BODY_MODES:
            raise ValueError(f"body_mode must be one of {_BODY_MODES}, not {self.body_mode!r}")

    def run(self, ex):
        if ex.status_sent:
            raise ScriptError("Status sent twice")
        headers = _header_list(self.headers)
        names = {k.lower() for k, _ in headers}
        extra = []
        if "content-type" not in names and self.code not in (204, 304):
            extra.append(("Content-Type", "text/event-stream" if self.code == 200 else "application/json"))
        if self.body_mode == "chunked" and "transfer-encoding" not in names:
            extra.append(("Transfer-Encoding", "chunked"))
        elif self.body_mode == "length" and "content-length" not in names:
            length = self.content_length if self.content_length is not None else ex.following_body_length()
            extra.append(("Content-Length", str(length)))
        elif self.body_mode == "close" and "connection" not in names:
            extra.append(("Connection", "close"))
        lines = [f"HTTP/1.1 {self.code} {self.reason or _reason(self.code)}"]
        lines += [f"{k}: {v}" for k, v in extra + headers]
        ex.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        ex.status_sent = True
        ex.body_mode = self.body_mode
        if any(k.lower() == "connection" and "close" in v.lower() for k, v in headers):
            ex.close_after = True


@dataclass
class Send:
    """One write: one chunk in chunked mode (sends the default Status() first if needed)."""
    data: bytes

    def body_length(self):
        return len(self.data)

    def run(self, ex):
        ex.ensure_status()
        ex.send_body(self.data)


@dataclass
class Trickle:
    """`data` in pieces of `size` bytes, each its own chunk and sendall, `delay` s apart."""
    data: bytes
    size: int = 1
    delay: float = 0.0

    def body_length(self):
        return len(self.data)

    def run(self, ex):
        ex.ensure_status()
        for i in range(0, len(self.data), self.size):
            if i and self.delay:
                ex.idle(self.delay)
            ex.send_body(self.data[i:i + self.size])


@dataclass
class Sleep:
    """Pause; a client hang-up during the pause ends the script (peer_closed is set)."""
    seconds: float

    def run(self, ex):
        ex.idle(self.seconds)


@dataclass
class WaitFor:
    """Pause until `event` is set (at most `timeout` s, then go on); watches for hang-ups."""
    event: threading.Event
    timeout: float = 30.0

    def run(self, ex):
        ex.idle(self.timeout, self.event)


@dataclass
class Stall:
    """Send nothing more; wait until the client closes the connection or the server stops."""

    def run(self, ex):
        ex.idle(None)
        return "stall"


@dataclass
class Reset:
    """Close with SO_LINGER(1, 0): the client gets a TCP RST."""

    def run(self, ex):
        ex.close(reset=True)
        return "reset"


@dataclass
class Cut:
    """Close the connection abruptly: no chunked terminator, a short Content-Length body."""

    def run(self, ex):
        ex.close()
        return "cut"


@dataclass
class End:
    """Finish the body: the chunked terminator; in "close" mode close the connection."""

    def run(self, ex):
        ex.ensure_status()
        if ex.body_mode == "chunked":
            ex.write(b"0\r\n\r\n")
        elif ex.body_mode == "close":
            ex.close()
        return "end"


@dataclass
class SendGzip:
    """One gzip stream: each piece compressed + Z_SYNC_FLUSH-ed as its own chunk, then the
    trailer as a last chunk. Set `content-encoding: gzip` in Status yourself."""
    pieces: list
    _chunks: list = field(init=False, repr=False, default=None)

    def chunks(self):
        if self._chunks is None:
            comp = zlib.compressobj(wbits=31)
            self._chunks = [comp.compress(p) + comp.flush(zlib.Z_SYNC_FLUSH) for p in self.pieces]
            self._chunks.append(comp.flush())
        return self._chunks

    def body_length(self):
        return sum(len(c) for c in self.chunks())

    def run(self, ex):
        ex.ensure_status()
        for chunk in self.chunks():
            ex.send_body(chunk)


@dataclass
class Raw:
    """Bytes written verbatim, outside any framing (e.g. a malformed status line or chunk).
    The fake does not track them: finish with Cut() or Reset()."""
    data: bytes

    def run(self, ex):
        ex.write(self.data)


TERMINAL_STEPS = (Stall, Reset, Cut, End)


def json_reply(obj, status=200, headers=None):
    """A script: `obj` (dict/list -> JSON; bytes/str as is) with a Content-Length body."""
    if isinstance(obj, bytes):
        body = obj
    elif isinstance(obj, str):
        body = obj.encode("utf-8")
    else:
        body = json_text(obj).encode("utf-8")
    headers = _merge_headers({"Content-Type": "application/json"}, headers)
    return [Status(status, headers=headers, body_mode="length", content_length=len(body)), Send(body), End()]


def sse_reply(events_bytes, delay=0, status=200, headers=None):
    """A script: 200 chunked text/event-stream, one Send (one chunk) per event, `delay` s apart."""
    headers = _merge_headers({"Content-Type": "text/event-stream; charset=utf-8",
                              "Cache-Control": "no-cache"}, headers)
    steps = [Status(status, headers=headers)]
    for i, event in enumerate(events_bytes):
        if i and delay:
            steps.append(Sleep(delay))
        steps.append(Send(event))
    steps.append(End())
    return steps


# ---------------------------------------------------------------------------
# Default replies
# ---------------------------------------------------------------------------

def _request_tool(body):
    tools = body.get("tools")
    if not tools or not isinstance(tools, list):
        return None
    first = tools[0] if isinstance(tools[0], dict) else {}
    name = first.get("name") or (first.get("function") or {}).get("name") or DEFAULT_TOOL_NAME
    return {"name": name, "input": DEFAULT_TOOL_INPUT}


def default_script(request):
    """The canned reply for a request (see the module docstring); usable from callables."""
    route = request.route.rstrip("/")
    body = request.json if isinstance(request.json, dict) else None
    rid = f"req_fake{request.index:04d}"
    if request.method == "GET" and route.endswith("/models"):
        return json_reply(models_list(), headers={"x-request-id": rid})
    kind = None
    if request.method == "POST":
        for suffix, name in (("/messages/count_tokens", "count"), ("/messages", "anthropic"),
                             ("/chat/completions", "chat"), ("/responses", "responses")):
            if route.endswith(suffix):
                kind = name
                break
    if kind is None:
        return json_reply(openai_error_body(f"Unknown request: {request.method} {request.route}",
                                            code="not_found"), status=404, headers={"x-request-id": rid})
    if body is None:
        if kind in ("anthropic", "count"):
            return json_reply(anthropic_error_body(message="Body is not a JSON object", request_id=rid),
                              status=400, headers={"request-id": rid})
        return json_reply(openai_error_body("Body is not a JSON object"), status=400,
                          headers={"x-request-id": rid})
    stream = body.get("stream") is True
    tool = _request_tool(body)
    model = body.get("model")
    pieces = [] if tool else DEFAULT_TEXT_PIECES
    text = None if tool else DEFAULT_TEXT
    if kind == "count":
        return json_reply({"input_tokens": DEFAULT_COUNT_TOKENS}, headers={"request-id": rid})
    if kind == "anthropic":
        headers = {"request-id": rid}
        model = model or DEFAULT_ANTHROPIC_MODEL
        mid = f"msg_fake{request.index:04d}"
        if stream:
            return sse_reply(anthropic_stream(pieces, model=model, tool=tool, message_id=mid), headers=headers)
        return json_reply(anthropic_message(text, model=model, tool=tool, message_id=mid), headers=headers)
    headers = {"x-request-id": rid}
    if kind == "chat":
        model = model or DEFAULT_CHAT_MODEL
        cid = f"chatcmpl-fake{request.index:04d}"
        if stream:
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return sse_reply(chat_stream(pieces, model=model, include_usage=include_usage, tool=tool,
                                         completion_id=cid), headers=headers)
        return json_reply(chat_completion(text, model=model, tool=tool, completion_id=cid), headers=headers)
    model = model or DEFAULT_RESPONSES_MODEL
    resp_id = f"resp_fake{request.index:04d}"
    if stream:
        return sse_reply(responses_stream(pieces, model=model, tool=tool, response_id=resp_id), headers=headers)
    return json_reply(responses_response(text, model=model, tool=tool, response_id=resp_id), headers=headers)
