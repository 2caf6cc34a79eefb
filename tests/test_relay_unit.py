"""The locked writer and the client probe, without a server."""

import select
import socket
import ssl
import struct
import threading
import time

from proxy.errors import ClientGone, ShuttingDown
from proxy.heartbeat import ClientWatch, Exchange, Heartbeat, client_has_hung_up
from proxy.writer import KEEPALIVE, KEEPALIVE_AFTER_ID, LockedWriter


def test_keepalive_only_after_the_interval_and_never_after_close():
    writer = LockedWriter()
    start = writer.last_write
    assert not writer.write_keepalive_if_idle(start + 0.01, 0.05)
    assert writer.write_keepalive_if_idle(start + 0.06, 0.05)
    writer.write_event(b"data: 1\n\n")
    writer.close(b"event: error\ndata: {}\n\n")
    assert not writer.write_event(b"data: 2\n\n")
    assert not writer.write_keepalive_if_idle(start + 100, 0.05)
    assert list(writer.frames()) == [KEEPALIVE, b"data: 1\n\n", b"event: error\ndata: {}\n\n"]


def test_after_an_id_field_the_keepalive_has_no_blank_line():
    writer = LockedWriter()
    writer.write_event(b"id: 1\ndata: x\n\n", has_id=True)
    assert writer.write_keepalive_if_idle(writer.last_write + 1, 0.05)
    writer.close()
    assert list(writer.frames())[-1] == KEEPALIVE_AFTER_ID


def test_a_writer_with_keepalives_disabled_never_sends_one():
    writer = LockedWriter(keepalive=False)
    assert not writer.write_keepalive_if_idle(writer.last_write + 100, 0.05)


def test_only_the_first_close_counts():
    writer = LockedWriter()
    assert writer.close(b"first\n\n")
    assert not writer.close(b"second\n\n")
    assert list(writer.frames()) == [b"first\n\n"]


def test_frames_are_whole_under_concurrent_keepalives():
    """A keepalive thread hammering the writer never splits or reorders events."""
    writer = LockedWriter()
    events = [f"data: {i}\n\n".encode() for i in range(5000)]
    stop = threading.Event()

    def hammer():
        while not stop.is_set():
            writer.write_keepalive_if_idle(writer.last_write + 1, 0.0)

    thread = threading.Thread(target=hammer)
    thread.start()
    for event in events:
        writer.write_event(event)
    stop.set()
    thread.join()
    writer.close()
    frames = list(writer.frames())
    assert [f for f in frames if f != KEEPALIVE] == events
    assert writer.keepalives_sent > 0


def test_client_probe_sees_a_hang_up():
    a, b = socket.socketpair()
    try:
        assert not client_has_hung_up(a)
        b.sendall(b"GET")  # pending data is not a hang-up
        assert not client_has_hung_up(a)
        a.recv(3)
        b.close()
        assert client_has_hung_up(a)
    finally:
        a.close()
    assert client_has_hung_up(a)  # a closed socket counts as gone
    assert not client_has_hung_up(None)  # servers without a socket: never probed


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected loopback TCP pair (a reset needs TCP: a socketpair only ever sees EOF)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    return server, client


def reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def watching(*sockets) -> ClientWatch:
    """The heartbeat's probe over these client sockets."""
    watch = ClientWatch()
    for sock in sockets:
        watch.add(Exchange(sock, None, on_end=lambda err: None))
    return watch


def hung_up(watch: ClientWatch) -> set:
    return {exchange.client_socket for exchange in watch.gone()}


def test_one_poll_finds_the_clients_that_left_among_many():
    pairs = [tcp_pair() for _ in range(6)]
    try:
        (quiet, _), (talking, t_peer), (left, l_peer), (rst, r_peer), (closed, _), \
            (said_then_left, s_peer) = pairs
        watch = watching(quiet, talking, left, rst, closed, said_then_left)
        t_peer.sendall(b"GET / HTTP/1.1\r\n")  # a pipelined request is not a hang-up
        l_peer.close()
        reset(r_peer)
        closed.close()  # closed under the watch
        s_peer.sendall(b"GET / HTTP/1.1\r\n")  # bytes before the FIN: a peek sees them first
        s_peer.close()
        for sock in (talking, left, rst, said_then_left):
            assert wait_readable(sock)
        assert hung_up(watch) == {left, rst, closed, said_then_left}
        assert talking.recv(100) == b"GET / HTTP/1.1\r\n"  # looked at, not consumed
        assert hung_up(watching()) == set()
    finally:
        for a, b in pairs:
            a.close()
            b.close()


