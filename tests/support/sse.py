"""The test suite's one SSE parser.

Two views of an event stream, both from the same rules:

* `parse(body)`: what a WHATWG parser (and so the SDKs) dispatches: a list of `Event(name,
  data)`.  Strict UTF-8, a leading BOM dropped, lines ended by LF, CRLF or a lone CR, comments
  skipped, `data:` lines joined with LF, the one-space rule after the colon.  `name` is the
  `event:` field as sent (None without one); `Event.type` is what a WHATWG parser dispatches
  it as ("message" without a name).  By default the body must end on an event boundary
  (`complete=False` drops an unfinished last event instead, as a client does when the stream
  breaks).

* `split(body)`: the bytes, LF-framed as the fake upstream and the proxy send them, cut at
  every blank line: the events' bytes (each with its blank line) and where the keepalive
  comments were.  A keepalive that landed on an event boundary is removed and its position
  recorded; one that landed inside an event stays inside that event's bytes, so the event no
  longer equals the upstream's: that is how the tests detect a split event.  `Splitter` does
  the same cut incrementally, for clients that read many streams at once.
"""

from __future__ import annotations

import json
import re
from typing import NamedTuple

KEEPALIVE = b": keepalive\n\n"  # the proxy's comment between events
BLANK_LINE = b"\n\n"


class Event(NamedTuple):
    name: str | None  # the `event:` field, None when the event has none
    data: str  # the `data:` lines joined with LF

    @property
    def type(self) -> str:
        """The type a WHATWG parser dispatches the event as."""
        return self.name or "message"

    @property
    def json(self):
        """`data` parsed as JSON, or None when it is not JSON (`[DONE]`, say)."""
        try:
            return json.loads(self.data)
        except ValueError:
            return None


_LINE_END = re.compile(r"\r\n|\r|\n")


def parse(body: bytes, *, complete: bool = True) -> list[Event]:
    """The events a WHATWG parser dispatches from `body` (see the module docstring).

    complete=True: the stream must end on an event boundary (an AssertionError otherwise).
    complete=False: an unfinished last event, or line, is dropped.
    """
    if not complete:  # an unfinished last line cannot be part of any dispatched event
        body = body[:max(body.rfind(b"\n"), body.rfind(b"\r")) + 1]
    text = body.decode("utf-8")
    if text.startswith("\ufeff"):
        text = text[1:]
    lines = _LINE_END.split(text)
    events: list[Event] = []
    data: list[str] = []
    name = None
    for line in lines[:-1]:  # the last piece follows the last line end (must be empty)
        if line == "":
            if data:
                events.append(Event(name, "\n".join(data)))
            data, name = [], None
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "data":
            data.append(value)
        elif field == "event":
            name = value
    if complete:
        assert lines[-1] == "" and not data, f"an event is left open at the end: {text[-200:]!r}"
    return events


def split(body: bytes) -> tuple[list[bytes], list[int]]:
    """Cut an LF-framed stream at its blank lines: (events, keepalive positions).

    Each keepalive comment found on an event boundary is removed and its position recorded
    as the number of events before it.  The stream must end on a boundary.
    """
    splitter = Splitter()
    blocks = splitter.feed(body)
    assert not splitter.pending, f"the stream ends inside an event: {splitter.pending!r}"
    events: list[bytes] = []
    keepalives: list[int] = []
    for block in blocks:
        if block == KEEPALIVE:
            keepalives.append(len(events))
        else:
            events.append(block)
    return events, keepalives


class Splitter:
    """`split` as the bytes arrive: feed what was read, get the blocks (events and comments,
    each with its blank line) that it completed."""

    def __init__(self) -> None:
        self.pending = b""  # the start of a block whose blank line has not arrived

    def feed(self, data: bytes) -> list[bytes]:
        buf = self.pending + data
        blocks = []
        pos = 0
        while (end := buf.find(BLANK_LINE, pos)) >= 0:
            blocks.append(buf[pos:end + 2])
            pos = end + 2
        self.pending = buf[pos:]
        return blocks


def is_comment(block: bytes) -> bool:
    """A block of comment lines only (a keepalive, say): no event."""
    return all(line.startswith(b":") for line in block.split(b"\n") if line)
