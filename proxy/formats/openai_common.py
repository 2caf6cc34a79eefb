"""What the OpenAI endpoints share: Bearer credentials and the `{"error": {...}}` shape."""

from __future__ import annotations

from typing import Any

from ..errors import ProxyError
from ..usage import Usage
from .usage_fields import count, get, uncached

# The proxy's own error codes OpenAI's shape leaves without a `code` (as OpenAI does for a
# plain invalid request); every other code is sent as it is.
_UNCODED = frozenset({"invalid_request", "method_not_allowed", "no_usable_deployment",
                      "internal_error", "not_configured", "client_gone"})


def bearer(key: str) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {key}")]


# The proxy's own refusals that OpenAI's API has a type of its own for.
_TYPES = {"authentication_error": "invalid_request_error", "rate_limit_exceeded": "requests",
          "budget_exceeded": "insufficient_quota", "permission_denied": "invalid_request_error"}


def openai_error_type(err: ProxyError) -> str:
    """The upstream's own type when it said one; else whose fault it is."""
    if err.upstream_type:
        return err.upstream_type
    if err.upstream_status is not None:
        return "server_error" if err.upstream_status >= 500 else "invalid_request_error"
    if err.code in _TYPES:
        return _TYPES[err.code]
    return "invalid_request_error" if err.client_fault else "server_error"


def openai_error_code(err: ProxyError) -> str | None:
    if err.upstream_status is not None:
        return f"upstream_status_{err.upstream_status}"
    if err.code == "authentication_error":
        return "invalid_api_key"  # OpenAI's own code for a key it does not know
    return None if err.code in _UNCODED else err.code


def openai_error_object(err: ProxyError) -> dict:
    return {"message": err.message, "type": openai_error_type(err), "param": None,
            "code": openai_error_code(err)}


def openai_usage(u: Any, prompt: str, completion: str) -> Usage:
    """OpenAI usage, Chat (`prompt_tokens`, `completion_tokens`) or Responses (`input_tokens`,
    `output_tokens`): the prompt count includes cache reads and writes, subtracted once here;
    each count's details sit beside it as `<name>_details`."""
    if not isinstance(u, dict):
        return Usage()
    cached = count(get(u, f"{prompt}_details", "cached_tokens"))
    written = count(get(u, f"{prompt}_details", "cache_write_tokens"))
    return Usage(
        input_tokens=uncached(count(u.get(prompt)), cached, written),
        output_tokens=count(u.get(completion)),
        cache_read_tokens=cached,
        cache_write_tokens=written,
        reasoning_tokens=count(get(u, f"{completion}_details", "reasoning_tokens")),
    )
