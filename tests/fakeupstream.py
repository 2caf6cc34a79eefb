"""A scripted fake LLM upstream for the test suite.

`FakeUpstream` is a real HTTP/1.1 server on 127.0.0.1 (raw sockets, one thread per
connection, keep-alive). Every request it receives is recorded, then answered by a
*script*: a list of steps (`Status`, `Send`, `Trickle`, `Sleep`, `WaitFor`, `Stall`,
`Reset`, `Cut`, `End`, `SendGzip`, `Raw`) run in order. Scripts give tests exact
control over bytes and timing: an event split inside a UTF-8 character, a stall after
the preamble, a reset before the headers, a body cut before the chunked terminator.

How a request finds its script, first match wins:
  1. header `x-fake-script: NAME`  -> `fake.named[NAME]`
  2. the FIFO filled by `fake.enqueue(script, ...)`, one script per request
  3. `default_script(request)`: a canned reply chosen by method, path and `"stream"`.
A script may also be a callable taking the `RecordedRequest` and returning a script
(or None for the default reply).

The transcript builders (`sse`, `anthropic_stream`, `chat_stream`, `responses_stream`,
...) are pure functions returning bytes; the byte-exact transcripts of protocols.md
are at the end of the module (`ANTHROPIC_TEXT` ... `RESPONSES_TOOL`).

Standard library only.
"""

from __future__ import annotations

import itertools
import json
import select
import socket
import struct
import sys
import threading
import time
import traceback
import zlib
from collections import deque
from dataclasses import dataclass, field
from http import HTTPStatus

# ---------------------------------------------------------------------------
# Constants used by the default replies. Tests assert against these.
# ---------------------------------------------------------------------------

DEFAULT_ANTHROPIC_MODEL = "claude-sonnet-4-5-20250929"
DEFAULT_CHAT_MODEL = "gpt-4o-2024-08-06"
DEFAULT_RESPONSES_MODEL = "gpt-4.1-2025-04-14"
DEFAULT_MODELS = (DEFAULT_CHAT_MODEL, DEFAULT_RESPONSES_MODEL, DEFAULT_ANTHROPIC_MODEL)

# Multi-byte UTF-8 on purpose ("é" is 2 bytes, "🌍" is 4), so split-UTF-8 tests are natural.
DEFAULT_TEXT_PIECES = ("Hello", ", héllo", " 🌍", "!")
DEFAULT_TEXT = "".join(DEFAULT_TEXT_PIECES)  # "Hello, héllo 🌍!"

# The tool call of default replies to requests that carry `tools`; the name is replaced
# by the name of the request's first tool.
DEFAULT_TOOL_NAME = "get_weather"
DEFAULT_TOOL_INPUT = {"location": "Paris"}

# Token counts of every default reply, normalised across the three protocols:
#   input       uncached input tokens
#   cache_read  input tokens read from the prompt cache
#   cache_write input tokens written to the prompt cache
#   output      output tokens (reasoning included)
#   reasoning   the reasoning share of output
# On the wire (see anthropic_usage / chat_usage / responses_usage):
#   Anthropic: input_tokens=25, cache_read_input_tokens=10, cache_creation_input_tokens=5,
#              output_tokens=1 in message_start and 15 in message_delta.
#   OpenAI chat: prompt_tokens=40 (cached_tokens=10, cache_write_tokens=5),
#              completion_tokens=15, total_tokens=55.
#   OpenAI responses: input_tokens=40 (cached_tokens=10, cache_write_tokens=5),
#              output_tokens=15, total_tokens=55.
DEFAULT_USAGE = {"input": 25, "output": 15, "cache_read": 10, "cache_write": 5, "reasoning": 0}
DEFAULT_TOTAL_INPUT = 40  # input + cache_read + cache_write, the same in every protocol
DEFAULT_COUNT_TOKENS = 42  # POST /v1/messages/count_tokens -> {"input_tokens": 42}

ANTHROPIC_START_OUTPUT_TOKENS = 1  # output_tokens in message_start (not final)

FAKE_SCRIPT_HEADER = "x-fake-script"

# A chunk of an event, ended by one blank line; used by tests that need a comment.
KEEPALIVE = b": keepalive\n\n"

_RECV_SIZE = 65536
_MAX_HEAD = 65536
_WAIT_SLICE = 0.05  # how often WaitFor re-checks the socket and the server's stop flag


# ---------------------------------------------------------------------------
# Usage helpers
# ---------------------------------------------------------------------------

def _usage(usage):
    merged = dict(DEFAULT_USAGE)
    if usage:
        unknown = set(usage) - set(DEFAULT_USAGE)
        if unknown:
            raise ValueError(f"unknown usage keys {sorted(unknown)}; use {sorted(DEFAULT_USAGE)}")
        merged.update(usage)
    return merged


def total_input(usage=None):
    """input + cache_read + cache_write for a normalised usage dict (default: DEFAULT_USAGE)."""
    u = _usage(usage)
    return u["input"] + u["cache_read"] + u["cache_write"]


def anthropic_usage(usage=None, *, start=False):
    """The Anthropic `usage` object: message_start's when start=True, else the final one."""
    u = _usage(usage)
    out = {
        "input_tokens": u["input"],
        "cache_creation_input_tokens": u["cache_write"],
        "cache_read_input_tokens": u["cache_read"],
        "cache_creation": {"ephemeral_5m_input_tokens": u["cache_write"], "ephemeral_1h_input_tokens": 0},
        "output_tokens": ANTHROPIC_START_OUTPUT_TOKENS if start else u["output"],
        "service_tier": "standard",
    }
    if u["reasoning"] and not start:
        out["output_tokens_details"] = {"thinking_tokens": u["reasoning"]}
    return out