def test_the_probe_reads_below_tls_so_a_tls_client_that_sends_is_not_taken_for_gone(tls_cert):
    cert, key = tls_cert
    server_side = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_side.load_cert_chain(cert, key)
    client_side = ssl.create_default_context(cafile=str(cert))
    a, b = socket.socketpair()
    accepted: list = []
    handshake = threading.Thread(target=lambda: accepted.append(server_side.wrap_socket(a, server_side=True)))
    handshake.start()
    client = client_side.wrap_socket(b, server_hostname="127.0.0.1")
    handshake.join(10)
    [server] = accepted
    try:
        watch = watching(server)
        assert hung_up(watch) == set()
        client.sendall(b"GET / HTTP/1.1\r\n\r\n")  # a pipelined request: readable, not gone
        assert wait_readable(server) and not client_has_hung_up(server)
        assert hung_up(watch) == set()
        assert server.recv(100) == b"GET / HTTP/1.1\r\n\r\n"  # the TLS record was left intact
        client.close()
        assert wait_readable(server) and hung_up(watch) == {server}
    finally:
        server.close()
        client.close()


def wait_readable(sock, timeout: float = 5.0) -> bool:
    return bool(select.select([sock], [], [], timeout)[0])


class _GraceRunsOutHere(Exchange):
    """An exchange whose visit takes until the end of the grace, as a pass over hundreds of
    streams can on a loaded machine."""

    def __init__(self, heartbeat: Heartbeat) -> None:
        super().__init__(None, LockedWriter(), on_end=lambda err: None)
        self.heartbeat = heartbeat

    def check_deadline(self, now: float) -> None:
        self.heartbeat.shutdown_deadline = time.monotonic() - 0.001


def test_the_grace_running_out_during_a_pass_ends_every_stream_in_that_pass():
    heartbeat = Heartbeat(heartbeat_interval=60, probe_interval=60)
    ended: list = []
    others = [Exchange(None, LockedWriter(), on_end=ended.append) for _ in range(20)]
    heartbeat._thread = threading.current_thread()  # no thread of its own: one pass by hand
    slow = _GraceRunsOutHere(heartbeat)
    for exchange in (slow, *others):
        heartbeat.register(exchange)
    slow.new_attempt(time.monotonic())  # due in this pass
    heartbeat.begin_shutdown(60, lambda: ShuttingDown("the proxy is shutting down"))
    heartbeat.visit_all(time.monotonic())
    assert len(ended) == 20 and all(isinstance(err, ShuttingDown) for err in ended)
    assert heartbeat.live_count() == 0


def test_a_slow_client_holds_the_stream_thread_back_instead_of_buffering():
    writer = LockedWriter(max_buffered=100)
    frames = writer.frames()
    writer.write_event(b"x" * 150)  # over the limit: the next write must wait
    second_queued = threading.Event()

    def stream_thread():
        writer.write_event(b"data: 2\n\n")
        second_queued.set()

    thread = threading.Thread(target=stream_thread, daemon=True)  # a stuck writer must not hang pytest
    thread.start()
    assert not second_queued.wait(0.2)  # held back while the client has not read
    assert next(frames) == b"x" * 150  # the client reads...
    assert second_queued.wait(2.0)  # ...and the stream thread goes on
    thread.join()
    assert next(frames) == b"data: 2\n\n"


def test_closing_releases_a_waiting_stream_thread():
    writer = LockedWriter(max_buffered=10)
    writer.write_event(b"y" * 50)
    result = []
    thread = threading.Thread(target=lambda: result.append(writer.write_event(b"z\n\n")))
    thread.start()
    writer.close()
    thread.join(2.0)
    assert result == [False]


def test_no_keepalive_follows_the_protocols_end_however_late_the_close():
    """The stream thread writes `data: [DONE]`, then records the row and closes; if it is held
    up past a heartbeat interval in between, the heartbeat must still not add a comment."""
    writer = LockedWriter()
    assert writer.write_event(b"data: [DONE]\n\n", last=True)
    assert not writer.write_keepalive_if_idle(time.monotonic() + 3600, interval=0.01)
    writer.close()
    assert list(writer.frames()) == [b"data: [DONE]\n\n"]


class _PausingWriter(LockedWriter):
    """A writer whose stream thread stops in the middle of queuing a frame: the moment a
    keepalive written without the lock would slip in.  The test decides when it goes on."""

    def __init__(self) -> None:
        super().__init__()
        self.inside = threading.Event()  # the stream thread is queuing its frame
        self.go_on = threading.Event()
        self.pause_thread: threading.Thread | None = None

    def _push(self, frame: bytes) -> None:
        if threading.current_thread() is self.pause_thread:
            self.inside.set()
            assert self.go_on.wait(5)
        super()._push(frame)


