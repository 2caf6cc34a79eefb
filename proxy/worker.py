"""The proxy's gunicorn worker: gthread, with the changes a proxy of long streams needs.

1. Requests are read whole by the event loop, not by a thread.  gthread hands a
   connection to a thread at its first byte, and the thread then blocks until the request
   is complete, so a few hundred clients trickling one byte a second hold every thread
   and nobody else is served.  Here the main loop buffers each request (head and body,
   `request_framing` says when it is whole) and gives it to a thread only then; a client
   gets `client_timeout` seconds for the whole request, then a 408, and a request too
   large is answered by the loop itself.  Connections being read do not count against
   `worker_connections`; a worker whose threads are all busy stops accepting, as in
   gthread, and requests that become whole meanwhile wait for a thread.
2. Requests gunicorn refuses itself (a malformed request line, bad chunked framing, a head
   too large) get the endpoint's own JSON error and a usage row, not an HTML page.
3. A connection that is not kept alive is closed as gunicorn does (FIN, then the rest of
   what the client sends is drained so no RST cuts the last response), but without
   blocking: gunicorn 27 lingers up to 2 s per connection *in the event loop*, so a few
   clients that do not close at once stopped accepting, reading and the worker's
   heartbeat for everyone (measured: 200 concurrent requests, 64 of them stuck in the
   listen queue for 30 s).  Here the loop watches the lingering sockets like any other.
4. SIGTERM tells the application at once (live streams get `shutdown_grace`, then one
   terminal error each), and the worker keeps the last seconds of gunicorn's
   `graceful_timeout` to itself: it waits for its streams' usage rows, records any that
   did not make it, and drains the usage queue before the master's SIGKILL.

5. A kept-alive connection's next request, when it comes within `NEXT_REQUEST_WAIT_MS`
   of the last answer, is read and served by the thread that answered (gthread sends the
   connection back through the event loop to another thread each time).

What stays gthread's: TLS and HTTP/2 connections (read by threads as before), the thread
pool, keep-alive handling and the graceful loop.  Nothing a client sends may raise out of
the event loop: one bad connection is dropped, never the worker.
"""

from __future__ import annotations

import collections
import errno
import logging
import resource
import select
import selectors
import socket
import sys
import time
from functools import partial
from typing import Protocol, runtime_checkable

from gunicorn.http import errors as http_errors
from gunicorn.http.unreader import SocketUnreader
from gunicorn.workers.gthread import _DEFER, TConn, ThreadWorker

from .errors import Overloaded, ProxyError, RequestRejected, RequestTimeout
from .pipeline.replies import reason_phrase
from .request_framing import Head, Progress, RequestFraming
from .text import loggable

log = logging.getLogger("proxy.worker")

RECV_SIZE = 256 * 1024
# Connections being read at once, per worker (fewer if file descriptors are short); past
# it the oldest (slowest) is answered 408 and closed.
MAX_READING = 4096
ACCEPT_PAUSE = 0.5  # seconds accepting rests when the worker is out of file descriptors
LINGER = 2.0  # seconds a closed connection is drained for the client's FIN (as gunicorn)
LINGER_DRAIN = 65536  # bytes drained at most before the connection is closed anyway
# Seconds of graceful_timeout the worker keeps for itself after its connections are done:
# usage rows of the last streams, then the tracker's drain, before the master's SIGKILL.
EXIT_RESERVE = 5
# A thread woken by its socket (a stream's next upstream chunk, a request handed to a pool
# thread) waits at most this long for the GIL held by another.
SWITCH_INTERVAL = 0.0005
# After an answer on a kept-alive connection, its thread waits this long for the client's
# next request and serves it itself (see `ProxyWorker.handle`).
NEXT_REQUEST_WAIT_MS = 2

# gunicorn's parser errors are translated here, once: the status each one means.
_PARSER_ERRORS: tuple[tuple[type, int], ...] = (
    (http_errors.LimitRequestLine, 414),
    (http_errors.LimitRequestHeaders, 431),
    (http_errors.UnsupportedTransferCoding, 501),
    (http_errors.ExpectationFailed, 417),
    (http_errors.ForbiddenProxyRequest, 403),
    (http_errors.ParseException, 400),  # every other request the parser refuses
)


def parser_error(exc: BaseException) -> ProxyError | None:
    """The error a request gunicorn's parser refused stands for, or None (a server fault)."""
    for kind, status in _PARSER_ERRORS:
        if isinstance(exc, kind):
            return RequestRejected(status, f"the request is malformed: {type(exc).__name__}: "
                                           f"{loggable(exc, 200)}")
    return None


