"""The relay end to end: real gunicorn, real loopback HTTP, a raw client that checks bytes.

Every test talks to the proxy through `RawResponse` (support/rawhttp.py), a socket-level HTTP/1.1
client that records the body exactly as it arrives, so the tests can see keepalive
comments, event boundaries, the chunked terminator and header duplicates that a high-level
client would hide.  The upstream is the scripted fake (`support/fake.py`); conditions are
waited for on events, reads and `wait_for_requests`, never by sleeping.
"""

from __future__ import annotations

import concurrent.futures
import gzip
import json
import random
import signal
import socket
import threading
import time
import zlib

import pytest
import requests

from support.builders import (DEFAULT_USAGE, anthropic_error_body, anthropic_message,
                              anthropic_stream, chat_stream, openai_error_body, responses_stream)
from support.checks import (PROTO_NAMES, PROTOS, Proto, assert_anthropic_error, assert_error_shape,
                            assert_event_stream_headers, assert_nothing_fabricated, assert_openai_error,
                            check_terminal_error, last_sequence)
from support.processes import ProxyProcess
from support.rawhttp import RID, RawResponse
from support.sse import KEEPALIVE, parse, split
from support.steps import (Cut, End, Reset, Send, SendGzip, Sleep, Stall, Status, Trickle, WaitFor,
                           json_reply)

SSE_CT = {"Content-Type": "text/event-stream; charset=utf-8"}


# ---------------------------------------------------------------------------
# Private proxies shared by several tests of this module
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def idle_proxy(fake, tmp_path_factory):
    """A proxy whose upstream idle timeout is 0.5 s (heartbeat 50 ms as usual)."""
    server = ProxyProcess(fake.url, tmp_path_factory.mktemp("idle"), LLM_PROXY_IDLE_TIMEOUT="0.5",
                         LLM_PROXY_PLAIN_TIMEOUT="0.5").start()
    yield server
    server.stop()


# ===========================================================================
# 1-3. Keepalives
# ===========================================================================

def test_keepalives_fill_an_upstream_silence_mid_stream(proxy, fake):
    events = anthropic_stream()
    release = threading.Event()
    fake.enqueue([Status(200, headers=SSE_CT)] + [Send(e) for e in events[:4]]
                 + [WaitFor(release, timeout=8)] + [Send(e) for e in events[4:]] + [End()])
    r = RawResponse(proxy.url, "/v1/messages", PROTOS["anthropic"].body, timeout=5).read_head()
    assert_event_stream_headers(r)
    before = b"".join(events[:4])
    # the upstream is silent until `release`: the keepalives must come on their own
    r.read_until(lambda b: b.replace(KEEPALIVE, b"") == before and b.count(KEEPALIVE) >= 3,
                 "three keepalives during the upstream's silence")
    release.set()
    body = r.read_all()
    assert r.complete
    got, keepalives = split(body)
    assert got == events, "a keepalive split an event or bytes changed"
    assert body.replace(KEEPALIVE, b"") == b"".join(events)
    assert keepalives.count(4) >= 3, keepalives  # the silence sat after the 4th event
    assert proxy.row(r.request_id)["end_reason"] == "complete"


def test_keepalives_flow_before_the_upstream_sends_its_headers(proxy, fake):
    events = anthropic_stream()
    release = threading.Event()
    fake.enqueue([WaitFor(release, timeout=8), Status(200, headers=SSE_CT)]
                 + [Send(e) for e in events] + [End()])
    r = RawResponse(proxy.url, "/v1/messages", PROTOS["anthropic"].body, timeout=5).read_head()
    commit_latency = r.head_at - r.sent_at
    print(f"\ncommit after {commit_latency * 1000:.1f} ms without upstream headers")
    assert not release.is_set()  # the upstream has sent nothing at all so far
    assert_event_stream_headers(r)
    assert commit_latency < 2.0  # about one heartbeat (50 ms); wide bound
    r.read_until(lambda b: b.count(KEEPALIVE) >= 3, "three keepalives before the upstream's headers")
    assert r.body == KEEPALIVE * r.body.count(KEEPALIVE)
    release.set()
    body = r.read_all()
    assert r.complete
    got, keepalives = split(body)
    assert got == events
    assert keepalives.count(0) >= 3
    assert proxy.row(r.request_id)["end_reason"] == "complete"


def test_no_keepalive_ever_lands_inside_an_event_under_a_1ms_heartbeat(start_proxy, fake):
    server = start_proxy(LLM_PROXY_HEARTBEAT_INTERVAL="0.001")
    rng = random.Random(20261121)
    head = anthropic_stream()
    deltas = [b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
              b'"delta":{"type":"text_delta","text":"' + str(i).encode() + b'"}}\n\n'
              for i in range(3000)]
    events = head[:2] + deltas + head[-3:]  # message_start, block start, 3000 deltas, stop/delta/stop
    script = [Status(200, headers=SSE_CT)]
    paused = set()
    for index, event in enumerate(events):
        pieces, pos = [], 0
        while pos < len(event):
            size = rng.randint(1, 7)
            pieces.append(event[pos:pos + size])
            pos += size
        pause_after = rng.randrange(len(pieces) - 1) if index % 10 == 5 and len(pieces) > 1 else None
        for i, piece in enumerate(pieces):
            script.append(Send(piece))
            if i == pause_after:  # the upstream goes quiet in the middle of this event
                script.append(Sleep(0.004))
                paused.add(index)
    script.append(End())
    fake.enqueue(script)
    r = RawResponse(server.url, "/v1/messages", PROTOS["anthropic"].body, timeout=20).read_head()
    assert_event_stream_headers(r)
    body = r.read_all()
    assert r.complete
    got, keepalives = split(body)
    assert len(got) == len(events)
    assert got == events, "a keepalive landed inside an event (or bytes changed)"
    assert body.replace(KEEPALIVE, b"") == b"".join(events)
    print(f"\n{len(keepalives)} keepalives interleaved with {len(events)} events")
    assert len(keepalives) >= 100, len(keepalives)
    # the test has teeth: while half an event sat in the proxy's buffer (the upstream paused
    # 4 ms mid-event), keepalives went out, and on the boundary before that event
    boundaries = set(keepalives)
    before_paused = sum(1 for index in paused if index in boundaries)
    print(f"{before_paused} of {len(paused)} mid-event pauses got a keepalive")
    assert before_paused >= len(paused) // 4, (before_paused, len(paused))
    assert server.row(r.request_id)["end_reason"] == "complete"


