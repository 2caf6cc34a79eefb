"""What one try sends: the deployment's URL, the provider's credentials and the body edits.

The client's own headers are checked once, when the request is admitted (a header that
cannot be sent upstream is the client's fault, a 400, never a failed try that would count
against a deployment); each try then adds the provider's key and the proxy's request id.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Mapping

from .. import formats
from ..config import Provider
from ..errors import BadRequest, NotTranslatable
from ..formats.translate.bridge import Bridge
from ..routing import Deployment
from ..text import loggable
from .client import header_problem, is_hop_by_hop_header

REQUEST_ID_HEADER = "x-llm-proxy-request-id"

# Never forwarded upstream: framing the proxy redoes, client addresses that the provider has
# no business seeing, and the client's Accept-Encoding (the proxy reads every body it relays,
# to mask echoed keys and to cap decompression, so it asks upstreams for identity).
_REQUEST_DROP = frozenset({"host", "content-length", "x-forwarded-for", "x-forwarded-host",
                           "x-forwarded-proto", "x-forwarded-port", "x-real-ip", "forwarded",
                           "accept-encoding", "x-llm-proxy-dedup", "x-llm-proxy-session",
                           "x-llm-proxy-cost-comment"})


@dataclass(frozen=True)
class UpstreamRequest:
    url: str
    headers: list[tuple[str, str]]
    body: bytes


class UpstreamRequests:
    """Builds each try's request from the configured providers.  With `keep_client_keys`
    off (keys mode) no credential of the client's ever goes upstream: it is a proxy key."""

    def __init__(self, providers: Mapping[str, Provider], keep_client_keys: bool = True) -> None:
        self._providers = providers
        self._keep_client_keys = keep_client_keys

    def build(self, request_id: str, path: str, headers: list[tuple[str, str]], body: bytes,
              payload: dict | None, deployment: Deployment,
              bridge: Bridge | None = None, continuation: bool = False) -> UpstreamRequest:
        """The try's request; with a bridge, rewritten for a provider of another format
        (which may refuse what it cannot express: a BadRequest, the client's fault).  A
        continuation's `payload` already ends with the prefill; the deployment's prefill
        parameters are added to it."""
        provider = self._providers[deployment.provider]
        if bridge is not None and payload is not None:
            path, headers = bridge.upstream_path, bridge.headers(headers)
            payload = deployment.rewrite(translated_request(bridge, payload))
        elif (deployment.edits_body or continuation) and payload is not None:
            payload = deployment.rewrite(payload)
        else:
            payload = None  # the client's body goes as it is
        if payload is not None:
            if continuation:
                payload.update(self.prefill_params(deployment))
            body = encode_json_body(payload)
        headers = with_credentials(headers, provider, self._keep_client_keys) + [
            (REQUEST_ID_HEADER, request_id)]
        return UpstreamRequest(provider.base_url + path, headers, body)

    def continues(self, deployment: Deployment) -> bool:
        """May a broken answer be continued on this deployment (an assistant prefill)?"""
        if deployment.continuation is not None:
            return deployment.continuation
        return self._providers[deployment.provider].continues

    def prefill_params(self, deployment: Deployment) -> dict:
        if deployment.prefill_params is not None:
            return deployment.prefill_params
        return self._providers[deployment.provider].prefill_params


def translated_request(bridge: Bridge, payload: dict) -> dict:
    """The request in the deployment's format; a field of an odd JSON type is the client's
    fault (a 400), never the proxy's."""
    try:
        return bridge.request(payload)
    except BadRequest as err:
        raise NotTranslatable(err.message) from None
    except (AttributeError, TypeError, KeyError, ValueError) as exc:
        raise NotTranslatable(f"the request cannot be sent to this model's API: a field has an "
                              f"unexpected JSON type ({type(exc).__name__})") from None


# Every header a client may carry a key in (Anthropic, OpenAI, Azure, Gemini).
CLIENT_CREDENTIAL_HEADERS = formats.CREDENTIAL_HEADERS | {"api-key", "x-goog-api-key"}


def with_credentials(headers: list[tuple[str, str]], provider: Provider,
                     keep_client_keys: bool = True) -> list[tuple[str, str]]:
    """The provider's own key replaces the client's, in the header its API expects; with
    `keep_client_keys` off the client's credentials go in any case (a provider without a
    key of its own, a local server, gets none)."""
    key = provider.api_key
    if not key and keep_client_keys:
        return list(headers)
    drop = formats.CREDENTIAL_HEADERS if keep_client_keys else CLIENT_CREDENTIAL_HEADERS
    kept = [(k, v) for k, v in headers if k.lower() not in drop]
    return kept + (formats.BY_PROVIDER[provider.format].credential_headers(key) if key else [])


def forwardable_headers(raw: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The client's end-to-end headers, each one sendable upstream; one that is not (a value
    that starts with a non-breaking space, a control character) is the client's fault."""
    listed = frozenset(t.strip().lower() for k, v in raw if k.lower() == "connection"
                       for t in v.split(","))
    headers = [(k, v) for k, v in raw
               if k.lower() not in _REQUEST_DROP and not is_hop_by_hop_header(k, listed)]
    for name, value in headers:
        problem = header_problem(name, value)
        if problem:
            raise BadRequest(f"request header {loggable(name, 64)!r} cannot be forwarded: {problem}")
    headers.append(("Accept-Encoding", "identity"))
    return headers


def encode_json_body(payload: dict) -> bytes:
    """The body as UTF-8 JSON; text JSON allowed but UTF-8 cannot carry (a lone surrogate
    such as "\\ud800") is sent escaped, exactly as the client wrote it."""
    try:
        return json.dumps(payload, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(payload).encode("ascii")
