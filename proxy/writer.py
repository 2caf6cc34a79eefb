"""The locked writers: the only path to the client for one streamed response.

Whole SSE events and `: keepalive` comments (from the heartbeat thread) go through one
lock, so a comment can never land inside an event.  Two shapes:

- `DirectWriter`: the server thread reads the upstream itself and writes each event to the
  client socket through the server's WSGI `write` callable; the heartbeat writes its
  keepalives through the same callable.  One thread per stream and no hand-off between
  threads per event.  Used where the server's `write` may be called from any thread
  (gunicorn, werkzeug).
- `LockedWriter`: a queue.  A stream thread puts frames in and the server thread (the WSGI
  generator) takes them out and yields each as one write: for any other WSGI server, and
  for the clients of a shared call (`fanout.py`), which must never slow the others down.
"""

from __future__ import annotations

import collections
import errno
import logging
import select
import threading
import time
from typing import Callable, Iterator

from .redact import Redactor

log = logging.getLogger("proxy.writer")

KEEPALIVE = b": keepalive\n\n"
# After an upstream `id:` field, the blank line of a comment would dispatch an empty event
# that the OpenAI SDK cannot parse (protocols.md section 0), so the comment stands alone.
KEEPALIVE_AFTER_ID = b": keepalive\n"
_END = object()  # sentinel: no more frames
# Bytes queued for a slow client before the stream thread waits: memory stays bounded, and
# the upstream sees TCP backpressure instead of the proxy buffering the answer.
MAX_BUFFERED = 4 * 1024 * 1024


class _Writer:
    """What both writers keep of their stream, and what the relay and the heartbeat read."""

    def __init__(self, keepalive: bool, redactor: Redactor | None) -> None:
        # Every frame passes here, so echoed keys are masked here (masks keep lengths).
        self._redactor = redactor if redactor else None
        self._closed = False
        self._ended = False  # the protocol's end went out: only its split-CRLF LF may follow
        self.keepalive = keepalive
        self.saw_id = False  # an upstream `id:` field went out (see KEEPALIVE_AFTER_ID)
        self.last_write = time.monotonic()
        self.bytes_out = 0
        self.keepalives_sent = 0

    @property
    def closed(self) -> bool:
        return self._closed


class LockedWriter(_Writer):
    """The only path to the client for one response: whole frames, in order, under a lock."""

    def __init__(self, keepalive: bool = True, max_buffered: int = MAX_BUFFERED,
                 redactor: Redactor | None = None) -> None:
        super().__init__(keepalive, redactor)
        lock = threading.Lock()
        self._cond = threading.Condition(lock)  # frames are waiting for the server thread
        self._space = threading.Condition(lock)  # room for the stream thread to queue more
        self._frames: collections.deque = collections.deque()
        self._queued = 0
        self.max_buffered = max_buffered

    def write_event(self, frame: bytes, has_id: bool = False, last: bool = False) -> bool:
        """Queue one complete event (waiting while a slow client has too much queued);
        False once the writer has been closed.  `last` marks the protocol's end: from then
        on no keepalive may follow, however long the stream thread takes to close."""
        if self._redactor is not None:
            frame = self._redactor.data(frame)
        with self._cond:
            while self._queued > self.max_buffered and not self._closed:
                self._space.wait()
            if self._closed:
                return False
            self.saw_id = self.saw_id or has_id
            self._ended = self._ended or last
            self._push(frame)
            return True

    def offer_event(self, frame: bytes, has_id: bool = False, last: bool = False) -> bool:
        """Queue one event without waiting: False when the writer is closed or its client
        has `max_buffered` bytes queued already (a shared stream never waits for one client)."""
        if self._redactor is not None:
            frame = self._redactor.data(frame)
        with self._cond:
            if self._closed or self._queued > self.max_buffered:
                return False
            self.saw_id = self.saw_id or has_id
            self._ended = self._ended or last
            self._push(frame)
            return True

    def write_keepalive_if_idle(self, now: float, interval: float) -> bool:
        with self._cond:
            if self._closed or self._ended or not self.keepalive or now - self.last_write < interval:
                return False
            self._push(KEEPALIVE_AFTER_ID if self.saw_id else KEEPALIVE)
            self.keepalives_sent += 1
            return True

    def close(self, final_frame: bytes | None = None) -> bool:
        """Queue an optional last frame and the end; only the first close counts."""
        if final_frame and self._redactor is not None:
            final_frame = self._redactor.data(final_frame)
        with self._cond:
            if self._closed:
                return False
            if final_frame:
                self._push(final_frame)
            self._closed = True
            self._frames.append(_END)
            self._cond.notify()
            self._space.notify_all()
            return True

    def frames(self) -> Iterator[bytes]:
        """Frames for the WSGI generator, blocking until each is available."""
        while True:
            with self._cond:
                while not self._frames:
                    self._cond.wait()
                frame = self._frames.popleft()
                if frame is not _END:
                    self._queued -= len(frame)
                    self._space.notify()
            if frame is _END:
                return
            yield frame

    def _push(self, frame: bytes) -> None:
        self._frames.append(frame)
        self._queued += len(frame)
        self.last_write = time.monotonic()
        self.bytes_out += len(frame)
        self._cond.notify()


