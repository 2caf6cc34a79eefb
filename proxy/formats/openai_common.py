"""What the OpenAI endpoints share: Bearer credentials and the `{"error": {...}}` shape."""

from __future__ import annotations

from ..errors import ProxyError

# The proxy's own error codes OpenAI's shape leaves without a `code` (as OpenAI does for a
# plain invalid request); every other code is sent as it is.
_UNCODED = frozenset({"invalid_request", "method_not_allowed", "no_usable_deployment",
                      "internal_error", "not_configured", "client_gone"})


def bearer(key: str) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {key}")]


def openai_error_type(err: ProxyError) -> str:
    """The upstream's own type when it said one; else whose fault it is."""
    if err.upstream_type:
        return err.upstream_type
    if err.upstream_status is not None:
        return "server_error" if err.upstream_status >= 500 else "invalid_request_error"
    return "invalid_request_error" if err.client_fault else "server_error"


def openai_error_code(err: ProxyError) -> str | None:
    if err.upstream_status is not None:
        return f"upstream_status_{err.upstream_status}"
    return None if err.code in _UNCODED else err.code


def openai_error_object(err: ProxyError) -> dict:
    return {"message": err.message, "type": openai_error_type(err), "param": None,
            "code": openai_error_code(err)}
