"""The upstream client: the one place where `requests` and `urllib3` errors are translated.

Callers see `UpstreamResponse` objects and `ProxyError` subclasses only.  The connection
each request uses is remembered on an `AbortHandle`, so another thread (the heartbeat
thread noticing a client that hung up) can shut the socket down at once, even while the
request is still waiting for the upstream's headers.
"""

from __future__ import annotations

import base64
import functools
import http.client
import http.cookiejar
import re
import socket
import threading
import urllib.request
from typing import Iterator
from urllib.parse import unquote, urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from .decoding import BodyDecoder, DecodeError, content_codings
from .head import parse_header_lines, read_header_lines
from ..errors import BadRequest, ProxyError, UpstreamBroken, UpstreamTimeout, UpstreamUnreachable
from ..text import loggable

# RFC 9110 7.6.1 plus the legacy names; never forwarded in either direction.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "trailers", "transfer-encoding", "upgrade",
})

_current = threading.local()  # the AbortHandle of the request this thread is sending
READ_PIECE = 64 * 1024  # most raw body bytes taken from the upstream in one read
RESPONSE_BUFFER = 2048  # http.client's buffer of an upstream response (its default: 8 KiB)
MAX_CHUNK_SIZE_LINE = 4096
_HEX_DIGITS = re.compile(rb"[0-9A-Fa-f]{1,16}")
# Decoded bytes of a JSON body read before its status goes out: enough to catch a gzip
# bomb (the ratio check starts after the first MiB) without buffering real answers.
PREFETCH_BYTES = 2 * 1024 * 1024

# RFC 9110 5.1 and 5.5: a header name is a token; a value is visible characters, spaces and
# tabs (obs-text allowed), with no leading whitespace (requests refuses one, and Python
# counts a non-breaking space as whitespace).
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_VALUE = re.compile(r"[ \t\x21-\x7e\x80-\xff]*")


def header_problem(name: str, value: str) -> str | None:
    """Why a header cannot be sent as it is, or None (names never carry the value)."""
    if not is_valid_header(name, value):
        return "the name is not an HTTP token, or the value holds a control character"
    if value[:1].isspace():
        return "the value starts with whitespace"
    return None


def is_valid_header(name: str, value: str) -> bool:
    """RFC 9110 syntax, as gunicorn enforces it on what it sends."""
    return bool(_TOKEN.fullmatch(name) and _FIELD_VALUE.fullmatch(value))


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

    def wait_at_most(self, seconds: float) -> None:
        """From now on each read of this exchange waits `seconds` at most (urllib3 sets
        the next request's own timeout on a pooled connection)."""
        with self._lock:
            sock = getattr(self._conn, "sock", None)
            if sock is not None:
                try:
                    sock.settimeout(seconds)
                except OSError:
                    pass

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


