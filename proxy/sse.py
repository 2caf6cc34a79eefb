"""Server-sent events framing, free of I/O.

The relay must forward whole events and nothing else between them, so that a keepalive
comment can never land inside an event.  The framer cuts the upstream byte stream at event
boundaries (the blank line that ends an event, per WHATWG HTML 9.2.5) and hands back the
original bytes of each event untouched, together with its parsed fields for accounting.

Line endings may be LF, CRLF or a lone CR, mixed.  A CR that ends a network chunk is
ambiguous until the next byte: if an LF follows, it belongs to the same line ending.  The
framer remembers that case and glues such an LF onto the front of the next frame, so the
bytes the client receives are exactly the bytes the upstream sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

BOM = b"\xef\xbb\xbf"


@dataclass
class Event:
    """One complete SSE event: its raw bytes and the fields a parser needs."""

    raw: bytes
    event: str | None = None
    data_lines: list[str] = field(default_factory=list)
    has_id: bool = False

    @property
    def data(self) -> str:
        return "\n".join(self.data_lines)

    @property
    def is_comment_only(self) -> bool:
        """True for blocks that dispatch nothing (comments, stray blank lines)."""
        return not self.data_lines and self.event is None and not self.has_id


class SSEFramer:
    """Incremental splitter: feed() bytes, get back the events they complete."""

    def __init__(self) -> None:
        self._pending = bytearray()  # bytes of the event under construction
        self._scan_from = 0  # where the next unfinished line starts in _pending
        self._fields: Event = Event(raw=b"")
        self._cr_at_end = False  # last byte seen was a CR that ended a line
        self._carry = b""  # an LF that completes a CRLF split after a dispatched event
        self._at_start = True

    def feed(self, chunk: bytes) -> list[Event]:
        if not chunk:
            return []
        if self._at_start:
            chunk = self._skip_bom(chunk)
            if not chunk:
                return []
        if self._cr_at_end and chunk[:1] == b"\n":
            self._cr_at_end = False
            if self._pending:
                self._pending += b"\n"
                self._scan_from = len(self._pending)
            else:
                self._carry += b"\n"
            chunk = chunk[1:]
        self._cr_at_end = False
        self._pending += chunk
        return self._cut_events()

    @property
    def ends_in_split_crlf(self) -> bool:
        """The last event ended on a CR at the end of a read: an LF may still follow."""
        return self._cr_at_end and not self._pending

    def take_carry(self) -> bytes:
        """Hand out the LF that completed a split CRLF, when no event follows to carry it."""
        carry, self._carry = self._carry, b""
        return carry

    def pending_bytes(self) -> bytes:
        """Bytes not handed out yet: an unfinished event, or the LF of a split CRLF."""
        return self._carry + bytes(self._pending)

    def _skip_bom(self, chunk: bytes) -> bytes:
        """Drop one leading BOM; it may arrive split across the first chunks."""
        head = bytes(self._pending) + chunk
        if len(head) < len(BOM) and BOM.startswith(head):
            self._pending.clear()
            self._pending += head
            return b""
        self._at_start = False
        if head.startswith(BOM):
            self._pending.clear()
            return head[len(BOM):]
        self._pending.clear()
        return head

    def _cut_events(self) -> list[Event]:
        events: list[Event] = []
        buf = self._pending
        pos = self._scan_from
        while True:
            end, next_pos = _find_line_end(buf, pos)
            if end < 0:
                break
            line = bytes(buf[pos:end])
            pos = next_pos
            if line:
                self._take_line(line)
                continue
            events.append(self._dispatch(bytes(buf[:pos])))
            del buf[:pos]
            pos = 0
        self._scan_from = pos
        self._cr_at_end = bool(buf) and buf[-1:] == b"\r" and pos == len(buf)
        if not buf and events:
            self._cr_at_end = events[-1].raw.endswith(b"\r")
        return events

    def _take_line(self, line: bytes) -> None:
        if line.startswith(b":"):
            return
        name, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        text = value.decode("utf-8", "replace")
        if name == b"data":
            self._fields.data_lines.append(text)
        elif name == b"event":
            self._fields.event = text
        elif name == b"id":
            self._fields.has_id = True

    def _dispatch(self, raw: bytes) -> Event:
        event = self._fields
        event.raw = self._carry + raw
        self._carry = b""
        self._fields = Event(raw=b"")
        return event


def _find_line_end(buf: bytearray, start: int) -> tuple[int, int]:
    """Return (end of line, start of next line), or (-1, -1) if the line is unfinished.

    A CR at the very end of the buffer ends its line; an LF arriving later is handled
    by the framer's CR bookkeeping.
    """
    lf = buf.find(b"\n", start)
    cr = buf.find(b"\r", start, lf if lf >= 0 else len(buf))
    if cr >= 0:
        if cr + 1 < len(buf) and buf[cr + 1] == 0x0A:
            return cr, cr + 2
        return cr, cr + 1
    if lf >= 0:
        return lf, lf + 1
    return -1, -1