@runtime_checkable
class ServerHooks(Protocol):
    """What the worker asks of the application it serves (proxy.app.App has all of it)."""

    config: object  # client_timeout, max_body_bytes, memory_budget

    def start(self) -> None: ...

    def begin_shutdown(self) -> None: ...

    def close(self, timeout: float) -> None: ...

    def refuse_unread(self, err: ProxyError, head: Head | None
                      ) -> tuple[int, list[tuple[str, str]], bytes]: ...


class PrebufferedUnreader(SocketUnreader):
    """gunicorn's reader of a request, fed first from what the event loop already read.

    Handing those bytes over with `unread` would put the whole request in gunicorn's
    buffer, and its chunked-body parser copies that buffer for every chunk: a body of a
    hundred thousand small chunks then takes minutes.  Served in socket-sized pieces, the
    buffer stays as small as when gunicorn reads the socket itself; the bytes are let go
    once served, so a long stream does not keep its request's copy alive.

    A request handed over before it was whole reads the rest from the socket by
    `deadline` in all (each read waits only for the time left, and the socket goes back to
    blocking after it, so writing the answer is never cut short)."""

    def __init__(self, sock, max_chunk: int, data: bytes, deadline: float | None = None) -> None:
        super().__init__(sock, max_chunk)
        self._data = memoryview(data)
        self._pos = 0
        self.deadline = deadline

    def chunk(self, size_hint=None) -> bytes:
        if self._pos >= len(self._data):
            if self.deadline is None:
                return super().chunk(size_hint)
            return self._chunk_by_deadline(size_hint)
        size = self.mxchunk if not size_hint or size_hint <= self.mxchunk \
            else min(size_hint, self.max_body_chunk)
        piece = bytes(self._data[self._pos:self._pos + size])
        self._pos += len(piece)
        if self._pos >= len(self._data):
            self._data, self._pos = memoryview(b""), 0
        return piece

    def _chunk_by_deadline(self, size_hint) -> bytes:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request did not arrive in time")
        self.sock.settimeout(left)
        try:
            return super().chunk(size_hint)
        finally:
            self.sock.settimeout(None)

    def take_buffered(self) -> bytes:
        rest = bytes(self._data[self._pos:])
        self._data, self._pos = memoryview(b""), 0
        return super().take_buffered() + rest

    def has_buffered(self) -> bool:
        return self._pos < len(self._data) or bool(self.buf.getvalue())


class ProxyConn(TConn):
    """A connection whose request is buffered by the event loop before a thread sees it."""

    def __init__(self, cfg, sock, client, server) -> None:
        super().__init__(cfg, sock, client, server)
        self.inbox = bytearray()
        self.framing: RequestFraming | None = None
        self.deadline = 0.0
        self.generation = 0
        self.reading = False
        self.registered = False
        self.continue_sent = False
        self.prebuffer = b""
        self.held = 0  # bytes of the request this connection carries, until it is answered
        self.unfinished = False  # handed over before it was whole: the thread reads the rest
        self.carry = b""  # the start of a next request its thread read but left to the loop
        self.linger = None  # the worker's non-blocking graceful close (plain TCP only)

    def close(self, graceful: bool = False) -> None:
        if graceful and self.linger is not None:
            self.linger(self.sock)
        else:
            super().close(graceful)

    def init(self) -> None:
        super().init()
        if self.prebuffer and self.parser is not None:
            earlier = self.parser.unreader.take_buffered()
            self.parser.unreader = PrebufferedUnreader(
                self.sock, self.parser.unreader.mxchunk, earlier + self.prebuffer,
                deadline=self.deadline if self.unfinished else None)
            self.prebuffer = b""


def _guarded(callback):
    """An event-loop callback for one connection: whatever it raises costs that connection,
    never the loop (which every connection of the worker depends on)."""

    def run(self, conn, *args, **kwargs):
        try:
            return callback(self, conn, *args, **kwargs)
        except Exception:
            log.exception("request reading failed; the connection is closed")
            self._forget(conn)
    return run


def _while_reading(callback):
    """A callback for a connection being read; a stale one (an event of the same round
    that arrives after the connection was handed over or closed) does nothing."""

    def run(self, conn, *args):
        if not conn.reading:
            return None
        return callback(self, conn, *args)
    return run


