"""gunicorn speaking TLS itself (`--certfile`), for deployments without nginx in front.

The worker leaves TLS connections to its threads, and the heartbeat probes client sockets
for a hang-up: over TLS that probe must read the socket below the TLS layer, or every
stream would look abandoned on the first pass."""

from __future__ import annotations

import threading

import pytest

from fakeupstream import End, Send, Stall, Status, WaitFor, anthropic_stream
from rawhttp import KEEPALIVE, PROTOS, RawResponse, split_lf_stream

SSE_CT = {"Content-Type": "text/event-stream; charset=utf-8"}


@pytest.fixture
def tls_proxy(start_proxy, tls_cert):
    return start_proxy(tls=tls_cert)


def _stream(server) -> RawResponse:
    return RawResponse(server.url, "/v1/messages", PROTOS["anthropic"].body, timeout=5,
                       cafile=server.verify).read_head()


def test_a_stream_over_tls_gets_keepalives_through_a_silence_and_completes(tls_proxy, fake):
    events = anthropic_stream()
    release = threading.Event()
    fake.enqueue([Status(200, headers=SSE_CT)] + [Send(e) for e in events[:4]]
                 + [WaitFor(release, timeout=8)] + [Send(e) for e in events[4:]] + [End()])
    r = _stream(tls_proxy)
    assert r.status == 200
    r.read_until(lambda b: b.count(KEEPALIVE) >= 3, "three keepalives during the silence")
    release.set()
    body = r.read_all()
    assert r.complete
    got, _ = split_lf_stream(body)
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


def test_keep_alive_requests_over_tls(tls_proxy, fake):
    """Two requests on one TLS connection: the second is read by the thread, not lost."""
    import requests
    with requests.Session() as session:
        for _ in range(2):
            fake.enqueue([Status(200, headers=SSE_CT)] + [Send(e) for e in anthropic_stream()]
                         + [End()])
            resp = session.post(tls_proxy.url + "/v1/messages", json=PROTOS["anthropic"].body,
                                verify=tls_proxy.verify, timeout=5)
            assert resp.status_code == 200 and resp.text.endswith(
                anthropic_stream()[-1].decode())
    assert len(fake.wait_for_requests(2)) == 2