def test_large_events_reach_a_slow_client_whole_under_a_1ms_heartbeat(start_proxy, fake):
    """Events of 3 MB, read slowly: the writer's queue fills (4 MB), so the stream thread
    waits for room between writes while the 1 ms heartbeat runs.  Written as one frame, an
    event waits whole and keepalives fall between events; written in pieces, a keepalive
    lands inside one."""
    server = start_proxy(LLM_PROXY_HEARTBEAT_INTERVAL="0.001")
    head = anthropic_stream()
    deltas = [b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
              b'"delta":{"type":"text_delta","text":"' + bytes([97 + i]) * (3 << 20) + b'"}}\n\n'
              for i in range(6)]
    events = head[:2] + deltas + head[-3:]
    fake.enqueue([Status(200, headers=SSE_CT)] + [Send(e) for e in events] + [End()])
    r = RawResponse(server.url, "/v1/messages", PROTOS["anthropic"].body, timeout=30,
                    read_pause=0.0005).read_head()
    body = r.read_all()
    assert r.complete
    got, keepalives = split(body)
    assert [len(e) for e in got] == [len(e) for e in events], "a keepalive landed inside an event"
    assert got == events
    assert keepalives, "the client was not slow enough for the heartbeat to matter"
    assert server.row(r.request_id)["end_reason"] == "complete"


# ===========================================================================
# 4. Client disconnects reach the upstream
# ===========================================================================

def _close_and_measure(r: RawResponse, upstream) -> float:
    closed_at = time.monotonic()
    r.close()
    assert upstream.peer_closed.wait(2.0), "the upstream connection was never closed"
    return upstream.peer_closed_at - closed_at


def test_client_hang_up_mid_stream_closes_the_upstream_at_once(proxy, fake):
    events = anthropic_stream()
    fake.enqueue([Status(200, headers=SSE_CT)] + [Send(e) for e in events[:4]] + [Stall()])
    r = RawResponse(proxy.url, "/v1/messages", PROTOS["anthropic"].body, timeout=5).read_head()
    r.read_until(lambda b: b.replace(KEEPALIVE, b"") == b"".join(events[:4]), "the first events")
    [upstream] = fake.wait_for_requests(1)
    latency = _close_and_measure(r, upstream)
    print(f"\ndisconnect mid-stream -> upstream closed after {latency * 1000:.1f} ms")
    assert latency < 0.25
    row = proxy.row(r.request_id)
    assert row["end_reason"] == "client_gone" and row["usage_complete"] == 0


@pytest.mark.parametrize("commit", ["before_commit", "after_commit"])
def test_client_hang_up_while_waiting_for_upstream_headers(proxy, fake, commit):
    fake.enqueue([Stall()])
    r = RawResponse(proxy.url, "/v1/messages", PROTOS["anthropic"].body, timeout=5)
    [upstream] = fake.wait_for_requests(1)
    if commit == "after_commit":
        r.read_head()  # the proxy committed to 200 while the upstream's headers are pending
        assert_event_stream_headers(r)
        assert r.request_id == upstream.headers.get(RID)
    latency = _close_and_measure(r, upstream)
    print(f"\ndisconnect {commit} (upstream headers pending) -> upstream closed after "
          f"{latency * 1000:.1f} ms")
    assert latency < 0.25
    row = proxy.row(upstream.headers.get(RID))  # the proxy's request id travels upstream too
    assert row["end_reason"] == "client_gone"


def test_client_hang_up_on_a_non_streaming_request_the_upstream_never_answers(proxy, fake):
    fake.enqueue([Stall()])
    body = dict(PROTOS["anthropic"].body, stream=False)
    r = RawResponse(proxy.url, "/v1/messages", body, timeout=5)
    [upstream] = fake.wait_for_requests(1)
    latency = _close_and_measure(r, upstream)
    print(f"\ndisconnect on a JSON request -> upstream closed after {latency * 1000:.1f} ms")
    assert latency < 0.25
    # the client never got a request id: find the row through the id sent upstream
    request_id = upstream.headers.get(RID)
    assert request_id
    row = proxy.row(request_id)
    assert row["end_reason"] == "client_gone"


# ===========================================================================
# 5. Terminal errors after content
# ===========================================================================

def _run_broken(server, fake, proto: Proto, tail: list) -> tuple[RawResponse, list[bytes], list[int]]:
    fake.enqueue([Status(200, headers=SSE_CT)] + [Send(e) for e in proto.content] + tail)
    r = RawResponse(server.url, proto.path, proto.body, timeout=10).read_head()
    assert_event_stream_headers(r)
    body = r.read_all()
    assert r.complete, f"the stream did not end cleanly (chunked terminator): {body[-300:]!r}"
    got, keepalives = split(body)
    assert_nothing_fabricated(proto, body)
    return r, got, keepalives


def _expect_one_terminal_error(proto: Proto, got: list[bytes], **kwargs) -> dict:
    assert got[:len(proto.content)] == proto.content
    assert len(got) == len(proto.content) + 1, got[len(proto.content):]
    if proto.name == "responses":
        kwargs.setdefault("sequence_number", last_sequence(proto.content) + 1)
    return check_terminal_error(proto.name, got[-1], **kwargs)


@pytest.mark.parametrize("name", PROTO_NAMES)
def test_upstream_stall_after_content_ends_with_one_timeout_error(idle_proxy, fake, name):
    proto = PROTOS[name]
    r, got, keepalives = _run_broken(idle_proxy, fake, proto, [Stall()])
    err = _expect_one_terminal_error(proto, got, anthropic_type="timeout_error" if name == "anthropic" else None)
    assert keepalives, "no keepalive during a 0.5 s stall with a 50 ms heartbeat"
    assert set(keepalives) == {len(proto.content)}
    row = idle_proxy.row(r.request_id)
    assert row["end_reason"] == "idle_timeout", row
    assert row["error"] and row["error"] == err["message"]