def chat_usage(usage=None):
    """The OpenAI Chat `CompletionUsage` object (cached tokens are part of prompt_tokens)."""
    u = _usage(usage)
    prompt = total_input(u)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": u["output"],
        "total_tokens": prompt + u["output"],
        "prompt_tokens_details": {
            "cached_tokens": u["cache_read"], "audio_tokens": 0, "cache_write_tokens": u["cache_write"],
        },
        "completion_tokens_details": {
            "reasoning_tokens": u["reasoning"], "audio_tokens": 0,
            "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0,
        },
    }


def responses_usage(usage=None):
    """The OpenAI Responses `ResponseUsage` object."""
    u = _usage(usage)
    inp = total_input(u)
    return {
        "input_tokens": inp,
        "input_tokens_details": {"cached_tokens": u["cache_read"], "cache_write_tokens": u["cache_write"]},
        "output_tokens": u["output"],
        "output_tokens_details": {"reasoning_tokens": u["reasoning"]},
        "total_tokens": inp + u["output"],
    }


# ---------------------------------------------------------------------------
# Transcript builders (pure)
# ---------------------------------------------------------------------------

def _json(obj):
    """Compact JSON, UTF-8 kept; text UTF-8 cannot carry (a lone surrogate a client sent in its
    model name, say) is escaped, as a real API would echo it."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(obj, separators=(",", ":"))
    return text


def sse(data, event=None, newline="\n"):
    """One SSE event as bytes. `data`: dict/list (compact JSON, UTF-8 kept), str or bytes.

    A str with line feeds becomes several `data:` lines. The event ends with a blank line.
    """
    if isinstance(data, (dict, list)):
        data = _json(data)
    elif isinstance(data, bytes):
        data = data.decode("utf-8")
    lines = [] if event is None else [f"event: {event}"]
    lines += [f"data: {line}" for line in data.split("\n")]
    return (newline.join(lines) + newline + newline).encode("utf-8")


def _tool(tool, default_id):
    """Normalise a tool spec -> (id, name, arguments_json, fragments).

    A tool spec is a dict: name (default "get_weather"), input (a dict) or arguments
    (a JSON string), optional id, optional fragments (how to split the arguments).
    """
    tool = dict(tool or {})
    if "arguments" in tool:
        args = tool["arguments"]
    else:
        args = _json(tool.get("input", DEFAULT_TOOL_INPUT))
    fragments = tool.get("fragments")
    if fragments is None:
        cut = args.find(":") + 1 or len(args) // 2
        fragments = [p for p in (args[:cut], args[cut:]) if p]
    if "".join(fragments) != args:
        raise ValueError("tool fragments must join to the arguments")
    return tool.get("id", default_id), tool.get("name", DEFAULT_TOOL_NAME), args, list(fragments)


def _tool_input(args):
    try:
        return json.loads(args)
    except ValueError:
        return {}


def _pieces(value):
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return list(value)


def anthropic_ping(newline="\n"):
    """The ping event exactly as Anthropic sends it (note the space in the JSON)."""
    return f'event: ping{newline}data: {{"type": "ping"}}{newline}{newline}'.encode()


def anthropic_stream(text_pieces=DEFAULT_TEXT_PIECES, model=DEFAULT_ANTHROPIC_MODEL, usage=None,
                     stop_reason=None, tool=None, thinking=None, *, message_id="msg_fake01",
                     ping=True, delta_usage=None, newline="\n"):
    """Anthropic Messages stream (protocols.md §2) as a list of event bytes.

    message_start (usage: input, cache read/write, output 1), optional ping after the first
    content_block_start, an optional thinking block (thinking pieces + signature), a text
    block (when text_pieces is non-empty or there is no tool), an optional tool_use block
    (input_json_delta "" then the fragments), message_delta (stop_reason; usage
    `delta_usage` or {"output_tokens": output}), message_stop.
    stop_reason None means "tool_use" with a tool, else "end_turn".
    """
    u = _usage(usage)
    text_pieces = _pieces(text_pieces)
    events = []

    def ev(obj):
        events.append(sse(obj, obj["type"], newline))

    def block(index, start, deltas):
        ev({"type": "content_block_start", "index": index, "content_block": start})
        if ping and index == 0:
            events.append(anthropic_ping(newline))
        for delta in deltas:
            ev({"type": "content_block_delta", "index": index, "delta": delta})
        ev({"type": "content_block_stop", "index": index})

    ev({"type": "message_start", "message": {
        "id": message_id, "type": "message", "role": "assistant", "model": model, "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": anthropic_usage(u, start=True)}})
    index = 0
    if thinking is not None:
        deltas = [{"type": "thinking_delta", "thinking": t} for t in _pieces(thinking)]
        deltas.append({"type": "signature_delta", "signature": "EqQBCgIYAhIMfakeSignature"})
        block(index, {"type": "thinking", "thinking": ""}, deltas)
        index += 1
    if text_pieces or tool is None:
        block(index, {"type": "text", "text": ""},
              [{"type": "text_delta", "text": t} for t in text_pieces])
        index += 1
    if tool is not None:
        tool_id, name, _, fragments = _tool(tool, "toolu_fake01")
        block(index, {"type": "tool_use", "id": tool_id, "name": name, "input": {}},
              [{"type": "input_json_delta", "partial_json": f} for f in [""] + fragments])
    ev({"type": "message_delta",
        "delta": {"stop_reason": stop_reason or ("tool_use" if tool is not None else "end_turn"),
                  "stop_sequence": None},
        "usage": delta_usage if delta_usage is not None else {"output_tokens": u["output"]}})
    ev({"type": "message_stop"})
    return events


def anthropic_message(text=DEFAULT_TEXT, model=DEFAULT_ANTHROPIC_MODEL, usage=None,
                      stop_reason=None, tool=None, *, message_id="msg_fake01"):
    """A non-streaming Anthropic Message dict (protocols.md §2.7)."""
    content = []
    if text:
        content.append({"type": "text", "text": text})
    if tool is not None:
        tool_id, name, args, _ = _tool(tool, "toolu_fake01")
        content.append({"type": "tool_use", "id": tool_id, "name": name, "input": _tool_input(args)})
    usage_obj = anthropic_usage(usage)
    return {"id": message_id, "type": "message", "role": "assistant", "model": model,
            "content": content,
            "stop_reason": stop_reason or ("tool_use" if tool is not None else "end_turn"),
            "stop_sequence": None, "usage": usage_obj}


def anthropic_error_event(type="overloaded_error", message="Overloaded", newline="\n"):
    """Anthropic mid-stream error event (protocols.md §2.6)."""
    return sse({"type": "error", "error": {"type": type, "message": message}}, "error", newline)


def anthropic_error_body(type="invalid_request_error", message="Invalid request",
                         request_id="req_fake"):
    """Anthropic HTTP error body (protocols.md §2.6)."""
    return {"type": "error", "error": {"type": type, "message": message}, "request_id": request_id}


def chat_stream(text_pieces=DEFAULT_TEXT_PIECES, model=DEFAULT_CHAT_MODEL, include_usage=True,
                tool=None, finish_reason=None, *, usage=None, completion_id="chatcmpl-fake01",
                created=1741570283, done=True, newline="\n"):
    """OpenAI Chat Completions stream (protocols.md §3) as a list of event bytes.

    A role chunk, one chunk per text piece, tool_calls deltas (id/name first, then argument
    fragments), the finish chunk, the usage chunk with empty `choices` (only if
    include_usage; then every chunk carries "usage": null), then `data: [DONE]` (if done).
    finish_reason None means "tool_calls" with a tool, else "stop".
    """
    text_pieces = _pieces(text_pieces)
    base = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
            "model": model, "service_tier": "default", "system_fingerprint": "fp_fake"}

    def chunk(delta, finish=None):
        obj = dict(base, choices=[{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}])
        if include_usage:
            obj["usage"] = None
        return sse(obj, None, newline)

    first_content = "" if (text_pieces or tool is None) else None
    events = [chunk({"role": "assistant", "content": first_content, "refusal": None})]
    events += [chunk({"content": t}) for t in text_pieces]
    if tool is not None:
        tool_id, name, _, fragments = _tool(tool, "call_fake01")
        events.append(chunk({"tool_calls": [{"index": 0, "id": tool_id, "type": "function",
                                             "function": {"name": name, "arguments": ""}}]}))
        events += [chunk({"tool_calls": [{"index": 0, "function": {"arguments": f}}]}) for f in fragments]
    events.append(chunk({}, finish_reason or ("tool_calls" if tool is not None else "stop")))
    if include_usage:
        events.append(sse(dict(base, choices=[], usage=chat_usage(usage)), None, newline))
    if done:
        events.append(sse("[DONE]", None, newline))
    return events


def chat_completion(text=DEFAULT_TEXT, model=DEFAULT_CHAT_MODEL, usage=None, tool=None,
                    finish_reason=None, *, completion_id="chatcmpl-fake01", created=1741570283):
    """A non-streaming OpenAI ChatCompletion dict."""
    message = {"role": "assistant", "content": text or None, "refusal": None}
    if tool is not None:
        tool_id, name, args, _ = _tool(tool, "call_fake01")
        message["tool_calls"] = [{"id": tool_id, "type": "function",
                                  "function": {"name": name, "arguments": args}}]
    return {"id": completion_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": finish_reason or ("tool_calls" if tool is not None else "stop")}],
            "usage": chat_usage(usage), "service_tier": "default", "system_fingerprint": "fp_fake"}


def chat_error_event(message="The server had an error while processing your request.",
                     type="server_error", code=None, param=None, newline="\n"):
    """OpenAI Chat mid-stream error: a data-only event with a top-level `error` (§3.4)."""
    return sse({"error": {"message": message, "type": type, "param": param, "code": code}}, None, newline)


def openai_error_body(message="Invalid request", type="invalid_request_error", code=None, param=None):
    """OpenAI HTTP error body (Chat and Responses, protocols.md §3.4)."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _response_object(response_id, model, status, output, usage, created_at, error=None,
                     incomplete_details=None):
    return {"id": response_id, "object": "response", "created_at": created_at, "status": status,
            "error": error, "incomplete_details": incomplete_details, "instructions": None,
            "model": model, "output": output, "parallel_tool_calls": True, "tool_choice": "auto",
            "tools": [], "usage": usage}


