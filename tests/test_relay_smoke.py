import requests


def test_anthropic_stream_through_gunicorn(proxy, fake):
    r = requests.post(proxy.url + "/v1/messages", json={"model": "claude-x", "max_tokens": 5,
                                                         "messages": [], "stream": True})
    assert r.status_code == 200
    assert r.headers["x-accel-buffering"] == "no"
    assert b"message_stop" in r.content
    row = proxy.row(r.headers["x-llm-proxy-request-id"])
    assert row["end_reason"] == "complete"