@pytest.mark.parametrize("ending", ["cut", "reset", "malformed", "no_final_event"])
@pytest.mark.parametrize("name", PROTO_NAMES)
def test_broken_upstream_stream_ends_with_one_terminal_error(proxy, fake, name, ending):
    proto = PROTOS[name]
    after = proto.events[len(proto.content)]
    tail = {"cut": [Cut()],
            "reset": [Reset()],
            "malformed": [Send(proto.malformed), Send(after), End()],
            "no_final_event": [End()]}[ending]
    r, got, _ = _run_broken(proxy, fake, proto, tail)
    _expect_one_terminal_error(proto, got)
    if ending == "malformed":
        assert proto.malformed not in r.body and after not in r.body
    row = proxy.row(r.request_id)
    assert row["end_reason"] == "upstream_error", row
    assert row["status"] == 200 and row["usage_complete"] == 0


@pytest.mark.parametrize("name", PROTO_NAMES)
def test_upstream_error_event_passes_through_and_nothing_is_appended(proxy, fake, name):
    proto = PROTOS[name]
    r, got, _ = _run_broken(proxy, fake, proto, [Send(proto.error_event), End()])
    assert got == proto.content + [proto.error_event]
    assert r.body.replace(KEEPALIVE, b"").endswith(proto.error_event)
    row = proxy.row(r.request_id)
    assert row["end_reason"] == "upstream_error" and "(upstream)" in (row["error"] or ""), row


# ===========================================================================
# 6. The commit rule
# ===========================================================================

ERROR_CASES = [
    ("anthropic", 429, anthropic_error_body("rate_limit_error", "Number of request tokens has exceeded your rate limit")),
    ("anthropic", 500, anthropic_error_body("api_error", "Internal server error")),
    ("anthropic", 400, anthropic_error_body("invalid_request_error", "max_tokens: field required")),
    ("chat", 429, openai_error_body("Rate limit reached for gpt-4o", "requests", "rate_limit_exceeded")),
    ("responses", 500, openai_error_body("The server had an error", "server_error")),
]


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
@pytest.mark.parametrize("name,status,error", ERROR_CASES, ids=[f"{n}-{s}" for n, s, _ in ERROR_CASES])
def test_upstream_error_before_the_stream_keeps_its_status_and_body(proxy, fake, name, status,
                                                                    error, stream):
    proto = PROTOS[name]
    raw = json.dumps(error, separators=(",", ":")).encode()
    fake.enqueue(json_reply(raw, status=status, headers={"Retry-After": "7", "x-upstream": "yes"}))
    r = RawResponse(proxy.url, proto.path, dict(proto.body, stream=stream)).read_head()
    body = r.read_all()
    assert r.status == status
    assert body == raw
    assert r.header("retry-after") == "7" and r.header("x-upstream") == "yes"
    assert (r.header("content-type") or "").startswith("application/json")
    assert r.header("x-accel-buffering") is None
    row = proxy.row(r.request_id)
    assert row["status"] == status and row["end_reason"] == "upstream_error", row


@pytest.mark.parametrize("name", PROTO_NAMES)
def test_upstream_error_after_the_commit_becomes_one_terminal_error(proxy, fake, name):
    proto = PROTOS[name]
    release = threading.Event()
    message = "Upstream exploded while thinking"
    error = (anthropic_error_body("api_error", message) if name == "anthropic"
             else openai_error_body(message, "server_error"))
    fake.enqueue([WaitFor(release, timeout=8)] + json_reply(error, status=500))
    r = RawResponse(proxy.url, proto.path, proto.body, timeout=5).read_head()
    assert_event_stream_headers(r)
    r.read_until(lambda b: KEEPALIVE in b, "a keepalive")
    release.set()
    body = r.read_all()
    assert r.complete
    got, keepalives = split(body)
    assert keepalives and keepalives[0] == 0
    assert len(got) == 1, got
    err = check_terminal_error(name, got[0], sequence_number=0 if name == "responses" else None)
    assert message in err["message"]
    assert_nothing_fabricated(proto, body)
    row = proxy.row(r.request_id)
    assert row["end_reason"] == "upstream_error" and row["status"] == 200, row


def test_upstream_silent_before_headers_past_the_idle_timeout_on_a_committed_stream(idle_proxy, fake):
    fake.enqueue([Stall()])
    r = RawResponse(idle_proxy.url, "/v1/messages", PROTOS["anthropic"].body, timeout=10).read_head()
    assert_event_stream_headers(r)
    body = r.read_all()
    assert r.complete
    got, keepalives = split(body)
    assert len(keepalives) >= 2 and len(got) == 1
    check_terminal_error("anthropic", got[0], anthropic_type="timeout_error")
    [upstream] = fake.wait_for_requests(1)
    assert upstream.peer_closed.wait(2.0)
    assert idle_proxy.row(r.request_id)["end_reason"] == "idle_timeout"


# ===========================================================================
# 7. Anti-buffering headers; nothing injected into JSON bodies
# ===========================================================================

@pytest.mark.parametrize("name", PROTO_NAMES)
def test_every_event_stream_carries_the_anti_buffering_headers(proxy, fake, name):
    proto = PROTOS[name]
    fake.enqueue([Status(200, headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                       "X-Accel-Buffering": "yes"})]
                 + [Send(e) for e in proto.events] + [End()])
    r = RawResponse(proxy.url, proto.path, proto.body).read_head()
    assert_event_stream_headers(r)  # upstream's own Cache-Control / X-Accel-Buffering replaced
    body = r.read_all()
    assert r.complete and body.replace(KEEPALIVE, b"") == b"".join(proto.events)


def test_a_slow_json_answer_is_read_whole_before_its_headers_with_no_keepalive(proxy, fake):
    """A JSON answer is read whole before its headers (they carry its cost): while the
    upstream trickles it, nothing reaches the client, keepalives least of all."""
    payload, parts, gaps = slow_json_answer(fake)
    r = RawResponse(proxy.url, "/v1/messages", dict(PROTOS["anthropic"].body, stream=False),
                    timeout=5)
    for gap in gaps:
        fake.wait_for_requests(1)
        assert_nothing_arrives(r, 0.4)  # the upstream is silent now, for many heartbeats
        gap.set()
    r.read_head()
    assert r.status == 200
    assert r.header("content-length") == str(len(payload))
    assert r.header("x-accel-buffering") is None and r.header("cache-control") is None
    assert r.header("transfer-encoding") is None
    assert r.header("x-llm-proxy-usage") is not None
    body = r.read_all()
    assert r.complete and body == payload
    assert proxy.row(r.request_id)["end_reason"] == "complete"


