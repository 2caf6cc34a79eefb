"""One exception root for everything the proxy reports to a client.

Each class carries its HTTP status, the error type each protocol uses for it, and the
`end_reason` recorded in the usage row, so no status table lives anywhere else.  How an
error is rendered (JSON body before the commit, one terminal event after it) is the
business of the endpoint's format module.
"""

from __future__ import annotations


class ProxyError(Exception):
    """Root of every error the proxy turns into a client-visible response."""

    status = 500
    anthropic_status: int | None = None  # Anthropic's own status where it differs (529)
    anthropic_type = "api_error"
    openai_type = "server_error"
    openai_code: str | None = None
    end_reason = "upstream_error"
    # Caused by what the client sent: answered at once, never retried, and never counted
    # against a deployment's circuit breaker (one client must not open it for everyone).
    client_fault = False

    def __init__(self, message: str, *, retry_after: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class BadRequest(ProxyError):
    status = 400
    anthropic_type = openai_type = "invalid_request_error"
    end_reason = "rejected"
    client_fault = True


class NotFound(ProxyError):
    status = 404
    anthropic_type = "not_found_error"
    openai_type = "invalid_request_error"
    openai_code = "not_found"
    end_reason = "rejected"
    client_fault = True


class MethodNotAllowed(ProxyError):
    status = 405
    anthropic_type = openai_type = "invalid_request_error"
    end_reason = "rejected"
    client_fault = True


class RequestRejected(BadRequest):
    """A request the server refused before the application could read it (bad framing)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class RequestTimeout(ProxyError):
    """The client took longer than `client_timeout` to send its request."""

    status = 408
    anthropic_type = openai_type = "invalid_request_error"
    openai_code = "request_timeout"
    end_reason = "rejected"
    client_fault = True


class PayloadTooLarge(ProxyError):
    status = 413
    anthropic_type = "request_too_large"
    openai_type = "invalid_request_error"
    openai_code = "request_too_large"
    end_reason = "rejected"
    client_fault = True


class Overloaded(ProxyError):
    """This worker holds as much request data as its memory budget allows; retry shortly."""

    status = 503
    anthropic_status = 529
    anthropic_type = "overloaded_error"
    openai_type = "server_error"
    openai_code = "proxy_overloaded"
    end_reason = "rejected"

    def __init__(self, message: str, *, retry_after: str | None = "1") -> None:
        super().__init__(message, retry_after=retry_after)


class UpstreamUnreachable(ProxyError):
    """Connect failure, reset, or a broken response before anything reached the client."""

    status = 502
    anthropic_type = "api_error"
    openai_type = "server_error"
    openai_code = "upstream_unreachable"
    end_reason = "connect_error"


class UpstreamTimeout(ProxyError):
    """The upstream said nothing for `idle_timeout` seconds."""

    status = 504
    anthropic_type = "timeout_error"
    openai_type = "server_error"
    openai_code = "upstream_timeout"
    end_reason = "idle_timeout"


class FirstTokenTimeout(ProxyError):
    """The deployment sent no content within the route's `first_token_timeout`."""

    status = 504
    anthropic_type = "timeout_error"
    openai_type = "server_error"
    openai_code = "first_token_timeout"
    end_reason = "first_token_timeout"


class UpstreamBroken(ProxyError):
    """The upstream cut the stream, sent a malformed event or ended it unfinished."""

    status = 502
    anthropic_type = "api_error"
    openai_type = "server_error"
    openai_code = "upstream_stream_broken"
    end_reason = "upstream_error"


class ShuttingDown(ProxyError):
    """The proxy is stopping; the client should retry elsewhere."""

    status = 503
    anthropic_status = 529
    anthropic_type = "overloaded_error"
    openai_type = "server_error"
    openai_code = "proxy_shutting_down"
    end_reason = "shutdown"


class ReportUnavailable(ProxyError):
    """The usage database cannot be read right now (the proxy itself is fine)."""

    status = 503
    openai_code = "usage_unavailable"
    end_reason = "rejected"


class ClientGone(ProxyError):
    """The client hung up; nothing is rendered, only recorded."""

    status = 499
    end_reason = "client_gone"


_ANTHROPIC_TYPE_BY_STATUS = {
    400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
    403: "permission_error", 404: "not_found_error", 409: "conflict_error",
    413: "request_too_large", 429: "rate_limit_error", 504: "timeout_error",
    529: "overloaded_error",
}


class UpstreamHTTPError(ProxyError):
    """An upstream error status that arrived after the stream had committed to 200."""

    end_reason = "upstream_error"

    def __init__(self, status: int, message: str, upstream_type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.anthropic_type = upstream_type or _ANTHROPIC_TYPE_BY_STATUS.get(
            status, "api_error" if status >= 500 else "invalid_request_error")
        self.openai_type = upstream_type or ("server_error" if status >= 500 else "invalid_request_error")
        self.openai_code = f"upstream_status_{status}"


class NoUsableDeployment(ProxyError):
    status = 400
    anthropic_type = openai_type = "invalid_request_error"
    end_reason = "rejected"
    client_fault = True


class AllDeploymentsUnavailable(ProxyError):
    """Every deployment's breaker is open; the client should come back later."""

    status = 503
    anthropic_type = "overloaded_error"
    openai_type = "server_error"
    openai_code = "all_deployments_unavailable"
    end_reason = "upstream_error"
