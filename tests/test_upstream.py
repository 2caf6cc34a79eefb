"""The upstream client's error translation and header rules (unit level, `responses`)."""

import requests
import responses

from proxy.errors import UpstreamBroken, UpstreamTimeout, UpstreamUnreachable
from proxy.upstream.client import (AbortHandle, UpstreamClient, is_hop_by_hop_header,
                                   remove_hop_by_hop_headers)

URL = "http://upstream.test/v1/messages"


def send(client=None):
    client = client or UpstreamClient(connect_timeout=1, idle_timeout=1)
    return client.send("POST", URL, [("content-type", "application/json")], b"{}", AbortHandle())


@responses.activate
def test_connection_error_becomes_502():
    responses.add(responses.POST, URL, body=requests.ConnectionError("refused"))
    try:
        send()
    except UpstreamUnreachable as err:
        assert err.status == 502 and err.end_reason == "connect_error"
    else:
        raise AssertionError("no error")


@responses.activate
def test_connect_timeout_becomes_502():
    responses.add(responses.POST, URL, body=requests.ConnectTimeout("slow"))
    try:
        send()
    except UpstreamUnreachable as err:
        assert "timed out connecting" in err.message
    else:
        raise AssertionError("no error")


@responses.activate
def test_read_timeout_waiting_for_headers_becomes_504():
    responses.add(responses.POST, URL, body=requests.ReadTimeout("silent"))
    try:
        send()
    except UpstreamTimeout as err:
        assert err.status == 504 and err.end_reason == "idle_timeout"
    else:
        raise AssertionError("no error")


@responses.activate
def test_error_status_is_a_response_not_an_exception():
    responses.add(responses.POST, URL, status=429, json={"error": {"message": "slow down"}},
                  headers={"retry-after": "3"})
    resp = send()
    assert resp.status == 429
    assert resp.header("retry-after") == "3"
    assert b"slow down" in resp.read_limited()


@responses.activate
def test_credentials_and_headers_are_sent_as_given():
    responses.add(responses.POST, URL, json={})
    client = UpstreamClient(connect_timeout=1, idle_timeout=1)
    client.send("POST", URL, [("x-api-key", "sk-1"), ("anthropic-version", "2023-06-01")], b"{}",
                AbortHandle())
    sent = responses.calls[0].request.headers
    assert sent["x-api-key"] == "sk-1" and sent["anthropic-version"] == "2023-06-01"
    assert "python-requests" not in sent.get("User-Agent", "")


@responses.activate
def test_upstream_cookies_are_never_replayed_to_other_clients():
    responses.add(responses.POST, URL, json={}, headers={"set-cookie": "sess=abc; Path=/"})
    responses.add(responses.POST, URL, json={})
    client = UpstreamClient(connect_timeout=1, idle_timeout=1)
    send(client)
    send(client)
    assert "Cookie" not in responses.calls[1].request.headers


def test_broken_body_errors_become_upstream_broken_or_timeout():
    from proxy.upstream import translate_errors
    import urllib3
    for exc, kind in [(urllib3.exceptions.ProtocolError("cut"), UpstreamBroken),
                      (urllib3.exceptions.ReadTimeoutError(None, URL, "idle"), UpstreamTimeout),
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