def test_a_slow_json_body_for_a_streaming_request_gets_no_keepalive_and_keeps_its_length(
        proxy, fake):
    payload, parts, gaps = slow_json_answer(fake)
    r = RawResponse(proxy.url, "/v1/messages", dict(PROTOS["anthropic"].body, stream=True),
                    timeout=5).read_head()
    assert r.status == 200
    assert r.header("content-length") == str(len(payload))
    assert r.header("x-accel-buffering") is None and r.header("cache-control") is None
    assert r.header("transfer-encoding") is None
    for i, gap in enumerate(gaps):
        r.read_until(lambda b, n=i: len(b) >= sum(map(len, parts[:n + 1])), "the next part")
        # the upstream is silent now, for many heartbeats: nothing may reach the client
        assert_nothing_arrives(r, 0.4)
        gap.set()
    body = r.read_all()
    assert r.complete and body == payload
    assert KEEPALIVE not in body
    assert proxy.row(r.request_id)["end_reason"] == "complete"


def slow_json_answer(fake):
    """A JSON answer the upstream sends in three parts, each after the test lets it."""
    payload = json.dumps(anthropic_message(), separators=(",", ":")).encode()
    cut = len(payload) // 3
    parts = [payload[:cut], payload[cut:2 * cut], payload[2 * cut:]]
    gaps = [threading.Event(), threading.Event()]
    fake.enqueue([Status(200, headers={"Content-Type": "application/json"}, body_mode="length"),
                  Send(parts[0]), WaitFor(gaps[0], 8), Send(parts[1]), WaitFor(gaps[1], 8),
                  Send(parts[2]), End()])
    return payload, parts, gaps


def assert_nothing_arrives(r: RawResponse, seconds: float) -> None:
    """A read that must time out: the proxy may not write while the upstream is silent."""
    assert r.buf == b"", r.buf
    old = r.sock.gettimeout()
    r.sock.settimeout(seconds)
    try:
        data = r.sock.recv(65536)
    except socket.timeout:
        return
    finally:
        r.sock.settimeout(old)
    raise AssertionError(f"{data!r} arrived while the upstream sent nothing")


# ===========================================================================
# 8. Header handling
# ===========================================================================

CLIENT_KEY = "sk-ant-client-e2e-SECRET-0d9f"
CLIENT_BEARER = "sk-client-bearer-SECRET-77aa"


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
def test_hop_by_hop_headers_stay_on_their_hop(proxy, fake, stream):
    body = dict(PROTOS["anthropic"].body, stream=stream)
    if stream:
        reply = [Status(200, headers=[("Content-Type", "text/event-stream"), ("Connection", "x-up-hop"),
                                      ("x-up-hop", "private"), ("Keep-Alive", "timeout=99"),
                                      ("Proxy-Authenticate", "Basic"), ("x-up-e2e", "kept")])]
        reply += [Send(e) for e in anthropic_stream()] + [End()]
    else:
        raw = json.dumps(anthropic_message()).encode()
        reply = [Status(200, headers=[("Content-Type", "application/json"), ("Connection", "x-up-hop"),
                                      ("x-up-hop", "private"), ("Keep-Alive", "timeout=99"),
                                      ("Proxy-Authenticate", "Basic"), ("x-up-e2e", "kept")],
                        body_mode="length"), Send(raw), End()]
    fake.enqueue(reply)
    headers = [("Connection", "keep-alive, x-custom"), ("x-custom", "hop-only"),
               ("Keep-Alive", "timeout=5"), ("TE", "trailers"), ("Upgrade", "h2c"),
               ("Proxy-Authorization", "Basic cHJveHk6c2VjcmV0"),
               ("anthropic-version", "2023-06-01"), ("anthropic-beta", "prompt-caching-2024-07-31"),
               ("x-api-key", CLIENT_KEY), ("Authorization", f"Bearer {CLIENT_BEARER}"),
               ("x-foo", "bar")]
    r = RawResponse(proxy.url, "/v1/messages?beta=true", body, headers=headers).read_head()
    r.read_all()
    assert r.status == 200 and r.complete
    [upstream] = fake.wait_for_requests(1)
    got = upstream.headers
    for name in ("x-custom", "keep-alive", "te", "upgrade", "proxy-authorization"):
        assert name not in got, f"hop-by-hop {name} reached the upstream: {upstream.raw_head!r}"
    assert "x-custom" not in got.get("connection", "").lower()
    assert got["anthropic-version"] == "2023-06-01"
    assert got["anthropic-beta"] == "prompt-caching-2024-07-31"
    assert got["x-api-key"] == CLIENT_KEY  # no provider key configured: the client's passes
    assert got["authorization"] == f"Bearer {CLIENT_BEARER}"
    assert got["x-foo"] == "bar"
    assert upstream.path == "/v1/messages?beta=true"
    assert json.loads(upstream.body) == body
    # and back: the upstream's hop-by-hop headers end at the proxy
    assert r.header("x-up-e2e") == "kept"
    assert r.header("x-up-hop") is None
    assert r.header("keep-alive") is None and r.header("proxy-authenticate") is None
    assert all("x-up-hop" not in v.lower() for v in r.header_all("connection"))
    log = proxy.log()
    assert CLIENT_KEY not in log and CLIENT_BEARER not in log


def test_configured_provider_key_replaces_the_clients_and_never_reaches_the_log(start_proxy, fake, tmp_path):
    proxy_key = "sk-ant-proxy-owned-SECRET-5150"
    config = tmp_path / "proxy.toml"
    config.write_text(f'[auth]\nmode = "open"\n[providers.anthropic]\nbase_url = "{fake.url}"\n'
                      'api_key_env = "TEST_ANTHROPIC_KEY"\n')
    server = start_proxy(LLM_PROXY_CONFIG=str(config), TEST_ANTHROPIC_KEY=proxy_key)
    client = [("x-api-key", CLIENT_KEY), ("Authorization", f"Bearer {CLIENT_BEARER}"),
              ("anthropic-version", "2023-06-01")]
    fake.enqueue([Status(200, headers=SSE_CT)] + [Send(e) for e in anthropic_stream()] + [End()],
                 json_reply(anthropic_error_body("authentication_error", "invalid x-api-key"), status=401),
                 [Status(200, headers=SSE_CT), Send(anthropic_stream()[0]), Cut()])
    streamed = RawResponse(server.url, "/v1/messages", PROTOS["anthropic"].body, headers=client)
    assert streamed.read_head().status == 200
    streamed.read_all()
    denied = RawResponse(server.url, "/v1/messages", dict(PROTOS["anthropic"].body, stream=False),
                         headers=client).read_head()
    assert denied.status == 401
    broken = RawResponse(server.url, "/v1/messages", PROTOS["anthropic"].body, headers=client).read_head()
    broken.read_all()
    rejected = RawResponse(server.url, "/v1/messages", b"{not json", headers=client).read_head()
    assert rejected.status == 400
    upstreams = fake.wait_for_requests(3)
    for upstream in upstreams:
        assert upstream.headers["x-api-key"] == proxy_key
        assert "authorization" not in upstream.headers
        assert CLIENT_KEY.encode() not in upstream.raw_head
        assert CLIENT_BEARER.encode() not in upstream.raw_head
    row = server.row(streamed.request_id)
    assert row["end_reason"] == "complete"
    assert CLIENT_KEY not in json.dumps(row) and proxy_key not in json.dumps(row)
    server.flush()
    log = server.log()
    for secret in (proxy_key, CLIENT_KEY, CLIENT_BEARER):
        assert secret not in log, f"secret in the gunicorn log:\n{log}"


