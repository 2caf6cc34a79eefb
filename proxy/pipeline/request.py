"""What the admit stage decided about a client request, handed down the pipeline."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..formats import Format
from ..formats.stitch import Stitch
from ..redact import Redactor
from ..routing import Route

if TYPE_CHECKING:
    from .dedup import DedupTicket


@dataclass(slots=True)
class ProxyRequest:
    request_id: str
    endpoint: str
    fmt: Format
    route: Route
    method: str
    path: str  # path and query string, appended to each deployment's base URL
    headers: list[tuple[str, str]]  # the client's end-to-end headers, checked sendable
    body: bytes  # the client's body (with the proxy's own additions)
    payload: dict | None = None  # the parsed body, for deployments that edit it
    model: str | None = None
    stream: bool = False
    strip_usage_chunk: bool = False  # the usage chunk the proxy asked for goes to nobody
    keepalive: bool = True  # keepalive comments may go to this client (the route allows)
    client_socket: socket.socket | None = None
    # The server's WSGI `write` may be called from any thread (see writer.DirectWriter):
    # a stream is then read and written by the server thread itself.
    writes_directly: bool = False
    redactor: Redactor = field(default_factory=Redactor)  # masks credentials in what is relayed
    estimate_locally: bool = False  # count_tokens the proxy answers itself (see admit)
    stitch: Stitch | None = None  # splices a continuation in, if this answer may be continued
    dedup: "DedupTicket | None" = None  # may share an answer (see pipeline/dedup)
    cost_comment: bool = False  # the stream ends with its cost in an SSE comment (opt-in)
