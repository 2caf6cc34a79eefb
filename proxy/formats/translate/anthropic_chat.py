"""Anthropic Messages clients on OpenAI Chat Completions upstreams.

`to_chat_request` rewrites a Messages request for a Chat upstream; `message_from_completion`
turns a `chat.completion` into a Messages answer; `ChatToAnthropicStream` turns a Chat stream
into Messages events as its chunks arrive.  Pure: JSON in, JSON or event bytes out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ...errors import BadRequest, UntranslatableAnswer
from ..base import Frame
from .common import anthropic_stop_reason, chat_tool_call, id_for_anthropic, id_from_anthropic

# Fields of a Messages request a Chat upstream cannot take; dropped (README lists them).
DROPPED_FIELDS = ("top_k", "service_tier", "container", "mcp_servers", "context_management")
# Thinking budgets (tokens) up to each bound map to that reasoning effort.
_EFFORTS = ((4096, "low"), (16384, "medium"))


@dataclass(frozen=True)
class ChatUpstream:
    """What a Chat upstream takes, from its provider's settings."""

    max_tokens_field: str = "max_tokens"  # or "max_completion_tokens" (OpenAI's o-series)
    reasoning_effort: bool = False  # takes `reasoning_effort` (else `thinking` is dropped)


# -- the request -----------------------------------------------------------------------------
def to_chat_request(payload: dict, upstream: ChatUpstream = ChatUpstream()) -> dict:
    """The Chat Completions request for a Messages request (raises BadRequest for what
    cannot be expressed)."""
    out: dict[str, Any] = {"model": payload.get("model")}
    messages = _system_messages(payload.get("system"))
    for message in _list(payload.get("messages"), "messages"):
        messages.extend(_chat_messages(message))
    out["messages"] = messages
    if payload.get("max_tokens") is not None:
        out[upstream.max_tokens_field] = payload["max_tokens"]
    for name in ("temperature", "top_p"):
        if payload.get(name) is not None:
            out[name] = payload[name]
    if payload.get("stop_sequences"):
        out["stop"] = list(payload["stop_sequences"])
    user = (payload.get("metadata") or {}).get("user_id")
    if isinstance(user, str) and user:
        out["user"] = user
    if payload.get("tools"):
        out["tools"] = [_chat_tool(tool) for tool in _list(payload["tools"], "tools")]
    out.update(_tool_choice(payload.get("tool_choice")))
    effort = _reasoning_effort(payload.get("thinking"))
    if effort and upstream.reasoning_effort:
        out["reasoning_effort"] = effort
    if payload.get("stream") is True:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    return out


def _list(value: Any, where: str) -> list:
    if not isinstance(value, list):
        raise BadRequest(f"`{where}` must be an array")
    return value


def _system_messages(system: Any) -> list[dict]:
    if system is None or system == "" or system == []:
        return []
    if isinstance(system, str):
        return [{"role": "system", "content": system}]
    texts = [block.get("text", "") for block in _list(system, "system")
             if isinstance(block, dict) and block.get("type") == "text"]
    return [{"role": "system", "content": "\n\n".join(texts)}]


def _blocks(content: Any) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return [b for b in _list(content, "content") if isinstance(b, dict)]


def _chat_messages(message: Any) -> list[dict]:
    if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
        raise BadRequest("each message needs a `role` of user or assistant")
    blocks = _blocks(message.get("content"))
    if message["role"] == "assistant":
        return [_assistant_message(blocks)]
    return _user_messages(blocks)


def _assistant_message(blocks: list[dict]) -> dict:
    texts, calls = [], []
    for block in blocks:
        kind = block.get("type")
        if kind == "text":
            texts.append(block.get("text", ""))
        elif kind == "tool_use":
            calls.append(chat_tool_call(block))
        elif kind in ("thinking", "redacted_thinking"):
            continue  # thinking does not cross formats
        else:
            raise BadRequest(f"an assistant `{kind}` block cannot be sent to this model's API")
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) or None}
    if calls:
        message["tool_calls"] = calls
    return message


def _user_messages(blocks: list[dict]) -> list[dict]:
    """Tool results first (each its own `tool` message, right after the assistant's calls),
    then the rest of the turn, with any image a tool result held."""
    tools, parts = [], []
    for block in blocks:
        kind = block.get("type")
        if kind == "tool_result":
            text, images = _tool_result_content(block)
            tools.append({"role": "tool", "tool_call_id": id_from_anthropic(str(block.get("tool_use_id", ""))),
                          "content": text})
            parts.extend(images)
        elif kind == "text":
            parts.append({"type": "text", "text": block.get("text", "")})
        elif kind == "image":
            parts.append(_image_part(block))
        else:
            raise BadRequest(f"a user `{kind}` block cannot be sent to this model's API")
    messages = tools
    if parts:
        content: Any = parts[0]["text"] if len(parts) == 1 and parts[0]["type"] == "text" else parts
        messages = tools + [{"role": "user", "content": content}]
    return messages