class _LeanResponse(http.client.HTTPResponse):
    """http.client's response with two costs cut, both measured on the hot path.

    Its buffer: http.client reads through 8 KiB that live as long as the response, and a
    silent stream holds its response for hours.  The body's pieces are read around the
    buffer anyway (`read1`, and reads of whole chunks larger than it), so a smaller one
    only means more reads for the status, header and chunk-size lines.

    Its head: `begin` is http.client's, step for step, but plain header lines are parsed
    without the email package (see `upstream/head.py`)."""

    def __init__(self, sock, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(sock, *args, **kwargs)
        default, self.fp = self.fp, sock.makefile("rb", buffering=RESPONSE_BUFFER)
        default.close()  # nothing was read through it yet

    def begin(self) -> None:
        if self.headers is not None:
            return
        version, status, reason = self._read_status()
        while status == http.client.CONTINUE:  # interim answers: their headers are skipped
            read_header_lines(self.fp)
            version, status, reason = self._read_status()
        self.code = self.status = status
        self.reason = reason.strip()
        if version in ("HTTP/1.0", "HTTP/0.9"):
            self.version = 10
        elif version.startswith("HTTP/1."):
            self.version = 11
        else:
            raise http.client.UnknownProtocol(version)
        self.headers = self.msg = parse_header_lines(read_header_lines(self.fp))
        self._frame_body(status)

    def _frame_body(self, status: int) -> None:
        """How the body ends, as http.client decides it: chunks, a length, or the close."""
        coding = self.headers.get("transfer-encoding")
        self.chunked = bool(coding) and coding.lower() == "chunked"
        if self.chunked:
            self.chunk_left = None
        self.will_close = self._check_close()
        self.length = None
        declared = self.headers.get("content-length")
        if declared and not self.chunked:
            try:
                self.length = int(declared)
            except ValueError:
                pass
            if self.length is not None and self.length < 0:
                self.length = None
        if status in (http.client.NO_CONTENT, http.client.NOT_MODIFIED) \
                or 100 <= status < 200 or self._method == "HEAD":
            self.length = 0
        if not self.will_close and not self.chunked and self.length is None:
            self.will_close = True  # no length, no chunks: the body ends with the connection


class _TrackedConnectionMixin:
    """Registers the connection with the sending thread's AbortHandle before each request,
    and reads its responses through a small buffer."""

    response_class = _LeanResponse

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

    def __init__(self, raw: urllib3.BaseHTTPResponse, handle: AbortHandle, max_decompressed: int,
                 max_ratio: int) -> None:
        self._raw = raw
        self.handle = handle
        self.status = raw.status
        self.reason = raw.reason or ""
        self._limits = (max_decompressed, max_ratio)
        self.encoded = bool(content_codings(self.header("content-encoding")))
        headers = remove_hop_by_hop_headers(list(raw.headers.items()))
        if self.encoded:  # relayed decoded: the upstream's framing headers no longer apply
            headers = [(k, v) for k, v in headers
                       if k.lower() not in ("content-encoding", "content-length")]
        self.headers = headers
        self._pieces: Iterator[bytes] | None = None
        self._prefetched: list[bytes] = []
        self.whole = False  # the whole body is read (prefetch_answer)
        self._decoder: BodyDecoder | None = None
        if raw.chunked:  # urllib3's own reader of chunk-size lines has no bound
            raw._update_chunk_length = functools.partial(_read_chunk_size, raw)

    def header(self, name: str) -> str | None:
        return self._raw.headers.get(name)

    @property
    def media_type(self) -> str:
        return (self.header("content-type") or "").split(";")[0].strip().lower()

    @property
    def is_event_stream(self) -> bool:
        return self.media_type == "text/event-stream"

    @property
    def is_json(self) -> bool:
        media = self.media_type
        return media == "application/json" or media.endswith("+json")

    def prefetch(self, enough: int = PREFETCH_BYTES) -> None:
        """Read the start of the body now (at least one piece, up to `enough` decoded bytes
        of what has already arrived), so that a body that cannot be read or decoded (a gzip
        bomb, a cut) fails the try before anything is sent to the client."""
        if self._pieces is None:
            self._read_ahead(lambda size: size >= enough or not self._has_more_now())

    def prefetch_answer(self, limit: int) -> None:
        """A successful JSON answer of at most `limit` decoded bytes is read whole now (its
        usage, and so its cost, is then known before the client's headers go out, and a
        body cut short fails the try instead of the client's answer); anything else only
        has its start read (`prefetch`).  `whole` says which."""
        if not (self.is_json and 200 <= self.status < 300) or self._pieces is not None:
            self.prefetch()
            return
        self.whole = not self._read_ahead(lambda size: size > limit)

    def _read_ahead(self, enough) -> bool:
        """Decoded pieces into the prefetch until `enough(bytes so far)`: True when it said
        so, False when the body ended first."""
        self._pieces = self._decode()
        size = 0
        for piece in self._pieces:
            self._prefetched.append(piece)
            size += len(piece)
            if enough(size):
                return True
        return False

    @property
    def whole_body(self) -> bytes:
        return b"".join(self._prefetched)

    def _has_more_now(self) -> bool:
        """More of the current read is still to be decoded (no wait on the network)."""
        decoder = self._decoder
        return decoder is not None and decoder.has_pending_input()

    def decoded_chunks(self) -> Iterator[bytes]:
        """Body bytes as they arrive, decompressed within limits; never waits to fill a block."""
        if self._pieces is None:
            yield from self._decode()
            return
        while self._prefetched:
            yield self._prefetched.pop(0)
        yield from self._pieces

    def _decode(self) -> Iterator[bytes]:
        doing = "reading the upstream body"
        with translate_errors(doing):
            decoder = self._decoder = BodyDecoder(self.header("content-encoding"), *self._limits)
            if decoder.identity:  # the usual case: the reads as they come, nothing to count
                yield from self._raw_chunks()
                return
            for raw in self._raw_chunks():
                yield from decoder.feed(raw)
            tail = decoder.finish()
        if tail:
            yield tail

    def _raw_chunks(self) -> Iterator[bytes]:
        # iter_content/read(n) may hold bytes back; chunk by chunk (chunked bodies) or
        # read1 (anything else) hands over whatever has arrived.  Never urllib3's decoding:
        # it inflates a whole read at once, with no limit.
        raw = self._raw
        if raw.chunked:
            # At most a piece per read: read_chunked(None) takes a whole chunk first, and an
            # upstream can announce a chunk of gigabytes and trickle it.
            yield from raw.read_chunked(READ_PIECE, decode_content=False)
            return
        while data := raw.read1(READ_PIECE, decode_content=False):
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
        """An answer read to its end has already given its connection back to the pool
        (urllib3 does that at the end); one left unread closes it."""
        try:
            self._raw.close()
            self._raw.release_conn()
        except Exception:  # closing a broken connection must never mask the real outcome
            pass


class translate_errors:
    """Context manager: `requests`/`urllib3`/socket errors -> ProxyError subclasses."""

    def __init__(self, doing: str, url: str | None = None) -> None:
        self.doing = doing
        self.url = url

    def __enter__(self) -> "translate_errors":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:  # type: ignore[no-untyped-def]
        if exc is None or isinstance(exc, ProxyError) or not isinstance(exc, Exception):
            return False
        raise _translate(exc, self.doing, self.url) from exc


def _translate(exc: BaseException, doing: str, url: str | None = None) -> ProxyError:
    where = _host_of(url)
    if _caused_by(exc, urllib3.exceptions.NameResolutionError):
        return UpstreamUnreachable(f"the upstream host {where} could not be resolved (DNS)")
    if _caused_by(exc, urllib3.exceptions.SSLError):
        return UpstreamUnreachable(f"TLS with the upstream {where} failed: "
                                   f"{loggable(_root_cause(exc), 200)}")
    if _caused_by(exc, ConnectionRefusedError):
        return UpstreamUnreachable(f"the upstream {where} refused the connection")
    if _caused_by(exc, urllib3.exceptions.NewConnectionError):
        return UpstreamUnreachable(f"could not connect to the upstream {where}: "
                                   f"{loggable(_root_cause(exc), 200)}")
    if isinstance(exc, requests.ConnectTimeout) or _caused_by(exc, urllib3.exceptions.ConnectTimeoutError):
        return UpstreamUnreachable(f"timed out connecting to the upstream {where}")
    if isinstance(exc, (requests.ReadTimeout, urllib3.exceptions.ReadTimeoutError, socket.timeout)) \
            or _caused_by(exc, urllib3.exceptions.ReadTimeoutError):
        return UpstreamTimeout(f"the upstream sent nothing within the idle timeout while {doing}")
    if isinstance(exc, DecodeError):
        return UpstreamBroken(f"the upstream sent a body the proxy will not decode while {doing}: {exc}")
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


def _read_chunk_size(raw) -> None:
    """urllib3's chunk-size step, bounded: its own reads the whole line however long it is
    (an upstream can send hundreds of MB without a line end) and takes "-1" as a size
    (then reads to the end of the connection).  Same contract: sets raw.chunk_left."""
    if raw.chunk_left is not None:
        return
    line = raw._fp.fp.readline(MAX_CHUNK_SIZE_LINE + 1)
    size = line.split(b";", 1)[0].strip()
    if len(line) > MAX_CHUNK_SIZE_LINE or not _HEX_DIGITS.fullmatch(size):
        raw.close()
        if not line:
            raise urllib3.exceptions.ProtocolError("Response ended prematurely")
        raise urllib3.exceptions.ProtocolError(
            f"invalid chunk size line from the upstream: {loggable(line[:64])}")
    raw.chunk_left = int(size, 16)


def _host_of(url: str | None) -> str:
    if not url:
        return "(unknown host)"
    parts = urlsplit(url)
    return parts.netloc.rpartition("@")[2] or "(unknown host)"  # never credentials in a URL


def _root_cause(exc: BaseException) -> BaseException:
    seen = 0
    while seen < 8:
        inner = getattr(exc, "reason", None) or exc.__cause__ or exc.__context__
        if not isinstance(inner, BaseException):
            return exc
        exc, seen = inner, seen + 1
    return exc


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


def _basic_auth(parts) -> dict[str, str]:
    """The Authorization header of credentials written in a deployment's URL (UTF-8, as
    RFC 7617 allows: a name outside Latin-1 must not fail every request)."""
    user, password = unquote(parts.username or ""), unquote(parts.password or "")
    token = base64.b64encode(f"{user}:{password}".encode("utf-8")).decode("ascii")
    return {"Authorization": f"Basic {token}"}


class UpstreamClient:
    """Upstream calls through urllib3's connection pools, the layer below `requests`.

    Per request, `requests` costs ~0.15 ms (measured: 339 µs per call through
    PreparedRequest and HTTPAdapter.send, 189 µs through the pool's `urlopen`) for what the
    proxy does not use: cookies, redirects, hooks, header and URL normalisation.  So the
    pools of a `requests` adapter (which tracks each connection for aborts, see
    `_TrackingAdapter`) are used directly, with the TLS settings `requests` would give them.
    When the environment names an HTTP(S) proxy, `requests` sends the request itself: it
    resolves proxies, `no_proxy` and their credentials."""

    def __init__(self, connect_timeout: float, idle_timeout: float, pool_size: int = 1024,
                 max_decompressed: int = 256 * 1024 * 1024, max_ratio: int = 100) -> None:
        self.timeout = (connect_timeout, idle_timeout)
        self.decode_limits = (max_decompressed, max_ratio)
        session = requests.Session()
        # Reading proxy variables and ~/.netrc on every request costs ~0.5 ms; do it only
        # when an HTTP(S) proxy is configured in the environment at all.
        session.trust_env = bool(urllib.request.getproxies())
        session.headers.clear()
        session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
        # One pool per upstream origin, kept: many more than any configuration names, so
        # the pool manager never closes one that requests are using.
        adapter = _TrackingAdapter(pool_connections=256, pool_maxsize=pool_size, max_retries=0)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        self.session = session
        self._adapter = adapter
        self._pools: dict[tuple[str, str, int | None], HTTPConnectionPool] = {}
        self._pools_lock = threading.Lock()

    def send(self, method: str, url: str, headers: list[tuple[str, str]], body: bytes,
             handle: AbortHandle, read_timeout: float | None = None) -> UpstreamResponse:
        """Send a request and return once the upstream's headers have arrived.

        `read_timeout` replaces the idle timeout for this request (a non-streaming answer
        is silent until it is complete)."""
        timeout = self.timeout if read_timeout is None else (self.timeout[0], read_timeout)
        for name, value in headers:
            problem = header_problem(name, value)
            if problem:  # the client's fault, caught here if admission missed it: no breaker
                raise BadRequest(f"header {loggable(name, 64)!r} cannot be sent upstream: {problem}")
        _current.handle = handle
        try:
            with translate_errors("waiting for the upstream's response headers", url):
                resp = self._send(method, url, dict(headers), body or None, timeout)
        except UpstreamBroken as exc:
            # A reset or close before any header is an unreachable upstream, not a broken stream.
            raise UpstreamUnreachable(exc.message) from exc
        finally:
            _current.handle = None
        response = UpstreamResponse(resp, handle, *self.decode_limits)
        self._check_headers(response)
        return response

    @staticmethod
    def _check_headers(response: UpstreamResponse) -> None:
        """A header the proxy could not relay (a control byte, a bad name) means a broken
        upstream: gunicorn would refuse it with its own HTML 500 after the fact."""
        for name, value in response.headers:
            if not is_valid_header(name, value):
                response.close()
                raise UpstreamBroken(f"the upstream sent a malformed response header "
                                     f"{loggable(name, 64)!r}")

    def _send(self, method: str, url: str, headers: dict, body: bytes | None,
              timeout: tuple[float, float]) -> urllib3.BaseHTTPResponse:
        """The request on a pooled connection; its response with the body unread."""
        if self.session.trust_env:  # proxies from the environment: let requests resolve them
            return self.session.request(method, url, headers=headers, data=body, stream=True,
                                        timeout=timeout, allow_redirects=False).raw
        parts = urlsplit(url)
        target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
        if parts.username is not None and not any(k.lower() == "authorization" for k in headers):
            headers = {**headers, **_basic_auth(parts)}  # as requests does for a URL's user
        return self._pool(parts).urlopen(
            method, target, body=body, headers=headers, retries=self._adapter.max_retries,
            redirect=False, assert_same_host=False, preload_content=False,
            decode_content=False, timeout=urllib3.Timeout(connect=timeout[0], read=timeout[1]),
            chunked=False)

    def _pool(self, parts) -> HTTPConnectionPool:
        """The adapter's pool for this origin, with the TLS settings `requests` gives it
        (certificates verified against its CA bundle); found once, then kept."""
        key = (parts.scheme.lower(), parts.hostname or "", parts.port)
        pool = self._pools.get(key)
        if pool is not None and pool.pool is not None:  # None: closed (evicted, or shut)
            return pool
        with self._pools_lock:
            origin = f"{parts.scheme}://{parts.netloc}/"
            prepared = requests.Request("GET", origin).prepare()
            pool = self._adapter.get_connection_with_tls_context(prepared, True)
            self._adapter.cert_verify(pool, origin, True, None)
            self._pools[key] = pool
            return pool

    def close(self) -> None:
        self.session.close()
