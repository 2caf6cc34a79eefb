"""The direct writer: events written by the stream's own thread straight to the server's
`write`, keepalives from the heartbeat through the same lock, without a server."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from proxy.writer import KEEPALIVE, KEEPALIVE_AFTER_ID, DirectWriter

pytestmark = pytest.mark.timeout(30)


class Wire:
    """The server's `write`: bytes go out one at a time, handing the GIL away between two,
    so a keepalive written without the writer's lock would land inside an event."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.status: str | None = None
        self.headers: list | None = None

    def start_response(self, status, headers, exc_info=None):
        self.status, self.headers = status, headers
        return self.write

    def write(self, data: bytes) -> None:
        for i in range(len(data)):
            self.out += data[i:i + 1]
            time.sleep(0)


def opened_writer(wire: Wire, **kwargs) -> DirectWriter:
    writer = DirectWriter(wire.start_response, **kwargs)
    writer.open("200 OK", [("Content-Type", "text/event-stream")])
    return writer


def test_events_are_whole_on_the_wire_under_concurrent_keepalives():
    wire = Wire()
    writer = opened_writer(wire)
    events = [f"data: {i}\n\n".encode() for i in range(400)]
    stop = threading.Event()

    def heartbeat():
        while not stop.is_set():
            writer.write_keepalive_if_idle(writer.last_write + 1, 0.0)
            time.sleep(0)  # else the stream's thread waits a switch interval per byte

    thread = threading.Thread(target=heartbeat)
    thread.start()
    try:
        for event in events:
            writer.write_event(event)
            time.sleep(0)
    finally:
        stop.set()
        thread.join()
    pieces = [p + b"\n\n" for p in bytes(wire.out).split(b"\n\n")[:-1]]
    assert [p for p in pieces if p != KEEPALIVE] == events
    assert writer.keepalives_sent > 0
    assert len(wire.out) == sum(map(len, events)) + len(KEEPALIVE) * writer.keepalives_sent


def test_no_keepalive_while_an_event_is_being_written():
    """The heartbeat never waits behind the stream's write (a slow client would hold it,
    and with it every stream of the worker): it skips its keepalive instead."""
    sending = threading.Event()
    go_on = threading.Event()
    out = []

    def slow_write(data: bytes) -> None:
        if data:
            sending.set()
            go_on.wait(10)
        out.append(data)

    writer = DirectWriter(lambda status, headers: slow_write)
    writer.open("200 OK", [])
    thread = threading.Thread(target=writer.write_event, args=(b"data: 1\n\n",))
    thread.start()
    assert sending.wait(5)
    began = time.monotonic()
    assert not writer.write_keepalive_if_idle(time.monotonic() + 3600, 0.01)
    assert time.monotonic() - began < 1.0
    go_on.set()
    thread.join()
    assert out == [b"data: 1\n\n"]


def test_no_keepalive_into_a_client_socket_without_room():
    """A client that stopped reading: the keepalive is skipped, never blocks the heartbeat."""
    ours, theirs = socket.socketpair()
    try:
        ours.setblocking(False)
        try:
            while True:
                ours.send(b"x" * 65536)
        except BlockingIOError:
            pass
        ours.setblocking(True)
        writer = DirectWriter(lambda status, headers: ours.sendall, client_socket=ours)
        writer.open("200 OK", [])
        result = []
        thread = threading.Thread(target=lambda: result.append(
            writer.write_keepalive_if_idle(time.monotonic() + 3600, 0.01)), daemon=True)
        thread.start()
        thread.join(3)
        assert result == [False]
    finally:
        theirs.close()
        ours.close()


def test_the_status_line_comes_from_open_or_else_from_head_once_decided():
    """No keepalive and no event before the status line is decided; a stream committed
    before any deployment answered gets its head from `head`, asked when bytes are due."""
    wire = Wire()
    decided = []
    writer = DirectWriter(wire.start_response, head=lambda: decided[0] if decided else None)
    assert not writer.write_keepalive_if_idle(time.monotonic() + 3600, 0.01)
    with pytest.raises(RuntimeError):
        writer.write_event(b"data: 1\n\n")
    assert wire.status is None and wire.out == b""
    decided.append(("200 OK", [("A", "b")]))
    assert writer.write_keepalive_if_idle(time.monotonic() + 3600, 0.01)
    assert wire.status == "200 OK" and bytes(wire.out) == KEEPALIVE
    assert not writer.open("500 Oops", [])  # the first decision stands
    assert writer.write_event(b"data: 2\n\n")
    assert wire.status == "200 OK" and bytes(wire.out) == KEEPALIVE + b"data: 2\n\n"


