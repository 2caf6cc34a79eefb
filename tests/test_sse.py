"""The SSE framer: whole events out, original bytes kept, however the input is split."""

import time

import pytest

from proxy.sse import EventTooLarge, SSEFramer

ANTHROPIC = (b'event: message_start\ndata: {"type":"message_start"}\n\n'
             b'event: ping\ndata: {"type": "ping"}\n\n'
             b'event: content_block_delta\ndata: {"type":"content_block_delta","delta":{"text":"h\xc3\xa9llo \xf0\x9f\x8c\x8d"}}\n\n'
             b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
CHAT_CRLF = (b'data: {"choices":[{"delta":{"content":"a"}}]}\r\n\r\n'
             b'data: {"choices":[{"delta":{"content":"b"}}]}\r\n\r\n'
             b'data: [DONE]\r\n\r\n')
LONE_CR = b'event: x\rdata: 1\r\rdata: 2\r\r'
MIXED = b': comment\n\nid: 7\ndata: a\r\ndata: b\n\r\nevent: e\rdata: {}\r\n\n'

CASES = {
    "anthropic-lf": (ANTHROPIC, [("message_start", '{"type":"message_start"}'),
                                 ("ping", '{"type": "ping"}'),
                                 ("content_block_delta", '{"type":"content_block_delta","delta":{"text":"héllo 🌍"}}'),
                                 ("message_stop", '{"type":"message_stop"}')]),
    "chat-crlf": (CHAT_CRLF, [(None, '{"choices":[{"delta":{"content":"a"}}]}'),
                              (None, '{"choices":[{"delta":{"content":"b"}}]}'),
                              (None, "[DONE]")]),
    "lone-cr": (LONE_CR, [("x", "1"), (None, "2")]),
    "mixed": (MIXED, [(None, "a\nb"), ("e", "{}")]),
}


def feed_in_pieces(data, cuts):
    framer = SSEFramer()
    events = []
    start = 0
    for cut in list(cuts) + [len(data)]:
        events.extend(framer.feed(data[start:cut]))
        start = cut
    return framer, events


def summary(events):
    return [(e.event, e.data) for e in events if not e.is_comment_only]


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_stream_fed_whole_gives_its_events_and_exact_bytes(name):
    data, expected = CASES[name]
    framer, events = feed_in_pieces(data, [])
    assert summary(events) == expected
    assert b"".join(e.raw for e in events) == data
    assert framer.pending_bytes() == b""


@pytest.mark.parametrize("name", sorted(CASES))
def test_events_and_exact_bytes_survive_two_cuts_anywhere(name):
    """Two cuts anywhere: the events and the exact bytes survive every split."""
    data, expected = CASES[name]
    for first in range(len(data) + 1):
        for second in range(first, len(data) + 1, 7):
            framer, events = feed_in_pieces(data, [first, second])
            assert summary(events) == expected, (first, second)
            assert b"".join(e.raw for e in events) + framer.pending_bytes() == data, (first, second)


@pytest.mark.parametrize("name", sorted(CASES))
def test_events_and_exact_bytes_survive_one_byte_at_a_time(name):
    data, expected = CASES[name]
    framer, events = feed_in_pieces(data, range(1, len(data)))
    assert summary(events) == expected
    assert b"".join(e.raw for e in events) + framer.pending_bytes() == data
    assert framer.pending_bytes().strip() == b""


def test_every_frame_ends_an_event():
    """Each frame handed out ends with a blank line: nothing can be inserted mid-event."""
    _, events = feed_in_pieces(ANTHROPIC + CHAT_CRLF, range(3, len(ANTHROPIC + CHAT_CRLF), 5))
    for event in events:
        assert event.raw.endswith((b"\n\n", b"\r\n\r\n", b"\r\n\r", b"\r\r", b"\n\r\n"))


def test_crlf_split_between_cr_and_lf_of_the_blank_line():
    framer = SSEFramer()
    first = framer.feed(b"data: a\r\n\r")
    assert [e.data for e in first] == ["a"]  # dispatched as soon as the blank line ends
    second = framer.feed(b"\ndata: b\r\n\r\n")
    assert [e.data for e in second] == ["b"]
    assert second[0].raw == b"\ndata: b\r\n\r\n"  # the LF of the split CRLF travels on


def test_incomplete_event_is_held_not_dispatched():
    framer = SSEFramer()
    assert framer.feed(b'data: {"partial": tr') == []
    assert framer.pending_bytes() == b'data: {"partial": tr'


def test_leading_bom_is_dropped_even_when_split():
    framer = SSEFramer()
    assert framer.feed(b"\xef\xbb") == []
    events = framer.feed(b"\xbfdata: x\n\n")
    assert [e.data for e in events] == ["x"]
    assert events[0].raw == b"data: x\n\n"


def test_a_bom_after_the_start_of_the_stream_is_kept_as_bytes():
    framer = SSEFramer()
    events = framer.feed(b"data: x\n\n\xef\xbb\xbfdata: y\n\n")
    assert events[1].raw.startswith(b"\xef\xbb\xbf")


def test_id_field_is_reported():
    _, events = feed_in_pieces(b"id: 1\ndata: x\n\ndata: y\n\n", [])
    assert [e.has_id for e in events] == [True, False]


def test_multiline_data_joined_and_space_rule():
    _, events = feed_in_pieces(b"data:a\ndata:  b\ndata\n\n", [])
    assert events[0].data == "a\n b\n"


# --- bounded work and memory ---------------------------------------------------------------------

def test_work_per_read_is_linear_in_the_new_bytes():
    """An upstream that sends one line forever must not make every read rescan it: 16 MiB
    in 1 KiB reads is ~16k scans of up to 16 MiB if the framer rescans (minutes), one pass
    if it resumes where it stopped (well under a second)."""
    framer = SSEFramer(max_event_bytes=32 * 1024 * 1024)
    piece = b"x" * 1024
    started = time.perf_counter()
    assert framer.feed(b"data: ") == []
    for _ in range(16 * 1024):
        assert framer.feed(piece) == []
    elapsed = time.perf_counter() - started
    assert elapsed < 2.0, f"{elapsed:.2f} s for 16 MiB of one line"
    # ...and the line still ends where it should
    [event] = framer.feed(b"\n\n")
    assert len(event.data) == 16 * 1024 * 1024


def test_lines_ended_by_lone_crs_are_found_in_linear_time():
    """Each lone CR ends a line; a search for LF first would rescan the rest of the buffer
    for every one of them (2 MiB of `a\r` took seconds)."""
    framer = SSEFramer()
    started = time.perf_counter()
    assert framer.feed(b"a\r" * (1024 * 1024)) == []
    assert time.perf_counter() - started < 2.0
    [event] = framer.feed(b"data: x\r\r")
    assert event.data == "x"


@pytest.mark.parametrize("cut", [1, 7, 4096])
def test_an_event_past_the_limit_stops_the_stream(cut):
    framer = SSEFramer(max_event_bytes=1000)
    big = b"data: " + b"y" * 2000 + b"\n\n"
    with pytest.raises(EventTooLarge):
        for i in range(0, len(big), cut):
            framer.feed(big[i:i + cut])
    with pytest.raises(EventTooLarge):
        framer.feed(b"data: more\n\n")  # and stays stopped


def test_events_before_an_oversized_one_are_handed_out_first():
    framer = SSEFramer(max_event_bytes=100)
    events = framer.feed(b"data: 1\n\ndata: 2\n\ndata: " + b"z" * 500 + b"\n\n")
    assert [e.data for e in events] == ["1", "2"]
    with pytest.raises(EventTooLarge):
        framer.feed(b"data: 3\n\n")


def test_a_line_that_never_ends_is_stopped_at_the_limit():
    framer = SSEFramer(max_event_bytes=64 * 1024)
    with pytest.raises(EventTooLarge):
        for _ in range(1000):
            framer.feed(b"q" * 1024)
    assert len(framer.pending_bytes()) < 70 * 1024  # memory stopped growing at the limit
