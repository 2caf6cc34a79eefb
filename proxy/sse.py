"""Server-sent events framing, free of I/O.

The relay must forward whole events and nothing else between them, so that a keepalive
comment can never land inside an event.  The framer cuts the upstream byte stream at event
boundaries (the blank line that ends an event, per WHATWG HTML 9.2.5) and hands back the
original bytes of each event untouched, together with its parsed fields for accounting.

Line endings may be LF, CRLF or a lone CR, mixed.  A CR that ends a network chunk is
ambiguous until the next byte: if an LF follows, it belongs to the same line ending.  The
framer remembers that case and glues such an LF onto the front of the next frame, so the
bytes the client receives are exactly the bytes the upstream sent.

Work per `feed` is linear in the bytes it adds, whatever came before: the search for the
end of an unfinished line resumes where the last one stopped (an upstream that sends one
line forever used to make every read rescan it), and an event larger than
`max_event_bytes` stops the stream (`EventTooLarge`) instead of growing without bound.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

BOM = b"\xef\xbb\xbf"
DEFAULT_MAX_EVENT_BYTES = 16 * 1024 * 1024


class EventTooLarge(ValueError):
    """An event (or an unfinished line) grew past the framer's limit."""


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

    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self.max_event_bytes = max_event_bytes
        self._pending = bytearray()  # bytes of the event under construction
        self._scan_from = 0  # where the next unfinished line starts in _pending
        self._searched_to = 0  # no line ends between _scan_from and here
        self._too_large: EventTooLarge | None = None
        self._fields: Event = Event(raw=b"")
        self._cr_at_end = False  # last byte seen was a CR that ended a line
        self._carry = b""  # an LF that completes a CRLF split after a dispatched event
        self._at_start = True

    def feed(self, chunk: bytes) -> list[Event]:
        """The events `chunk` completes.  Raises EventTooLarge once an event passes the limit
        (the events completed before it are returned first, by the call that found it)."""
        if self._too_large is not None:
            raise self._too_large
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
                self._scan_from = self._searched_to = len(self._pending)
            else:
                self._carry += b"\n"
            chunk = chunk[1:]
        self._cr_at_end = False
        self._pending += chunk
        events = self._cut_events()
        if self._too_large is not None and not events:
            raise self._too_large
        return events

    def settle(self) -> bytes | None:
        """After the stream's last event: the bytes that complete it on the wire, or None
        while they may still be on their way.  An event can end on the CR of a CRLF at the
        end of a read; the LF that follows belongs to it (a relay that stopped at the CR
        would not pass the stream through byte for byte)."""
        carry, self._carry = self._carry, b""
        if carry or not (self._cr_at_end and not self._pending):
            return carry
        return None

    def finish(self) -> bytes:
        """At the end of the stream: whatever completes the last event (see `settle`)."""
        return self.settle() or b""

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
        search = max(pos, self._searched_to)
        while True:
            end, next_pos = _find_line_end(buf, pos, search)
            if end < 0:
                break
            line = bytes(buf[pos:end])
            pos = search = next_pos
            if pos > self.max_event_bytes:
                self._too_large = self._event_too_large()
                return events
            if line:
                self._take_line(line)
                continue
            events.append(self._dispatch(bytes(buf[:pos])))
            del buf[:pos]
            pos = search = 0
        self._scan_from = pos
        self._searched_to = len(buf)
        if len(buf) > self.max_event_bytes:
            self._too_large = self._event_too_large()
        self._cr_at_end = bool(buf) and buf[-1:] == b"\r" and pos == len(buf)
        if not buf and events:
            self._cr_at_end = events[-1].raw.endswith(b"\r")
        return events

    def _event_too_large(self) -> EventTooLarge:
        return EventTooLarge(f"an SSE event larger than {self.max_event_bytes} bytes "
                             "(or a line that never ends)")

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


_LINE_END = re.compile(rb"[\r\n]")


def _find_line_end(buf: bytearray, start: int, search: int) -> tuple[int, int]:
    """Return (end of line, start of next line), or (-1, -1) if the line is unfinished.

    The line starts at `start`; `search` (>= start) is where to look for its end, since
    the bytes before it are known to hold none.  One search for either CR or LF: looking
    for an LF first would scan the rest of the buffer for every line a lone CR ends.  A
    CR at the very end of the buffer ends its line; an LF arriving later is handled by the
    framer's CR bookkeeping.
    """
    found = _LINE_END.search(buf, search)
    if found is None:
        return -1, -1
    end = found.start()
    if buf[end] == 0x0D and end + 1 < len(buf) and buf[end + 1] == 0x0A:
        return end, end + 2
    return end, end + 1
