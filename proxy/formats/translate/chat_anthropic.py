"""OpenAI Chat Completions clients on Anthropic Messages upstreams.

`to_messages_request` rewrites a Chat request for an Anthropic upstream;
`completion_from_message` turns a Messages answer into a `chat.completion`;
`AnthropicToChatStream` turns Messages events into Chat chunks as they arrive.  Pure: JSON in,
JSON or event bytes out (the caller passes the clock's `created`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ...errors import BadRequest
from ..base import Frame
from .common import chat_finish_reason, chat_tool_call, id_for_anthropic, id_from_anthropic

# Fields of a Chat request Anthropic has no counterpart for; dropped (the README lists them).
DROPPED_FIELDS = ("frequency_penalty", "presence_penalty", "seed", "logit_bias", "store",
                  "metadata", "service_tier", "stream_options")
# Reasoning effort -> Anthropic thinking budget (tokens).
_BUDGETS = {"minimal": 1024, "low": 1024, "medium": 4096, "high": 16384}


@dataclass(frozen=True)
class AnthropicUpstream:
    """What an Anthropic upstream needs that a Chat request may not say."""

    default_max_tokens: int = 4096  # Anthropic requires max_tokens


# -- the request -----------------------------------------------------------------------------
def to_messages_request(payload: dict, upstream: AnthropicUpstream = AnthropicUpstream()) -> dict:
    """The Messages request for a Chat request; what Anthropic cannot express is a 400."""
    _refuse_the_inexpressible(payload)
    system, messages = _split_messages(payload.get("messages"))
    out: dict[str, Any] = {"model": payload.get("model"), "messages": messages}
    if system:
        out["system"] = system
    out["max_tokens"] = (payload.get("max_completion_tokens") or payload.get("max_tokens")
                         or upstream.default_max_tokens)
    for name in ("temperature", "top_p"):
        if payload.get(name) is not None:
            out[name] = payload[name]
    stop = payload.get("stop")
    if stop:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    if isinstance(payload.get("user"), str) and payload["user"]:
        out["metadata"] = {"user_id": payload["user"]}
    if payload.get("tools"):
        out["tools"] = [_anthropic_tool(tool) for tool in payload["tools"]]
    choice = _tool_choice(payload.get("tool_choice"), payload.get("parallel_tool_calls"))
    if choice:
        out["tool_choice"] = choice
    effort = payload.get("reasoning_effort")
    if effort:
        out["thinking"] = _thinking(effort, out["max_tokens"])
    if payload.get("stream") is True:
        out["stream"] = True
    return out


def _refuse_the_inexpressible(payload: dict) -> None:
    if (payload.get("n") or 1) > 1:
        raise BadRequest("`n` > 1 cannot be sent to this model's API (one answer per request)")
    if payload.get("logprobs") or payload.get("top_logprobs"):
        raise BadRequest("`logprobs` cannot be sent to this model's API")
    response_format = payload.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") not in (None, "text"):
        raise BadRequest(f"`response_format` {response_format.get('type')!r} cannot be sent to "
                         "this model's API")


def _split_messages(messages: Any) -> tuple[str, list[dict]]:
    """System and developer messages -> `system`; the rest -> alternating turns, tool
    results gathered into the user turn that follows the assistant's calls."""
    if not isinstance(messages, list):
        raise BadRequest("`messages` must be an array")
    system: list[str] = []
    turns: list[dict] = []
    for message in messages:
        if not isinstance(message, dict):
            raise BadRequest("each message must be an object")
        role = message.get("role")
        if role in ("system", "developer"):
            system.append(_text_of(message.get("content")))
            continue
        if role == "user":
            blocks = _user_blocks(message.get("content"))
        elif role == "tool":
            role, blocks = "user", [{"type": "tool_result",
                                     "tool_use_id": id_for_anthropic(str(message.get("tool_call_id", ""))),
                                     "content": _text_of(message.get("content"))}]
        elif role == "assistant":
            blocks = _assistant_blocks(message)
        else:
            raise BadRequest(f"a message with role {role!r} cannot be sent to this model's API")
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        elif blocks:
            turns.append({"role": role, "content": blocks})
    return "\n\n".join(s for s in system if s), turns


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content
                       if isinstance(part, dict) and part.get("type") == "text")
    return ""


