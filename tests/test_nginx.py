"""deploy/nginx.conf under a real nginx: in front of the proxy, and in front of the bare fake
upstream (so the site itself is proven SSE-safe, without the proxy's `X-Accel-Buffering: no`).

nginx runs as a child of the test with a throw-away main config whose `http {}` block is
deliberately hostile (gzip on for event streams and JSON, as many distribution configs have it),
and includes the site with only its listen port and upstream address rewritten.

nginx is required: README.md's test command and CI install it (`apt-get install -y nginx-light`);
a missing binary fails the tests.
"""

from __future__ import annotations

import http.client
import json
import threading
import time

import pytest

from support.builders import chat_stream
from support.nginx import NginxProcess
from support.rawhttp import RID, RawResponse
from support.sse import KEEPALIVE
from support.steps import End, Send, Sleep, Stall, Status, WaitFor, json_reply

ACCEPT_GZIP = {"Accept-Encoding": "gzip, deflate"}
READ_TIMEOUT = 5.0  # for each awaited event: one that nginx holds back fails the test here
CHAT_STREAM_BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                    "stream_options": {"include_usage": True}}


@pytest.fixture(scope="module")
def nginx_proxy(proxy, tmp_path_factory):
    """nginx -> gunicorn proxy -> fake upstream."""
    server = NginxProcess(tmp_path_factory.mktemp("nginx-proxy"), proxy.url.split("//", 1)[1]).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def nginx_bare(fake, tmp_path_factory):
    """nginx -> fake upstream: the site on its own, with no anti-buffering header to help it."""
    server = NginxProcess(tmp_path_factory.mktemp("nginx-bare"), fake.url.split("//", 1)[1]).start()
    yield server
    server.stop()