def test_a_keepalive_waits_for_the_event_being_written_and_never_follows_the_last():
    """Forces the interleaving the writer exists to prevent: the heartbeat tries to write
    while the stream thread is inside its write.  It must wait for the lock, and once the
    protocol's last event is in, write nothing at all."""
    writer = _PausingWriter()
    last_event = b"event: message_stop\ndata: {}\n\n"
    stream = threading.Thread(target=writer.write_event, args=(last_event,),
                              kwargs={"last": True})
    writer.pause_thread = stream
    stream.start()
    assert writer.inside.wait(5)
    wrote = []
    heartbeat = threading.Thread(
        target=lambda: wrote.append(writer.write_keepalive_if_idle(writer.last_write + 60, 0.001)))
    heartbeat.start()
    heartbeat.join(0.2)  # it may not finish while the stream thread holds the lock
    assert heartbeat.is_alive(), "a keepalive was written while an event was being written"
    writer.go_on.set()
    stream.join(5)
    heartbeat.join(5)
    assert wrote == [False]
    writer.close()
    assert list(writer.frames()) == [last_event]


def test_a_try_that_starts_after_the_exchange_ended_is_aborted_from_the_start():
    """The client can leave between the loop's last look and the next try's handle: that
    try must not reach (or wait for) an upstream (mutant h1)."""
    exchange = Exchange(None, None, on_end=lambda err: None)
    first = exchange.new_attempt(None)
    assert not first.aborted
    assert exchange.end(ClientGone("the client left"))
    assert first.aborted
    assert exchange.new_attempt(None).aborted


class _Raising(Exchange):
    def __init__(self) -> None:
        super().__init__(None, None, on_end=lambda err: None)

    def check_deadline(self, now: float) -> None:
        raise RuntimeError("a bug in one stream")


class _Counted(Exchange):
    def __init__(self) -> None:
        super().__init__(None, None, on_end=lambda err: None)
        self.visits = 0

    def check_deadline(self, now: float) -> None:
        self.visits += 1
        super().check_deadline(now)


def hand_driven_heartbeat(interval: float = 1.0) -> Heartbeat:
    heartbeat = Heartbeat(heartbeat_interval=interval, probe_interval=0.01)
    heartbeat._thread = threading.current_thread()  # no thread of its own: passes by hand
    return heartbeat


def test_a_visit_that_raises_costs_no_other_stream_its_visits():
    heartbeat = hand_driven_heartbeat()
    bad, good = _Raising(), _Counted()
    for exchange in (bad, good):
        heartbeat.register(exchange)
        exchange.new_attempt(time.monotonic())  # both due now
    now = time.monotonic() + 0.01
    heartbeat.visit_all(now)
    assert good.visits == 1
    heartbeat.visit_all(now + 2)  # both queued again, the one that raised included
    assert good.visits == 2 and bad.next_at < float("inf")


def test_an_exchange_is_visited_when_a_new_deadline_comes_not_every_pass():
    heartbeat = hand_driven_heartbeat(interval=10.0)
    exchange = _Counted()
    heartbeat.register(exchange)
    start = time.monotonic()
    for step in range(1, 20):
        heartbeat.visit_all(start + step * 0.1)
    assert exchange.visits == 0  # nothing due for 10 s
    handle = exchange.new_attempt(start + 2.5)
    heartbeat.visit_all(start + 2.4)
    assert exchange.visits == 0 and not handle.aborted
    heartbeat.visit_all(start + 2.6)
    assert exchange.visits == 1 and handle.aborted  # cut at its deadline
    heartbeat.visit_all(start + 2.7)
    assert exchange.visits == 1  # one pending visit, not one per deadline ever set


def test_an_exchange_that_ended_is_not_kept_alive_by_the_visit_queue():
    import gc
    import weakref

    heartbeat = hand_driven_heartbeat(interval=60.0)
    exchange = _Counted()
    heartbeat.register(exchange)
    exchange.new_attempt(time.monotonic() + 30)
    gone = weakref.ref(exchange)
    heartbeat.unregister(exchange)
    del exchange
    gc.collect()
    assert gone() is None
    assert heartbeat.live_count() == 0


def test_a_stream_whose_client_left_and_whose_end_fails_costs_no_other_its_visits():
    heartbeat = hand_driven_heartbeat()
    ours, theirs = socket.socketpair()
    try:
        def refuse(err):
            raise RuntimeError("a bug while ending")

        left = Exchange(ours, None, on_end=refuse)
        other = _Counted()
        for exchange in (left, other):
            heartbeat.register(exchange)
        other.new_attempt(time.monotonic())
        theirs.close()  # the client leaves
        heartbeat.visit_all(time.monotonic() + 0.01)
        assert other.visits == 1 and other.next_at < float("inf")  # visited, and queued again
    finally:
        ours.close()
