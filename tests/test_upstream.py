"""The upstream client: error translation and header rules, over loopback to the scripted
fake upstream (a closed port for a refused connection)."""

import http.client
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


# -- the response head: parsed without the email package, read as http.client reads it --
HEADS = {
    "plain": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
             b"request-id: req_1\r\nX-Trailing:  spaced value \t\r\n\r\n{}",
    "repeated names": b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nset-cookie: b=2\r\n"
                      b"Content-Length: 0\r\n\r\n",
    "chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
    "chunked and a length": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
                            b"Content-Length: 99\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
    "coded then chunked: read to the close": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n"
                                             b"\r\n2\r\nhi\r\n0\r\n\r\n",
    "no length: read to the close": b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil close",
    "connection close": b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 3\r\n\r\nabc",
    "http/1.0": b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nabc",
    "http/1.0 kept alive": b"HTTP/1.0 200 OK\r\nKeep-Alive: timeout=5\r\nContent-Length: 3\r\n\r\nabc",
    "no content": b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n",
    "not modified": b"HTTP/1.1 304 Not Modified\r\n\r\n",
    "interim answers first": b"HTTP/1.1 100 Continue\r\nX-Interim: 1\r\n\r\nHTTP/1.1 100 Continue\r\n\r\n"
                             b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok",
    "negative length": b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\nConnection: close\r\n\r\nbody",
    "bad length": b"HTTP/1.1 200 OK\r\nContent-Length: 12x\r\nConnection: close\r\n\r\nbody",
    "bare LF lines": b"HTTP/1.1 200 OK\nContent-Length: 2\nX-A: b\n\nok",
    "no reason": b"HTTP/1.1 429\r\nRetry-After: 3\r\nContent-Length: 0\r\n\r\n",
    # Not plain: the email package reads these, defects and all.
    "folded line": b"HTTP/1.1 200 OK\r\nX-Folded: first\r\n  second\r\nContent-Length: 0\r\n\r\n",
    "non-ascii value": "HTTP/1.1 200 OK\r\nX-Name: caf\u00e9 \u00c5\r\nContent-Length: 0\r\n\r\n".encode(),
    "line without a colon": b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nnot a header\r\nX-After: 1\r\n\r\n",
    "space before the colon": b"HTTP/1.1 200 OK\r\nX-Bad : 1\r\nContent-Length: 0\r\n\r\n",
    "bare CR inside": b"HTTP/1.1 200 OK\r\nX-A: one\rtwo\r\nContent-Length: 0\r\n\r\n",
    "control byte": b"HTTP/1.1 200 OK\r\nX-A: bell\x07\r\nContent-Length: 0\r\n\r\n",
    "empty value": b"HTTP/1.1 200 OK\r\nX-Empty:\r\nX-Blank:   \r\nContent-Length: 0\r\n\r\n",
    "multipart without a boundary": b"HTTP/1.1 200 OK\r\nContent-Type: multipart/mixed\r\n"
                                    b"Content-Length: 0\r\n\r\n",
    "a message type": b"HTTP/1.1 200 OK\r\nContent-Type: message/rfc822\r\nContent-Length: 0\r\n\r\n",
    # Refused alike.
    "99 headers": b"HTTP/1.1 200 OK\r\n" + b"X-H: 1\r\n" * 98 + b"Content-Length: 0\r\n\r\n",
    "100 headers: too many": b"HTTP/1.1 200 OK\r\n" + b"X-H: 1\r\n" * 99 + b"Content-Length: 0\r\n\r\n",
    "header line too long": b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * 70000 + b"\r\n\r\n",
    "unknown protocol": b"HTTP/2.0 200 OK\r\n\r\n",
    "bad status line": b"HTTX/1.1 200 OK\r\n\r\n",
}


def _read_with(response_class, raw: bytes, method: str = "GET"):
    """What an http.client response class makes of `raw`: its head, its framing and its
    body, or the exception it raises."""
    ours, theirs = socket.socketpair()
    try:
        theirs.sendall(raw)
        theirs.shutdown(socket.SHUT_WR)
        response = response_class(ours, method=method)
        try:
            response.begin()
            framing = (response.status, response.reason, response.version, response.chunked,
                       response.length, response.will_close)
            payload = response.msg.get_payload()
            if isinstance(payload, list):  # parts the email parser read: compared by content
                payload = [(part.items(), part.get_payload()) for part in payload]
            head = (list(response.msg.items()), [type(d) for d in response.msg.defects],
                    payload, response.msg.is_multipart(), response.msg.get_all("set-cookie"))
            return framing, head, response.read()
        except Exception as exc:  # noqa: BLE001 - the comparison is the test
            return type(exc), str(exc)[:80]
    finally:
        ours.close()
        theirs.close()


@pytest.mark.timeout(10)
@pytest.mark.parametrize("name", HEADS)
def test_a_response_head_is_read_as_http_client_reads_it(name):
    """The lean response and http.client's own agree on every head: status, reason,
    version, every header (name, value, order, repeats), defects, how the body is framed
    and the body itself, or the error they raise."""
    from proxy.upstream.client import _LeanResponse

    assert _read_with(_LeanResponse, HEADS[name]) == _read_with(http.client.HTTPResponse, HEADS[name])


@pytest.mark.timeout(10)
def test_a_head_request_has_no_body_whatever_its_length_says():
    from proxy.upstream.client import _LeanResponse

    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"
    ours = _read_with(_LeanResponse, raw, method="HEAD")
    assert ours == _read_with(http.client.HTTPResponse, raw, method="HEAD")
    assert ours[0][4] == 0


@pytest.mark.timeout(10)
def test_plain_heads_do_not_go_through_the_email_package(monkeypatch):
    """The point of the lean head: the common case never builds an email parser, and
    reads the same as when it did."""
    import email.parser

    from proxy.upstream.client import _LeanResponse

    expected = _read_with(http.client.HTTPResponse, HEADS["plain"])

    def refuse(*args, **kwargs):
        raise AssertionError("the email package parsed a plain head")

    monkeypatch.setattr(email.parser, "Parser", refuse)
    monkeypatch.setattr(http.client, "parse_headers", refuse)
    assert _read_with(_LeanResponse, HEADS["plain"]) == expected