class ProxyWorker(ThreadWorker):
    """gthread with whole-request reading, JSON errors with rows, and a careful exit."""

    def __init__(self, *args, **kwargs) -> None:
        self._in_threads = 0  # requests handed to the thread pool and not finished
        super().__init__(*args, **kwargs)
        self._reading: collections.deque = collections.deque()  # (deadline, generation, conn)
        self._reading_count = 0
        self._buffered = 0  # bytes of requests being read, or handed over and not answered yet
        self._heads: dict = {}  # socket -> the head read for its current request (for errors)
        self._accept_paused_until = 0.0
        self._lingering: collections.deque = collections.deque()  # [deadline, sock, drained]
        self.max_reading = MAX_READING
        self._kill_at: float | None = None
        self.hooks: ServerHooks | None = None
        self.client_timeout = 30.0
        self.max_body = 32 * 1024 * 1024
        self.read_budget = 1024 * 1024 * 1024

    # gthread stops accepting at `worker_connections` connections, idle kept-alive ones
    # included, so with a slack for those a worker full of streams took a few more that no
    # thread was free for (measured: 8 of 2,000 streams got their first byte only when
    # others ended).  Here a worker whose every thread has a request accepts no more: the
    # other workers take the new connections.
    @property
    def worker_connections(self) -> int:
        return 0 if self._in_threads >= self.cfg.threads else self._worker_connections

    @worker_connections.setter
    def worker_connections(self, value: int) -> None:
        self._worker_connections = value

    def enqueue_req(self, conn) -> None:
        super().enqueue_req(conn)
        # Counted after the submit: its `finish_request` runs on this (the loop's) thread.
        self._in_threads += 1

    # -- start and stop ------------------------------------------------------------------

    def init_process(self) -> None:
        sys.setswitchinterval(SWITCH_INTERVAL)
        _raise_open_file_limit()
        super().init_process()

    def run(self) -> None:
        if isinstance(self.wsgi, ServerHooks):
            self.hooks = self.wsgi
            config = self.hooks.config
            self.client_timeout = config.client_timeout
            self.max_body = config.max_body_bytes
            self.read_budget = config.memory_budget
            self.hooks.start()  # the usage writer runs before the first request, not in it
        self.max_reading = _readers_allowed(self.cfg.worker_connections)
        try:
            super().run()
        finally:
            self._drop_unread()
            self._end_lingering(float("inf"))
            self._close_app()

    def handle_exit(self, sig, frame) -> None:
        if self.alive:
            graceful = self.cfg.graceful_timeout
            self._kill_at = time.monotonic() + graceful  # the master's SIGKILL, give or take
            self.cfg.set("graceful_timeout", max(int(graceful - EXIT_RESERVE), 1))
            if self.hooks is not None:
                self.hooks.begin_shutdown()
        super().handle_exit(sig, frame)

    def _close_app(self) -> None:
        if self.hooks is None:
            return
        left = 10.0 if self._kill_at is None else self._kill_at - time.monotonic() - 0.5
        self.hooks.close(max(left, 0.5))

    # -- reading requests in the event loop ------------------------------------------------

    def accept(self, listener) -> None:
        try:
            sock, addr = listener.accept()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                self._out_of_descriptors()
                return
            if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        conn = ProxyConn(self.cfg, sock, addr, listener.getsockname())
        if not self.cfg.is_ssl:
            conn.linger = self._linger
        if self.cfg.is_ssl:  # TLS is read by a thread, as in gthread
            self.nr_conns += 1
            sock.setblocking(True)
            self.enqueue_req(conn)
            return
        self._read_request(conn)

    def _out_of_descriptors(self) -> None:
        """No descriptor for a new connection: the slowest reader goes, and accepting
        rests a moment (the listener would report the same connection again at once)."""
        log.warning("out of file descriptors: %d connections are sending requests",
                    self._reading_count)
        self._evict_oldest("the proxy has too many connections sending requests")
        self._accept_paused_until = time.monotonic() + ACCEPT_PAUSE
        self.set_accept_enabled(False)

    def set_accept_enabled(self, enabled: bool) -> None:
        if enabled and time.monotonic() < self._accept_paused_until:
            enabled = False
        super().set_accept_enabled(enabled)

    def on_client_socket_readable(self, conn, client) -> None:
        """A kept-alive connection sends its next request: read it here too."""
        if self.cfg.is_ssl:
            super().on_client_socket_readable(conn, client)
            return
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        self.nr_conns -= 1
        self._read_request(conn, readable=True)

    def handle(self, conn):
        """gthread's, then the connection's next requests while they come at once.

        A kept-alive connection otherwise goes back to the event loop after each answer,
        and its next request comes back to a thread through the loop: two thread switches
        and a round of the loop, ~0.2 ms of a request to a busy proxy.  A client that sends
        its next request within `NEXT_REQUEST_WAIT_MS` is served by the same thread; one
        that does not (or sends an unfinished request) goes back to the loop as before.

        Only while the worker has a thread to spare: when every thread has a request, the
        loop stops accepting and may hold requests queued for a thread, and those go first
        (a client that sends request after request must not keep others out)."""
        result = super().handle(conn)
        while result is True and self._next_request_here(conn):
            result = super().handle(conn)
        return result

    def _next_request_here(self, conn) -> bool:
        """Whether the connection's next request arrived whole in time and is set up
        for this thread to parse (a part of one is kept in `carry` for the loop)."""
        if (not self.alive or self.cfg.is_ssl or not isinstance(conn, ProxyConn)
                or conn.is_http2 or conn.parser is None or _has_buffered(conn.parser.unreader)
                or self._threads_all_taken()
                or not _readable_within(conn.sock, NEXT_REQUEST_WAIT_MS)
                or self._threads_all_taken()):  # again: others may have come meanwhile
            return False
        try:
            data = conn.sock.recv(RECV_SIZE, socket.MSG_DONTWAIT)
        except OSError:  # nothing after all, or a reset: the loop sees the same
            return False
        if not data:  # the client closed: the loop sees it too
            return False
        framing = RequestFraming(self.max_body)
        if framing.advance(data) is not Progress.WHOLE:
            conn.carry = data  # the loop reads the rest, with its deadline and budget
            return False
        # Whole: as the loop would hand it over.  Its bytes are not counted in the loop's
        # read budget (a thread has it; the application's budget counts its parse), and
        # those of the request the loop read are let go now, not at the end of the run.
        self._heads[conn.sock] = framing.head
        conn.prebuffer, conn.unfinished = data, False
        held, conn.held = conn.held, 0
        if held:
            self.method_queue.defer(self._let_go_of, held)
        return True

    def _threads_all_taken(self) -> bool:
        # Read from a pool thread: the loop's count, a moment old at worst.
        return self._in_threads >= self.cfg.threads

    def _let_go_of(self, nbytes: int) -> None:
        """On the loop's thread (the read budget is the loop's): bytes no longer held."""
        self._buffered -= nbytes

    def finish_request(self, conn, fs) -> None:
        """As gthread, except that a request pipelined behind the last one, or begun while
        the thread waited for it, is read here (gthread would hand it to a thread, where an
        unfinished one would block it)."""
        self._heads.pop(conn.sock, None)
        self._in_threads -= 1
        carry = b""
        if isinstance(conn, ProxyConn):
            self._buffered -= conn.held  # the request is answered: its bytes are let go
            conn.held = 0
            carry, conn.carry = conn.carry, b""
        try:
            result = fs.result() if not fs.cancelled() else False
            pipelined = (result and result is not _DEFER and isinstance(conn, ProxyConn)
                         and not self.cfg.is_ssl and conn.parser is not None
                         and (carry or _has_buffered(conn.parser.unreader)))
        except Exception:
            pipelined = False
        if not pipelined:
            super().finish_request(conn, fs)
            return
        self.nr_conns -= 1
        conn.sock.setblocking(False)
        self._read_request(conn, conn.parser.unreader.take_buffered() + carry)

    @_guarded
    def _read_request(self, conn: ProxyConn, already: bytes = b"", readable: bool = False) -> None:
        """Start reading the connection's next request.  A `readable` connection (the loop
        saw its bytes arrive) is read at once: a kept-alive client's whole request usually
        sits in the socket already, and a round of the loop costs it ~0.05 ms."""
        conn.inbox = bytearray(already)
        conn.framing = RequestFraming(self.max_body)
        conn.deadline = time.monotonic() + self.client_timeout
        conn.generation += 1
        conn.reading = True
        conn.continue_sent = False
        conn.unfinished = False
        self._buffered += len(already)
        self._reading.append((conn.deadline, conn.generation, conn))
        self._reading_count += 1
        if self._reading_count > self.max_reading:
            self._evict_oldest("the proxy has too many connections sending requests")
        if already and self._judge(conn, conn.framing.advance(conn.inbox)):
            return
        if already:
            self._continue_if_expected(conn)
        if readable:
            self._on_request_bytes(conn, conn.sock)
            if not conn.reading:  # handed over, answered or closed
                return
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_request_bytes, conn))
        conn.registered = True

    @_guarded
    @_while_reading
    def _on_request_bytes(self, conn: ProxyConn, _sock) -> None:
        try:
            data = conn.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the client closed its side: answer what it sent, if anything
            self._hand_over(conn, whole=False) if conn.inbox else self._drop(conn)
            return
        if self._buffered + len(data) > self.read_budget:
            # The worker holds as much request data as it may: this request is refused,
            # none is paused (paused readers would wait on each other until their 408s).
            self._refuse(conn, Overloaded("the proxy holds as much request data as it may "
                                          "right now; retry shortly"))
            return
        conn.inbox += data
        self._buffered += len(data)
        if self._judge(conn, conn.framing.advance(conn.inbox)):
            return
        self._continue_if_expected(conn)

    @staticmethod
    def _continue_if_expected(conn: ProxyConn) -> None:
        """The client waits for `100 Continue` before it sends the body (once its head is
        read, whether the loop read it or the thread that answered the last request)."""
        if conn.framing.expects_continue and not conn.continue_sent:
            conn.continue_sent = True
            _send_quietly(conn.sock, b"HTTP/1.1 100 Continue\r\n\r\n")

    def _judge(self, conn: ProxyConn, progress: Progress) -> bool:
        """Act on what the framing says; True once the connection has left the loop."""
        if progress is Progress.MORE:
            return False
        if progress is Progress.REFUSE:
            self._refuse(conn, conn.framing.refusal)
        else:
            self._hand_over(conn, whole=progress is Progress.WHOLE)
        return True

    def _hand_over(self, conn: ProxyConn, whole: bool) -> None:
        """The request is in (or needs gunicorn's judgement): a thread takes it from here.
        Its bytes stay counted until it is answered (a request waiting for a thread holds
        them too)."""
        conn.held = len(conn.inbox)  # already counted in _buffered, and it stays so
        conn.prebuffer = bytes(conn.inbox)
        conn.inbox = bytearray()
        self._stop_reading(conn)
        self._heads[conn.sock] = conn.framing.head if conn.framing is not None else None
        conn.data_ready = True
        conn.unfinished = not whole
        self.nr_conns += 1
        self.enqueue_req(conn)

    def _drop(self, conn: ProxyConn) -> None:
        self._stop_reading(conn)
        conn.close()

    def _forget(self, conn: ProxyConn) -> None:
        """After a failure in the loop: the connection goes, whatever state it was in."""
        if conn.reading:
            self._stop_reading(conn)
        else:
            self._unregister(conn)
        conn.close()

    def _stop_reading(self, conn: ProxyConn) -> None:
        if not conn.reading:
            return
        self._unregister(conn)
        conn.reading = False
        self._reading_count -= 1
        self._buffered -= len(conn.inbox)

    def _unregister(self, conn: ProxyConn) -> None:
        if conn.registered:
            try:
                self.poller.unregister(conn.sock)
            except (KeyError, ValueError, OSError):
                pass
            conn.registered = False

    # -- closing without blocking the loop ----------------------------------------------------

    def _linger(self, sock) -> None:
        """Half-close (the client gets its FIN), then drain what it still sends until it
        closes too, `LINGER` seconds pass or `LINGER_DRAIN` bytes came: all from the event
        loop, so no client can hold the worker's loop."""
        try:
            sock.shutdown(socket.SHUT_WR)
            sock.setblocking(False)
            entry = [time.monotonic() + LINGER, sock, 0]
            self.poller.register(sock, selectors.EVENT_READ, partial(self._drain, entry))
        except (OSError, ValueError, KeyError):
            _close_quietly(sock)
            return
        self._lingering.append(entry)

    def _drain(self, entry: list, _sock) -> None:
        sock = entry[1]
        if sock is None:
            return
        try:
            data = sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        entry[2] += len(data)
        if not data or entry[2] >= LINGER_DRAIN:
            self._stop_lingering(entry)

    def _stop_lingering(self, entry: list) -> None:
        sock, entry[1] = entry[1], None
        if sock is None:
            return
        try:
            self.poller.unregister(sock)
        except (KeyError, ValueError, OSError):
            pass
        _close_quietly(sock)

    def _end_lingering(self, now: float) -> None:
        """Close the lingering connections whose time is up (all of them at exit)."""
        while self._lingering and (self._lingering[0][0] <= now or self._lingering[0][1] is None):
            self._stop_lingering(self._lingering.popleft())

    def murder_pending(self) -> None:
        """Called by gthread's loop after every round of events: requests past their
        deadline get a 408 (in the endpoint's shape, with a row when their head came), and
        lingering connections past their time are closed."""
        super().murder_pending()
        now = time.monotonic()
        self._end_lingering(now)
        while self._reading and self._reading[0][0] <= now:
            _, generation, conn = self._reading.popleft()
            if conn.reading and conn.generation == generation:
                self._time_out(conn)

    def _time_out(self, conn: ProxyConn, why: str | None = None) -> None:
        self._refuse(conn, RequestTimeout(why or (
            f"the request did not arrive within {self.client_timeout:g} s (server.client_timeout)")))

    @_guarded
    @_while_reading
    def _refuse(self, conn: ProxyConn, err: ProxyError) -> None:
        """Answer from the loop (too slow, too large) and close: no thread waits on it."""
        head = conn.framing.head if conn.framing is not None else None
        self._stop_reading(conn)
        if self.hooks is not None:
            _send_quietly(conn.sock, _http_response(*self.hooks.refuse_unread(err, head)))
        conn.close()

    def _evict_oldest(self, why: str) -> None:
        while self._reading:
            _, generation, conn = self._reading.popleft()
            if conn.reading and conn.generation == generation:
                self._time_out(conn, f"{why}; this one was the slowest")
                return

    def _drop_unread(self) -> None:
        """At exit: connections that never sent a whole request."""
        while self._reading:
            _, generation, conn = self._reading.popleft()
            if conn.reading and conn.generation == generation:
                self._drop(conn)

    # -- requests gunicorn refuses ---------------------------------------------------------

    def handle_error(self, req, client, addr, exc) -> None:
        """The endpoint's JSON error (and a usage row) instead of gunicorn's HTML page."""
        err = parser_error(exc)
        if self.hooks is None or err is None and not isinstance(exc, Exception):
            super().handle_error(req, client, addr, exc)
            return
        if err is None:
            self.log.exception("Error handling request")
            err = RequestRejected(500, "internal error in the proxy")
        head = self._heads.get(client)  # what the loop read; gunicorn may have given up earlier
        if head is None and getattr(req or getattr(exc, "req", None), "uri", None):
            req = req or exc.req
            head = Head(req.method, req.uri, "HTTP/1.1", list(req.headers or []))
        try:
            client.sendall(_http_response(*self.hooks.refuse_unread(err, head)))
        except OSError:
            pass

    def handle_request(self, req, conn):
        """gunicorn parsed the request: the head kept for its own error answers is let go
        (a stream holds its thread for hours; `handle_error` rebuilds a head from `req`)."""
        self._heads.pop(conn.sock, None)
        if isinstance(conn, ProxyConn):
            conn.framing = None
        return super().handle_request(req, conn)

    def _keepalive_after(self, conn, keepalive):
        """After the answer went out: a body the application did not read that turns out
        to be malformed only means the connection cannot be reused (gthread would answer
        the same request a second time, with a second usage row)."""
        try:
            return super()._keepalive_after(conn, keepalive)
        except Exception:
            return False