# ===========================================================================
# 9. Compressed upstream bodies
# ===========================================================================

def test_gzip_event_stream_is_decoded_and_forwarded_as_events(proxy, fake):
    proto = PROTOS["responses"]
    fake.enqueue([Status(200, headers={"Content-Type": "text/event-stream", "Content-Encoding": "gzip"}),
                  SendGzip(list(proto.events)), End()])
    r = RawResponse(proxy.url, proto.path, proto.body, headers={"Accept-Encoding": "gzip"}).read_head()
    assert_event_stream_headers(r)  # no Content-Encoding: the proxy decoded the body
    body = r.read_all()
    assert r.complete
    got, _ = split(body)
    assert got == proto.events
    assert proxy.row(r.request_id)["end_reason"] == "complete"


def test_gzip_event_stream_is_decoded_as_it_arrives(proxy, fake):
    events = anthropic_stream()
    comp = zlib.compressobj(wbits=31)
    first = comp.compress(b"".join(events[:3])) + comp.flush(zlib.Z_SYNC_FLUSH)
    rest = comp.compress(b"".join(events[3:])) + comp.flush()
    release = threading.Event()
    fake.enqueue([Status(200, headers={"Content-Type": "text/event-stream", "Content-Encoding": "gzip"}),
                  Send(first), WaitFor(release, 8), Send(rest), End()])
    r = RawResponse(proxy.url, "/v1/messages", PROTOS["anthropic"].body,
                    headers={"Accept-Encoding": "gzip"}, timeout=5).read_head()
    assert_event_stream_headers(r)
    r.read_until(lambda b: b.replace(KEEPALIVE, b"") == b"".join(events[:3]),
                 "the events of the first gzip block")
    release.set()
    got, _ = split(r.read_all())
    assert r.complete and got == events


def test_json_bodies_are_asked_for_uncompressed_and_decoded_if_compressed_anyway(proxy, fake):
    """The proxy reads every body it relays (to mask echoed keys, to cap decompression), so
    it asks the upstream for identity; a body compressed anyway reaches the client decoded,
    with framing that matches what is sent."""
    payload = json.dumps(anthropic_message()).encode()
    compressed = gzip.compress(payload)
    fake.enqueue([Status(200, headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
                         body_mode="length"), Send(compressed), End()])
    r = RawResponse(proxy.url, "/v1/messages", dict(PROTOS["anthropic"].body, stream=False),
                    headers={"Accept-Encoding": "gzip"}).read_head()
    body = r.read_all()
    assert r.status == 200 and r.complete
    assert r.header("content-encoding") is None
    assert r.header("content-length") in (None, str(len(payload)))
    assert json.loads(body) == anthropic_message()
    [upstream] = fake.wait_for_requests(1)
    assert upstream.headers.get_all("accept-encoding") == ["identity"]
    row = proxy.row(r.request_id)
    assert (row["end_reason"], row["output_tokens"]) == ("complete", DEFAULT_USAGE["output"])
    # and a high-level client reads it as any client would
    fake.enqueue([Status(200, headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
                         body_mode="length"), Send(compressed), End()])
    resp = requests.post(proxy.url + "/v1/messages", json=dict(PROTOS["anthropic"].body, stream=False),
                         timeout=10)
    assert resp.status_code == 200 and resp.json() == anthropic_message()


# ===========================================================================
# 10. CRLF and split UTF-8
# ===========================================================================

CRLF_STREAMS = {
    "anthropic": anthropic_stream(newline="\r\n"),
    "chat": chat_stream(newline="\r\n"),
    "responses": responses_stream(newline="\r\n"),
}


@pytest.mark.parametrize("name", PROTO_NAMES)
def test_crlf_stream_trickled_byte_by_byte_arrives_intact(proxy, fake, name):
    proto = PROTOS[name]
    transcript = b"".join(CRLF_STREAMS[name])
    assert "é".encode() in transcript and "🌍".encode() in transcript
    fake.enqueue([Status(200, headers=SSE_CT), Trickle(transcript, size=1), End()])
    r = RawResponse(proxy.url, proto.path, proto.body).read_head()
    assert_event_stream_headers(r)
    body = r.read_all()
    assert r.complete
    assert parse(body) == parse(transcript)  # what an SDK sees, keepalives and all
    assert body.replace(KEEPALIVE, b"") == transcript  # and byte for byte (protocols.md §0.1)
    text = "".join(json.dumps(json.loads(d), ensure_ascii=False) for _, d in parse(body)
                   if d != "[DONE]")
    assert "héllo" in text and "🌍" in text
    assert proxy.row(r.request_id)["end_reason"] == "complete"


def test_the_lf_of_a_stripped_usage_chunk_does_not_reach_the_client(proxy, fake):
    """A chat stream without `[DONE]` whose last event (the usage chunk the proxy asked for,
    so the client never sees it) ends on a CR read apart from its LF: that LF belongs to
    the stripped chunk, so nothing follows the last event the client got."""
    role = b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,' \
           b'"delta":{"role":"assistant","content":""},"finish_reason":null}]}\r\n\r\n'
    text = b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,' \
           b'"delta":{"content":"hi"},"finish_reason":"stop"}]}\r\n\r\n'
    usage = b'data: {"id":"c","object":"chat.completion.chunk","choices":[],"usage":' \
            b'{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}\r\n\r'
    fake.enqueue([Status(200, headers=SSE_CT), Send(role), Send(text), Send(usage), Send(b"\n"),
                  End()])
    body = dict(PROTOS["chat"].body)
    body.pop("stream_options", None)  # the proxy asks for usage itself and strips the chunk
    r = RawResponse(proxy.url, "/v1/chat/completions", body).read_head()
    assert r.read_all().replace(KEEPALIVE, b"") == role + text
    row = proxy.row(r.request_id)
    assert (row["end_reason"], row["output_tokens"]) == ("complete", 1)