def post(server: NginxProcess, path: str, body: dict | bytes, headers: dict | None = None):
    """POST through nginx; -> (connection, response) with the headers read, body unread."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=READ_TIMEOUT)
    conn.request("POST", path, body=data, headers={"Content-Type": "application/json",
                                                    "Authorization": "Bearer sk-test", **(headers or {})})
    return conn, conn.getresponse()


def read_until(resp: http.client.HTTPResponse, buf: bytes, marker: bytes) -> bytes:
    """Read what has arrived (no fixed-size reads) until `marker` is in the body, within
    READ_TIMEOUT in all (keepalives would reset a per-read timeout forever)."""
    deadline = time.monotonic() + READ_TIMEOUT
    while marker not in buf:
        try:
            if time.monotonic() > deadline:
                raise TimeoutError
            chunk = resp.read1(65536)
        except TimeoutError:
            raise AssertionError(f"no {marker[:60]!r}... within {READ_TIMEOUT}s; got so far:\n{buf!r}") from None
        assert chunk, f"the body ended before {marker[:60]!r}; got:\n{buf!r}"
        buf += chunk
    return buf


# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["nginx_proxy", "nginx_bare"])
def test_events_reach_the_client_one_by_one(request, fake, backend):
    """The upstream sends each content event only after the client has received the previous
    one, so any buffering along the way (nginx, the proxy) stalls the stream and fails here."""
    server = request.getfixturevalue(backend)
    events = chat_stream()  # role, 4 text pieces, finish, usage, [DONE]
    received = [threading.Event() for _ in events]
    # The role chunk is preamble, which a proxy may hold back until content arrives: it goes
    # out together with the first content event; from there on it is strictly one by one.
    steps = [Status(200), Send(events[0])]
    for event, flag in zip(events[1:], received[1:]):
        steps += [Send(event), WaitFor(flag, timeout=30)]
    steps.append(End())
    fake.enqueue(steps)
    # Accept gzip like the openai SDK does: a compressing nginx would hold events back.
    conn, resp = post(server, "/v1/chat/completions", CHAT_STREAM_BODY, headers=ACCEPT_GZIP)
    try:
        assert resp.status == 200
        assert resp.getheader("content-encoding") is None
        buf = b""
        for i in range(1, len(events)):
            buf = read_until(resp, buf, events[i])
            if i + 1 < len(events):
                assert events[i + 1] not in buf  # the upstream has not even sent it yet
            received[i].set()
        buf += resp.read()
        assert buf.replace(KEEPALIVE, b"") == b"".join(events)
    finally:
        for flag in received:
            flag.set()
        conn.close()


def test_keepalives_pass_through_nginx_during_silence(nginx_proxy, fake):
    events = chat_stream()
    fake.enqueue([Status(200), Send(events[0]), Send(events[1]), Sleep(0.5),
                  *[Send(e) for e in events[2:]], End()])
    conn, resp = post(nginx_proxy, "/v1/chat/completions", CHAT_STREAM_BODY, headers=ACCEPT_GZIP)
    try:
        assert resp.status == 200
        body = resp.read()
    finally:
        conn.close()
    assert body.count(KEEPALIVE) >= 2, body  # ~10 at a 50 ms heartbeat
    before, _, after = body.partition(KEEPALIVE)
    assert before == events[0] + events[1]  # the keepalives filled the silence
    assert body.replace(KEEPALIVE, b"") == b"".join(events)


@pytest.mark.parametrize("backend", ["nginx_proxy", "nginx_bare"])
def test_client_hang_up_at_nginx_reaches_the_upstream(request, fake, backend):
    server = request.getfixturevalue(backend)
    events = chat_stream()
    fake.enqueue([Status(200), Send(events[0]), Send(events[1]), Stall()])
    r = RawResponse(server.url, "/v1/chat/completions", CHAT_STREAM_BODY, timeout=READ_TIMEOUT)
    try:
        r.read_until(lambda received: events[1] in received, "the first content event")
        upstream = fake.requests[-1]
        assert not upstream.peer_closed.is_set()
    finally:
        r.close()
    closed_at = time.monotonic()
    assert upstream.peer_closed.wait(5.0), "the upstream never saw the hang-up"
    assert upstream.peer_closed_at - closed_at < 1.0
    if backend == "nginx_proxy":
        row = request.getfixturevalue("proxy").row(r.request_id)
        assert row["end_reason"] == "client_gone" and row["usage_complete"] == 0


def test_anti_buffering_headers_reach_the_client(nginx_proxy):
    conn, resp = post(nginx_proxy, "/v1/chat/completions", CHAT_STREAM_BODY,
                      headers=ACCEPT_GZIP)
    try:
        headers = {k.lower(): v for k, v in resp.getheaders()}
        body = resp.read()
    finally:
        conn.close()
    assert resp.status == 200
    assert headers["content-type"].startswith("text/event-stream")
    cache_control = {d.strip() for d in headers["cache-control"].split(",")}
    assert {"no-cache", "no-transform"} <= cache_control
    assert headers.get("x-accel-buffering") == "no"  # passed on for any proxy further out
    assert "content-encoding" not in headers  # no gzip, although the client accepts it
    assert "content-length" not in headers
    assert headers.get("transfer-encoding") == "chunked"
    assert headers.get(RID, "").startswith("req_")
    assert body.rstrip().endswith(b"data: [DONE]")


def test_json_bodies_arrive_intact_both_ways(nginx_proxy, fake):
    """A 5 MB request body (nginx's default limit is 1 MB) and a 1 MB JSON answer, byte for byte."""
    request_body = json.dumps({"model": "gpt-4o", "messages": [
        {"role": "user", "content": "dé🌍" * 1_000_000}]}, ensure_ascii=False).encode()
    answer = json.dumps({"id": "chatcmpl-big", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "héllo 🌍 " * 100_000},
         "finish_reason": "stop"}]}, ensure_ascii=False).encode()
    fake.enqueue(json_reply(answer))
    conn, resp = post(nginx_proxy, "/v1/chat/completions", request_body,
                      headers=ACCEPT_GZIP)
    try:
        headers = {k.lower(): v for k, v in resp.getheaders()}
        body = resp.read()
    finally:
        conn.close()
    assert resp.status == 200, body[:500]
    assert body == answer
    assert "content-encoding" not in headers
    assert headers["content-type"] == "application/json"
    assert fake.requests[-1].body == request_body
