"""A complete streamed answer, turned into the JSON body of the same answer without streaming.

Why: a non-streaming duplicate of a request whose streamed answer is cached can be answered
from that cache, but only with the body the upstream would have sent for `stream: false`.
The official `anthropic` and `openai` SDKs must parse it with their non-streaming types, and it
must hold everything the stream held (text, thinking and its signature, redacted thinking,
tool calls, citations, stop reason, usage, ids, model).

The input is the SSE bytes exactly as a client received them.  An answer that is not whole
(cut, ended by an error, or of a shape this module does not know) raises `NotAssembled` and
nothing else: the caller then simply does not answer from the cache, which is always safe,
whereas a half answer served as a whole one is not.  So every rule here errs on refusing.

Pure and I/O-free (protocols.md §2-§4 describe the wire formats).
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable

from ..sse import Event, SSEFramer
from .openai_chat import DONE_MARKER

# Anthropic content blocks whose `input` arrives as `input_json_delta` fragments.
_TOOL_BLOCKS = frozenset({"tool_use", "server_tool_use"})
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")


class NotAssembled(ValueError):
    """The events do not make one complete answer (cut, failed, unknown shape)."""


def assemble_stream(fmt_name: str, body: bytes) -> dict:
    """The non-streaming JSON body equivalent to the complete SSE stream `body`.

    `fmt_name` is a Format's `name` ("anthropic", "openai-chat", "openai-responses").
    Raises NotAssembled, never another exception, when `body` is not one whole answer: odd
    shapes are checked where they are read, and the last `except` turns any that slipped
    through into a refusal, because a caller serving from a cache must never crash on one.
    """
    assembler = _ASSEMBLERS.get(fmt_name)
    if assembler is None:
        raise NotAssembled(f"no assembler for the format {fmt_name!r}")
    try:
        return assembler(_decoded_events(body))
    except NotAssembled:
        raise
    except (LookupError, TypeError, ValueError, AttributeError, RecursionError) as exc:
        raise NotAssembled(f"a malformed stream ({type(exc).__name__}: {exc})") from exc


# -- SSE ---------------------------------------------------------------------------------

def _decoded_events(body: bytes) -> list[tuple[str | None, Any]]:
    """(event name, JSON data) of each event a client dispatched; `[DONE]` stays a string.

    Invalid UTF-8 is refused (the framer would replace it, the SDKs fail on it), and so is
    an unfinished last event: the client never saw it.
    """
    if not isinstance(body, (bytes, bytearray)):
        raise NotAssembled("the stream must be bytes")
    raw = bytes(body)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NotAssembled("the stream is not valid UTF-8") from exc
    framer = SSEFramer()
    events = framer.feed(raw)
    if not _dispatches_nothing(framer.pending_bytes()):
        raise NotAssembled("the stream ends inside an event")
    return [(event.event, _data(event)) for event in events if not event.is_comment_only]


def _dispatches_nothing(leftover: bytes) -> bool:
    """True for trailing bytes made only of line breaks and comment lines (a keepalive
    sent without its blank line): they would dispatch nothing even if the event ended."""
    return all(not line or line.startswith(b":") for line in _LINE_BREAK.split(leftover))


def _data(event: Event) -> Any:
    data = event.data
    if data == DONE_MARKER:
        return DONE_MARKER
    try:
        return json.loads(data, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise NotAssembled(f"an event's data is not JSON: {data[:80]!r}") from exc


def _reject_constant(name: str) -> Any:
    """NaN and Infinity are not JSON: an answer carrying them could not be sent on."""
    raise NotAssembled(f"an event's data holds {name}, which is not JSON")


# -- small checks ------------------------------------------------------------------------

def _dict(value: Any, what: str) -> dict:
    if not isinstance(value, dict):
        raise NotAssembled(f"{what} is not a JSON object")
    return value


def _str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise NotAssembled(f"{what} is not a string")
    return value


def _index(value: Any, what: str) -> int:
    """A list position: a non-negative int (JSON `true` is not one, though Python agrees)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise NotAssembled(f"{what} is not an index")
    return value