def _user_blocks(content: Any) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    blocks = []
    for part in content if isinstance(content, list) else []:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            blocks.append({"type": "text", "text": part.get("text", "")})
        elif kind == "image_url":
            blocks.append(_image_block((part.get("image_url") or {}).get("url", "")))
        else:
            raise BadRequest(f"a `{kind}` content part cannot be sent to this model's API")
    return blocks


def _image_block(url: str) -> dict:
    if url.startswith("data:"):
        head, _, data = url[5:].partition(",")
        media_type, _, encoding = head.partition(";")
        if encoding != "base64" or not data:
            raise BadRequest("an image data URL must be base64")
        return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
    if url.startswith(("http://", "https://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise BadRequest("an image_url must be a data URL or an http(s) URL")


def _assistant_blocks(message: dict) -> list[dict]:
    text = _text_of(message.get("content"))
    blocks = [{"type": "text", "text": text}] if text else []  # never an empty text block
    for call in message.get("tool_calls") or []:
        function = (call or {}).get("function") or {}
        try:
            arguments = json.loads(function.get("arguments") or "{}")
        except ValueError:
            raise BadRequest(f"the arguments of tool call {call.get('id')!r} are not valid JSON") from None
        blocks.append({"type": "tool_use", "id": id_for_anthropic(str(call.get("id", ""))),
                       "name": function.get("name"), "input": arguments})
    return blocks


def _anthropic_tool(tool: Any) -> dict:
    function = (tool or {}).get("function") if isinstance(tool, dict) else None
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
        raise BadRequest("only function tools can be sent to this model's API")
    out = {"name": function.get("name"),
           "input_schema": function.get("parameters") or {"type": "object", "properties": {}}}
    if function.get("description"):
        out["description"] = function["description"]
    return out


def _tool_choice(choice: Any, parallel: Any) -> dict | None:
    out: dict[str, Any] | None = None
    if choice == "auto":
        out = {"type": "auto"}
    elif choice == "required":
        out = {"type": "any"}
    elif choice == "none":
        out = {"type": "none"}
    elif isinstance(choice, dict):
        out = {"type": "tool", "name": (choice.get("function") or {}).get("name")}
    if parallel is False:
        out = (out or {"type": "auto"}) | {"disable_parallel_tool_use": True}
    return out


def _thinking(effort: str, max_tokens: int) -> dict:
    budget = _BUDGETS.get(effort)
    if budget is None:
        raise BadRequest(f"`reasoning_effort` {effort!r} cannot be sent to this model's API")
    if max_tokens <= 1024:
        raise BadRequest("`reasoning_effort` needs max_tokens above 1024 on this model's API")
    return {"type": "enabled", "budget_tokens": min(budget, max_tokens - 1)}


# -- usage and the JSON answer --------------------------------------------------------------
def chat_usage(usage: Any) -> dict:
    """Anthropic usage in Chat's terms: `prompt_tokens` counts cached input too."""
    usage = usage if isinstance(usage, dict) else {}
    read = usage.get("cache_read_input_tokens") or 0
    written = usage.get("cache_creation_input_tokens") or 0
    prompt = (usage.get("input_tokens") or 0) + read + written
    completion = usage.get("output_tokens") or 0
    out: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                           "total_tokens": prompt + completion}
    if read:
        out["prompt_tokens_details"] = {"cached_tokens": read}
    return out


def completion_from_message(message: dict, created: int, reasoning: bool = False) -> dict:
    """A Messages answer as a `chat.completion` (`reasoning`: pass thinking on as
    `reasoning_content`, an opt-in some clients read)."""
    texts, thoughts, calls = [], [], []
    for block in message.get("content") or []:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(block.get("text", ""))
        elif kind == "thinking":
            thoughts.append(block.get("thinking", ""))
        elif kind == "tool_use":
            calls.append(chat_tool_call(block))
    out_message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) or None}
    if calls:
        out_message["tool_calls"] = calls
    if reasoning and thoughts:
        out_message["reasoning_content"] = "".join(thoughts)
    return {"id": "chatcmpl-" + str(message.get("id", "")), "object": "chat.completion",
            "created": created, "model": message.get("model"),
            "choices": [{"index": 0, "message": out_message, "logprobs": None,
                         "finish_reason": chat_finish_reason(message.get("stop_reason"), bool(calls))}],
            "usage": chat_usage(message.get("usage"))}


