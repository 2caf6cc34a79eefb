"""The upstream client: the one place where `requests` and `urllib3` errors are translated.

Callers see `UpstreamResponse` objects and `ProxyError` subclasses only.  The connection
each request uses is remembered on an `AbortHandle`, so another thread (the heartbeat
thread noticing a client that hung up) can shut the socket down at once, even while the
request is still waiting for the upstream's headers.
"""

from __future__ import annotations

import http.cookiejar
import socket
import threading
import urllib.request
from typing import Iterator

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from .errors import ProxyError, UpstreamBroken, UpstreamTimeout, UpstreamUnreachable

# RFC 9110 7.6.1 plus the legacy names; never forwarded in either direction.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "trailers", "transfer-encoding", "upgrade",
})

_current = threading.local()  # the AbortHandle of the request this thread is sending


def is_hop_by_hop_header(name: str, connection_tokens: frozenset[str] = frozenset()) -> bool:
    lowered = name.lower()
    return lowered in HOP_BY_HOP or lowered in connection_tokens


def connection_tokens(headers: list[tuple[str, str]]) -> frozenset[str]:
    """Header names listed in `Connection:`, which are hop-by-hop too."""
    tokens = set()
    for name, value in headers:
        if name.lower() == "connection":
            tokens.update(t.strip().lower() for t in value.split(",") if t.strip())
    return frozenset(tokens)