def _text_so_far(obj: dict, key: str) -> str:
    """The string a delta appends to: absent or null counts as empty, anything else is odd."""
    value = obj.get(key)
    return "" if value is None else _str(value, key)


def _overwrite(target: dict, source: dict) -> None:
    """Non-null values replace (never add to) earlier ones: streamed counts are totals."""
    target.update({key: value for key, value in source.items() if value is not None})


def _in_order(items: dict[int, Any], what: str) -> list[Any]:
    """Items keyed by position 0..n-1; a gap means a part of the answer is missing."""
    if sorted(items) != list(range(len(items))):
        raise NotAssembled(f"the {what} indexes are not 0..{len(items) - 1}")
    return [items[i] for i in range(len(items))]


# -- Anthropic Messages (protocols.md §2) ------------------------------------------------

# delta type -> (the block types it applies to, the block's string field it extends, the
# delta's field that carries the piece).  Pieces are joined when the block stops: a long
# answer in thousands of deltas must not be copied once per delta.
_STRING_DELTAS: dict[str, tuple[frozenset[str], str, str]] = {
    "text_delta": (frozenset({"text"}), "text", "text"),
    "thinking_delta": (frozenset({"thinking"}), "thinking", "thinking"),
    # Sent once, just before the block stops, to a block started with "" or without one:
    # appending is setting, and a signature ever sent in pieces would still come out whole.
    "signature_delta": (frozenset({"thinking"}), "signature", "signature"),
    # JSON fragments, parsed once the block stops (see `_tool_input`).
    "input_json_delta": (_TOOL_BLOCKS, "input", "partial_json"),
}


class _Block:
    """One content block: as `content_block_start` gave it, plus its deltas' pieces."""

    def __init__(self, body: dict) -> None:
        self.body = body
        self.pieces: dict[str, list[str]] = {}
        self.stopped = False

    def apply(self, delta: dict) -> None:
        kind = _str(delta.get("type"), "delta.type")
        if kind == "citations_delta":
            self._expect(kind, frozenset({"text"}))
            self._add_citation(_dict(delta.get("citation"), "citations_delta.citation"))
        elif kind in _STRING_DELTAS:
            wanted, field, source = _STRING_DELTAS[kind]
            self._expect(kind, wanted)
            self.pieces.setdefault(field, []).append(_str(delta.get(source), source))
        # Any other delta type is newer than this module: the block stays as started.

    def _expect(self, delta_type: str, block_types: frozenset[str]) -> None:
        if self.body["type"] not in block_types:
            raise NotAssembled(f"a {delta_type} for a {self.body['type']} block")

    def _add_citation(self, citation: dict) -> None:
        citations = self.body.get("citations")
        if citations is None:
            citations = self.body["citations"] = []
        if not isinstance(citations, list):
            raise NotAssembled("a text block's citations are not a list")
        citations.append(citation)

    def stop(self) -> None:
        self.stopped = True
        for field, pieces in self.pieces.items():
            joined = "".join(pieces)
            if field == "input":
                self.body["input"] = _tool_input(joined)
            else:
                self.body[field] = _text_so_far(self.body, field) + joined


def _tool_input(raw: str) -> dict:
    """The concatenated `partial_json` of a tool block; the API sends "" for no input."""
    if not raw.strip():
        return {}
    try:
        value = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise NotAssembled("a tool's input is not JSON") from exc
    return _dict(value, "a tool's input")


# message_delta.delta keys that must not replace the message's own (content is rebuilt
# from the blocks, usage is merged key by key).
_MESSAGE_OWN = frozenset({"content", "usage"})