# ===========================================================================
# 11. Errors in the endpoint's own format and status
# ===========================================================================

@pytest.mark.parametrize("name", PROTO_NAMES)
def test_bad_requests_get_400_in_the_endpoints_shape(proxy, fake, name):
    proto = PROTOS[name]
    for body in (b"{not json", json.dumps({k: v for k, v in proto.body.items() if k != "model"}).encode(),
                 b"[1, 2]", b"\xff\xfe{}"):
        r = RawResponse(proxy.url, proto.path, body).read_head()
        assert r.status == 400, (body, r.status)
        assert (r.header("content-type") or "").startswith("application/json")
        assert_error_shape(name, r.json(), "invalid_request_error")
        assert proxy.row(r.request_id)["end_reason"] == "rejected"
    assert fake.requests == []


def test_unknown_path_is_404_in_the_shape_the_client_speaks(proxy, fake):
    r = RawResponse(proxy.url, "/v1/nope", {"model": "x"}).read_head()
    assert r.status == 404
    assert_openai_error(r.json())
    r = RawResponse(proxy.url, "/v1/nope", {"model": "x"}, headers={"anthropic-version": "2023-06-01"}).read_head()
    assert r.status == 404
    assert_anthropic_error(r.json(), "not_found_error")
    assert fake.requests == []


@pytest.mark.parametrize("name", PROTO_NAMES)
def test_body_over_the_limit_is_413(start_proxy, fake, name):
    server = start_proxy(LLM_PROXY_MAX_BODY_BYTES="1000")
    pid = server.health()["pid"]
    proto = PROTOS[name]
    big = dict(proto.body, metadata={"pad": "x" * 2000})
    r = RawResponse(server.url, proto.path, big).read_head()
    assert r.status == 413
    assert_error_shape(name, r.json(), "request_too_large")
    # without a Content-Length (chunked upload) the limit holds too
    chunked = RawResponse(server.url, proto.path, big, chunked=True).read_head()
    assert chunked.status == 413
    assert_error_shape(name, chunked.json(), "request_too_large")
    small = RawResponse(server.url, proto.path, proto.body).read_head()
    small.read_all()
    assert small.status == 200 and small.complete
    assert len(fake.requests) == 1
    assert server.health()["pid"] == pid


def test_unreachable_upstream_is_502(start_proxy):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        # a commit window of 1 s: the refusal must beat it even on a loaded machine (the
        # commit rule itself is tested above with the default window)
        server = start_proxy(upstream_url=f"http://127.0.0.1:{s.getsockname()[1]}",
                             LLM_PROXY_COMMIT_AFTER="1")
        pid = server.health()["pid"]
        for name, stream in (("anthropic", True), ("anthropic", False), ("chat", True), ("responses", False)):
            proto = PROTOS[name]
            r = RawResponse(server.url, proto.path, dict(proto.body, stream=stream)).read_head()
            assert r.status == 502, (name, stream, r.status)
            assert_error_shape(name, r.json(), "api_error")
            row = server.row(r.request_id)
            assert (row["status"], row["end_reason"]) == (502, "connect_error")
        assert server.health()["pid"] == pid


@pytest.mark.parametrize("name", PROTO_NAMES)
def test_upstream_that_never_answers_is_504(idle_proxy, fake, name):
    proto = PROTOS[name]
    pid = idle_proxy.health()["pid"]
    fake.enqueue([Stall()])
    r = RawResponse(idle_proxy.url, proto.path, dict(proto.body, stream=False), timeout=10).read_head()
    assert r.status == 504
    assert_error_shape(name, r.json(), "timeout_error")
    [upstream] = fake.wait_for_requests(1)
    assert upstream.peer_closed.wait(2.0)  # the proxy let go of the silent upstream
    row = idle_proxy.row(r.request_id)
    assert (row["status"], row["end_reason"]) == (504, "idle_timeout")
    assert idle_proxy.health()["pid"] == pid


@pytest.mark.identical_requests
def test_the_worker_survives_everything_a_client_can_send(proxy, fake):
    pid = proxy.health()["pid"]
    port = proxy.port
    for path, body in (("/v1/messages", b"{not json"), ("/v1/chat/completions", b"null"),
                       ("/v1/responses", b'{"model": 7}'), ("/v1/messages", b"\xff" * 100)):
        assert RawResponse(proxy.url, path, body).read_head().status == 400
    assert RawResponse(proxy.url, "/v1/messages", method="GET").read_head().status == 405
    assert RawResponse(proxy.url, "/nope/../../etc", method="GET").read_head().status in (400, 404)
    # a body shorter than its Content-Length, then the client leaves
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 5000\r\n\r\n{\"model\":")
    # garbage instead of HTTP
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not http at all\r\n\r\n")
        try:
            s.recv(1024)
        except OSError:
            pass
    # a stream the client abandons at once, and one the upstream resets before its headers
    fake.enqueue([Stall()], [Reset()])
    abandoned = RawResponse(proxy.url, "/v1/messages", PROTOS["anthropic"].body)
    fake.wait_for_requests(1)
    abandoned.close()
    reset = RawResponse(proxy.url, "/v1/messages", dict(PROTOS["anthropic"].body, stream=False)).read_head()
    assert reset.status == 502
    assert_anthropic_error(reset.json())
    # still the same worker, still serving streams
    ok = RawResponse(proxy.url, "/v1/messages", PROTOS["anthropic"].body).read_head()
    ok.read_all()
    assert ok.status == 200 and ok.complete and b"message_stop" in ok.body
    assert proxy.health()["pid"] == pid


# ===========================================================================
# 12. SIGTERM
# ===========================================================================