def _responses_items(text, tool):
    """-> (message item or None, function_call item or None), both completed."""
    message = fcall = None
    if text is not None:
        message = {"id": "msg_fake01", "type": "message", "status": "completed", "role": "assistant",
                   "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}
    if tool is not None:
        tool_id, name, args, _ = _tool(tool, "call_fake01")
        fcall = {"id": "fc_fake01", "type": "function_call", "status": "completed",
                 "arguments": args, "call_id": tool_id, "name": name}
    return message, fcall


def responses_stream(text_pieces=DEFAULT_TEXT_PIECES, model=DEFAULT_RESPONSES_MODEL, tool=None, *,
                     usage=None, response_id="resp_fake01", terminal="completed",
                     created_at=1741290958, newline="\n"):
    """OpenAI Responses stream (protocols.md §4) as a list of event bytes.

    Every event has `event:` and a `sequence_number` counting from 0: response.created,
    response.in_progress, a message item (when text_pieces is non-empty or there is no
    tool) with output_text deltas, a function_call item with arguments deltas (if tool),
    then the terminal event: terminal="completed" | "incomplete" | "failed" (each with
    usage) or None (no terminal event: a truncated stream).
    """
    text_pieces = _pieces(text_pieces)
    seq = itertools.count()
    events = []

    def ev(type_, **fields):
        events.append(sse({"type": type_, "sequence_number": next(seq), **fields}, type_, newline))

    with_text = bool(text_pieces) or tool is None
    message, fcall = _responses_items("".join(text_pieces) if with_text else None, tool)
    in_progress = _response_object(response_id, model, "in_progress", [], None, created_at)
    ev("response.created", response=in_progress)
    ev("response.in_progress", response=in_progress)
    output_index = 0
    if message is not None:
        item_id, text = message["id"], message["content"][0]["text"]
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        ev("response.output_item.added", output_index=output_index,
           item=dict(message, status="in_progress", content=[]))
        ev("response.content_part.added", item_id=item_id, output_index=output_index, content_index=0, part=part)
        for t in text_pieces:
            ev("response.output_text.delta", item_id=item_id, output_index=output_index, content_index=0,
               delta=t, logprobs=[])
        ev("response.output_text.done", item_id=item_id, output_index=output_index, content_index=0,
           text=text, logprobs=[])
        ev("response.content_part.done", item_id=item_id, output_index=output_index, content_index=0,
           part=dict(part, text=text))
        ev("response.output_item.done", output_index=output_index, item=message)
        output_index += 1
    if fcall is not None:
        _, _, args, fragments = _tool(tool, "call_fake01")
        ev("response.output_item.added", output_index=output_index,
           item=dict(fcall, status="in_progress", arguments=""))
        for f in fragments:
            ev("response.function_call_arguments.delta", item_id=fcall["id"], output_index=output_index, delta=f)
        ev("response.function_call_arguments.done", item_id=fcall["id"], output_index=output_index, arguments=args)
        ev("response.output_item.done", output_index=output_index, item=fcall)
    output = [item for item in (message, fcall) if item is not None]
    usage_obj = responses_usage(usage)
    if terminal == "completed":
        ev("response.completed",
           response=_response_object(response_id, model, "completed", output, usage_obj, created_at))
    elif terminal == "incomplete":
        ev("response.incomplete",
           response=_response_object(response_id, model, "incomplete", output, usage_obj, created_at,
                                     incomplete_details={"reason": "max_output_tokens"}))
    elif terminal == "failed":
        ev("response.failed",
           response=_response_object(response_id, model, "failed", output, usage_obj, created_at,
                                     error={"code": "server_error", "message": "The server had an error"}))
    elif terminal is not None:
        raise ValueError(f"terminal must be completed, incomplete, failed or None, not {terminal!r}")
    return events


def responses_response(text=DEFAULT_TEXT, model=DEFAULT_RESPONSES_MODEL, usage=None, tool=None, *,
                       response_id="resp_fake01", created_at=1741290958):
    """A non-streaming OpenAI Responses `Response` dict."""
    message, fcall = _responses_items(text or None, tool)
    output = [item for item in (message, fcall) if item is not None]
    return _response_object(response_id, model, "completed", output, responses_usage(usage), created_at)


def responses_error_event(code="server_error", message="The server had an error", sequence_number=0,
                          param=None, newline="\n"):
    """OpenAI Responses mid-stream `event: error` (protocols.md §4.5)."""
    return sse({"type": "error", "sequence_number": sequence_number, "code": code, "message": message,
                "param": param}, "error", newline)


def models_list(models=DEFAULT_MODELS):
    """GET /v1/models body in OpenAI shape."""
    return {"object": "list",
            "data": [{"id": m, "object": "model", "created": 1700000000, "owned_by": "fake-upstream"}
                     for m in models]}


# ---------------------------------------------------------------------------
# Script steps
# ---------------------------------------------------------------------------

class ScriptError(Exception):
    """A script that cannot run as written (a bug in the test)."""


class _PeerGone(Exception):
    """The client closed the connection (noticed by a failed write or an EOF)."""


class _Stopped(Exception):
    """The server is stopping."""


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


_TERMINAL_STEPS = (Stall, Reset, Cut, End)


def json_reply(obj, status=200, headers=None):
    """A script: `obj` (dict/list -> JSON; bytes/str as is) with a Content-Length body."""
    if isinstance(obj, bytes):
        body = obj
    elif isinstance(obj, str):
        body = obj.encode("utf-8")
    else:
        body = _json(obj).encode("utf-8")
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
# Recorded requests
# ---------------------------------------------------------------------------

class Headers(dict):
    """Request headers: a dict with lower-case keys (repeated headers joined with ", "),
    case-insensitive lookup, and `.raw`, the (name, value) pairs as received."""

    def __init__(self, raw=()):
        super().__init__()
        self.raw = list(raw)
        for name, value in self.raw:
            key = name.lower()
            dict.__setitem__(self, key, f"{dict.__getitem__(self, key)}, {value}" if key in self else value)

    def __getitem__(self, name):
        return super().__getitem__(name.lower())

    def __contains__(self, name):
        return isinstance(name, str) and super().__contains__(name.lower())

    def get(self, name, default=None):
        return super().get(name.lower(), default)

    def get_all(self, name):
        return [v for k, v in self.raw if k.lower() == name.lower()]


_UNPARSED = object()


@dataclass(eq=False)
class RecordedRequest:
    method: str
    path: str  # request target, query string included
    version: str
    headers: Headers
    body: bytes
    received_at: float  # time.monotonic() when the whole body had arrived
    index: int = 0  # 1-based order of arrival at this server
    connection_id: int = 0  # 1-based; equal ids mean the same TCP connection
    chunked: bool = False  # the request body came with Transfer-Encoding: chunked
    raw_head: bytes = b""
    peer_closed: threading.Event = field(default_factory=threading.Event)
    peer_closed_at: float | None = None
    finished: threading.Event = field(default_factory=threading.Event)  # script done
    outcome: str | None = None  # end, cut, reset, peer_closed, stopped, error
    script_source: str | None = None  # "named:NAME", "queue" or "default"
    _json: object = field(default=_UNPARSED, repr=False)

    @property
    def json(self):
        """The body parsed as JSON, or None."""
        if self._json is _UNPARSED:
            try:
                self._json = json.loads(self.body) if self.body else None
            except ValueError:
                self._json = None
        return self._json

    @property
    def route(self):
        """The path without the query string."""
        return self.path.split("?", 1)[0]

    @property
    def query(self):
        return self.path.split("?", 1)[1] if "?" in self.path else ""


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


# ---------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------

class _BadRequest(Exception):
    pass


class _Exchange:
    """One request's response: the state the steps act on."""

    def __init__(self, conn, request, script):
        self.conn = conn
        self.request = request
        self.script = script
        self.pos = 0
        self.status_sent = False
        self.body_mode = "chunked"
        self.close_after = False
        self.closed = False

    # -- used by steps --------------------------------------------------------
    def write(self, data):
        if self.closed:
            raise ScriptError("write after the connection was closed")
        try:
            self.conn.sock.sendall(data)
        except OSError:
            self._gone()

    def send_body(self, data):
        if not data:
            return  # an empty chunk would be the terminator
        if self.body_mode == "chunked":
            self.write(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            self.write(data)

    def ensure_status(self):
        if not self.status_sent:
            Status().run(self)

    def following_body_length(self):
        total = 0
        for step in self.script[self.pos + 1:]:
            if isinstance(step, _TERMINAL_STEPS):
                break
            if hasattr(step, "body_length"):
                total += step.body_length()
        return total

    def idle(self, timeout, event=None):
        """Wait `timeout` s (None: forever) or until `event` is set, watching the socket:
        a hang-up raises _PeerGone, the server stopping raises _Stopped."""
        deadline = None if timeout is None else time.monotonic() + timeout
        poller = select.poll()
        poller.register(self.conn.sock, select.POLLIN | select.POLLERR | select.POLLHUP)
        while True:
            if self.conn.server.stopping:
                raise _Stopped
            if event is not None and event.is_set():
                return
            wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait <= 0:
                return
            if event is not None:
                wait = _WAIT_SLICE if wait is None else min(wait, _WAIT_SLICE)
            if poller.poll(None if wait is None else max(wait * 1000, 1)):
                try:
                    data = self.conn.sock.recv(_RECV_SIZE)
                except OSError:
                    data = b""
                if not data:
                    self._gone()
                self.conn.buf += data  # pipelined bytes: keep them for the next request

    def close(self, reset=False):
        if not self.closed:
            self.closed = True
            self.conn.close(reset=reset)

    # -- internals --------------------------------------------------------------
    def _gone(self):
        if self.conn.server.stopping:
            raise _Stopped
        req = self.request
        if not req.peer_closed.is_set():
            req.peer_closed_at = time.monotonic()
            req.peer_closed.set()
        raise _PeerGone

    def keep_alive(self):
        return not self.closed and not self.close_after and self.body_mode != "close"


class _Connection:
    def __init__(self, server, cid, sock):
        self.server = server
        self.cid = cid
        self.sock = sock
        self.buf = b""

    def serve(self):
        while not self.server.stopping:
            request = self.read_request()
            if request is None:
                return
            self.server._record(request)
            script = self.server._pick_script(request)
            ex = _Exchange(self, request, script)
            outcome = "error"
            try:
                outcome = self.run_script(ex)
            except _PeerGone:
                outcome = "peer_closed"
            except _Stopped:
                outcome = "stopped"
            except Exception as exc:  # a broken script: make it visible, close the connection
                self.server._error(f"script for {request.method} {request.path} failed: {exc!r}")
                ex.closed = True
            finally:
                request.outcome = outcome
                request.finished.set()
            if outcome != "end" or not ex.keep_alive() or not self.wants_keep_alive(request):
                return

    @staticmethod
    def run_script(ex):
        for pos, step in enumerate(ex.script):
            ex.pos = pos
            outcome = step.run(ex)
            if outcome:
                return outcome
        ex.pos = len(ex.script)
        return End().run(ex)

    @staticmethod
    def wants_keep_alive(request):
        connection = request.headers.get("connection", "").lower()
        if request.version == "HTTP/1.0":
            return "keep-alive" in connection
        return "close" not in connection

    # -- reading ------------------------------------------------------------------
    def _fill(self):
        try:
            data = self.sock.recv(_RECV_SIZE)
        except OSError:
            data = b""
        self.buf += data
        return bool(data)

    def _read_line(self):
        while b"\r\n" not in self.buf:
            if len(self.buf) > _MAX_HEAD:
                raise _BadRequest("line too long")
            if not self._fill():
                raise _BadRequest("connection closed mid-request")
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _read_exact(self, n):
        while len(self.buf) < n:
            if not self._fill():
                raise _BadRequest("connection closed mid-body")
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def read_request(self):
        """-> RecordedRequest, or None when the client closed (or sent garbage)."""
        while b"\r\n\r\n" not in self.buf:
            if len(self.buf) > _MAX_HEAD or not self._fill():
                return None
        try:
            return self._parse_request()
        except (_BadRequest, ValueError, UnicodeDecodeError) as exc:
            self.server._error(f"bad request on connection {self.cid}: {exc}")
            try:
                body = _json(openai_error_body(f"fake upstream: bad request: {exc}")).encode()
                self.sock.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
                                  b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            except OSError:
                pass
            return None

    def _parse_request(self):
        while self.buf.startswith(b"\r\n"):  # tolerate stray CRLFs between requests
            self.buf = self.buf[2:]
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ", 2)
        raw = []
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise _BadRequest(f"malformed header line {line!r}")
            raw.append((name.strip(), value.strip()))
        headers = Headers(raw)
        if "100-continue" in headers.get("expect", "").lower():
            self.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        if chunked:
            body = self._read_chunked()
        else:
            body = self._read_exact(int(headers.get("content-length", "0") or 0))
        return RecordedRequest(method=method, path=target, version=version, headers=headers, body=body,
                               received_at=time.monotonic(), connection_id=self.cid, chunked=chunked,
                               raw_head=head + b"\r\n\r\n")

    def _read_chunked(self):
        parts = []
        while True:
            size = int(self._read_line().split(b";", 1)[0].strip(), 16)
            if size == 0:
                while self._read_line():  # trailers up to the blank line
                    pass
                return b"".join(parts)
            parts.append(self._read_exact(size))
            if self._read_exact(2) != b"\r\n":
                raise _BadRequest("chunk not followed by CRLF")

    # -- closing ------------------------------------------------------------------
    def close(self, reset=False):
        self.server._forget(self.cid)
        try:
            if reset:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.sock.close()
        except OSError:
            pass


class FakeUpstream:
    """A scripted HTTP/1.1 upstream on 127.0.0.1 (see the module docstring).

        with FakeUpstream() as fake:
            fake.enqueue(sse_reply(anthropic_stream(["a", "b"])))
            requests.post(fake.url + "/v1/messages", json={...})
            [req] = fake.wait_for_requests(1)
    """

    def __init__(self, host="127.0.0.1", port=0):
        self.host = host
        self.port = port
        self.named = {}  # name -> script or callable(RecordedRequest) -> script
        self.errors = []  # messages about broken scripts and bad requests
        self.connection_count = 0
        self._queue = deque()
        self._records = []
        self._cond = threading.Condition()
        self._stop_event = threading.Event()
        self._listener = None
        self._accept_thread = None
        self._conns = {}
        self._threads = []

    # -- lifecycle ------------------------------------------------------------------
    @property
    def url(self):
        return f"http://{self.host}:{self.port}"

    @property
    def stopping(self):
        return self._stop_event.is_set()

    def start(self):
        if self._listener is not None or self.stopping:
            raise RuntimeError("FakeUpstream can be started once")
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(128)
        listener.settimeout(0.5)  # a backstop: stop() also shuts the socket down to wake accept()
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._accept_thread = threading.Thread(target=self._accept_loop, name=f"fakeupstream-{self.port}",
                                               daemon=True)
        self._accept_thread.start()
        return self

    def stop(self, timeout=5.0):
        """Close the listener and every connection (stalled ones included); join the threads."""
        if self._listener is None or self.stopping:
            return
        deadline = time.monotonic() + timeout
        self._stop_event.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._accept_thread.join(max(0.0, deadline - time.monotonic()))
        self._listener.close()
        with self._cond:
            conns = list(self._conns.values())
            threads = list(self._threads)
            self._cond.notify_all()
        for sock in conns:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes recv/poll/sendall; the owner thread closes
            except OSError:
                pass
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- scripts and records ------------------------------------------------------
    def enqueue(self, *scripts):
        """Queue scripts (or callables) for the next requests without x-fake-script, FIFO."""
        with self._cond:
            self._queue.extend(scripts)

    @property
    def pending(self):
        """How many enqueued scripts have not been used yet."""
        with self._cond:
            return len(self._queue)

    @property
    def requests(self):
        """A snapshot of the recorded requests, in order of arrival."""
        with self._cond:
            return list(self._records)

    def wait_for_requests(self, n, timeout=5.0):
        """Return the recorded requests once there are at least n; TimeoutError otherwise."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._records) >= n, timeout):
                seen = [f"{r.method} {r.path}" for r in self._records]
                raise TimeoutError(f"waited {timeout}s for {n} request(s), got {len(seen)}: {seen}")
            return list(self._records)

    def reset(self):
        """Forget queued and named scripts, records and errors."""
        with self._cond:
            self._queue.clear()
            self.named.clear()
            self._records.clear()
            self.errors.clear()

    # -- internals -------------------------------------------------------------------
    def _accept_loop(self):
        while not self.stopping:
            try:
                sock, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._cond:
                if self.stopping:
                    sock.close()
                    return
                self.connection_count += 1
                cid = self.connection_count
                self._conns[cid] = sock
                thread = threading.Thread(target=self._serve, args=(cid, sock), daemon=True,
                                          name=f"fakeupstream-{self.port}-conn{cid}")
                self._threads = [t for t in self._threads if t.is_alive()]
                self._threads.append(thread)
            thread.start()

    def _serve(self, cid, sock):
        conn = _Connection(self, cid, sock)
        try:
            conn.serve()
        except Exception:
            self._error(f"connection {cid} crashed:\n{traceback.format_exc()}")
        finally:
            conn.close()

    def _forget(self, cid):
        with self._cond:
            self._conns.pop(cid, None)

    def _record(self, request):
        with self._cond:
            self._records.append(request)
            request.index = len(self._records)
            self._cond.notify_all()

    def _error(self, message):
        with self._cond:
            self.errors.append(message)
        print(f"fakeupstream: {message}", file=sys.stderr)

    def _pick_script(self, request):
        name = request.headers.get(FAKE_SCRIPT_HEADER)
        with self._cond:
            if name is not None:
                entry = self.named.get(name)
                request.script_source = f"named:{name}"
                if entry is None:
                    missing = f"no script named {name!r} (known: {sorted(self.named)})"
            elif self._queue:
                entry = self._queue.popleft()
                request.script_source = "queue"
            else:
                entry = None
                request.script_source = "default"
        if name is not None and entry is None:
            self._error(missing)
            return json_reply(openai_error_body(f"fake upstream: {missing}", type="server_error"), status=500)
        try:
            if callable(entry):
                entry = entry(request)
            return default_script(request) if entry is None else list(entry)
        except Exception:
            self._error(f"script callable failed:\n{traceback.format_exc()}")
            return json_reply(openai_error_body("fake upstream: script callable failed", type="server_error"),
                              status=500)


# ---------------------------------------------------------------------------
# Byte-exact transcripts copied from protocols.md (each event ends with a blank line)
# ---------------------------------------------------------------------------

ANTHROPIC_TEXT = rb"""event: message_start
data: {"type":"message_start","message":{"id":"msg_01XFDUDYJgAACzvnptvVoYEL","type":"message","role":"assistant","model":"claude-sonnet-4-5-20250929","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":25,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"cache_creation":{"ephemeral_5m_input_tokens":0,"ephemeral_1h_input_tokens":0},"output_tokens":1,"service_tier":"standard"}}}

event: content_block_start
data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}