class _AnthropicMessage:
    """Replays a Messages stream the way the SDK's own accumulator does, more strictly."""

    def __init__(self) -> None:
        self.message: dict | None = None
        self.blocks: dict[int, _Block] = {}
        self.done = False

    def feed(self, name: str | None, obj: Any) -> None:
        obj = _dict(obj, "an Anthropic event")
        kind = obj.get("type")
        if name is None or kind != name:
            # The SDKs drop events without an `event:` name, so the client never saw it.
            raise NotAssembled(f"an event named {name!r} carries type {kind!r}")
        if kind == "ping":
            return
        if kind == "error":
            raise NotAssembled("the stream ended with an error event")
        if self.done:
            raise NotAssembled(f"a {kind} event after message_stop")
        handler = self._HANDLERS.get(kind)
        if handler is None:
            return  # "handle unknown event types gracefully" (protocols.md §2.2)
        if kind != "message_start" and self.message is None:
            raise NotAssembled(f"a {kind} event before message_start")
        handler(self, obj)

    def _start(self, obj: dict) -> None:
        if self.message is not None:
            raise NotAssembled("a second message_start")
        message = _dict(obj.get("message"), "message_start.message")
        _str(message.get("id"), "message.id")
        _str(message.get("model"), "message.model")
        _dict(message.get("usage"), "message.usage")
        if message.get("content") != []:
            raise NotAssembled("message_start.message.content is not empty")
        self.message = message

    def _block_start(self, obj: dict) -> None:
        index = _index(obj.get("index"), "content_block_start.index")
        if index in self.blocks:
            raise NotAssembled(f"a second content block {index}")
        block = _dict(obj.get("content_block"), "content_block")
        _str(block.get("type"), "content_block.type")
        self.blocks[index] = _Block(block)

    def _open_block(self, obj: dict) -> _Block:
        index = _index(obj.get("index"), f"{obj.get('type')}.index")
        block = self.blocks.get(index)
        if block is None or block.stopped:
            raise NotAssembled(f"{obj.get('type')} for a block that is not open ({index})")
        return block

    def _block_delta(self, obj: dict) -> None:
        self._open_block(obj).apply(_dict(obj.get("delta"), "content_block_delta.delta"))

    def _block_stop(self, obj: dict) -> None:
        self._open_block(obj).stop()

    def _delta(self, obj: dict) -> None:
        assert self.message is not None
        delta = _dict(obj.get("delta"), "message_delta.delta")
        _overwrite(self.message, {k: v for k, v in delta.items() if k not in _MESSAGE_OWN})
        usage = obj.get("usage")
        if usage is not None:
            _overwrite(self.message["usage"], _dict(usage, "message_delta.usage"))

    def _stop(self, obj: dict) -> None:
        self.done = True

    _HANDLERS: dict[str, Callable[["_AnthropicMessage", dict], None]] = {
        "message_start": _start, "content_block_start": _block_start,
        "content_block_delta": _block_delta, "content_block_stop": _block_stop,
        "message_delta": _delta, "message_stop": _stop,
    }

    def result(self) -> dict:
        if not self.done or self.message is None:
            raise NotAssembled("the stream has no message_stop")
        if not all(block.stopped for block in self.blocks.values()):
            raise NotAssembled("a content block was never stopped")
        _str(self.message.get("stop_reason"), "stop_reason")
        blocks = _in_order(self.blocks, "content block")
        return {**self.message, "content": [block.body for block in blocks]}


def _assemble_anthropic(events: list[tuple[str | None, Any]]) -> dict:
    message = _AnthropicMessage()
    for name, obj in events:
        message.feed(name, obj)
    return message.result()


# -- OpenAI Chat Completions (protocols.md §3) -------------------------------------------

# Delta fields whose string pieces make one string of the message.  The reasoning ones are
# not OpenAI's (DeepSeek, vLLM and OpenRouter send them) and appear only when streamed.
_CHAT_TEXTS = ("content", "refusal", "reasoning_content", "reasoning")


