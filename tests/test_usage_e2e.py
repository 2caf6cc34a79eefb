"""Every token accounted for, end to end: real gunicorn, fake upstream, SQLite rows."""

from __future__ import annotations

import concurrent.futures
import signal
import socket
import threading

import pytest
import requests

from support.builders import DEFAULT_USAGE, anthropic_stream, chat_stream, responses_stream
from support.processes import local_session
from support.rawhttp import RID, RawResponse
from support.steps import Send, Stall, Status, WaitFor

BODIES = {
    "/v1/messages": {"model": "claude-sonnet-4-5", "max_tokens": 32, "messages": [{"role": "user", "content": "hi"}]},
    "/v1/chat/completions": {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
    "/v1/responses": {"model": "gpt-4o", "input": "hi"},
}
ENDPOINT_NAMES = {"/v1/messages": "anthropic", "/v1/chat/completions": "openai-chat",
                  "/v1/responses": "openai-responses"}


def expected_tokens():
    return {"input_tokens": DEFAULT_USAGE["input"], "output_tokens": DEFAULT_USAGE["output"],
            "cache_read_tokens": DEFAULT_USAGE["cache_read"],
            "cache_write_tokens": DEFAULT_USAGE["cache_write"]}


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
@pytest.mark.parametrize("path", sorted(BODIES))
def test_row_matches_the_upstream_usage_exactly(proxy, path, stream):
    body = dict(BODIES[path], stream=stream)
    r = requests.post(proxy.url + path, json=body, headers={"x-api-key": "sk-secret-123"}, timeout=10)
    assert r.status_code == 200
    row = proxy.row(r.headers[RID])
    assert {k: row[k] for k in expected_tokens()} == expected_tokens()
    assert row["endpoint"] == ENDPOINT_NAMES[path]
    assert row["end_reason"] == "complete" and row["status"] == 200
    assert row["usage_complete"] == 1 and row["stream"] == int(stream)
    assert row["model_requested"] == body["model"] and row["upstream_model"] == body["model"]
    assert row["cost_usd"] is not None and row["cost_usd"] > 0 and row["priced"] == 1
    assert row["client_key_id"].startswith("key_") and "sk-secret" not in str(row)
    assert row["bytes_out"] > 0 and row["bytes_in"] > 0
    assert row["ttfb_ms"] is not None and row["ended_at"] >= row["started_at"]


def test_unknown_model_is_unpriced_not_free(proxy):
    r = requests.post(proxy.url + "/v1/messages", json=dict(BODIES["/v1/messages"], model="my-local-llm"),
                      timeout=10)
    row = proxy.row(r.headers[RID])
    assert row["input_tokens"] == DEFAULT_USAGE["input"]
    assert row["cost_usd"] is None and row["priced"] == 0


def test_client_hang_up_mid_stream_leaves_a_partial_row(proxy, fake):
    events = anthropic_stream()
    fake.enqueue([Status(200), Send(events[0]), Send(events[1]), Stall()])
    body = b'{"model":"claude-sonnet-4-5","max_tokens":5,"messages":[],"stream":true}'
    r = RawResponse(proxy.url, "/v1/messages", body)
    r.read_until(lambda received: b"content_block_start" in received, "the content block's start")
    request_id = r.request_id
    upstream = fake.wait_for_requests(1)[0]
    r.close()
    assert upstream.peer_closed.wait(2.0)
    row = proxy.row(request_id)
    assert row["end_reason"] == "client_gone"
    assert row["usage_complete"] == 0
    assert row["input_tokens"] == DEFAULT_USAGE["input"]  # known from message_start
    assert row["cache_read_tokens"] == DEFAULT_USAGE["cache_read"]


def test_connect_failure_leaves_a_502_row(start_proxy):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"  # bound, never listening: refused
        server = start_proxy(upstream_url=dead)
        r = requests.post(server.url + "/v1/chat/completions", json=dict(BODIES["/v1/chat/completions"], stream=True),
                          timeout=10)
    assert r.status_code == 502
    assert r.json()["error"]["type"] == "server_error"
    row = server.row(r.headers[RID])
    assert (row["status"], row["end_reason"]) == (502, "connect_error")
    assert row["input_tokens"] is None and row["cost_usd"] is None


def test_rejected_request_leaves_a_row(proxy):
    r = requests.post(proxy.url + "/v1/messages", json={"messages": []}, timeout=10)
    assert r.status_code == 400
    row = proxy.row(r.headers[RID])
    assert (row["status"], row["end_reason"]) == (400, "rejected")


def test_an_upstream_error_event_leaves_an_upstream_error_row_with_its_message(proxy, fake):
    events = chat_stream(include_usage=False, done=False)
    error = b'data: {"error":{"message":"boom","type":"server_error","param":null,"code":null}}\n\n'
    fake.enqueue([Status(200), Send(events[0]), Send(events[1]), Send(error)])
    r = requests.post(proxy.url + "/v1/chat/completions", json=dict(BODIES["/v1/chat/completions"], stream=True),
                      timeout=10)
    assert r.content.endswith(error)
    row = proxy.row(r.headers[RID])
    assert row["end_reason"] == "upstream_error" and row["error"] == "boom"
    assert row["usage_complete"] == 0


@pytest.mark.identical_requests
def test_sigterm_during_50_live_streams_loses_no_row(start_proxy, fake):
    """Every live stream ends with a terminal event and a `shutdown` row; none is lost."""
    server = start_proxy(LLM_PROXY_SHUTDOWN_GRACE="0.5", LLM_PROXY_GRACEFUL_TIMEOUT="10",
                         threads=80)
    release = threading.Event()
    events = responses_stream()
    for _ in range(50):
        fake.enqueue([Status(200), Send(events[0]), Send(events[4]), WaitFor(release, timeout=30)])

    def stream_one():
        with local_session() as s:
            r = s.post(server.url + "/v1/responses", json=dict(BODIES["/v1/responses"], stream=True),
                       stream=True, timeout=30)
            chunks = r.iter_content(None)
            got = next(chunks)
            started.release()
            for chunk in chunks:
                got += chunk
            return r.headers[RID], got

    started = threading.Semaphore(0)
    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        futures = [pool.submit(stream_one) for _ in range(50)]
        for _ in range(50):
            assert started.acquire(timeout=20)
        fake.wait_for_requests(50, timeout=20)
        server.signal(signal.SIGTERM)
        results = [f.result(timeout=30) for f in futures]
    release.set()
    server.proc.wait(timeout=20)
    for request_id, body in results:
        assert body.rstrip().endswith(b"}")
        assert b"event: error" in body and b"proxy_shutting_down" in body
    rows = {r["request_id"]: r for r in server.rows()}
    assert len(rows) == 50
    assert {rows[rid]["end_reason"] for rid, _ in results} == {"shutdown"}


@pytest.mark.identical_requests
def test_several_workers_under_concurrent_load_lose_no_row(start_proxy):
    server = start_proxy(workers=3, threads=16)
    paths = sorted(BODIES)

    def call(i):
        path = paths[i % 3]
        with local_session() as s:
            r = s.post(server.url + path, json=dict(BODIES[path], stream=bool(i % 2)), timeout=30)
            assert r.status_code == 200
            return r.headers[RID]

    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        ids = list(pool.map(call, range(300)))
    server.stop()  # SIGTERM: every worker drains its queue on exit
    rows = server.rows()
    assert sorted(r["request_id"] for r in rows) == sorted(ids)
    assert {r["end_reason"] for r in rows} == {"complete"}
    assert sum(r["output_tokens"] for r in rows) == 300 * DEFAULT_USAGE["output"]


def test_a_client_that_hangs_up_mid_stream_leaves_a_499_row(proxy, fake):
    """The row of a stream the client left says 499 (the client closed the request), not
    the 200 that went out before it left (mutant r10)."""
    events = anthropic_stream()
    fake.enqueue([Status(200), Send(events[0]), Send(events[1]), Stall()])
    r = RawResponse(proxy.url, "/v1/messages", dict(BODIES["/v1/messages"], stream=True))
    r.read_until(lambda received: b"content_block_start" in received, "the content block's start")
    upstream = fake.wait_for_requests(1)[0]
    r.close()
    assert upstream.peer_closed.wait(2.0)
    row = proxy.row(r.request_id)
    assert (row["status"], row["end_reason"]) == (499, "client_gone"), row
