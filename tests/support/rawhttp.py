"""The test suite's one raw HTTP/1.1 client.

High-level clients hide what these tests are about (keepalive comments, event boundaries,
the chunked terminator, duplicate headers, a body cut short), so requests go out on plain
sockets and answers are read by hand:

* `build_request(...)`: the bytes of one request;
* `ResponseParser`: sans-I/O; feed it what was read, it hands back the body pieces (one per
  HTTP chunk in chunked mode) and knows whether the body ended properly;
* `RawResponse`: one request on its own connection (or on a `RawConnection` kept alive for
  several), read as the test asks (`read_head`, `read_until`, `read_all`), every piece
  recorded with its arrival time.  The whole answer must arrive within `timeout` seconds:
  keepalive comments every 50 ms would otherwise keep a per-read timeout from ever firing;
* `exchange(...)`: bytes sent verbatim (malformed ones included), everything read until the
  server closes; `parse_response(...)` reads such an answer.

Clients that read many streams at once from one thread (tests/support/load.py, the
benchmarks) feed their sockets' bytes to `ResponseParser` themselves.
"""

from __future__ import annotations

import json
import socket
import ssl
import time
from collections import deque
from urllib.parse import urlsplit

RID = "x-llm-proxy-request-id"
DEFAULT_TIMEOUT = 10.0  # seconds for a whole answer: a hung stream fails in seconds


def build_request(method: str, path: str, host: str, body: bytes | dict | list | None = b"",
                  headers: list[tuple[str, str]] | dict | None = None,
                  chunked: bool = False) -> bytes:
    """One request.  A dict/list body is sent as JSON; Content-Type (JSON) and Content-Length
    are added unless `headers` name them; `chunked` sends the body as one chunk instead."""
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode("utf-8")
    body = body or b""
    headers = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
    names = {k.lower() for k, _ in headers}
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    if body and "content-type" not in names:
        lines.append("Content-Type: application/json")
    if chunked:  # the body as one chunk and the terminator: no length known up front
        lines.append("Transfer-Encoding: chunked")
        body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n"
    elif "content-length" not in names and (body or method == "POST"):
        lines.append(f"Content-Length: {len(body)}")
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class ResponseParser:
    """One HTTP/1.1 response, parsed incrementally from the bytes fed to it.

    `feed(data)` returns the body pieces `data` completed: each whole HTTP chunk in chunked
    mode, whatever arrived otherwise.  `eof()` says the connection ended: a body delimited
    by the close is then complete; a chunked or Content-Length body is cut (`truncated`).
    """

    def __init__(self) -> None:
        self.buf = bytearray()
        self.state = "head"  # head, size, data, crlf, trailer, length, close, done
        self.head = b""  # the status line and headers as received, blank line included
        self.status: int | None = None
        self.headers: list[tuple[str, str]] = []
        self.remaining = 0
        self.complete = False  # the body ended properly (chunked terminator / full length / close)
        self.truncated = False  # the connection ended before the body was complete
        self.body: bytes | None = None  # the whole body, when `parse_response` read the answer

    @property
    def head_done(self) -> bool:
        return self.state != "head"

    @property
    def done(self) -> bool:
        return self.state == "done"

    def header_all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def header(self, name: str) -> str | None:
        values = self.header_all(name)
        return values[0] if values else None

    def feed(self, data: bytes) -> list[bytes]:
        self.buf += data
        buf = self.buf
        out: list[bytes] = []
        while True:
            state = self.state
            if state == "head":
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    break
                self.head = bytes(buf[:end + 4])
                del buf[:end + 4]
                lines = self.head[:-4].decode("latin-1").split("\r\n")
                self.status = int(lines[0].split()[1])
                self.headers = [tuple(p.strip() for p in line.split(":", 1)) for line in lines[1:]]
                if "chunked" in (self.header("transfer-encoding") or "").lower():
                    self.state = "size"
                elif self.header("content-length") is not None:
                    self.remaining = int(self.header("content-length"))
                    self.state = "length" if self.remaining else "done"
                else:
                    self.state = "close"
            elif state == "size":
                end = buf.find(b"\r\n")
                if end < 0:
                    break
                size = int(bytes(buf[:end]).split(b";")[0], 16)
                if size == 0:
                    del buf[:end + 2]
                    self.state = "trailer"
                elif len(buf) < end + 2 + size + 2:
                    break  # a chunk is handed out whole
                else:
                    chunk, crlf = bytes(buf[end + 2:end + 2 + size]), bytes(buf[end + 2 + size:end + 4 + size])
                    assert crlf == b"\r\n", f"bad chunk framing: {crlf!r}"
                    del buf[:end + 4 + size]
                    out.append(chunk)
            elif state == "trailer":
                end = buf.find(b"\r\n")
                if end < 0:
                    break
                del buf[:end + 2]
                if end == 0:
                    self.state = "done"
            elif state == "length":
                if not buf:
                    break
                piece = bytes(buf[:self.remaining])
                del buf[:len(piece)]
                self.remaining -= len(piece)
                out.append(piece)
                if self.remaining == 0:
                    self.state = "done"
            elif state == "close":
                if buf:
                    out.append(bytes(buf))
                    buf.clear()
                break
            else:  # done
                break
        if self.state == "done":
            self.complete = True
        return out

    def eof(self) -> None:
        if self.state == "close":
            self.state = "done"
            self.complete = True
        elif self.state != "done":
            self.truncated = self.head_done