class _ChatChoice:
    """One choice's deltas, merged into the message a non-streaming answer carries.

    Pieces are gathered in lists and joined once: a long answer in thousands of chunks must
    not be copied once per chunk.
    """

    def __init__(self, index: int) -> None:
        self.index = index
        self.role = "assistant"
        self.texts: dict[str, list[str]] = {}
        self.tool_calls: dict[int, dict] = {}
        self.function_call: dict | None = None
        self.logprobs: dict[str, list | None] | None = None
        self.finish_reason: str | None = None

    def feed(self, choice: dict) -> None:
        delta = choice.get("delta")
        self._delta({} if delta is None else _dict(delta, "choice.delta"))
        self._logprobs(choice.get("logprobs"))
        reason = choice.get("finish_reason")
        if reason is not None:
            self.finish_reason = _str(reason, "finish_reason")

    def _delta(self, delta: dict) -> None:
        if delta.get("audio") is not None:
            raise NotAssembled("streamed audio is not assembled")
        if delta.get("role") is not None:
            self.role = _str(delta["role"], "delta.role")
        for key in _CHAT_TEXTS:
            if delta.get(key) is not None:
                self.texts.setdefault(key, []).append(_str(delta[key], f"delta.{key}"))
        calls = delta.get("tool_calls")
        if calls is not None:
            if not isinstance(calls, list):
                raise NotAssembled("delta.tool_calls is not a list")
            for call in calls:
                self._tool_call(_dict(call, "a tool call delta"))
        if delta.get("function_call") is not None:
            self.function_call = self.function_call or {}
            function = _dict(delta["function_call"], "delta.function_call")
            _merge_function(self.function_call, function)

    def _tool_call(self, call: dict) -> None:
        """The first delta of a call has its id, type and name; later ones add arguments."""
        index = _index(call.get("index"), "tool_call.index")
        merged = self.tool_calls.setdefault(index, {})
        for key in ("id", "type"):
            if call.get(key) is not None and key not in merged:
                merged[key] = _str(call[key], f"tool_call.{key}")
        if call.get("function") is not None:
            _merge_function(merged.setdefault("function", {}),
                            _dict(call["function"], "tool_call.function"))

    def _logprobs(self, logprobs: Any) -> None:
        if logprobs is None:
            return
        logprobs = _dict(logprobs, "choice.logprobs")
        self.logprobs = self.logprobs or {"content": None, "refusal": None}
        for key in ("content", "refusal"):
            tokens = logprobs.get(key)
            if tokens is not None:
                if not isinstance(tokens, list):
                    raise NotAssembled(f"logprobs.{key} is not a list")
                gathered = self.logprobs[key]
                if gathered is None:
                    gathered = self.logprobs[key] = []
                gathered.extend(tokens)

    def result(self) -> dict:
        if self.finish_reason is None:
            raise NotAssembled(f"choice {self.index} has no finish_reason")
        message: dict[str, Any] = {"role": self.role}
        for key in ("content", "refusal"):  # null, not "", when none came (as without stream)
            message[key] = "".join(self.texts.get(key, [])) or None
        if self.tool_calls:
            message["tool_calls"] = [_finished_call(call) for call in
                                     _in_order(self.tool_calls, "tool call")]
        if self.function_call is not None:
            message["function_call"] = _finished_function(self.function_call)
        for key in ("reasoning_content", "reasoning"):
            if key in self.texts:
                message[key] = "".join(self.texts[key])
        return {"index": self.index, "message": message, "logprobs": self.logprobs,
                "finish_reason": self.finish_reason}


def _merge_function(merged: dict, function: dict) -> None:
    """The name comes once (a repeat is not appended); the arguments come in fragments."""
    if function.get("name") is not None and "name" not in merged:
        merged["name"] = _str(function["name"], "function.name")
    if function.get("arguments") is not None:
        merged.setdefault("arguments", []).append(_str(function["arguments"], "arguments"))


def _finished_function(function: dict) -> dict:
    if "name" not in function:
        raise NotAssembled("a function call without a name")
    return {"name": function["name"], "arguments": "".join(function.get("arguments", []))}


