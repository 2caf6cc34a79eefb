"""One module per API format; each owns everything about its protocol (see `base.Format`)."""

from __future__ import annotations

from typing import Mapping

from .anthropic import AnthropicFormat
from .base import EventKind, Format, RequestFacts, StreamView, UsageParser
from .openai_chat import ChatFormat
from .openai_responses import ResponsesFormat

ANTHROPIC = AnthropicFormat()
OPENAI_CHAT = ChatFormat()
OPENAI_RESPONSES = ResponsesFormat()

BY_NAME: dict[str, Format] = {f.name: f for f in (ANTHROPIC, OPENAI_CHAT, OPENAI_RESPONSES)}
# The format a provider family's credentials and list endpoints speak.
BY_PROVIDER: dict[str, Format] = {"anthropic": ANTHROPIC, "openai": OPENAI_CHAT}
# Headers any format may carry a key in (a client's key is replaced by the provider's).
CREDENTIAL_HEADERS = frozenset({"x-api-key", "authorization"})


def for_client(headers: Mapping[str, str]) -> Format:
    """The error shape a client will understand when the path tells us nothing: an
    Anthropic SDK sends `anthropic-version` (and its key in `x-api-key`)."""
    if headers.get("anthropic-version") or headers.get("x-api-key"):
        return ANTHROPIC
    return OPENAI_CHAT


__all__ = ["ANTHROPIC", "OPENAI_CHAT", "OPENAI_RESPONSES", "BY_NAME", "BY_PROVIDER",
           "CREDENTIAL_HEADERS", "EventKind", "Format", "RequestFacts", "StreamView",
           "UsageParser", "for_client"]