def _http_response(status: int, headers: list[tuple[str, str]], body: bytes) -> bytes:
    """One complete HTTP/1.1 response that closes its connection."""
    lines = [f"HTTP/1.1 {status} {reason_phrase(status)}", *(f"{k}: {v}" for k, v in headers),
             f"Content-Length: {len(body)}", "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _has_buffered(unreader) -> bool:
    if isinstance(unreader, PrebufferedUnreader):
        return unreader.has_buffered()
    return bool(unreader.buf.getvalue())


def _readable_within(sock, timeout_ms: int) -> bool:
    try:
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(timeout_ms))
    except (OSError, ValueError):
        return False


def _send_quietly(sock, data: bytes) -> None:
    try:
        sock.send(data)
    except OSError:
        pass


def _readers_allowed(worker_connections: int) -> int:
    """As many readers as the file descriptors allow beside the connections the worker
    serves (a client socket and an upstream socket each) and some to spare."""
    try:
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ValueError, OSError):
        return MAX_READING
    if limit == resource.RLIM_INFINITY:
        return MAX_READING
    return max(16, min(MAX_READING, limit - 2 * worker_connections - 128))


def _raise_open_file_limit() -> None:
    """Each connection being read costs a descriptor: allow as many as the system does."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass


def _close_quietly(sock) -> None:
    try:
        sock.close()
    except OSError:
        pass
