"""A bridge: everything one try needs to cross from its client's format to its deployment's.

The pipeline asks `Bridges.between` once per try.  Same format: no bridge, the bytes pass
through untouched.  Another format: the bridge rewrites the request (path, headers, body)
for the upstream, turns its answer back (a JSON body, or its events one by one) into the
client's protocol, and tells the upstream's errors in the client's terms.  Pure: the
caller passes decoded JSON and the clock's `created`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from ...errors import UntranslatableAnswer, UpstreamHTTPError
from .. import ANTHROPIC, BY_PROVIDER, CREDENTIAL_HEADERS, OPENAI_CHAT, Format
from ..base import Frame
from ...redact import CREDENTIAL_HEADERS as REDACTED_KEY_HEADERS
from .anthropic_chat import (ChatToAnthropicStream, ChatUpstream, estimate_input_tokens,
                             message_from_completion, to_chat_request)
from .chat_anthropic import (AnthropicToChatStream, AnthropicUpstream, completion_from_message,
                             to_messages_request)

ANTHROPIC_VERSION = "2023-06-01"
# Error types of both protocols -> the status they stand for: an upstream's error event
# mid-stream carries a type but no status, and the client's protocol needs one.
_TYPE_STATUS = {
    "invalid_request_error": 400, "authentication_error": 401, "billing_error": 402,
    "permission_error": 403, "not_found_error": 404, "request_too_large": 413,
    "rate_limit_error": 429, "rate_limit_exceeded": 429, "insufficient_quota": 429,
    "tokens": 429, "requests": 429, "api_error": 500, "server_error": 500,
    "timeout_error": 504, "overloaded_error": 529,
}


class EventTranslator(Protocol):
    """Upstream events in (decoded), client events out (whole SSE frames)."""

    def feed(self, name: str | None, payload: Any) -> list[Frame]: ...

    def finish(self) -> list[Frame]: ...


def foreign_error(client: Format, status: int, message: str) -> UpstreamHTTPError:
    """An error an upstream of another format answered, in the client's terms: the status
    its SDK expects (Anthropic's 529 is a 503 to an OpenAI client), and no upstream error
    type, so the client's format names the type after the status."""
    if client is not ANTHROPIC and status == 529:
        status = 503
    return UpstreamHTTPError(status, message)


def status_of_error_type(kind: str | None) -> int:
    return _TYPE_STATUS.get(kind or "", 500)


class Bridge:
    """One direction of translation, with the deployment's provider settings."""

    client: Format
    upstream: Format
    upstream_path: str

    def request(self, payload: dict) -> dict:
        raise NotImplementedError

    def headers(self, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """The client's headers without what belongs to its own provider: its key (never
        sent to another provider) and its API's own headers."""
        own = _OWN_HEADER_PREFIX[self.client.provider_format]
        return [(k, v) for k, v in headers
                if k.lower() not in _KEY_HEADERS and not k.lower().startswith(own)]

    def events(self, payload: dict, include_usage: bool, created: int) -> EventTranslator:
        raise NotImplementedError

    def answer(self, body: Any, created: int) -> dict:
        raise NotImplementedError

    def event_error(self, payload: Any) -> UpstreamHTTPError:
        """An upstream's error event, as the error the client's protocol tells."""
        error = payload.get("error") if isinstance(payload, dict) else None
        kind = error.get("type") if isinstance(error, dict) else None
        return foreign_error(self.client, status_of_error_type(kind),
                             self.upstream.event_error_message(payload))


_OWN_HEADER_PREFIX = {"anthropic": "anthropic-", "openai": "openai-"}
# Every header a client may send a key in (Azure's `api-key`, Google's `x-goog-api-key` too).
_KEY_HEADERS = CREDENTIAL_HEADERS | frozenset(REDACTED_KEY_HEADERS)


@dataclass
class AnthropicOnChat(Bridge):
    """An Anthropic Messages client, a Chat Completions upstream."""

    settings: ChatUpstream = ChatUpstream()
    client = ANTHROPIC
    upstream = OPENAI_CHAT
    upstream_path = "/v1/chat/completions"

    def request(self, payload: dict) -> dict:
        return to_chat_request(payload, self.settings)

    def events(self, payload: dict, include_usage: bool, created: int) -> EventTranslator:
        return _ChatEvents(ChatToAnthropicStream(model=_model(payload),
                                                 input_estimate=estimate_input_tokens(payload)))

    def answer(self, body: Any, created: int) -> dict:
        return message_from_completion(_object(body))


@dataclass
class ChatOnAnthropic(Bridge):
    """A Chat Completions client, an Anthropic Messages upstream."""

    settings: AnthropicUpstream = AnthropicUpstream()
    reasoning: bool = False  # pass thinking on as `reasoning_content` (an opt-in)
    client = OPENAI_CHAT
    upstream = ANTHROPIC
    upstream_path = "/v1/messages"

    def request(self, payload: dict) -> dict:
        return to_messages_request(payload, self.settings)

    def headers(self, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        return super().headers(headers) + [("anthropic-version", ANTHROPIC_VERSION)]

    def events(self, payload: dict, include_usage: bool, created: int) -> EventTranslator:
        return AnthropicToChatStream(created, include_usage=include_usage, reasoning=self.reasoning)

    def answer(self, body: Any, created: int) -> dict:
        return completion_from_message(_object(body), created, reasoning=self.reasoning)


@dataclass
class _ChatEvents:
    """`ChatToAnthropicStream` behind the translator interface (chunks carry no names)."""

    stream: ChatToAnthropicStream

    def feed(self, name: str | None, payload: Any) -> list[Frame]:
        return self.stream.feed(payload)

    def finish(self) -> list[Frame]:
        return self.stream.finish()


@dataclass(frozen=True)
class ProviderTranslation:
    """A provider's translation settings (config: `[providers.NAME]`)."""

    format: str
    max_tokens_field: str = "max_tokens"
    reasoning_effort: bool = False
    default_max_tokens: int = 4096
    reasoning_content: bool = False


class Bridges:
    """The bridge for each (client format, provider) pair, built once from the config."""

    def __init__(self, providers: dict[str, ProviderTranslation]) -> None:
        self._providers = providers
        self._built: dict[tuple[str, str], Bridge | None] = {
            (client.name, name): _bridge(client, settings)
            for name, settings in providers.items() for client in (ANTHROPIC, OPENAI_CHAT)}

    def between(self, client: Format, provider: str) -> Bridge | None:
        """None when the provider speaks the client's format (or nothing bridges them)."""
        return self._built.get((client.name, provider))

    def reaches(self, client: Format, provider: str) -> bool:
        """Can a client of this format be served by this provider, directly or bridged?"""
        settings = self._providers.get(provider)
        if settings is None:
            return False
        return settings.format == client.provider_format or self.between(client, provider) is not None


def _bridge(client: Format, settings: ProviderTranslation) -> Bridge | None:
    upstream = BY_PROVIDER.get(settings.format)
    if upstream is None or upstream.provider_format == client.provider_format:
        return None
    if client is ANTHROPIC:
        return AnthropicOnChat(ChatUpstream(settings.max_tokens_field, settings.reasoning_effort))
    return ChatOnAnthropic(AnthropicUpstream(settings.default_max_tokens),
                           reasoning=settings.reasoning_content)


def _model(payload: dict) -> str | None:
    model = payload.get("model")
    return model if isinstance(model, str) else None


def _object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise UntranslatableAnswer("the upstream answered with JSON that is not an object")
    return body