event: ping
data: {"type": "ping"}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hello"}}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"!"}}

event: content_block_stop
data: {"type":"content_block_stop","index":0}

event: message_delta
data: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":15}}

event: message_stop
data: {"type":"message_stop"}

"""

ANTHROPIC_TOOL = rb"""event: message_start
data: {"type":"message_start","message":{"id":"msg_014p7gG3wDgGV9EUtLvnow3U","type":"message","role":"assistant","model":"claude-sonnet-4-5-20250929","stop_sequence":null,"usage":{"input_tokens":472,"output_tokens":2},"content":[],"stop_reason":null}}

event: content_block_start
data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Okay, let's check the weather for San Francisco, CA:"}}

event: content_block_stop
data: {"type":"content_block_stop","index":0}

event: content_block_start
data: {"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"toolu_01T1x1fJ34qAmk2tNTrN7Up6","name":"get_weather","input":{}}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":""}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"location\":"}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":" \"San Francisco, CA\"}"}}

event: content_block_stop
data: {"type":"content_block_stop","index":1}

event: message_delta
data: {"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},"usage":{"output_tokens":89}}

event: message_stop
data: {"type":"message_stop"}

"""

CHAT_TEXT = rb"""data: {"id":"chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG","object":"chat.completion.chunk","created":1741570283,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_eb9dce56a8","choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}],"usage":null}

