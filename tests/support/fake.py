"""The scripted fake LLM upstream: `FakeUpstream`.

A real HTTP/1.1 server on 127.0.0.1 (raw sockets, one thread per connection, keep-alive).
Every request it receives is recorded (`RecordedRequest`), then answered by a *script*, a
list of steps (tests/support/steps.py) run in order.

How a request finds its script, first match wins:
  1. header `x-fake-script: NAME`  -> `fake.named[NAME]`
  2. the FIFO filled by `fake.enqueue(script, ...)`, one script per request
  3. `default_script(request)`: a canned reply chosen by method, path and `"stream"`.
A script may also be a callable taking the `RecordedRequest` and returning a script
(or None for the default reply).

Standard library only.
"""

from __future__ import annotations

import json
import select
import socket
import struct
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field

from support.builders import json_text, openai_error_body
from support.steps import TERMINAL_STEPS, End, ScriptError, Status, default_script, json_reply

FAKE_SCRIPT_HEADER = "x-fake-script"

_RECV_SIZE = 65536
_MAX_HEAD = 65536
_WAIT_SLICE = 0.05  # how often WaitFor re-checks the socket and the server's stop flag


class _PeerGone(Exception):
    """The client closed the connection (noticed by a failed write or an EOF)."""


class _Stopped(Exception):
    """The server is stopping."""


# ---------------------------------------------------------------------------
# Recorded requests
# ---------------------------------------------------------------------------

class Headers(dict):
    """Request headers: a dict with lower-case keys (repeated headers joined with ", "),
    case-insensitive lookup, and `.raw`, the (name, value) pairs as received."""

    def __init__(self, raw=()):
        super().__init__()
        self.raw = list(raw)
        for name, value in self.raw:
            key = name.lower()
            dict.__setitem__(self, key, f"{dict.__getitem__(self, key)}, {value}" if key in self else value)

    def __getitem__(self, name):
        return super().__getitem__(name.lower())

    def __contains__(self, name):
        return isinstance(name, str) and super().__contains__(name.lower())

    def get(self, name, default=None):
        return super().get(name.lower(), default)

    def get_all(self, name):
        return [v for k, v in self.raw if k.lower() == name.lower()]


_UNPARSED = object()


@dataclass(eq=False)
class RecordedRequest:
    method: str
    path: str  # request target, query string included
    version: str
    headers: Headers
    body: bytes
    received_at: float  # time.monotonic() when the whole body had arrived
    index: int = 0  # 1-based order of arrival at this server
    connection_id: int = 0  # 1-based; equal ids mean the same TCP connection
    chunked: bool = False  # the request body came with Transfer-Encoding: chunked
    raw_head: bytes = b""
    peer_closed: threading.Event = field(default_factory=threading.Event)
    peer_closed_at: float | None = None
    finished: threading.Event = field(default_factory=threading.Event)  # script done
    outcome: str | None = None  # end, cut, reset, peer_closed, stopped, error
    script_source: str | None = None  # "named:NAME", "queue" or "default"
    _json: object = field(default=_UNPARSED, repr=False)

    @property
    def json(self):
        """The body parsed as JSON, or None."""
        if self._json is _UNPARSED:
            try:
                self._json = json.loads(self.body) if self.body else None
            except ValueError:
                self._json = None
        return self._json

    @property
    def route(self):
        """The path without the query string."""
        return self.path.split("?", 1)[0]

    @property
    def query(self):
        return self.path.split("?", 1)[1] if "?" in self.path else ""


# ---------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------

class _BadRequest(Exception):
    pass


