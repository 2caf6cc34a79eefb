"""The proxy's gunicorn worker, piece by piece (its end-to-end behaviour is in
test_hardening.py): the reader that feeds gunicorn what the event loop buffered."""

import socket
import time

import pytest

from proxy.worker import PrebufferedUnreader


@pytest.fixture
def pair():
    ours, theirs = socket.socketpair()
    yield ours, theirs
    ours.close()
    theirs.close()


def test_buffered_bytes_come_in_socket_sized_pieces_then_the_socket(pair):
    ours, theirs = pair
    reader = PrebufferedUnreader(ours, 8, b"0123456789abcdef")
    assert reader.chunk() == b"01234567" and reader.chunk() == b"89abcdef"
    theirs.sendall(b"more")
    assert reader.chunk() == b"more"


def test_a_read_past_the_deadline_fails_and_never_leaves_a_timeout_behind(pair):
    """The rest of an unfinished request is read by its deadline, but the socket goes
    back to blocking after each read: the answer it then carries (a stream of hours) must
    never inherit a timeout."""
    ours, theirs = pair
    reader = PrebufferedUnreader(ours, 8192, b"head", deadline=time.monotonic() + 0.3)
    assert reader.chunk() == b"head"
    theirs.sendall(b"x")
    assert reader.chunk() == b"x"
    assert ours.gettimeout() is None
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        reader.chunk()  # nothing more arrives: it waits only for what is left of 0.3 s
    assert time.monotonic() - started < 0.5
    assert ours.gettimeout() is None
    with pytest.raises(TimeoutError):
        reader.chunk()  # past the deadline: at once


def test_take_buffered_hands_back_what_gunicorn_did_not_read(pair):
    ours, _ = pair
    reader = PrebufferedUnreader(ours, 4, b"GET / HTTP/1.1\r\n\r\nGET /next")
    reader.chunk()
    assert reader.has_buffered()
    assert reader.take_buffered() == b"/ HTTP/1.1\r\n\r\nGET /next"
    assert not reader.has_buffered()


# ---------------------------------------------------------------------------------------------
# Closing a connection without holding the event loop (real gunicorn, one worker)

def _closing_request(url: str) -> socket.socket:
    """A client that asks for `Connection: close`, then neither reads nor closes."""
    host, port = url.rsplit("/", 1)[-1].split(":")
    sock = socket.create_connection((host, int(port)), timeout=5)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    return sock


@pytest.mark.timeout(60)
def test_clients_that_do_not_close_never_stall_the_worker(start_proxy):
    """gunicorn 27 drains a closed connection for the client's FIN for up to 2 s in the
    event loop; five such clients used to stop one worker for 10 s: no accept, no reads,
    no heartbeat.  Each still gets its whole answer, then the proxy's FIN."""
    from support.processes import http_get

    server = start_proxy(workers=1)
    lingering = [_closing_request(server.url) for _ in range(5)]
    try:
        for sock in lingering:  # each answer arrives whole, and then the FIN
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
            assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"}")
        started = time.monotonic()
        assert http_get(server.url + "/health", timeout=5).status_code == 200
        assert time.monotonic() - started < 1.0, "the worker's loop was held by the lingerers"
    finally:
        for sock in lingering:
            sock.close()