Sink = Callable[[bytes], object]  # the server's WSGI `write` callable
Head = tuple[str, list[tuple[str, str]]]  # a status line and its headers


class DirectWriter(_Writer):
    """The only path to the client for one response, written on the calling thread.

    The stream's own thread (the server thread, which reads the upstream) writes events,
    blocking while a slow client catches up (TCP backpressure all the way to the upstream).
    The heartbeat never blocks here: it skips its keepalive while an event is being
    written (the stream is not idle) or while the client's socket has no room, and a close
    from another thread only marks the writer closed and leaves the last frame to the
    stream's thread (`finish`), which is woken by the abort of its upstream read.

    The status line is decided once: by `open` (a deployment answered), or else by `head`,
    asked whenever something is to be sent before that (a stream committed before any
    deployment answered).

    Two locks: `_io` is held for as long as bytes go out (so no keepalive lands inside an
    event), `_state` only for a few assignments (so a close from another thread never
    waits behind a slow client)."""

    def __init__(self, start_response, head: Callable[[], Head | None] = lambda: None,
                 client_socket=None, keepalive: bool = True, redactor: Redactor | None = None,
                 on_client_gone: Callable[[], None] | None = None) -> None:
        super().__init__(keepalive, redactor)
        self._start_response = start_response
        self._head = head
        self._socket = client_socket
        self._on_client_gone = on_client_gone
        self._io = threading.Lock()
        self._state = threading.Lock()
        self._sink: Sink | None = None  # set once the status line is decided
        self._final: bytes | None = None  # a last frame left by another thread for `finish`
        self._broken = False  # a write failed: the client is gone
        self._told_gone = False
        self._owner = threading.get_ident()  # the stream's own thread

    @property
    def opened(self) -> bool:
        return self._sink is not None

    @property
    def client_gone(self) -> bool:
        """A write found the client gone (the exchange may not know it yet)."""
        return self._broken

    def open(self, status: str, headers: list[tuple[str, str]]) -> bool:
        """Decide the status line and headers (only the first decision counts); they go out
        with the first write.  True when this call decided them."""
        with self._io:
            if self._sink is not None:
                return False
            self._sink = self._start_response(status, headers)
            return True

    def send_head(self, wait: bool = True) -> None:
        """Put the status line and headers on the wire now (an empty write does that).
        The heartbeat does not `wait`: while an event is being written the headers are on
        their way anyway, and a client without room gets them with its next keepalive."""
        if not self._io.acquire(blocking=wait):
            return
        try:
            if self._opened_now() and (wait or _has_room(self._socket)):
                self._send(b"", count=False)
        finally:
            self._io.release()
        self._tell_if_gone()

    def write_event(self, frame: bytes, has_id: bool = False, last: bool = False) -> bool:
        """Write one complete event; False once the writer is closed or its client gone."""
        if self._redactor is not None:
            frame = self._redactor.data(frame)
        with self._io:
            with self._state:
                if self._closed:
                    return False
                self.saw_id = self.saw_id or has_id
                self._ended = self._ended or last
            if not self._opened_now():
                raise RuntimeError("an event before the stream's status line was decided")
            sent = self._send(frame)
        self._tell_if_gone()
        return sent

    def _opened_now(self) -> bool:
        """Under `_io`: is the status line decided (asking `head` if it was not)?"""
        if self._sink is None:
            decided = self._head()
            if decided is not None:
                self._sink = self._start_response(*decided)
        return self._sink is not None

    def write_keepalive_if_idle(self, now: float, interval: float) -> bool:
        """From the heartbeat: a keepalive if nothing went out for `interval` seconds, the
        status line is decided, and the client's socket takes a few bytes without blocking."""
        if now - self.last_write < interval or not self.keepalive or self._closed:
            return False
        if not self._io.acquire(blocking=False):
            return False  # an event is being written: the stream is not idle
        try:
            if self._closed or self._ended or not self._opened_now() \
                    or not _has_room(self._socket):
                return False
            sent = self._send(KEEPALIVE_AFTER_ID if self.saw_id else KEEPALIVE)
            self.keepalives_sent += sent
        finally:
            self._io.release()
        self._tell_if_gone()
        return sent

    def close(self, final_frame: bytes | None = None) -> bool:
        """No more events after this; `final_frame` (a terminal error) is the last one.  On
        the stream's own thread it is written now; from another thread it waits for
        `finish`, so the heartbeat never blocks on a slow client.  The first close counts."""
        if final_frame and self._redactor is not None:
            final_frame = self._redactor.data(final_frame)
        with self._state:
            if self._closed:
                return False
            self._closed = True
            self._final = final_frame or None
        if threading.get_ident() == self._owner:
            self.finish()
        return True

    def finish(self) -> None:
        """On the stream's own thread, at its end: the last frame a close left goes out, and
        the writer is closed, whatever happened before."""
        with self._state:
            self._closed = True
        with self._io:
            opened = self._opened_now()  # a committed stream's status line, whatever came
            if self._final is not None and opened:
                frame, self._final = self._final, None
                self._send(frame)
        self._tell_if_gone()

    def _send(self, frame: bytes, count: bool = True) -> bool:
        """Under `_io`: one write to the client; a failed one means the client is gone."""
        if self._broken:
            return False
        try:
            self._sink(frame)
        except Exception as exc:
            if not isinstance(exc, OSError):  # the server's own error for a stream it dropped
                log.warning("the server's write failed (%s); the stream ends", type(exc).__name__)
            with self._state:
                self._broken = True
                self._closed = True
            return False
        if count:
            self.last_write = time.monotonic()
            self.bytes_out += len(frame)
        return True

    def _tell_if_gone(self) -> None:
        """Once, outside the locks: a write found the client gone (the exchange ends, which
        stops the upstream).  Every write ends here: no lock while the client is there."""
        if not self._broken:
            return
        with self._state:
            if self._told_gone:
                return
            self._told_gone = True
        if self._on_client_gone is not None:
            self._on_client_gone()


_ROOM = select.POLLOUT | select.POLLERR | select.POLLHUP


def _has_room(sock) -> bool:
    """Will a keepalive go out without blocking?  (POLLOUT on a TCP socket means at least a
    third of its send buffer is free.)  Without a socket to ask, yes."""
    if sock is None:
        return True
    try:
        fd = sock.fileno()
        if fd < 0:
            return False
        poller = select.poll()
        poller.register(fd, _ROOM)
        events = poller.poll(0)
    except (OSError, ValueError) as exc:
        return getattr(exc, "errno", None) == errno.EINTR
    return bool(events) and bool(events[0][1] & select.POLLOUT)