def parse_response(answer: bytes) -> ResponseParser:
    """One whole answer as received (up to the server's close); `.body` holds its body."""
    parser = ResponseParser()
    parser.body = b"".join(parser.feed(answer))
    parser.eof()
    return parser


class RawConnection:
    """A client connection (TLS for an https URL) that can carry several requests in turn."""

    def __init__(self, base_url: str, timeout: float = DEFAULT_TIMEOUT, cafile: str | None = None,
                 nodelay: bool = False) -> None:
        parts = urlsplit(base_url)
        self.netloc = parts.netloc
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
        if nodelay:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if parts.scheme == "https":
            context = ssl.create_default_context(cafile=cafile)
            self.sock = context.wrap_socket(self.sock, server_hostname=parts.hostname)

    def close(self) -> None:
        self.sock.close()


class RawResponse:
    """One request; the answer read by hand, piece by piece, as the test asks for it.

    `timeout`: the whole answer must have arrived this many seconds after the request was
    sent (each socket operation waits at most what is left).  `raw`: send these bytes instead
    of building a request; `half_close`: shut the sending side down after them.  `conn`: use
    this kept-alive connection (and leave it open) instead of a new one.  `clock`: the clock
    of `sent_at`, `head_at` and the arrival times in `chunks`.  `read_pause`: seconds to wait
    before each read of the answer, a client on a slow link.
    """

    opened: list["RawResponse"] = []  # closed after each test (conftest: `_close_raw_clients`)

    def __init__(self, base_url: str, path: str = "/", body: bytes | dict | list | None = b"",
                 headers: list[tuple[str, str]] | dict | None = None, method: str = "POST",
                 timeout: float = DEFAULT_TIMEOUT, chunked: bool = False, cafile: str | None = None,
                 *, raw: bytes | None = None, half_close: bool = False,
                 conn: RawConnection | None = None, clock=time.monotonic,
                 read_pause: float = 0.0) -> None:
        self.timeout = timeout
        self.read_pause = read_pause
        self.clock = clock
        self._deadline = time.monotonic() + timeout
        self._own_conn = conn is None
        self.conn = conn or RawConnection(base_url, timeout, cafile)
        self.sock = self.conn.sock
        if self._own_conn:
            RawResponse.opened.append(self)
        if raw is None:
            raw = build_request(method, path, self.conn.netloc, body, headers, chunked)
        self.parser = ResponseParser()
        self.head_at = None
        self.ended_at = None  # when the read that completed (or ended) the answer returned
        self.chunks: list[tuple[float, bytes]] = []  # (arrival time, bytes) per piece read
        self._unread: deque[tuple[float, bytes]] = deque()  # parsed, not yet handed to the test
        self._ended = False  # the body is complete or the connection closed
        self.sent_at = clock()
        try:
            self.sock.settimeout(self._left())
            self.sock.sendall(raw)
            if half_close:
                self.sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered (and closed) before the client finished sending

    # -- the answer ----------------------------------------------------------------
    @property
    def status(self) -> int | None:
        return self.parser.status

    @property
    def headers(self) -> list[tuple[str, str]]:
        return self.parser.headers

    @property
    def head(self) -> bytes:
        """The status line and headers as received."""
        return self.parser.head

    def header_all(self, name: str) -> list[str]:
        return self.parser.header_all(name)

    def header(self, name: str) -> str | None:
        return self.parser.header(name)

    @property
    def request_id(self) -> str:
        rid = self.header(RID)
        assert rid, f"no {RID} header in {self.headers}"
        return rid

    @property
    def body(self) -> bytes:
        """The body read so far."""
        return b"".join(c for _, c in self.chunks)

    @property
    def complete(self) -> bool:
        """The body ended properly (chunked terminator, full length, or the close it is
        delimited by) and all of it has been read."""
        return self.parser.complete and not self._unread

    @property
    def eof_early(self) -> bool:
        """The connection closed before the body was complete."""
        return self.parser.truncated

    @property
    def buf(self) -> bytes:
        """Bytes received but not read by the test yet."""
        return b"".join(c for _, c in self._unread) + bytes(self.parser.buf)

    # -- reading ---------------------------------------------------------------------
    def _left(self) -> float:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        return left

    def _receive(self, what: str) -> bool:
        """One read from the socket; False once the connection has ended."""
        if self.read_pause:
            time.sleep(self.read_pause)  # the slow link, not a wait for something to happen
        try:
            self.sock.settimeout(self._left())
            data = self.sock.recv(65536)
        except (TimeoutError, socket.timeout):
            received = self.body + self.buf
            raise AssertionError(f"no {what} within {self.timeout:g} s of the request; so far "
                                 f"{self.head!r} and {len(received)} bytes of body, ending "
                                 f"{received[-300:]!r}") from None
        except ConnectionResetError:
            data = b""
        now = self.clock()
        if not data:
            self.parser.eof()
            self.ended_at = now
            self._finished()
            return False
        head_done = self.parser.head_done
        for piece in self.parser.feed(data):
            self._unread.append((now, piece))
        if not head_done and self.parser.head_done:
            self.head_at = now
        if self.parser.done:
            self.ended_at = now
            self._finished()
        return True

    def _finished(self) -> None:
        self._ended = True
        if self._own_conn:  # one request per connection: an idle keep-alive connection
            self.sock.close()  # would only delay the shutdown of a private proxy

    def read_head(self) -> "RawResponse":
        while not self.parser.head_done:
            if not self._receive("response head"):
                raise EOFError(f"the connection closed before a response head: {bytes(self.parser.buf)!r}")
        return self

    def _next_piece(self, what: str) -> bool:
        """Hand the test one more piece of the body; False once there is none."""
        while not self._unread:
            if self._ended:
                return False
            self._receive(what)
        self.chunks.append(self._unread.popleft())
        return True

    def read_until(self, predicate, what: str = "the expected bytes") -> bytes:
        self.read_head()
        while not predicate(self.body):
            if not self._next_piece(what):
                raise AssertionError(f"the body ended before {what}: {self.body!r}")
        return self.body

    def read_all(self) -> bytes:
        self.read_head()
        while self._next_piece("end of the body"):
            pass
        return self.body

    def json(self):
        return json.loads(self.read_all())

    def close(self) -> None:
        if self._own_conn:
            self.sock.close()


def close_raw_clients() -> None:
    while RawResponse.opened:
        RawResponse.opened.pop().close()


def exchange(url_or_port: str | int, raw: bytes, *, half_close: bool = False,
             timeout: float = DEFAULT_TIMEOUT) -> bytes:
    """Send `raw` verbatim on a new connection to 127.0.0.1 and read until the server closes
    (or resets) it; the whole exchange must be over within `timeout` seconds."""
    port = url_or_port if isinstance(url_or_port, int) else urlsplit(url_or_port).port
    deadline = time.monotonic() + timeout
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(raw)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server answered (and closed) before the client finished sending
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"the server did not close within {timeout:g} s: {answer[:2000]!r}")
            sock.settimeout(left)
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                break
            except (TimeoutError, socket.timeout):
                continue  # the loop reports it
            if not data:
                break
            answer += data
    return answer
