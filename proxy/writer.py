"""The locked writer: the only path to the client for one streamed response.

The stream thread puts whole SSE events into it and the heartbeat thread puts `: keepalive`
comments into it, under one lock, so a comment can never land inside an event.  The server
thread (the WSGI generator) takes frames out and yields each as one write.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Iterator

from .redact import Redactor

KEEPALIVE = b": keepalive\n\n"
# After an upstream `id:` field, the blank line of a comment would dispatch an empty event
# that the OpenAI SDK cannot parse (protocols.md section 0), so the comment stands alone.
KEEPALIVE_AFTER_ID = b": keepalive\n"
_END = object()  # sentinel: no more frames
# Bytes queued for a slow client before the stream thread waits: memory stays bounded, and
# the upstream sees TCP backpressure instead of the proxy buffering the answer.
MAX_BUFFERED = 4 * 1024 * 1024


class LockedWriter:
    """The only path to the client for one response: whole frames, in order, under a lock."""

    def __init__(self, keepalive: bool = True, max_buffered: int = MAX_BUFFERED,
                 redactor: Redactor | None = None) -> None:
        # Every frame passes here, so echoed keys are masked here (masks keep lengths).
        self._redactor = redactor if redactor else None
        lock = threading.Lock()
        self._cond = threading.Condition(lock)  # frames are waiting for the server thread
        self._space = threading.Condition(lock)  # room for the stream thread to queue more
        self._frames: collections.deque = collections.deque()
        self._queued = 0
        self.max_buffered = max_buffered
        self._closed = False
        self._ended = False  # the protocol's end went out: only its split-CRLF LF may follow
        self.keepalive = keepalive
        self.saw_id = False
        self.last_write = time.monotonic()
        self.bytes_out = 0
        self.keepalives_sent = 0

    @property
    def closed(self) -> bool:
        return self._closed

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
