"""The upstream client: error translation and header rules, over loopback to the scripted
fake upstream (a closed port for a refused connection)."""

import socket

import pytest
import requests

from proxy.errors import UpstreamBroken, UpstreamTimeout, UpstreamUnreachable
from proxy.upstream.client import (AbortHandle, UpstreamClient, is_hop_by_hop_header,
                                   remove_hop_by_hop_headers)
from support.steps import Sleep, Status, json_reply

pytestmark = pytest.mark.timeout(30)

PATH = "/v1/messages"


def send(url: str, client=None, headers=(("content-type", "application/json"),)):
    client = client or UpstreamClient(connect_timeout=1, idle_timeout=1)
    return client.send("POST", url + PATH, list(headers), b"{}", AbortHandle())


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens there once closed


def test_a_refused_connection_becomes_502():
    with pytest.raises(UpstreamUnreachable) as caught:
        send(closed_port_url())
    assert caught.value.status == 502 and caught.value.end_reason == "connect_error"
    assert "refused the connection" in caught.value.message


def test_connect_timeout_becomes_502():
    from proxy.upstream import translate_errors
    import urllib3
    with pytest.raises(UpstreamUnreachable) as caught:
        with translate_errors("connecting", "http://upstream.test/"):
            raise urllib3.exceptions.ConnectTimeoutError(None, "timed out")
    assert "timed out connecting to the upstream upstream.test" in caught.value.message


def test_read_timeout_waiting_for_headers_becomes_504(fake):
    fake.enqueue([Sleep(3), *json_reply({})])
    with pytest.raises(UpstreamTimeout) as caught:
        send(fake.url)
    assert caught.value.status == 504 and caught.value.end_reason == "idle_timeout"


def test_error_status_is_a_response_not_an_exception(fake):
    fake.enqueue(json_reply({"error": {"message": "slow down"}}, status=429,
                            headers={"retry-after": "3"}))
    resp = send(fake.url)
    assert resp.status == 429
    assert resp.header("retry-after") == "3" and resp.header("Retry-After") == "3"
    assert b"slow down" in resp.read_limited()


def test_credentials_and_headers_are_sent_as_given(fake):
    fake.enqueue(json_reply({}))
    resp = send(fake.url, headers=[("x-api-key", "sk-1"), ("anthropic-version", "2023-06-01"),
                                   ("content-type", "application/json")])
    resp.read_limited()
    sent = fake.wait_for_requests(1)[0]
    assert sent.headers["x-api-key"] == "sk-1" and sent.headers["anthropic-version"] == "2023-06-01"
    assert sent.path == PATH and sent.body == b"{}" and sent.headers["content-length"] == "2"
    assert "python-requests" not in (sent.headers.get("user-agent") or "")
    assert "cookie" not in sent.headers


def test_upstream_cookies_are_never_replayed_to_other_clients(fake):
    fake.enqueue(json_reply({}, headers={"set-cookie": "sess=abc; Path=/"}), json_reply({}))
    client = UpstreamClient(connect_timeout=1, idle_timeout=1)
    for _ in range(2):
        send(fake.url, client).read_limited()
    second = fake.wait_for_requests(2)[1]
    assert "cookie" not in second.headers


def test_an_answer_read_to_its_end_gives_its_connection_back(fake):
    fake.enqueue(json_reply({"a": 1}), json_reply({"b": 2}), json_reply({"c": 3}))
    client = UpstreamClient(connect_timeout=1, idle_timeout=1)
    for _ in range(3):
        resp = send(fake.url, client)
        resp.read_limited()
        resp.close()
    first, second, third = fake.wait_for_requests(3)
    assert first.connection_id == second.connection_id == third.connection_id


def test_an_answer_left_unread_closes_its_connection(fake):
    fake.enqueue([Status(200, headers={"content-type": "application/json",
                                       "content-length": "100000"}), Sleep(0.2)],
                 json_reply({}))
    client = UpstreamClient(connect_timeout=1, idle_timeout=1)
    send(fake.url, client).close()  # nothing read: that connection cannot carry another request
    send(fake.url, client).read_limited()
    first, second = fake.wait_for_requests(2)
    assert first.connection_id != second.connection_id


def test_broken_body_errors_become_upstream_broken_or_timeout():
    from proxy.upstream import translate_errors
    import urllib3
    for exc, kind in [(urllib3.exceptions.ProtocolError("cut"), UpstreamBroken),
                      (urllib3.exceptions.ReadTimeoutError(None, "http://upstream.test/", "idle"), UpstreamTimeout),
                      (requests.exceptions.ChunkedEncodingError("bad chunk"), UpstreamBroken)]:
        try:
            with translate_errors("reading"):
                raise exc
        except kind:
            pass
        else:
            raise AssertionError(f"{exc!r} not translated to {kind.__name__}")


def test_hop_by_hop_headers_and_the_ones_connection_names_are_removed():
    assert is_hop_by_hop_header("Transfer-Encoding") and is_hop_by_hop_header("keep-alive")
    assert not is_hop_by_hop_header("anthropic-beta")
    kept = remove_hop_by_hop_headers([("Connection", "close, x-secret"), ("X-Secret", "1"),
                                      ("Upgrade", "h2c"), ("request-id", "r1")])
    assert kept == [("request-id", "r1")]


def test_credentials_in_a_deployments_url_are_sent_as_basic_auth(fake):
    import base64

    fake.enqueue(json_reply({}))
    host = fake.url.split("://", 1)[1]
    send(f"http://user:p%40ss@{host}").read_limited()
    sent = fake.wait_for_requests(1)[0]
    assert sent.headers["authorization"] == "Basic " + base64.b64encode(b"user:p@ss").decode()


def test_a_failed_tls_handshake_is_a_502_that_says_so():
    import threading

    server = socket.create_server(("127.0.0.1", 0))

    def answer_in_plain_http():
        conn, _ = server.accept()
        with conn:
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    thread = threading.Thread(target=answer_in_plain_http, daemon=True)
    thread.start()
    try:
        with pytest.raises(UpstreamUnreachable) as caught:
            send(f"https://127.0.0.1:{server.getsockname()[1]}")
    finally:
        thread.join(5)
        server.close()
    assert "TLS with the upstream 127.0.0.1" in caught.value.message
