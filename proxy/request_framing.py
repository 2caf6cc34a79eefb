"""When is an HTTP/1.1 request whole?  Its head, then a body by Content-Length or chunked.

gunicorn's threaded worker hands a connection to a thread as soon as its first byte
arrives, and the thread then blocks until the request is complete.  A client that sends
one byte a second holds that thread for as long as it likes, and a few hundred such
clients hold them all.  The proxy's worker instead buffers each request in its event loop
and hands it to a thread only when it is whole (or when it is clearly broken, so that
gunicorn's own strict parser can answer it).  This module is the bookkeeping for that:
it parses no more than it must, decides nothing about a request but its framing and its
size, and does no I/O.  The work per `advance` is linear in the bytes added since the last call.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

from .errors import PayloadTooLarge, ProxyError, RequestRejected

MAX_HEAD = 1024 * 1024  # gunicorn refuses far smaller heads itself (431); past this, hand over
MAX_CHUNK_LINE = 8190  # gunicorn's own limit for a chunk-size line
MAX_TRAILERS = 16 * 1024
# Sizes are read exactly as gunicorn reads them (a request it would take must never be
# handed over before it is whole), but never with a bare int(), which also takes "-6",
# "+5", "1_0" and "0x1f": a negative chunk size walked the framing backwards forever.
_HEX_DIGITS = re.compile(rb"[0-9A-Fa-f]+")


class Progress(enum.Enum):
    MORE = "more"  # keep reading
    WHOLE = "whole"  # the request is in: hand it to a thread
    # The head alone shows the request is malformed: gunicorn's parser refuses it from the
    # bytes it is given, without waiting for more.
    HAND_OVER = "hand_over"
    # Too large, or a line that would need more bytes than allowed: answered by the event
    # loop itself (`refusal`), since a thread would wait on the client for the rest.
    REFUSE = "refuse"


@dataclass
class Head:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]] = field(default_factory=list)

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    def header(self, name: str) -> str | None:
        lowered = name.lower()
        for key, value in self.headers:
            if key.lower() == lowered:
                return value
        return None


class RequestFraming:
    """Feed it the connection's buffer as it grows; it says when the request is whole."""

    def __init__(self, max_body: int, max_head: int = MAX_HEAD) -> None:
        self.max_body = max_body
        self.max_head = max_head
        self.head: Head | None = None
        self.expects_continue = False
        self.refusal: ProxyError | None = None  # why, with Progress.REFUSE
        self._pos = 0  # bytes of the buffer already accounted for
        self._searched = 0  # where the search for the end of the head resumes
        self._remaining = 0  # body bytes still due (Content-Length, or of the current chunk)
        self._body_bytes = 0
        self._trailer_bytes = 0
        self._state = "head"

    def advance(self, buf: bytes | bytearray) -> Progress:
        """Account for what `buf` (the whole buffer so far) adds; returns what to do."""
        while True:
            step = getattr(self, f"_{self._state}")(buf)
            if step is not None:
                return step

    # Each state returns a Progress to stop, or None after moving to another state.

    def _head(self, buf) -> Progress | None:
        start = max(0, self._searched - 3)
        end = buf.find(b"\r\n\r\n", start)
        if end < 0:
            bare_lf = buf.find(b"\n\n", start) >= 0
            self._searched = len(buf)
            if bare_lf or len(buf) > self.max_head:
                return Progress.HAND_OVER  # bare LF line ends or a huge head: gunicorn decides
            return Progress.MORE
        self._pos = end + 4
        raw = bytes(buf[:end])
        progress = self._parse_head(raw)  # first: the head is kept for the error answer
        if raw.count(b"\n") != raw.count(b"\r\n"):
            return Progress.HAND_OVER  # a bare LF inside the head: gunicorn refuses it at once
        return progress

    def _parse_head(self, raw: bytes) -> Progress | None:
        lines = raw.decode("latin-1").split("\r\n")
        while lines and not lines[0]:  # stray CRLFs between requests
            lines.pop(0)
        parts = lines[0].split(" ") if lines else []
        if len(parts) != 3:
            return Progress.HAND_OVER
        head = self.head = Head(parts[0], parts[1], parts[2])  # kept for the error answer
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon:
                return Progress.HAND_OVER
            head.headers.append((name.strip(), value.strip()))
        return self._choose_body(head)

    def _choose_body(self, head: Head) -> Progress | None:
        lengths = [v for k, v in head.headers if k.lower() == "content-length"]
        codings = [v for k, v in head.headers if k.lower() == "transfer-encoding"]
        expect = head.header("expect")
        self.expects_continue = bool(expect) and expect.lower() == "100-continue" \
            and head.version == "HTTP/1.1"
        if codings:
            if lengths or not ",".join(codings).lower().replace(" ", "").endswith("chunked"):
                return Progress.HAND_OVER  # ambiguous framing is gunicorn's to refuse
            self._state = "chunk_size"
            return None
        if not lengths:
            return Progress.WHOLE
        length = _content_length(lengths[0]) if len(lengths) == 1 else None
        if length is None:
            return Progress.HAND_OVER
        self._remaining = length
        if self._remaining > self.max_body:
            return self._refuse(PayloadTooLarge(
                f"request body is {self._remaining} bytes; the limit is {self.max_body}"))
        self._state = "length_body"
        return None

    def _refuse(self, err: ProxyError) -> Progress:
        self.refusal = err
        return Progress.REFUSE

    def _length_body(self, buf) -> Progress | None:
        if len(buf) - self._pos < self._remaining:
            return Progress.MORE
        self._pos += self._remaining
        return Progress.WHOLE

    def _chunk_size(self, buf) -> Progress | None:
        end = buf.find(b"\r\n", self._pos)
        if end < 0:
            if len(buf) - self._pos > MAX_CHUNK_LINE:
                return self._refuse(RequestRejected(400, "a chunk-size line of the request body is too long"))
            return Progress.MORE
        size = _chunk_size(bytes(buf[self._pos:end]))
        if size is None:
            return Progress.HAND_OVER  # gunicorn refuses it (InvalidChunkSize) from these bytes
        self._pos = end + 2
        if size == 0:
            self._state = "trailers"
            return None
        self._body_bytes += size
        if self._body_bytes > self.max_body:
            return self._refuse(PayloadTooLarge(
                f"request body is larger than the limit of {self.max_body} bytes"))
        self._remaining = size + 2  # the data and its CRLF
        self._state = "chunk_data"
        return None

    def _chunk_data(self, buf) -> Progress | None:
        if len(buf) - self._pos < self._remaining:
            return Progress.MORE
        self._pos += self._remaining
        if bytes(buf[self._pos - 2:self._pos]) != b"\r\n":
            return Progress.HAND_OVER
        self._state = "chunk_size"
        return None

    def _trailers(self, buf) -> Progress | None:
        end = buf.find(b"\r\n", self._pos)
        if end < 0:
            if self._trailer_bytes + len(buf) - self._pos > MAX_TRAILERS:
                return self._refuse(RequestRejected(431, "the request's trailer section is too large"))
            return Progress.MORE
        line_was_empty = end == self._pos
        self._trailer_bytes += end + 2 - self._pos
        self._pos = end + 2
        if self._trailer_bytes > MAX_TRAILERS:
            return self._refuse(RequestRejected(431, "the request's trailer section is too large"))
        return Progress.WHOLE if line_was_empty else None  # stays in "trailers"


def _content_length(value: str) -> int | None:
    """A Content-Length as gunicorn takes it (str.isnumeric, then int), or None."""
    if not value.isnumeric():
        return None
    try:
        return int(value)
    except ValueError:  # a numeric character int() refuses, or more than 4,300 digits
        return None


def _chunk_size(line: bytes) -> int | None:
    """A chunk-size line's size as gunicorn takes it (hex digits, blanks allowed before an
    extension), or None."""
    size, semicolon, _ = line.partition(b";")
    if semicolon:
        size = size.rstrip(b" \t")
    return int(size, 16) if _HEX_DIGITS.fullmatch(size) else None
