"""One module per API format: how its streams are classified and how its errors look.

Each format answers the same questions for the relay: is this event preamble, content,
the protocol's own end, or an upstream error; what does an error look like as a JSON
body (before the commit) and as one terminal event (after it).
"""

from __future__ import annotations

from .anthropic import AnthropicFormat
from .base import EventKind, Format, StreamView
from .openai_chat import ChatFormat
from .openai_responses import ResponsesFormat

ANTHROPIC = AnthropicFormat()
OPENAI_CHAT = ChatFormat()
OPENAI_RESPONSES = ResponsesFormat()

BY_NAME: dict[str, Format] = {f.name: f for f in (ANTHROPIC, OPENAI_CHAT, OPENAI_RESPONSES)}

__all__ = ["ANTHROPIC", "OPENAI_CHAT", "OPENAI_RESPONSES", "BY_NAME", "EventKind", "Format",
           "StreamView"]