def remove_hop_by_hop_headers(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    listed = connection_tokens(headers)
    return [(k, v) for k, v in headers if not is_hop_by_hop_header(k, listed)]


class AbortHandle:
    """Lets another thread cut an upstream exchange short, at any phase."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conn: HTTPConnection | None = None
        self.aborted = False

    def attach(self, conn: HTTPConnection) -> None:
        with self._lock:
            self._conn = conn
            conn._abort_owner = self  # type: ignore[attr-defined]
            if self.aborted:
                _shutdown_socket(conn)

    def detach(self, conn: HTTPConnection) -> None:
        """The connection goes back to the pool: from now on it serves someone else."""
        with self._lock:
            if self._conn is conn:
                self._conn = None
            conn._abort_owner = None  # type: ignore[attr-defined]

    def abort(self) -> None:
        """Shut the upstream socket down; a thread blocked reading it returns at once."""
        with self._lock:
            self.aborted = True
            if self._conn is not None:
                _shutdown_socket(self._conn)


def _shutdown_socket(conn: HTTPConnection) -> None:
    shutdown_quietly(getattr(conn, "sock", None))


def shutdown_quietly(sock: socket.socket | None) -> None:
    """Shut a socket down both ways; a thread blocked on it returns at once."""
    if sock is None:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class _TrackedConnectionMixin:
    """Registers the connection with the sending thread's AbortHandle before each request."""

    def request(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        handle = getattr(_current, "handle", None)
        if handle is not None:
            handle.attach(self)
        return super().request(*args, **kwargs)  # type: ignore[misc]


class _HTTPConnection(_TrackedConnectionMixin, HTTPConnection):
    pass


class _HTTPSConnection(_TrackedConnectionMixin, HTTPSConnection):
    pass


class _ReleasingPoolMixin:
    """Detaches a connection from its AbortHandle when it returns to the pool.

    Without this, a late abort (a client that hangs up just after its answer) would shut
    down a pooled connection that already carries another client's request.  The handle's
    lock orders the two: an abort that wins leaves a shut socket in the pool, which
    urllib3 sees as dropped and replaces before reuse.
    """

    def _put_conn(self, conn):  # type: ignore[no-untyped-def]
        owner = getattr(conn, "_abort_owner", None)
        if owner is not None:
            owner.detach(conn)
        return super()._put_conn(conn)  # type: ignore[misc]


class _HTTPPool(_ReleasingPoolMixin, HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(_ReleasingPoolMixin, HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


class _TrackingAdapter(HTTPAdapter):
    def init_poolmanager(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}


class UpstreamResponse:
    """An upstream response whose body has not been read yet."""

    def __init__(self, resp: requests.Response, handle: AbortHandle) -> None:
        self._resp = resp
        self.handle = handle
        self.status = resp.status_code
        self.reason = resp.reason or ""
        self.headers = remove_hop_by_hop_headers(list(resp.raw.headers.items()))

    def header(self, name: str) -> str | None:
        return self._resp.headers.get(name)

    @property
    def is_event_stream(self) -> bool:
        return (self.header("content-type") or "").lower().startswith("text/event-stream")

    def decoded_chunks(self) -> Iterator[bytes]:
        """Body bytes as they arrive, decompressed; never waits to fill a block."""
        return self._chunks(decode=True, doing="reading the upstream stream")

    def raw_chunks(self) -> Iterator[bytes]:
        """Body bytes exactly as sent (still compressed), for pass-through bodies."""
        return self._chunks(decode=False, doing="reading the upstream body")

    def _chunks(self, decode: bool, doing: str) -> Iterator[bytes]:
        # iter_content/read(n) may hold bytes back; chunk by chunk (chunked bodies) or
        # read1 (anything else) hands over whatever has arrived.
        raw = self._resp.raw
        with translate_errors(doing):
            if raw.chunked:
                yield from raw.read_chunked(None, decode_content=decode)
                return
            while data := raw.read1(65536, decode_content=decode):
                yield data

    def read_limited(self, limit: int = 1 << 20) -> bytes:
        """Read a small body (an error body) whole, decompressed, up to `limit` bytes."""
        out = bytearray()
        for chunk in self.decoded_chunks():
            out += chunk
            if len(out) >= limit:
                break
        return bytes(out[:limit])

    def close(self) -> None:
        try:
            self._resp.close()
        except Exception:  # closing a broken connection must never mask the real outcome
            pass


class translate_errors:
    """Context manager: `requests`/`urllib3`/socket errors -> ProxyError subclasses."""

    def __init__(self, doing: str) -> None:
        self.doing = doing

    def __enter__(self) -> "translate_errors":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:  # type: ignore[no-untyped-def]
        if exc is None or isinstance(exc, ProxyError) or not isinstance(exc, Exception):
            return False
        raise _translate(exc, self.doing) from exc


def _translate(exc: BaseException, doing: str) -> ProxyError:
    if isinstance(exc, requests.ConnectTimeout) or _caused_by(exc, urllib3.exceptions.ConnectTimeoutError):
        return UpstreamUnreachable(f"timed out connecting to the upstream while {doing}")
    if isinstance(exc, (requests.ReadTimeout, urllib3.exceptions.ReadTimeoutError, socket.timeout)) \
            or _caused_by(exc, urllib3.exceptions.ReadTimeoutError):
        return UpstreamTimeout(f"the upstream sent nothing within the idle timeout while {doing}")
    if isinstance(exc, (requests.exceptions.ContentDecodingError, urllib3.exceptions.DecodeError)):
        return UpstreamBroken(f"the upstream sent a body that could not be decoded while {doing}")
    if isinstance(exc, (requests.exceptions.ChunkedEncodingError, urllib3.exceptions.ProtocolError,
                        urllib3.exceptions.IncompleteRead, ConnectionError, OSError)):
        return UpstreamBroken(f"the upstream connection broke while {doing}")
    if isinstance(exc, requests.ConnectionError):
        return UpstreamUnreachable(f"could not reach the upstream while {doing}")
    if isinstance(exc, (requests.RequestException, urllib3.exceptions.HTTPError)):
        return UpstreamUnreachable(f"upstream request failed while {doing}: {type(exc).__name__}")
    return UpstreamBroken(f"unexpected {type(exc).__name__} while {doing}")


def _caused_by(exc: BaseException, kind: type) -> bool:
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, kind):
            return True
        if exc.args and isinstance(exc.args[0], BaseException) and isinstance(exc.args[0], kind):
            return True
        reason = getattr(exc, "reason", None)
        if isinstance(reason, kind):
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
        seen += 1
    return False


class UpstreamClient:
    """A shared `requests` session with a large pool and no cookies (clients must not share)."""

    def __init__(self, connect_timeout: float, idle_timeout: float, pool_size: int = 1024) -> None:
        self.timeout = (connect_timeout, idle_timeout)
        session = requests.Session()
        # Reading proxy variables and ~/.netrc on every request costs ~0.5 ms; do it only
        # when an HTTP(S) proxy is configured in the environment at all.
        session.trust_env = bool(urllib.request.getproxies())
        session.headers.clear()
        session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
        adapter = _TrackingAdapter(pool_connections=16, pool_maxsize=pool_size, max_retries=0)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        self.session = session

    def send(self, method: str, url: str, headers: list[tuple[str, str]], body: bytes,
             handle: AbortHandle, read_timeout: float | None = None) -> UpstreamResponse:
        """Send a request and return once the upstream's headers have arrived.

        `read_timeout` replaces the idle timeout for this request (a non-streaming answer
        is silent until it is complete)."""
        timeout = self.timeout if read_timeout is None else (self.timeout[0], read_timeout)
        _current.handle = handle
        try:
            with translate_errors("waiting for the upstream's response headers"):
                resp = self._send(method, url, dict(headers), body or None, timeout)
        except UpstreamBroken as exc:
            # A reset or close before any header is an unreachable upstream, not a broken stream.
            raise UpstreamUnreachable(exc.message) from exc
        finally:
            _current.handle = None
        return UpstreamResponse(resp, handle)

    def _send(self, method: str, url: str, headers: dict, body: bytes | None, timeout) -> requests.Response:
        if self.session.trust_env:  # proxies from the environment: let requests resolve them
            return self.session.request(method, url, headers=headers, data=body, stream=True,
                                        timeout=timeout, allow_redirects=False)
        # Straight to the adapter: Session.send's hooks, cookie and redirect handling cost
        # ~0.15 ms per request and do nothing here (no cookies, no redirects).
        prepared = requests.PreparedRequest()
        prepared.prepare(method=method, url=url, headers=headers, data=body)
        return self.session.get_adapter(url).send(prepared, stream=True, timeout=timeout)

    def close(self) -> None:
        self.session.close()