def _tool_result_content(block: dict) -> tuple[str, list[dict]]:
    content = block.get("content")
    blocks = _blocks(content) if content is not None else []
    text = "\n".join(b.get("text", "") for b in blocks if b.get("type") == "text")
    images = [_image_part(b) for b in blocks if b.get("type") == "image"]
    if block.get("is_error"):
        text = f"Error: {text}" if text else "Error"
    return text, images


def _image_part(block: dict) -> dict:
    source = block.get("source") or {}
    if source.get("type") == "base64":
        url = f"data:{source.get('media_type')};base64,{source.get('data')}"
    elif source.get("type") == "url":
        url = source.get("url")
    else:
        raise BadRequest("an image needs a base64 or url source")
    return {"type": "image_url", "image_url": {"url": url}}


def _chat_tool(tool: Any) -> dict:
    """Claude Code's tools omit `type`; server tools (`web_search_...`) have no Chat form."""
    if not isinstance(tool, dict) or not tool.get("name"):
        raise BadRequest("each tool needs a `name`")
    if tool.get("type") not in (None, "custom"):
        raise BadRequest(f"the tool type {tool['type']!r} cannot be sent to this model's API")
    function = {"name": tool["name"], "parameters": tool.get("input_schema") or {"type": "object"}}
    if tool.get("description"):
        function["description"] = tool["description"]
    return {"type": "function", "function": function}


