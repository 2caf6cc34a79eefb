"""Commit rule and timeouts: what a stream or a JSON answer does when the upstream is slow."""

import requests


def test_an_anthropic_stream_through_gunicorn_completes_unbuffered_with_its_row(proxy, fake):
    r = requests.post(proxy.url + "/v1/messages", json={"model": "claude-x", "max_tokens": 5,
                                                         "messages": [], "stream": True}, timeout=10)
    assert r.status_code == 200
    assert r.headers["x-accel-buffering"] == "no"
    assert b"message_stop" in r.content
    row = proxy.row(r.headers["x-llm-proxy-request-id"])
    assert row["end_reason"] == "complete"


def test_non_streaming_answer_may_take_longer_than_the_idle_timeout(start_proxy, fake):
    """A JSON answer is silent until complete: it waits `plain_timeout`, not `idle_timeout`."""
    from support.builders import anthropic_message
    from support.steps import WaitFor, json_reply
    import threading
    server = start_proxy(LLM_PROXY_IDLE_TIMEOUT="0.2", LLM_PROXY_PLAIN_TIMEOUT="10")
    release = threading.Event()
    fake.enqueue([WaitFor(release, timeout=5)] + json_reply(anthropic_message()))
    timer = threading.Timer(0.8, release.set)  # four idle timeouts of silence
    timer.start()
    r = requests.post(server.url + "/v1/messages", json={"model": "claude-x", "max_tokens": 5,
                                                          "messages": []}, timeout=10)
    timer.join()
    assert r.status_code == 200 and r.json()["type"] == "message"


def test_json_answer_after_the_stream_committed_becomes_a_terminal_error(proxy, fake):
    """The 200 event-stream headers went out (keepalives flowed); a JSON body cannot follow."""
    from support.builders import anthropic_message
    from support.steps import Sleep, json_reply
    fake.enqueue([Sleep(0.3)] + json_reply(anthropic_message()))
    r = requests.post(proxy.url + "/v1/messages", json={"model": "claude-x", "max_tokens": 5,
                                                         "messages": [], "stream": True}, timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert b": keepalive" in r.content
    assert r.content.rstrip().endswith(b"}") and r.content.count(b"event: error") == 1
    assert b"non-stream body" in r.content
    assert proxy.row(r.headers["x-llm-proxy-request-id"])["end_reason"] == "upstream_error"
