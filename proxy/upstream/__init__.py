"""Everything about talking to an upstream: building a try's request (`request`), sending
it and reading the answer (`client`, the one place `requests` errors are translated), and
decoding its body within limits (`decoding`)."""

from .client import (AbortHandle, UpstreamClient, UpstreamResponse, header_problem,
                     is_hop_by_hop_header, shutdown_quietly,
                     translate_errors)
from .request import (REQUEST_ID_HEADER, UpstreamRequest, UpstreamRequests, encode_json_body,
                      forwardable_headers)

__all__ = ["AbortHandle", "UpstreamClient", "UpstreamResponse", "header_problem",
           "is_hop_by_hop_header", "shutdown_quietly",
           "translate_errors", "REQUEST_ID_HEADER", "UpstreamRequest", "UpstreamRequests",
           "encode_json_body", "forwardable_headers"]