data: {"id":"chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG","object":"chat.completion.chunk","created":1741570283,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_eb9dce56a8","choices":[{"index":0,"delta":{"content":"Hello"},"logprobs":null,"finish_reason":null}],"usage":null}

data: {"id":"chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG","object":"chat.completion.chunk","created":1741570283,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_eb9dce56a8","choices":[{"index":0,"delta":{"content":"!"},"logprobs":null,"finish_reason":null}],"usage":null}

data: {"id":"chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG","object":"chat.completion.chunk","created":1741570283,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_eb9dce56a8","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}],"usage":null}

data: {"id":"chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG","object":"chat.completion.chunk","created":1741570283,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_eb9dce56a8","choices":[],"usage":{"prompt_tokens":19,"completion_tokens":3,"total_tokens":22,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}

data: [DONE]

"""

CHAT_TOOL = rb"""data: {"id":"chatcmpl-BQb0iSFzE1zz1OVhaqg3u2Yqn1Ezf","object":"chat.completion.chunk","created":1745678496,"model":"gpt-4.1-nano-2025-04-14","service_tier":"default","system_fingerprint":"fp_eede8f0d45","choices":[{"index":0,"delta":{"role":"assistant","content":null,"refusal":null},"logprobs":null,"finish_reason":null}],"usage":null}

data: {"id":"chatcmpl-BQb0iSFzE1zz1OVhaqg3u2Yqn1Ezf","object":"chat.completion.chunk","created":1745678496,"model":"gpt-4.1-nano-2025-04-14","service_tier":"default","system_fingerprint":"fp_eede8f0d45","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_PieqNSej6kM9hgYbcQdbZSaC","type":"function","function":{"name":"get_weather","arguments":""}}]},"logprobs":null,"finish_reason":null}],"usage":null}