def _finished_call(call: dict) -> dict:
    if "id" not in call or "function" not in call:
        raise NotAssembled("a tool call without its id or function")
    return {"id": call["id"], "type": call.get("type", "function"),
            "function": _finished_function(call["function"])}


class _ChatCompletion:
    """Chunks until `[DONE]`: the head fields from the first chunk, choices by index."""

    _HEAD = ("id", "created", "model")
    _OPTIONAL = ("system_fingerprint", "service_tier")

    def __init__(self) -> None:
        self.head: dict[str, Any] = {}
        self.extra: dict[str, Any] = {}
        self.choices: dict[int, _ChatChoice] = {}
        self.usage: dict | None = None
        self.done = False

    def feed(self, obj: Any) -> None:
        if self.done:
            return  # the SDK stops reading at [DONE]
        if obj == DONE_MARKER:
            self.done = True
            return
        chunk = _dict(obj, "a chat chunk")
        if chunk.get("error"):
            raise NotAssembled("the stream ended with an error chunk")
        for key in self._HEAD:
            if key not in self.head and chunk.get(key) is not None:
                self.head[key] = chunk[key]
        _overwrite(self.extra, {key: chunk.get(key) for key in self._OPTIONAL})
        if chunk.get("usage") is not None:
            self.usage = _dict(chunk["usage"], "chunk.usage")
        choices = chunk.get("choices")
        if choices is None:
            return  # vLLM's usage chunk has `choices: null`
        if not isinstance(choices, list):
            raise NotAssembled("chunk.choices is not a list")
        for choice in choices:
            choice = _dict(choice, "a chunk's choice")
            index = _index(choice.get("index"), "choice.index")
            self.choices.setdefault(index, _ChatChoice(index)).feed(choice)

    def result(self) -> dict:
        if not self.done:
            raise NotAssembled("the stream has no [DONE]")
        if not self.choices:
            raise NotAssembled("the stream has no choices")
        created = self.head.get("created")
        if not isinstance(created, int) or isinstance(created, bool):
            raise NotAssembled("the chunks have no integer `created`")
        body: dict[str, Any] = {
            "id": _str(self.head.get("id"), "id"), "object": "chat.completion",
            "created": created, "model": _str(self.head.get("model"), "model"),
            "choices": [choice.result() for choice in _in_order(self.choices, "choice")],
        }
        if self.usage is not None:
            body["usage"] = self.usage
        return {**body, **self.extra}


def _assemble_chat(events: list[tuple[str | None, Any]]) -> dict:
    completion = _ChatCompletion()
    for _, obj in events:
        completion.feed(obj)
    return completion.result()


# -- OpenAI Responses (protocols.md §4) --------------------------------------------------

_RESPONSES_FAILURES = frozenset({"error", "response.failed", "response.incomplete"})


def _assemble_responses(events: list[tuple[str | None, Any]]) -> dict:
    """The `response` of `response.completed` already is the non-streaming body."""
    completed: dict | None = None
    for name, obj in events:
        if obj == DONE_MARKER:
            continue  # not documented, but the SDK accepts one
        event = _dict(obj, "a Responses event")
        kind = _str(event.get("type") or name, "a Responses event's type")
        if kind in _RESPONSES_FAILURES:
            raise NotAssembled(f"the stream ended with {kind}")
        if kind == "response.completed":
            if completed is not None:
                raise NotAssembled("a second response.completed")
            completed = _dict(event.get("response"), "response.completed.response")
    if completed is None:
        raise NotAssembled("the stream has no response.completed")
    if completed.get("status", "completed") != "completed":
        raise NotAssembled(f"response.completed with status {completed.get('status')!r}")
    return completed


_ASSEMBLERS: dict[str, Callable[[list[tuple[str | None, Any]]], dict]] = {
    "anthropic": _assemble_anthropic,
    "openai-chat": _assemble_chat,
    "openai-responses": _assemble_responses,
}