@pytest.mark.identical_requests
def test_sigterm_ends_live_streams_with_one_terminal_error_each(start_proxy, fake):
    server = start_proxy(LLM_PROXY_SHUTDOWN_GRACE="0.5", LLM_PROXY_GRACEFUL_TIMEOUT="5")
    events = anthropic_stream()
    content = b"".join(events[:4])
    release = threading.Event()
    for _ in range(3):
        fake.enqueue([Status(200, headers=SSE_CT)] + [Send(e) for e in events[:4]]
                     + [WaitFor(release, timeout=30)])
    streams = [RawResponse(server.url, "/v1/messages", PROTOS["anthropic"].body, timeout=10).read_head()
               for _ in range(3)]
    for r in streams:
        assert_event_stream_headers(r)
        r.read_until(lambda b: b.replace(KEEPALIVE, b"") == content, "the first events")
    upstreams = fake.wait_for_requests(3)
    try:
        sent_at = time.monotonic()
        server.signal(signal.SIGTERM)
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            bodies = list(pool.map(lambda r: r.read_all(), streams))
        ended = [r.chunks[-1][0] - sent_at for r in streams]
        print(f"\nSIGTERM -> terminal errors after {[round(t, 3) for t in ended]} s")
        for r, body in zip(streams, bodies):
            assert r.complete, f"stream not closed cleanly: {body[-200:]!r}"
            got, _ = split(body)
            assert got[:4] == events[:4] and len(got) == 5, got[4:]
            check_terminal_error("anthropic", got[4], anthropic_type="overloaded_error")
            assert b"message_stop" not in body
        assert all(0.3 <= t < 4.5 for t in ended), ended  # after the grace, before gunicorn's
        assert server.proc.wait(timeout=10) is not None
        for upstream in upstreams:
            assert upstream.peer_closed.wait(2.0)
    finally:
        release.set()
    rows = {r["request_id"]: r for r in server.rows()}
    assert {rows[r.request_id]["end_reason"] for r in streams} == {"shutdown"}, rows