def test_a_close_from_another_thread_leaves_the_last_frame_to_the_streams_thread():
    """The heartbeat (a shutdown, a client gone) must never write an event itself: the
    stream's thread writes it when it finishes."""
    wire = Wire()
    writer = opened_writer(wire)
    writer.write_event(b"data: 1\n\n")
    closer = threading.Thread(target=writer.close, args=(b"event: error\ndata: {}\n\n",))
    closer.start()
    closer.join()
    assert writer.closed and bytes(wire.out) == b"data: 1\n\n"
    assert not writer.write_event(b"data: 2\n\n")
    writer.finish()
    assert bytes(wire.out) == b"data: 1\n\nevent: error\ndata: {}\n\n"
    writer.finish()  # once only
    assert bytes(wire.out).count(b"event: error") == 1


def test_a_close_on_the_streams_thread_writes_the_last_frame_at_once():
    wire = Wire()
    writer = opened_writer(wire)
    assert writer.close(b"event: error\ndata: {}\n\n")
    assert not writer.close(b"second\n\n")
    assert bytes(wire.out) == b"event: error\ndata: {}\n\n"


def test_a_client_gone_is_told_once_outside_the_lock():
    """The callback ends the exchange, which closes this writer: under the lock that would
    deadlock."""
    told = []

    def refuse(data: bytes) -> None:
        raise BrokenPipeError("the client left")

    def gone() -> None:
        told.append(writer.close(b"event: error\n\n"))

    writer = DirectWriter(lambda status, headers: refuse, on_client_gone=gone)
    writer.open("200 OK", [])
    result = []
    thread = threading.Thread(target=lambda: result.append(writer.write_event(b"data: 1\n\n")),
                              daemon=True)
    thread.start()
    thread.join(5)
    assert result == [False] and told == [False]  # closed by the failed write already
    assert not writer.write_event(b"data: 2\n\n")
    assert writer.closed and writer.bytes_out == 0


def test_no_keepalive_after_the_protocols_end_or_with_keepalives_off():
    wire = Wire()
    writer = opened_writer(wire)
    writer.write_event(b"data: [DONE]\n\n", last=True)
    assert not writer.write_keepalive_if_idle(time.monotonic() + 3600, 0.01)
    quiet = opened_writer(Wire(), keepalive=False)
    assert not quiet.write_keepalive_if_idle(time.monotonic() + 3600, 0.01)


def test_after_an_id_field_the_keepalive_has_no_blank_line():
    wire = Wire()
    writer = opened_writer(wire)
    writer.write_event(b"id: 1\ndata: x\n\n", has_id=True)
    assert writer.write_keepalive_if_idle(writer.last_write + 1, 0.05)
    assert bytes(wire.out).endswith(b"\n\n" + KEEPALIVE_AFTER_ID)


def test_a_flag_wakes_its_waiter_whichever_comes_first():
    """`Flag` (an Event that makes its Condition only for a waiter) loses no wake-up."""
    from proxy.flag import Flag

    flag = Flag()
    assert not flag.is_set() and not flag.wait(0.01)
    flag.set()
    assert flag.is_set() and flag.wait(0) and flag.wait(None)
    for _ in range(200):  # a waiter and a setter racing
        flag = Flag()
        woke = []
        waiter = threading.Thread(target=lambda f=flag: woke.append(f.wait(5)))
        waiter.start()
        flag.set()
        waiter.join(6)
        assert woke == [True]


def test_a_terminal_error_left_before_the_status_line_goes_out_with_it():
    """Committed by the heartbeat, ended by a shutdown before any byte went out: the
    stream's thread, finishing, sends the committed head and the terminal error."""
    wire = Wire()
    committed = []
    writer = DirectWriter(wire.start_response, head=lambda: committed[0] if committed else None)
    closer = threading.Thread(target=writer.close, args=(b"event: error\ndata: {}\n\n",))
    closer.start()
    closer.join()
    committed.append(("200 OK", []))
    writer.finish()
    assert wire.status == "200 OK" and bytes(wire.out) == b"event: error\ndata: {}\n\n"


def test_a_committed_stream_that_ends_without_a_frame_still_gets_its_status_line():
    """Its client left before a byte went out: the server must still have a status line to
    close the response with."""
    wire = Wire()
    writer = DirectWriter(wire.start_response, head=lambda: ("200 OK", []))
    closer = threading.Thread(target=writer.close)
    closer.start()
    closer.join()
    writer.finish()
    assert wire.status == "200 OK" and wire.out == b""
