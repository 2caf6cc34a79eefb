"""gunicorn speaking TLS itself (`--certfile`), for deployments without nginx in front.

The worker leaves TLS connections to its threads, and the heartbeat probes client sockets
for a hang-up.  Over TLS a client says goodbye with a close_notify alert before its FIN, so
unread bytes sit in front of the end of the stream: the probe must still see the client
leave (during a silence no keepalive write would notice for a whole heartbeat interval),
and must not take bytes a client sends mid-stream for a goodbye."""

from __future__ import annotations

import ssl
import threading
import time

import pytest

from support.builders import anthropic_stream
from support.checks import PROTOS
from support.processes import local_session
from support.rawhttp import RawResponse
from support.sse import KEEPALIVE, split
from support.steps import End, Send, Stall, Status, WaitFor

SSE_CT = {"Content-Type": "text/event-stream; charset=utf-8"}


@pytest.fixture
def tls_proxy(start_proxy, tls_cert):
    return start_proxy(tls=tls_cert)


@pytest.fixture
def quiet_tls_proxy(start_proxy, tls_cert):
    """Keepalives every 30 s: only the probe can notice a client that left."""
    return start_proxy(tls=tls_cert, LLM_PROXY_HEARTBEAT_INTERVAL="30")


def say_goodbye(r: RawResponse) -> None:
    """Leave as most TLS clients do: a close_notify alert, then the FIN (without waiting
    for the server's own alert, which a proxy in the middle of an answer does not send)."""
    r.sock.setblocking(False)
    try:
        r.sock.unwrap()
    except ssl.SSLWantReadError:  # the alert went out; the server's is not awaited
        pass
    r.sock.close()


def enqueue_paused_stream(fake) -> tuple[list[bytes], threading.Event]:
    """A stream that falls silent after its 4th event until the returned event is set."""
    events = anthropic_stream()
    release = threading.Event()
    fake.enqueue([Status(200, headers=SSE_CT)] + [Send(e) for e in events[:4]]
                 + [WaitFor(release, timeout=8)] + [Send(e) for e in events[4:]] + [End()])
    return events, release


def _stream(server) -> RawResponse:
    return RawResponse(server.url, "/v1/messages", PROTOS["anthropic"].body, timeout=5,
                       cafile=server.verify).read_head()


def test_a_stream_over_tls_gets_keepalives_through_a_silence_and_completes(tls_proxy, fake):
    events, release = enqueue_paused_stream(fake)
    r = _stream(tls_proxy)
    assert r.status == 200
    r.read_until(lambda b: b.count(KEEPALIVE) >= 3, "three keepalives during the silence")
    release.set()
    body = r.read_all()
    assert r.complete
    got, _ = split(body)
    assert got == events
    assert tls_proxy.row(r.request_id)["end_reason"] == "complete"


def test_a_tls_client_that_hangs_up_stops_the_upstream(tls_proxy, fake):
    events = anthropic_stream()
    fake.enqueue([Status(200, headers=SSE_CT)] + [Send(e) for e in events[:4]] + [Stall()])
    r = _stream(tls_proxy)
    r.read_until(lambda b: b.replace(KEEPALIVE, b"") == b"".join(events[:4]), "the first events")
    [upstream] = fake.wait_for_requests(1)
    r.close()
    assert upstream.peer_closed.wait(2.0), "the upstream connection was never closed"
    assert tls_proxy.row(r.request_id)["end_reason"] == "client_gone"


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
def test_a_tls_client_that_says_goodbye_during_a_silence_stops_the_upstream(quiet_tls_proxy, fake,
                                                                           stream):
    events = anthropic_stream()
    fake.enqueue(([Status(200, headers=SSE_CT)] + [Send(e) for e in events[:4]] if stream else [])
                 + [Stall()])
    body = dict(PROTOS["anthropic"].body, stream=stream)
    r = RawResponse(quiet_tls_proxy.url, "/v1/messages", body, timeout=5,
                    cafile=quiet_tls_proxy.verify)
    [upstream] = fake.wait_for_requests(1)
    if stream:
        r.read_until(lambda b: b == b"".join(events[:4]), "the first events")
    left_at = time.monotonic()
    say_goodbye(r)
    assert upstream.peer_closed.wait(2.0), "the upstream was never closed"
    print(f"\nTLS goodbye -> upstream closed after {(upstream.peer_closed_at - left_at) * 1000:.0f} ms")


def test_bytes_a_tls_client_sends_mid_stream_are_no_goodbye(tls_proxy, fake):
    events, release = enqueue_paused_stream(fake)
    r = _stream(tls_proxy)
    r.read_until(lambda b: b.replace(KEEPALIVE, b"") == b"".join(events[:4]), "the first events")
    r.sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # pipelined, unread
    r.read_until(lambda b: b.count(KEEPALIVE) >= 5, "keepalives while the bytes wait")
    release.set()
    r.read_all()
    assert r.complete
    assert tls_proxy.row(r.request_id)["end_reason"] == "complete"


def test_keep_alive_requests_over_tls(tls_proxy, fake):
    """Two requests on one TLS connection: the second is read by the thread, not lost."""
    with local_session() as session:
        for _ in range(2):
            fake.enqueue([Status(200, headers=SSE_CT)] + [Send(e) for e in anthropic_stream()]
                         + [End()])
            resp = session.post(tls_proxy.url + "/v1/messages", json=PROTOS["anthropic"].body,
                                verify=tls_proxy.verify, timeout=5)
            assert resp.status_code == 200 and resp.text.endswith(
                anthropic_stream()[-1].decode())
    assert len(fake.wait_for_requests(2)) == 2