def _tool_choice(choice: Any) -> dict:
    if not isinstance(choice, dict):
        return {}
    kind = choice.get("type")
    out: dict[str, Any] = {}
    if kind == "auto":
        out["tool_choice"] = "auto"
    elif kind == "any":
        out["tool_choice"] = "required"
    elif kind == "none":
        out["tool_choice"] = "none"
    elif kind == "tool":
        out["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
    if choice.get("disable_parallel_tool_use") is True:
        out["parallel_tool_calls"] = False
    return out


def _reasoning_effort(thinking: Any) -> str | None:
    if not isinstance(thinking, dict) or thinking.get("type") != "enabled":
        return None
    budget = thinking.get("budget_tokens") or 0
    return next((effort for bound, effort in _EFFORTS if budget <= bound), "high")


def estimate_input_tokens(payload: dict) -> int:
    """The prompt's size in tokens, roughly (a token per 4 characters of its JSON): what
    `message_start` says before the upstream has counted (never a bare 0)."""
    return max(1, len(json.dumps(payload.get("messages", []))) // 4
               + len(json.dumps(payload.get("system") or "")) // 4
               + len(json.dumps(payload.get("tools") or [])) // 4)


# -- usage and the JSON answer --------------------------------------------------------------
def anthropic_usage(usage: Any) -> dict:
    """Chat usage in Anthropic's terms: `prompt_tokens` counts cache reads and writes,
    Anthropic's `input_tokens` counts neither (they are reported beside it)."""
    if not isinstance(usage, dict):
        return {"input_tokens": 0, "output_tokens": 0}
    prompt = usage.get("prompt_tokens") or 0
    details = usage.get("prompt_tokens_details") or {}
    cached = details.get("cached_tokens") or 0
    written = details.get("cache_write_tokens") or 0
    out = {"input_tokens": max(prompt - cached - written, 0),
           "output_tokens": usage.get("completion_tokens") or 0}
    if cached:
        out["cache_read_input_tokens"] = cached
    if written:
        out["cache_creation_input_tokens"] = written
    return out


def message_from_completion(completion: dict, model: str | None = None) -> dict:
    """A `chat.completion` as a Messages answer."""
    choices = completion.get("choices") or []
    if not choices or not isinstance(choices[0], dict):
        raise UntranslatableAnswer("the upstream answered without a choice")
    message = choices[0].get("message") or {}
    content: list[dict] = []
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    if isinstance(reasoning, str) and reasoning:
        content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
    if isinstance(message.get("content"), str) and message["content"]:
        content.append({"type": "text", "text": message["content"]})
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        content.append({"type": "tool_use", "id": id_for_anthropic(str(call.get("id", ""))),
                        "name": function.get("name"), "input": _arguments(function.get("arguments"))})
    tools = any(block["type"] == "tool_use" for block in content)
    return {"id": "msg_" + str(completion.get("id", "")), "type": "message", "role": "assistant",
            "model": completion.get("model") or model, "content": content,
            "stop_reason": anthropic_stop_reason(choices[0].get("finish_reason"), tools),
            "stop_sequence": None, "usage": anthropic_usage(completion.get("usage"))}


def _arguments(arguments: Any) -> dict:
    if not arguments:
        return {}
    try:
        value = json.loads(arguments)
    except ValueError:
        raise UntranslatableAnswer("the upstream sent tool arguments that are not JSON") from None
    return value if isinstance(value, dict) else {"value": value}


# -- the event stream -----------------------------------------------------------------------
def _event(name: str, payload: dict) -> Frame:
    return Frame.of(name, payload)


@dataclass
class _Block:
    kind: str  # text, thinking, tool_use
    index: int  # the Anthropic content block index
    tool_index: int | None = None  # the Chat tool call index, for tool_use


@dataclass
class ChatToAnthropicStream:
    """Feeds on Chat chunks (decoded), gives Messages events (bytes), one block at a time:
    a block stops before the next starts, and a chunk that starts a new block is never
    lost.  `finish` ends the message (usage and stop reason), once."""

    model: str | None = None
    input_estimate: int = 1
    _started: bool = False
    _block: _Block | None = None
    _next_index: int = 0
    _tools_done: set[int] = field(default_factory=set)
    _emitted_tool: bool = False
    _finish_reason: str | None = None
    _usage: dict | None = None
    _ended: bool = False

    def feed(self, chunk: Any) -> list[Frame]:
        if not isinstance(chunk, dict):
            return []
        events = self._start(chunk)
        if isinstance(chunk.get("usage"), dict):
            self._usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue  # one answer per message: n > 1 was refused with the request
            delta = choice.get("delta") or {}
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if isinstance(reasoning, str) and reasoning:
                events += self._into("thinking", {"type": "thinking_delta", "thinking": reasoning})
            if isinstance(delta.get("content"), str) and delta["content"]:
                events += self._into("text", {"type": "text_delta", "text": delta["content"]})
            for call in delta.get("tool_calls") or []:
                events += self._tool_delta(call)
            if choice.get("finish_reason"):
                self._finish_reason = choice["finish_reason"]
        return events

    def finish(self) -> list[Frame]:
        """The end of the message: the open block stops, then the stop reason and usage."""
        if self._ended:
            return []
        self._ended = True
        events = self._start({}) + self._close()
        reason = anthropic_stop_reason(self._finish_reason, self._emitted_tool)
        usage = anthropic_usage(self._usage) if self._usage else {"output_tokens": 0}
        events.append(_event("message_delta", {
            "type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": None},
            "usage": usage}))
        events.append(_event("message_stop", {"type": "message_stop"}))
        return events

    def _start(self, chunk: dict) -> list[Frame]:
        if self._started:
            return []
        self._started = True
        return [_event("message_start", {"type": "message_start", "message": {
            "id": "msg_" + str(chunk.get("id", "")), "type": "message", "role": "assistant",
            "model": chunk.get("model") or self.model, "content": [], "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": self.input_estimate, "output_tokens": 1}}})]

    def _into(self, kind: str, delta: dict) -> list[Frame]:
        events = []
        if self._block is None or self._block.kind != kind:
            events += self._close()
            empty = {"type": "text", "text": ""} if kind == "text" else \
                {"type": "thinking", "thinking": "", "signature": ""}
            events += self._open(_Block(kind, self._next_index), empty)
        events.append(_event("content_block_delta", {"type": "content_block_delta",
                                                     "index": self._block.index, "delta": delta}))
        return events

    def _tool_delta(self, call: Any) -> list[Frame]:
        if not isinstance(call, dict):
            return []
        index = call.get("index", 0)
        function = call.get("function") or {}
        events = []
        if self._block is None or self._block.tool_index != index:
            if index in self._tools_done:
                raise UntranslatableAnswer("the upstream went back to a finished tool call")
            events += self._close()
            events += self._open(_Block("tool_use", self._next_index, index), {
                "type": "tool_use", "id": id_for_anthropic(str(call.get("id") or f"call_{index}")),
                "name": function.get("name") or "", "input": {}})
            self._emitted_tool = True
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            events.append(_event("content_block_delta", {
                "type": "content_block_delta", "index": self._block.index,
                "delta": {"type": "input_json_delta", "partial_json": arguments}}))
        return events

    def _open(self, block: _Block, content_block: dict) -> list[Frame]:
        self._block = block
        self._next_index += 1
        return [_event("content_block_start", {"type": "content_block_start", "index": block.index,
                                               "content_block": content_block})]

    def _close(self) -> list[Frame]:
        if self._block is None:
            return []
        block, self._block = self._block, None
        if block.tool_index is not None:
            self._tools_done.add(block.tool_index)
        return [_event("content_block_stop", {"type": "content_block_stop", "index": block.index})]