data: {"id":"chatcmpl-BQb0iSFzE1zz1OVhaqg3u2Yqn1Ezf","object":"chat.completion.chunk","created":1745678496,"model":"gpt-4.1-nano-2025-04-14","service_tier":"default","system_fingerprint":"fp_eede8f0d45","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"location\":"}}]},"logprobs":null,"finish_reason":null}],"usage":null}

data: {"id":"chatcmpl-BQb0iSFzE1zz1OVhaqg3u2Yqn1Ezf","object":"chat.completion.chunk","created":1745678496,"model":"gpt-4.1-nano-2025-04-14","service_tier":"default","system_fingerprint":"fp_eede8f0d45","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"\"Paris\"}"}}]},"logprobs":null,"finish_reason":null}],"usage":null}

data: {"id":"chatcmpl-BQb0iSFzE1zz1OVhaqg3u2Yqn1Ezf","object":"chat.completion.chunk","created":1745678496,"model":"gpt-4.1-nano-2025-04-14","service_tier":"default","system_fingerprint":"fp_eede8f0d45","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"tool_calls"}],"usage":null}

data: {"id":"chatcmpl-BQb0iSFzE1zz1OVhaqg3u2Yqn1Ezf","object":"chat.completion.chunk","created":1745678496,"model":"gpt-4.1-nano-2025-04-14","service_tier":"default","system_fingerprint":"fp_eede8f0d45","choices":[],"usage":{"prompt_tokens":62,"completion_tokens":15,"total_tokens":77,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}

data: [DONE]

"""

RESPONSES_TEXT = rb"""event: response.created
data: {"type":"response.created","sequence_number":0,"response":{"id":"resp_67c9fdcecf488190","object":"response","created_at":1741290958,"status":"in_progress","error":null,"incomplete_details":null,"model":"gpt-4.1-2025-04-14","output":[],"usage":null}}

event: response.in_progress
data: {"type":"response.in_progress","sequence_number":1,"response":{"id":"resp_67c9fdcecf488190","object":"response","created_at":1741290958,"status":"in_progress","error":null,"incomplete_details":null,"model":"gpt-4.1-2025-04-14","output":[],"usage":null}}

event: response.output_item.added
data: {"type":"response.output_item.added","sequence_number":2,"output_index":0,"item":{"id":"msg_67c9fdcf37fc8190","type":"message","status":"in_progress","role":"assistant","content":[]}}

event: response.content_part.added
data: {"type":"response.content_part.added","sequence_number":3,"item_id":"msg_67c9fdcf37fc8190","output_index":0,"content_index":0,"part":{"type":"output_text","text":"","annotations":[],"logprobs":[]}}

event: response.output_text.delta
data: {"type":"response.output_text.delta","sequence_number":4,"item_id":"msg_67c9fdcf37fc8190","output_index":0,"content_index":0,"delta":"Hi","logprobs":[]}

event: response.output_text.delta
data: {"type":"response.output_text.delta","sequence_number":5,"item_id":"msg_67c9fdcf37fc8190","output_index":0,"content_index":0,"delta":" there!","logprobs":[]}

event: response.output_text.done
data: {"type":"response.output_text.done","sequence_number":6,"item_id":"msg_67c9fdcf37fc8190","output_index":0,"content_index":0,"text":"Hi there!","logprobs":[]}

event: response.content_part.done
data: {"type":"response.content_part.done","sequence_number":7,"item_id":"msg_67c9fdcf37fc8190","output_index":0,"content_index":0,"part":{"type":"output_text","text":"Hi there!","annotations":[],"logprobs":[]}}

event: response.output_item.done
data: {"type":"response.output_item.done","sequence_number":8,"output_index":0,"item":{"id":"msg_67c9fdcf37fc8190","type":"message","status":"completed","role":"assistant","content":[{"type":"output_text","text":"Hi there!","annotations":[],"logprobs":[]}]}}

event: response.completed
data: {"type":"response.completed","sequence_number":9,"response":{"id":"resp_67c9fdcecf488190","object":"response","created_at":1741290958,"status":"completed","error":null,"incomplete_details":null,"model":"gpt-4.1-2025-04-14","output":[{"id":"msg_67c9fdcf37fc8190","type":"message","status":"completed","role":"assistant","content":[{"type":"output_text","text":"Hi there!","annotations":[],"logprobs":[]}]}],"usage":{"input_tokens":36,"input_tokens_details":{"cached_tokens":0},"output_tokens":87,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":123}}}

"""

RESPONSES_TOOL = rb"""event: response.created
data: {"type":"response.created","sequence_number":0,"response":{"id":"resp_abc","object":"response","created_at":1741290958,"status":"in_progress","error":null,"incomplete_details":null,"model":"gpt-4.1-2025-04-14","output":[],"usage":null}}

event: response.output_item.added
data: {"type":"response.output_item.added","sequence_number":1,"output_index":0,"item":{"id":"fc_123","type":"function_call","status":"in_progress","arguments":"","call_id":"call_XYZ","name":"get_weather"}}

event: response.function_call_arguments.delta
data: {"type":"response.function_call_arguments.delta","sequence_number":2,"item_id":"fc_123","output_index":0,"delta":"{\"location\":"}

event: response.function_call_arguments.delta
data: {"type":"response.function_call_arguments.delta","sequence_number":3,"item_id":"fc_123","output_index":0,"delta":"\"Paris\"}"}

event: response.function_call_arguments.done
data: {"type":"response.function_call_arguments.done","sequence_number":4,"item_id":"fc_123","output_index":0,"arguments":"{\"location\":\"Paris\"}"}

event: response.output_item.done
data: {"type":"response.output_item.done","sequence_number":5,"output_index":0,"item":{"id":"fc_123","type":"function_call","status":"completed","arguments":"{\"location\":\"Paris\"}","call_id":"call_XYZ","name":"get_weather"}}

event: response.completed
data: {"type":"response.completed","sequence_number":6,"response":{"id":"resp_abc","object":"response","created_at":1741290958,"status":"completed","error":null,"incomplete_details":null,"model":"gpt-4.1-2025-04-14","output":[{"id":"fc_123","type":"function_call","status":"completed","arguments":"{\"location\":\"Paris\"}","call_id":"call_XYZ","name":"get_weather"}],"usage":{"input_tokens":58,"input_tokens_details":{"cached_tokens":0},"output_tokens":17,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":75}}}

"""
