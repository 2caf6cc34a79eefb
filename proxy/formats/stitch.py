"""Stitching a continuation into a client's stream: one answer from several upstream calls.

When a stream breaks after content, the proxy may ask a deployment to continue from the
text the client already has (an assistant prefill) and splice that continuation into the
same response.  A `Stitch` watches every event the client gets (in the client's protocol)
and knows, at a break:

- whether the answer can be continued (its last open block is text, nothing but text came,
  it has not ended; never across thinking or a tool call's arguments);
- the text to prefill (trailing whitespace trimmed: Anthropic refuses it, and a model
  regenerates it anyway), and the request that asks for the rest;
- how to rewrite the continuation's events so the client sees one answer: its preamble
  dropped, its first text merged into the open block, block indexes that keep counting, the
  whitespace the trim would repeat dropped, one final stop reason and one final usage.

Pure: decoded events in, decoded events out (the relay encodes them).
"""

from __future__ import annotations

import copy
from typing import Any

Event = tuple[str | None, Any]  # (SSE event name, decoded data)


def estimate_tokens(text: str) -> int:
    """A token per 4 characters: the common rule of thumb, as for broken streams."""
    return -(-len(text) // 4)


class Stitch:
    """Base: what both protocols share (the text so far, the whitespace rule)."""

    def __init__(self) -> None:
        self.pieces: list[str] = []  # the text the client has, in order
        self.carried = 0  # output tokens of earlier calls (estimated), for the final usage
        self.continuing = False
        self._pending_space = ""  # whitespace the prefill trimmed, still to drop once

    # -- at a break ------------------------------------------------------------------
    def continuable(self) -> bool:
        raise NotImplementedError

    def text(self) -> str:
        return "".join(self.pieces)

    def begin(self) -> str:
        """Enter a continuation; returns the prefill text (trailing whitespace trimmed)."""
        text = self.text()
        prefill = text.rstrip()
        self._pending_space = text[len(prefill):]
        self.carried = estimate_tokens(text)
        self.continuing = True
        self._begin()
        return prefill

    def request(self, payload: dict, prefill: str) -> dict:
        """The continuation request: the original one plus the prefill as the last turn."""
        raise NotImplementedError

    def _begin(self) -> None:
        pass

    # -- event by event ------------------------------------------------------------------
    def observe(self, name: str | None, data: Any) -> None:
        raise NotImplementedError

    def rewrite(self, name: str | None, data: Any) -> list[Event]:
        raise NotImplementedError

    def _without_repeated_space(self, text: str) -> str:
        """The continuation's text minus the whitespace the trimmed prefill already sent."""
        pending = self._pending_space
        if not pending:
            return text
        same = 0
        while same < min(len(pending), len(text)) and pending[same] == text[same]:
            same += 1
        self._pending_space = "" if same < len(text) or same == len(pending) else pending[same:]
        return text[same:]


def _with_assistant_turn(messages: Any, prefill: str) -> list:
    """`messages` ending with an assistant turn holding `prefill` (appended to a prefill the
    client sent itself, whose text the answer continues)."""
    messages = list(messages) if isinstance(messages, list) else []
    if messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
        last = messages.pop()
        prefill = _text_of(last.get("content")) + prefill
    if prefill:
        messages.append({"role": "assistant", "content": prefill})
    return messages


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(b.get("text", "") for b in content if isinstance(b, dict)
                       and b.get("type") in ("text", "output_text", "input_text"))
    return ""


# -- Anthropic Messages ----------------------------------------------------------------------
class AnthropicStitch(Stitch):
    """Messages events: blocks by index, one `message_start`, `message_delta` with usage."""

    def __init__(self) -> None:
        super().__init__()
        self.started = False
        self.stopped = False
        self.blocks: dict[int, str] = {}  # client index -> block type
        self.open: int | None = None
        self.start_usage: dict = {}
        self._map: dict[int, int] = {}  # continuation index -> client index
        self._merge_first = False

    def continuable(self) -> bool:
        return (self.started and not self.stopped
                and all(kind == "text" for kind in self.blocks.values()))

    def request(self, payload: dict, prefill: str) -> dict:
        return dict(payload, messages=_with_assistant_turn(payload.get("messages"), prefill))

    def _begin(self) -> None:
        self._map = {}
        self._merge_first = self.open is not None

    def observe(self, name: str | None, data: Any) -> None:
        if not isinstance(data, dict):
            return
        kind = data.get("type")
        if kind == "message_start":
            self.started = True
            usage = (data.get("message") or {}).get("usage")
            self.start_usage = dict(usage) if isinstance(usage, dict) else {}
        elif kind == "content_block_start":
            index = data.get("index")
            self.blocks[index] = (data.get("content_block") or {}).get("type") or "unknown"
            self.open = index
        elif kind == "content_block_delta":
            delta = data.get("delta") or {}
            if delta.get("type") == "text_delta" and isinstance(delta.get("text"), str):
                self.pieces.append(delta["text"])
        elif kind == "content_block_stop":
            self.open = None
        elif kind == "message_delta":
            self.stopped = True

    def rewrite(self, name: str | None, data: Any) -> list[Event]:
        kind = data.get("type") if isinstance(data, dict) else None
        if kind == "message_start":
            return []  # the client has its message already
        if kind == "content_block_start":
            return self._block_start(name, data)
        if kind in ("content_block_delta", "content_block_stop"):
            return self._in_block(name, data)
        if kind == "message_delta":
            return [(name, self._final_usage(data))]
        return [(name, data)]  # ping, message_stop, error

    def _block_start(self, name: str | None, data: dict) -> list[Event]:
        index, block = data.get("index"), data.get("content_block") or {}
        if self._merge_first and block.get("type") == "text":
            self._merge_first = False
            self._map[index] = self.open  # the open text block goes on
            return []
        out: list[Event] = []
        if self._merge_first:  # something else comes first: the open block ends here
            self._merge_first = False
            out.append(("content_block_stop", {"type": "content_block_stop", "index": self.open}))
            self.open = None
        mapped = self._map[index] = max(self.blocks, default=-1) + 1
        return out + [(name, dict(data, index=mapped))]

    def _in_block(self, name: str | None, data: dict) -> list[Event]:
        mapped = self._map.get(data.get("index"), data.get("index"))
        delta = data.get("delta")
        if isinstance(delta, dict) and delta.get("type") == "text_delta":
            text = self._without_repeated_space(delta.get("text") or "")
            if not text:
                return []
            delta = dict(delta, text=text)
            return [(name, dict(data, index=mapped, delta=delta))]
        return [(name, dict(data, index=mapped))]

    def _final_usage(self, data: dict) -> dict:
        """The whole answer's usage: the prompt as first sent, and every call's output."""
        usage = dict(data.get("usage") or {})
        usage["output_tokens"] = self.carried + (usage.get("output_tokens") or 0)
        for key in ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"):
            if key in usage and key in self.start_usage:
                usage[key] = self.start_usage[key]
        return dict(data, usage=usage)


# -- OpenAI Chat Completions -------------------------------------------------------------------
class ChatStitch(Stitch):
    """Chat chunks: one choice's content, the first stream's id, one usage chunk."""

    def __init__(self) -> None:
        super().__init__()
        self.identity: dict = {}  # id, created, model of the first stream
        self.other = False  # tool calls, reasoning, refusals or a second choice came
        self.finished = False

    def continuable(self) -> bool:
        return not self.other and not self.finished

    def request(self, payload: dict, prefill: str) -> dict:
        return dict(payload, messages=_with_assistant_turn(payload.get("messages"), prefill))

    def observe(self, name: str | None, data: Any) -> None:
        if data == "[DONE]":
            self.finished = True
            return
        if not isinstance(data, dict):
            return
        if not self.identity:
            self.identity = {k: data[k] for k in ("id", "created", "model") if k in data}
        for choice in data.get("choices") or []:
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta") or {}
            if choice.get("index", 0) != 0 or any(
                    delta.get(k) for k in ("tool_calls", "function_call", "reasoning_content",
                                           "reasoning", "refusal")):
                self.other = True
            if isinstance(delta.get("content"), str):
                self.pieces.append(delta["content"])
            if choice.get("finish_reason"):
                self.finished = True

    def rewrite(self, name: str | None, data: Any) -> list[Event]:
        if not isinstance(data, dict):
            return [(name, data)]  # [DONE]
        chunk = dict(data, **self.identity)
        if isinstance(chunk.get("usage"), dict):
            chunk["usage"] = self._final_usage(chunk["usage"])
        choices = [c for c in (self._choice(c) for c in chunk.get("choices") or []) if c is not None]
        if data.get("choices") and not choices and not chunk.get("usage"):
            return []  # the continuation's role chunk, or whitespace already sent
        return [(name, dict(chunk, choices=choices))]

    def _choice(self, choice: Any) -> dict | None:
        if not isinstance(choice, dict):
            return None
        delta = {k: v for k, v in (choice.get("delta") or {}).items() if k != "role"}
        if isinstance(delta.get("content"), str):
            delta["content"] = self._without_repeated_space(delta["content"])
        if not delta.get("content"):
            delta.pop("content", None)
        if not delta and not choice.get("finish_reason"):
            return None
        return dict(choice, delta=delta)

    def _final_usage(self, usage: dict) -> dict:
        """The continuation's prompt held the prefill, which is output the client got: it
        moves back from prompt to completion, so the totals describe one answer."""
        usage = copy.deepcopy(usage)
        carried = self.carried
        prompt = usage.get("prompt_tokens") or 0
        usage["prompt_tokens"] = max(prompt - carried, 0)
        usage["completion_tokens"] = (usage.get("completion_tokens") or 0) + carried
        return usage


# -- OpenAI Responses ---------------------------------------------------------------------------
class ResponsesStitch(Stitch):
    """Responses events: numbered in sequence, items by output index, the text told again in
    full by each `*.done` event and by the terminal response object."""

    PREAMBLE = frozenset({"response.created", "response.in_progress", "response.queued"})

    def __init__(self) -> None:
        super().__init__()
        self.response: dict = {}  # the first call's response object (id, created_at, model)
        self.sequence = -1  # the last sequence number the client got
        self.items: dict[int, dict] = {}  # output index -> the item as the client has it
        self.open: int | None = None  # the output index of the item still being written
        self.parts: dict[tuple[int, int], str] = {}  # (output index, content index) -> its text
        self.other = False  # an item or part that is not text (a call, reasoning, a refusal)
        self.ended = False
        self._items_map: dict[int, int] = {}  # continuation output index -> the client's
        self._ids: dict[str, str] = {}  # continuation item id -> the client's
        self._merge_first = False

    def continuable(self) -> bool:
        return bool(self.response) and not self.other and not self.ended

    def text(self) -> str:
        """Every text part, in output and content order (nothing but text, if continuable)."""
        return "".join(self.parts[key] for key in sorted(self.parts))

    def request(self, payload: dict, prefill: str) -> dict:
        turns = payload.get("input")
        turns = [{"role": "user", "content": turns}] if isinstance(turns, str) else list(turns or [])
        return dict(payload, input=_with_assistant_turn(turns, prefill))

    def _begin(self) -> None:
        self._items_map, self._ids = {}, {}
        self._merge_first = self.open is not None and (self.open, 0) in self.parts

    # -- what the client has -------------------------------------------------------------
    def observe(self, name: str | None, data: Any) -> None:
        if not isinstance(data, dict):
            return
        if isinstance(data.get("sequence_number"), int):
            self.sequence = data["sequence_number"]
        kind = data.get("type")
        if kind == "response.created" and isinstance(data.get("response"), dict):
            self.response = data["response"]
        elif kind == "response.output_item.added":
            item = data.get("item") or {}
            self.items[data.get("output_index")] = item
            self.open = data.get("output_index")
            self.other = self.other or item.get("type") != "message"
        elif kind == "response.content_part.added":
            part = data.get("part") or {}
            self.other = self.other or part.get("type") != "output_text"
            self.parts[(data.get("output_index"), data.get("content_index"))] = part.get("text") or ""
        elif kind == "response.output_text.delta":
            key = (data.get("output_index"), data.get("content_index"))
            self.parts[key] = self.parts.get(key, "") + (data.get("delta") or "")
        elif kind == "response.output_item.done":
            self.items[data.get("output_index")] = data.get("item") or {}
            self.open = None
        elif kind in ("response.completed", "response.incomplete", "response.failed"):
            self.ended = True
        elif kind and kind.startswith("response.") and kind not in self.PREAMBLE \
                and not kind.startswith(("response.output_text", "response.content_part")):
            self.other = True  # function call arguments, reasoning, refusals, tool progress

    # -- the continuation, renumbered ------------------------------------------------------------
    def rewrite(self, name: str | None, data: Any) -> list[Event]:
        kind = data.get("type") if isinstance(data, dict) else None
        if kind in self.PREAMBLE:
            return []
        out = self._renamed(data)
        if kind == "response.output_item.added":
            if self._merge_first and (out.get("item") or {}).get("type") == "message":
                self._merge_first = False
                self._map_item(data, self.open)
                return []
            self._merge_first = False
            out = self._renamed(data, self._map_item(data, max(self.items, default=-1) + 1))
        elif kind == "response.content_part.added" and out.get("output_index") == self.open \
                and (self.open, out.get("content_index")) in self.parts:
            return []  # the open part goes on
        elif kind == "response.output_text.delta":
            out["delta"] = self._without_repeated_space(out.get("delta") or "")
            if not out["delta"]:
                return []
        elif kind == "response.output_text.done":
            out["text"] = self.parts.get((out.get("output_index"), out.get("content_index")), "")
        elif kind == "response.content_part.done":
            key = (out.get("output_index"), out.get("content_index"))
            out["part"] = dict(out.get("part") or {}, text=self.parts.get(key, ""))
        elif kind == "response.output_item.done":
            out["item"] = self._whole_item(out.get("output_index"), out.get("item") or {})
        elif kind in ("response.completed", "response.incomplete", "response.failed"):
            out["response"] = self._whole_response(out.get("response") or {})
        self.sequence += 1
        out["sequence_number"] = self.sequence
        return [(name, out)]

    def _map_item(self, data: dict, index: int) -> int:
        self._items_map[data.get("output_index")] = index
        item_id = (data.get("item") or {}).get("id")
        if item_id and index in self.items and self.items[index].get("id"):
            self._ids[item_id] = self.items[index]["id"]
        return index

    def _renamed(self, data: dict, index: int | None = None) -> dict:
        out = dict(data)
        if "output_index" in out:
            out["output_index"] = index if index is not None else self._items_map.get(
                out["output_index"], out["output_index"])
        if out.get("item_id") in self._ids:
            out["item_id"] = self._ids[out["item_id"]]
        if isinstance(out.get("item"), dict) and out["item"].get("id") in self._ids:
            out["item"] = dict(out["item"], id=self._ids[out["item"]["id"]])
        return out

    def _whole_item(self, index: int, item: dict) -> dict:
        if item.get("type") != "message":
            return item
        content = [dict(part, text=self.parts[(index, i)]) if (index, i) in self.parts else part
                   for i, part in enumerate(item.get("content") or [])]
        return dict(item, content=content)

    def _whole_response(self, response: dict) -> dict:
        """The first call's response object, with every item the client got and the whole
        answer's usage."""
        items = [self.items[i] for i in sorted(self.items)]
        out = dict(response, output=items)
        for key in ("id", "created_at"):
            if key in self.response:
                out[key] = self.response[key]
        usage = response.get("usage")
        if isinstance(usage, dict):
            usage = copy.deepcopy(usage)
            usage["input_tokens"] = max((usage.get("input_tokens") or 0) - self.carried, 0)
            usage["output_tokens"] = (usage.get("output_tokens") or 0) + self.carried
            out["usage"] = usage
        return out