# -- the event stream -----------------------------------------------------------------------
@dataclass
class AnthropicToChatStream:
    """Feeds on Messages events (name, decoded data), gives Chat chunks (bytes): the role
    chunk, content and tool-call deltas, the finish reason, the usage chunk when the client
    asked for it, `[DONE]`."""

    created: int
    include_usage: bool = False
    reasoning: bool = False
    _id: str = ""
    _model: str | None = None
    _usage: dict = field(default_factory=dict)
    _tool_index: dict[int, int] = field(default_factory=dict)  # block index -> tool call index
    _stop_reason: str | None = None
    _ended: bool = False

    def feed(self, name: str | None, data: Any) -> list[Frame]:
        if not isinstance(data, dict):
            return []
        kind = data.get("type") or name
        if kind == "message_start":
            message = data.get("message") or {}
            self._id, self._model = str(message.get("id", "")), message.get("model")
            self._usage.update(message.get("usage") or {})
            return [self._chunk({"role": "assistant", "content": ""})]
        if kind == "content_block_start":
            return self._block_start(data.get("index", 0), data.get("content_block") or {})
        if kind == "content_block_delta":
            return self._block_delta(data.get("index", 0), data.get("delta") or {})
        if kind == "message_delta":
            self._stop_reason = (data.get("delta") or {}).get("stop_reason") or self._stop_reason
            self._usage.update({k: v for k, v in (data.get("usage") or {}).items() if v is not None})
            return []
        if kind == "message_stop":
            return self.finish()
        return []  # ping, content_block_stop

    def finish(self) -> list[Frame]:
        if self._ended:
            return []
        self._ended = True
        reason = chat_finish_reason(self._stop_reason, bool(self._tool_index))
        chunks = [self._chunk({}, finish_reason=reason)]
        if self.include_usage:
            chunks.append(self._frame({"choices": [], "usage": chat_usage(self._usage)}))
        return chunks + [Frame.of(None, "[DONE]")]

    def _block_start(self, index: int, block: dict) -> list[Frame]:
        if block.get("type") != "tool_use":
            return []
        call_index = self._tool_index.setdefault(index, len(self._tool_index))
        return [self._chunk({"tool_calls": [{
            "index": call_index, "id": id_from_anthropic(str(block.get("id", ""))), "type": "function",
            "function": {"name": block.get("name"), "arguments": ""}}]})]

    def _block_delta(self, index: int, delta: dict) -> list[Frame]:
        kind = delta.get("type")
        if kind == "text_delta" and delta.get("text"):
            return [self._chunk({"content": delta["text"]})]
        if kind == "input_json_delta" and delta.get("partial_json") and index in self._tool_index:
            return [self._chunk({"tool_calls": [{"index": self._tool_index[index],
                                                 "function": {"arguments": delta["partial_json"]}}]})]
        if kind == "thinking_delta" and self.reasoning and delta.get("thinking"):
            return [self._chunk({"reasoning_content": delta["thinking"]})]
        return []

    def _chunk(self, delta: dict, finish_reason: str | None = None) -> Frame:
        return self._frame({"choices": [{"index": 0, "delta": delta, "logprobs": None,
                                         "finish_reason": finish_reason}]})

    def _frame(self, body: dict) -> Frame:
        return Frame.of(None, {"id": "chatcmpl-" + self._id, "object": "chat.completion.chunk",
                               "created": self.created, "model": self._model, **body})
