"""One exception root for everything the proxy reports to a client.

Each class carries its HTTP status, a protocol-free `code` that says what went wrong, and
the end reason recorded in the usage row.  How an error looks in each API (its error type,
Anthropic's 529, the JSON body before the commit, the one terminal event after it) is the
business of that API's module in `formats/`, which maps the code.
"""

from __future__ import annotations

from .usage import EndReason


class ProxyError(Exception):
    """Root of every error the proxy turns into a client-visible response."""

    status = 500
    code = "internal_error"
    end_reason = EndReason.UPSTREAM_ERROR
    # An upstream's own error, told after the stream committed: its status and error type.
    upstream_status: int | None = None
    upstream_type: str | None = None
    # Caused by what the client sent: answered at once, never retried, and never counted
    # against a deployment's circuit breaker (one client must not open it for everyone).
    client_fault = False
    # False: the client must not retry (`x-should-retry: false`, which both SDKs honour).
    should_retry: bool | None = None

    def __init__(self, message: str, *, retry_after: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class BadRequest(ProxyError):
    status = 400
    code = "invalid_request"
    end_reason = EndReason.REJECTED
    client_fault = True


class NotTranslatable(BadRequest):
    """The request says something the deployment's API cannot express (tried on each
    deployment of another format: another deployment of the route may still take it)."""


class NotFound(ProxyError):
    status = 404
    code = "not_found"
    end_reason = EndReason.REJECTED
    client_fault = True


class MethodNotAllowed(ProxyError):
    status = 405
    code = "method_not_allowed"
    end_reason = EndReason.REJECTED
    client_fault = True


class RequestRejected(BadRequest):
    """A request the server refused before the application could read it (bad framing)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class RequestTimeout(ProxyError):
    """The client took longer than `client_timeout` to send its request."""

    status = 408
    code = "request_timeout"
    end_reason = EndReason.REJECTED
    client_fault = True


class PayloadTooLarge(ProxyError):
    status = 413
    code = "request_too_large"
    end_reason = EndReason.REJECTED
    client_fault = True


class Overloaded(ProxyError):
    """This worker holds as much request data as its memory budget allows; retry shortly."""

    status = 503
    code = "proxy_overloaded"
    end_reason = EndReason.REJECTED

    def __init__(self, message: str, *, retry_after: str | None = "1") -> None:
        super().__init__(message, retry_after=retry_after)


class Unauthenticated(ProxyError):
    """No proxy key, or one the proxy does not know (keys mode)."""

    status = 401
    code = "authentication_error"
    end_reason = EndReason.REJECTED
    client_fault = True


class Forbidden(ProxyError):
    """A known key that may not do this: revoked, expired, or a model outside its list."""

    status = 403
    code = "permission_denied"
    end_reason = EndReason.REJECTED
    client_fault = True


class RateLimited(ProxyError):
    """A key's requests or tokens per minute, or its parallel requests, are used up for
    now; `retry_after` says when a retry can pass (the SDKs wait that long)."""

    status = 429
    code = "rate_limit_exceeded"
    end_reason = EndReason.REJECTED
    client_fault = True


class BudgetExhausted(ProxyError):
    """A key's budget for the period cannot cover this request's reservation: retrying
    before the period ends cannot help, so the SDKs are told not to (402, no retry)."""

    status = 402
    code = "budget_exceeded"
    end_reason = EndReason.REJECTED
    client_fault = True
    should_retry = False


class LimitsUnavailable(ProxyError):
    """The key database cannot be read or written right now: a key with limits is not
    admitted unchecked (money is at stake), and the client may retry shortly."""

    status = 503
    code = "limits_unavailable"
    end_reason = EndReason.REJECTED

    def __init__(self, message: str, *, retry_after: str | None = "1") -> None:
        super().__init__(message, retry_after=retry_after)


class UpstreamUnreachable(ProxyError):
    """Connect failure, reset, or a broken response before anything reached the client."""

    status = 502
    code = "upstream_unreachable"
    end_reason = EndReason.CONNECT_ERROR


class UpstreamTimeout(ProxyError):
    """The upstream said nothing for `idle_timeout` seconds."""

    status = 504
    code = "upstream_timeout"
    end_reason = EndReason.IDLE_TIMEOUT


class FirstTokenTimeout(ProxyError):
    """The deployment sent no content within the route's `first_token_timeout`."""

    status = 504
    code = "first_token_timeout"
    end_reason = EndReason.FIRST_TOKEN_TIMEOUT


class UpstreamBroken(ProxyError):
    """The upstream cut the stream, sent a malformed event or ended it unfinished."""

    status = 502
    code = "upstream_stream_broken"
    end_reason = EndReason.UPSTREAM_ERROR


class UntranslatableAnswer(UpstreamBroken):
    """The upstream's answer cannot be told in the client's protocol (an unknown stop
    reason, a tool call it went back to): asking again would not help, so it is never
    continued."""


class UpstreamErrorEvent(UpstreamBroken):
    """The upstream sent an error event mid-answer.  Worth a continuation when it is a
    transient one; if none follows, the client gets it as its terminal error, with the
    upstream's message, status and (in the client's terms) type."""

    def __init__(self, message: str, status: int, upstream_type: str | None = None) -> None:
        super().__init__(message)
        self.status = self.upstream_status = status
        self.upstream_type = upstream_type
        self.client_frame: bytes | None = None  # the event as the client would have had it


class ShuttingDown(ProxyError):
    """The proxy is stopping; the client should retry elsewhere."""

    status = 503
    code = "proxy_shutting_down"
    end_reason = EndReason.SHUTDOWN


class ReportUnavailable(ProxyError):
    """The usage database cannot be read right now (the proxy itself is fine)."""

    status = 503
    code = "usage_unavailable"
    end_reason = EndReason.REJECTED


class ClientGone(ProxyError):
    """The client hung up; nothing is rendered, only recorded."""

    status = 499
    code = "client_gone"
    end_reason = EndReason.CLIENT_GONE


class ClientTooSlow(ProxyError):
    """A client sharing an upstream call fell too far behind the others (its queue is
    bounded): its stream ends with this terminal error instead of holding everyone up."""

    status = 500
    code = "client_too_slow"
    end_reason = EndReason.CLIENT_GONE


class UpstreamHTTPError(ProxyError):
    """An upstream error status that arrived after the stream had committed to 200: told
    as one terminal event with the upstream's status and, if it said one, its error type."""

    code = "upstream_status"
    end_reason = EndReason.UPSTREAM_ERROR

    def __init__(self, status: int, message: str, upstream_type: str | None = None) -> None:
        super().__init__(message)
        self.status = self.upstream_status = status
        self.upstream_type = upstream_type


class NotConfigured(ProxyError):
    """The proxy serves no upstream for this API: the operator's configuration, not the
    client's request, is what is missing."""

    status = 500
    code = "not_configured"
    end_reason = EndReason.UPSTREAM_ERROR


class NoUsableDeployment(ProxyError):
    status = 400
    code = "no_usable_deployment"
    end_reason = EndReason.REJECTED
    client_fault = True


class AllDeploymentsUnavailable(ProxyError):
    """Every deployment's breaker is open; the client should come back later."""

    status = 503
    code = "all_deployments_unavailable"
    end_reason = EndReason.UPSTREAM_ERROR