def test_a_chat_stream_cut_inside_an_event_after_its_finish_reason_is_not_complete(proxy, fake):
    """Every choice has its finish reason, but the stream ends in the middle of the next
    event (the usage chunk): the answer is not whole, so it ends with one terminal error and
    the cut event never reaches the client (mutant r17)."""
    proto = PROTOS["chat"]
    events = chat_stream(done=False)  # ... the finish chunk, then the usage chunk
    cut = events[-1][:-30]  # inside the usage object
    assert b"prompt_tokens" in cut
    fake.enqueue([Status(200, headers=SSE_CT)] + [Send(e) for e in events[:-1]] + [Send(cut), End()])
    r = RawResponse(proxy.url, proto.path, proto.body).read_head()
    got, _ = split(r.read_all())
    assert r.complete
    assert got[:-1] == events[:-1] and b"prompt_tokens" not in r.body
    err = check_terminal_error("chat", got[-1])
    assert "cut off" in err["message"]
    row = proxy.row(r.request_id)
    assert (row["status"], row["end_reason"]) == (200, "upstream_error"), row


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_a_json_answer_cut_by_the_upstream_fails_before_any_header(proxy, fake, framing):
    """A JSON answer is read whole before its headers go out, so one that breaks off is
    the try's failure: the client gets a 502 in its API's error shape, never half an answer
    that looks whole (mutant r21)."""
    payload = json.dumps(anthropic_message()).encode()
    half = payload[:len(payload) // 2]
    fake.enqueue([Status(200, headers={"Content-Type": "application/json"}, body_mode=framing,
                         content_length=len(payload) if framing == "length" else None),
                  Send(half), Cut()])
    r = RawResponse(proxy.url, "/v1/messages", dict(PROTOS["anthropic"].body, stream=False),
                    timeout=5).read_head()
    assert r.status == 502
    body = json.loads(r.read_all())
    assert body["type"] == "error" and body["error"]["type"] == "api_error"
    assert half.decode() not in json.dumps(body)
    assert proxy.row(r.request_id)["end_reason"] != "complete"


def test_a_stream_whose_end_splits_its_crlf_closes_without_waiting_for_the_upstream(proxy, fake):
    """`data: [DONE]` ends on a CR whose LF comes in the next read, and the upstream then
    keeps its connection open: the body closes as soon as the LF is through, not when the
    upstream lets go (mutant r24)."""
    proto = PROTOS["chat"]
    transcript = b"".join(chat_stream(newline="\r\n"))
    assert transcript.endswith(b"[DONE]\r\n\r\n")
    lf_may_go = threading.Event()
    fake.enqueue([Status(200, headers=SSE_CT), Send(transcript[:-1]), WaitFor(lf_may_go, 8),
                  Send(b"\n"), Stall()])
    r = RawResponse(proxy.url, proto.path, proto.body, timeout=3).read_head()
    r.read_until(lambda b: b.replace(KEEPALIVE, b"").endswith(b"[DONE]\r\n\r"), "the [DONE] event")
    lf_may_go.set()
    body = r.read_all()  # within 3 s: the upstream's idle timeout here is 5 s
    assert r.complete and body.replace(KEEPALIVE, b"") == transcript


def test_the_cost_comment_waits_for_the_last_event_to_be_whole(proxy, fake):
    """The last event's blank line is a CRLF whose LF comes in a later read: the cost
    comment goes after that LF, never inside the event (a comment is only ever written
    between events)."""
    split = 1
    proto = PROTOS["chat"]
    transcript = b"".join(chat_stream(newline="\r\n"))
    lf_may_go = threading.Event()
    fake.enqueue([Status(200, headers=SSE_CT), Send(transcript[:-split]), WaitFor(lf_may_go, 8),
                  Send(transcript[-split:]), Stall()])
    r = RawResponse(proxy.url, proto.path, proto.body, timeout=3,
                    headers={"X-LLM-Proxy-Cost-Comment": "1"}).read_head()
    r.read_until(lambda b: b.replace(KEEPALIVE, b"").endswith(transcript[:-split]),
                 "the [DONE] event but its end")
    assert_nothing_arrives(r, 0.2)
    lf_may_go.set()
    body = r.read_all().replace(KEEPALIVE, b"")
    assert r.complete and body.startswith(transcript)
    comment = body[len(transcript):]
    assert comment.startswith(b": llm-proxy-usage {") and comment.endswith(b"}\n\n")
    assert json.loads(comment[len(b": llm-proxy-usage "):])["request_id"] == r.request_id


def test_count_tokens_is_never_a_stream_even_when_its_body_says_stream(proxy, fake):
    """count_tokens answers with JSON: `"stream": true` in its body must not make the proxy
    commit to an event stream while the upstream takes its time (mutant d3)."""
    fake.enqueue([Sleep(0.3)] + json_reply({"input_tokens": 12}))
    r = RawResponse(proxy.url, "/v1/messages/count_tokens",
                    {"model": "claude-sonnet-4-5", "messages": [], "stream": True}, timeout=5).read_head()
    body = r.read_all()
    assert r.status == 200 and (r.header("content-type") or "").startswith("application/json")
    assert json.loads(body) == {"input_tokens": 12}
    row = proxy.row(r.request_id)
    assert (row["stream"], row["end_reason"]) == (0, "complete"), row


def test_a_provider_with_keepalive_off_gets_no_keepalive_comments(start_proxy, fake, tmp_path):
    """`keepalive = false` on a provider (a client that cannot parse SSE comments) turns the
    comments off for its streams, whatever the global setting (mutant d2)."""
    config = tmp_path / "proxy.toml"
    config.write_text(f'[providers.anthropic]\nbase_url = "{fake.url}"\nkeepalive = false\n')
    server = start_proxy(LLM_PROXY_CONFIG=str(config))
    events = anthropic_stream()
    release = threading.Event()
    fake.enqueue([Status(200, headers=SSE_CT)] + [Send(e) for e in events[:4]]
                 + [WaitFor(release, timeout=8)] + [Send(e) for e in events[4:]] + [End()])
    r = RawResponse(server.url, "/v1/messages", PROTOS["anthropic"].body, timeout=5).read_head()
    r.read_until(lambda b: b.endswith(events[3]), "the first events")
    timer = threading.Timer(0.5, release.set)  # ten heartbeats of upstream silence
    timer.start()
    body = r.read_all()
    timer.join()
    assert r.complete and body == b"".join(events), body


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
def test_the_clients_addresses_never_reach_the_provider(proxy, fake, stream):
    """X-Forwarded-* / Forwarded / X-Real-IP (nginx sets them) stay with the proxy (mutant q3)."""
    headers = [("X-Forwarded-For", "203.0.113.7"), ("X-Forwarded-Host", "proxy.example"),
               ("X-Forwarded-Proto", "https"), ("X-Real-IP", "203.0.113.7"),
               ("Forwarded", "for=203.0.113.7")]
    r = RawResponse(proxy.url, "/v1/messages", dict(PROTOS["anthropic"].body, stream=stream),
                    headers=headers).read_head()
    r.read_all()
    assert r.status == 200 and r.complete
    [upstream] = fake.wait_for_requests(1)
    for name in ("x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-real-ip", "forwarded"):
        assert name not in upstream.headers, upstream.raw_head
    assert b"203.0.113.7" not in upstream.raw_head


def test_a_broken_stream_tells_its_cost_before_its_terminal_error(proxy, fake):
    """A stream that breaks after content ends with the proxy's terminal error, after which
    a client stops reading: the cost comment it asked for goes just before that error, so
    the tokens already used are accounted for too."""
    proto = PROTOS["anthropic"]
    fake.enqueue([Status(200, headers=SSE_CT)] + [Send(e) for e in proto.content] + [Cut()])
    r = RawResponse(proxy.url, proto.path, proto.body, timeout=10,
                    headers={"X-LLM-Proxy-Cost-Comment": "1"}).read_head()
    body = r.read_all().replace(KEEPALIVE, b"")
    assert r.complete
    content = b"".join(proto.content)
    assert body.startswith(content)
    comment, error = body[len(content):].split(b"\n\n", 1)
    assert comment.startswith(b": llm-proxy-usage {")
    told = json.loads(comment[len(b": llm-proxy-usage "):])
    assert told["request_id"] == r.request_id and told["usage_complete"] is False
    assert error.startswith(b"event: error\n")
    assert proxy.row(r.request_id)["end_reason"] == "upstream_error"


def test_a_joined_stream_never_gets_the_cost_comment_of_the_request_that_paid(fake, tmp_path):
    """A client that joined another's live upstream call paid nothing (its row: joined,
    cost 0): the payer's cost comment must not reach it, even when it asks for one, while
    the payer gets it; and the shared call ends without a failure of its stream thread."""
    config = tmp_path / "proxy.toml"
    config.write_text(f'[providers.anthropic]\nbase_url = "{fake.url}"\n\n'
                      '[routes."join-*"]\njoin_live = true\ndeployments = [{ provider = '
                      '"anthropic", model = "claude-sonnet-4-5", name = "join" }]\n')
    server = ProxyProcess(fake.url, tmp_path, LLM_PROXY_CONFIG=str(config)).start()
    try:
        events = anthropic_stream(model="claude-sonnet-4-5")
        release = threading.Event()
        fake.enqueue([Status(200, headers=SSE_CT), *[Send(e) for e in events[:4]],
                      WaitFor(release, 20), *[Send(e) for e in events[4:]], End()])
        body = dict(PROTOS["anthropic"].body, model="join-cost")
        headers = {"x-api-key": "sk-joiners", "anthropic-version": "2023-06-01",
                   "X-LLM-Proxy-Cost-Comment": "1"}
        head = b"".join(events[:4])
        clients = []
        for _ in range(2):
            r = RawResponse(server.url, "/v1/messages", body, headers=headers,
                            timeout=20).read_head()
            r.read_until(lambda got: got.replace(KEEPALIVE, b"").startswith(head),
                         "the events so far")
            clients.append(r)
        payer, joined = clients
        assert joined.header("x-llm-proxy-dedup") == "joined"
        release.set()
        paid = payer.read_all().replace(KEEPALIVE, b"").rstrip(b"\n").rsplit(b"\n", 1)[-1]
        assert paid.startswith(b": llm-proxy-usage ")  # the payer's own, to its own writer
        assert json.loads(paid[len(b": llm-proxy-usage "):])["request_id"] == payer.request_id
        body = joined.read_all().replace(KEEPALIVE, b"")
        assert joined.complete and body.startswith(b"".join(events))
        assert server.row(joined.request_id)["end_reason"] == "joined"
        assert payer.request_id.encode() not in body
        for line in body.split(b"\n"):
            if line.startswith(b": llm-proxy-usage "):
                assert json.loads(line[len(b": llm-proxy-usage "):])["request_id"] == \
                    joined.request_id
        assert "Traceback" not in server.log()
    finally:
        server.stop()