class _Exchange:
    """One request's response: the state the steps act on."""

    def __init__(self, conn, request, script):
        self.conn = conn
        self.request = request
        self.script = script
        self.pos = 0
        self.status_sent = False
        self.body_mode = "chunked"
        self.close_after = False
        self.closed = False

    # -- used by steps --------------------------------------------------------
    def write(self, data):
        if self.closed:
            raise ScriptError("write after the connection was closed")
        try:
            self.conn.sock.sendall(data)
        except OSError:
            self._gone()

    def send_body(self, data):
        if not data:
            return  # an empty chunk would be the terminator
        if self.body_mode == "chunked":
            self.write(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            self.write(data)

    def ensure_status(self):
        if not self.status_sent:
            Status().run(self)

    def following_body_length(self):
        total = 0
        for step in self.script[self.pos + 1:]:
            if isinstance(step, TERMINAL_STEPS):
                break
            if hasattr(step, "body_length"):
                total += step.body_length()
        return total

    def idle(self, timeout, event=None):
        """Wait `timeout` s (None: forever) or until `event` is set, watching the socket:
        a hang-up raises _PeerGone, the server stopping raises _Stopped."""
        deadline = None if timeout is None else time.monotonic() + timeout
        poller = select.poll()
        poller.register(self.conn.sock, select.POLLIN | select.POLLERR | select.POLLHUP)
        while True:
            if self.conn.server.stopping:
                raise _Stopped
            if event is not None and event.is_set():
                return
            wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait <= 0:
                return
            if event is not None:
                wait = _WAIT_SLICE if wait is None else min(wait, _WAIT_SLICE)
            if poller.poll(None if wait is None else max(wait * 1000, 1)):
                try:
                    data = self.conn.sock.recv(_RECV_SIZE)
                except OSError:
                    data = b""
                if not data:
                    self._gone()
                self.conn.buf += data  # pipelined bytes: keep them for the next request

    def close(self, reset=False):
        if not self.closed:
            self.closed = True
            self.conn.close(reset=reset)

    # -- internals --------------------------------------------------------------
    def _gone(self):
        if self.conn.server.stopping:
            raise _Stopped
        req = self.request
        if not req.peer_closed.is_set():
            req.peer_closed_at = time.monotonic()
            req.peer_closed.set()
        raise _PeerGone

    def keep_alive(self):
        return not self.closed and not self.close_after and self.body_mode != "close"


class _Connection:
    def __init__(self, server, cid, sock):
        self.server = server
        self.cid = cid
        self.sock = sock
        self.buf = b""

    def serve(self):
        while not self.server.stopping:
            request = self.read_request()
            if request is None:
                return
            self.server._record(request)
            script = self.server._pick_script(request)
            ex = _Exchange(self, request, script)
            outcome = "error"
            try:
                outcome = self.run_script(ex)
            except _PeerGone:
                outcome = "peer_closed"
            except _Stopped:
                outcome = "stopped"
            except Exception as exc:  # a broken script: make it visible, close the connection
                self.server._error(f"script for {request.method} {request.path} failed: {exc!r}")
                ex.closed = True
            finally:
                request.outcome = outcome
                request.finished.set()
            if outcome != "end" or not ex.keep_alive() or not self.wants_keep_alive(request):
                return

    @staticmethod
    def run_script(ex):
        for pos, step in enumerate(ex.script):
            ex.pos = pos
            outcome = step.run(ex)
            if outcome:
                return outcome
        ex.pos = len(ex.script)
        return End().run(ex)

    @staticmethod
    def wants_keep_alive(request):
        connection = request.headers.get("connection", "").lower()
        if request.version == "HTTP/1.0":
            return "keep-alive" in connection
        return "close" not in connection

    # -- reading ------------------------------------------------------------------
    def _fill(self):
        try:
            data = self.sock.recv(_RECV_SIZE)
        except OSError:
            data = b""
        self.buf += data
        return bool(data)

    def _read_line(self):
        while b"\r\n" not in self.buf:
            if len(self.buf) > _MAX_HEAD:
                raise _BadRequest("line too long")
            if not self._fill():
                raise _BadRequest("connection closed mid-request")
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _read_exact(self, n):
        while len(self.buf) < n:
            if not self._fill():
                raise _BadRequest("connection closed mid-body")
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def read_request(self):
        """-> RecordedRequest, or None when the client closed (or sent garbage)."""
        while b"\r\n\r\n" not in self.buf:
            if len(self.buf) > _MAX_HEAD or not self._fill():
                return None
        try:
            return self._parse_request()
        except (_BadRequest, ValueError, UnicodeDecodeError) as exc:
            self.server._error(f"bad request on connection {self.cid}: {exc}")
            try:
                body = json_text(openai_error_body(f"fake upstream: bad request: {exc}")).encode()
                self.sock.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
                                  b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            except OSError:
                pass
            return None

    def _parse_request(self):
        while self.buf.startswith(b"\r\n"):  # tolerate stray CRLFs between requests
            self.buf = self.buf[2:]
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ", 2)
        raw = []
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise _BadRequest(f"malformed header line {line!r}")
            raw.append((name.strip(), value.strip()))
        headers = Headers(raw)
        if "100-continue" in headers.get("expect", "").lower():
            self.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        if chunked:
            body = self._read_chunked()
        else:
            body = self._read_exact(int(headers.get("content-length", "0") or 0))
        return RecordedRequest(method=method, path=target, version=version, headers=headers, body=body,
                               received_at=time.monotonic(), connection_id=self.cid, chunked=chunked,
                               raw_head=head + b"\r\n\r\n")

    def _read_chunked(self):
        parts = []
        while True:
            size = int(self._read_line().split(b";", 1)[0].strip(), 16)
            if size == 0:
                while self._read_line():  # trailers up to the blank line
                    pass
                return b"".join(parts)
            parts.append(self._read_exact(size))
            if self._read_exact(2) != b"\r\n":
                raise _BadRequest("chunk not followed by CRLF")

    # -- closing ------------------------------------------------------------------
    def close(self, reset=False):
        self.server._forget(self.cid)
        try:
            if reset:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.sock.close()
        except OSError:
            pass


class FakeUpstream:
    """A scripted HTTP/1.1 upstream on 127.0.0.1 (see the module docstring).

        with FakeUpstream() as fake:
            fake.enqueue(sse_reply(anthropic_stream(["a", "b"])))
            requests.post(fake.url + "/v1/messages", json={...})
            [req] = fake.wait_for_requests(1)
    """

    def __init__(self, host="127.0.0.1", port=0):
        self.host = host
        self.port = port
        self.named = {}  # name -> script or callable(RecordedRequest) -> script
        self.errors = []  # messages about broken scripts and bad requests
        self.connection_count = 0
        self._queue = deque()
        self._records = []
        self._cond = threading.Condition()
        self._stop_event = threading.Event()
        self._listener = None
        self._accept_thread = None
        self._conns = {}
        self._threads = []

    # -- lifecycle ------------------------------------------------------------------
    @property
    def url(self):
        return f"http://{self.host}:{self.port}"

    @property
    def stopping(self):
        return self._stop_event.is_set()

    def start(self):
        if self._listener is not None or self.stopping:
            raise RuntimeError("FakeUpstream can be started once")
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(128)
        listener.settimeout(0.5)  # a backstop: stop() also shuts the socket down to wake accept()
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._accept_thread = threading.Thread(target=self._accept_loop, name=f"fakeupstream-{self.port}",
                                               daemon=True)
        self._accept_thread.start()
        return self

    def stop(self, timeout=5.0):
        """Close the listener and every connection (stalled ones included); join the threads."""
        if self._listener is None or self.stopping:
            return
        deadline = time.monotonic() + timeout
        self._stop_event.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._accept_thread.join(max(0.0, deadline - time.monotonic()))
        self._listener.close()
        with self._cond:
            conns = list(self._conns.values())
            threads = list(self._threads)
            self._cond.notify_all()
        for sock in conns:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes recv/poll/sendall; the owner thread closes
            except OSError:
                pass
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- scripts and records ------------------------------------------------------
    def enqueue(self, *scripts):
        """Queue scripts (or callables) for the next requests without x-fake-script, FIFO."""
        with self._cond:
            self._queue.extend(scripts)

    @property
    def pending(self):
        """How many enqueued scripts have not been used yet."""
        with self._cond:
            return len(self._queue)

    @property
    def requests(self):
        """A snapshot of the recorded requests, in order of arrival."""
        with self._cond:
            return list(self._records)

    def wait_for_requests(self, n, timeout=5.0):
        """Return the recorded requests once there are at least n; TimeoutError otherwise."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._records) >= n, timeout):
                seen = [f"{r.method} {r.path}" for r in self._records]
                raise TimeoutError(f"waited {timeout}s for {n} request(s), got {len(seen)}: {seen}")
            return list(self._records)

    def reset(self):
        """Forget queued and named scripts, records and errors."""
        with self._cond:
            self._queue.clear()
            self.named.clear()
            self._records.clear()
            self.errors.clear()

    # -- internals -------------------------------------------------------------------
    def _accept_loop(self):
        while not self.stopping:
            try:
                sock, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._cond:
                if self.stopping:
                    sock.close()
                    return
                self.connection_count += 1
                cid = self.connection_count
                self._conns[cid] = sock
                thread = threading.Thread(target=self._serve, args=(cid, sock), daemon=True,
                                          name=f"fakeupstream-{self.port}-conn{cid}")
                self._threads = [t for t in self._threads if t.is_alive()]
                self._threads.append(thread)
            thread.start()

    def _serve(self, cid, sock):
        conn = _Connection(self, cid, sock)
        try:
            conn.serve()
        except Exception:
            self._error(f"connection {cid} crashed:\n{traceback.format_exc()}")
        finally:
            conn.close()

    def _forget(self, cid):
        with self._cond:
            self._conns.pop(cid, None)

    def _record(self, request):
        with self._cond:
            self._records.append(request)
            request.index = len(self._records)
            self._cond.notify_all()

    def _error(self, message):
        with self._cond:
            self.errors.append(message)
        print(f"fakeupstream: {message}", file=sys.stderr)

    def _pick_script(self, request):
        name = request.headers.get(FAKE_SCRIPT_HEADER)
        with self._cond:
            if name is not None:
                entry = self.named.get(name)
                request.script_source = f"named:{name}"
                if entry is None:
                    missing = f"no script named {name!r} (known: {sorted(self.named)})"
            elif self._queue:
                entry = self._queue.popleft()
                request.script_source = "queue"
            else:
                entry = None
                request.script_source = "default"
        if name is not None and entry is None:
            self._error(missing)
            return json_reply(openai_error_body(f"fake upstream: {missing}", type="server_error"), status=500)
        try:
            if callable(entry):
                entry = entry(request)
            return default_script(request) if entry is None else list(entry)
        except Exception:
            self._error(f"script callable failed:\n{traceback.format_exc()}")
            return json_reply(openai_error_body("fake upstream: script callable failed", type="server_error"),
                              status=500)
