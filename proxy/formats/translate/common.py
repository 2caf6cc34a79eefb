"""What both directions share: the stop-reason table and reversible tool-call ids."""

from __future__ import annotations

import json
import re

from ...errors import UntranslatableAnswer

# Chat `finish_reason` -> Anthropic `stop_reason`, and back.  One table, both directions.
STOP_REASONS: tuple[tuple[str, str], ...] = (
    ("stop", "end_turn"),
    ("length", "max_tokens"),
    ("tool_calls", "tool_use"),
    ("content_filter", "refusal"),
)
_TO_ANTHROPIC = dict(STOP_REASONS) | {"function_call": "tool_use"}
_TO_CHAT = {anthropic: chat for chat, anthropic in STOP_REASONS} | {
    "stop_sequence": "stop", "pause_turn": "stop"}


def anthropic_stop_reason(finish_reason: str | None, emitted_tool_use: bool) -> str:
    """The Anthropic stop reason of a Chat answer.  A tool block sent wins over `end_turn`
    (servers that say "stop" after tool calls would leave the tool unrun); running out of
    tokens wins over tools (their arguments may be cut)."""
    return _mapped(finish_reason, "finish_reason", _TO_ANTHROPIC, ("end_turn", "tool_use"),
                   emitted_tool_use)


def chat_finish_reason(stop_reason: str | None, emitted_tool_calls: bool) -> str:
    """The Chat finish reason of an Anthropic answer (the same rules, the other way)."""
    return _mapped(stop_reason, "stop_reason", _TO_CHAT, ("stop", "tool_calls"), emitted_tool_calls)


def _mapped(reason: str | None, field: str, table: dict[str, str], ends: tuple[str, str],
            emitted_tools: bool) -> str:
    """`reason` in the other protocol's words; `ends` are its (plain end, tool use) reasons.
    None is the plain end; an unknown one is the upstream's fault, never a silent end."""
    plain, tools = ends
    if reason is None:
        mapped = plain
    elif reason in table:
        mapped = table[reason]
    else:
        raise UntranslatableAnswer(f"the upstream ended with an unknown {field} {reason!r}")
    return tools if emitted_tools and mapped == plain else mapped


def chat_tool_call(block: dict) -> dict:
    """An Anthropic `tool_use` block as a Chat tool call (its id mapped back)."""
    return {"id": id_from_anthropic(str(block.get("id", ""))), "type": "function",
            "function": {"name": block.get("name"), "arguments": json.dumps(block.get("input") or {})}}


# Anthropic takes tool-use ids matching this; OpenAI-compatible servers send what they like.
_ANTHROPIC_ID = re.compile(r"[a-zA-Z0-9_-]+")
_ENCODED = "llmp_"


def id_for_anthropic(tool_call_id: str) -> str:
    """A tool-call id Anthropic accepts, reversibly: one it would refuse is sent as its
    hex, so the id in a history the client replays later maps back to the original."""
    if _ANTHROPIC_ID.fullmatch(tool_call_id) and not tool_call_id.startswith(_ENCODED):
        return tool_call_id
    return _ENCODED + tool_call_id.encode("utf-8").hex()


def id_from_anthropic(tool_use_id: str) -> str:
    if tool_use_id.startswith(_ENCODED):
        try:
            return bytes.fromhex(tool_use_id[len(_ENCODED):]).decode("utf-8")
        except ValueError:
            pass
    return tool_use_id
