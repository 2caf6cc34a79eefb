"""The test support code itself (tests/support/): the SSE parser and the raw HTTP client the
other tests read the proxy's answers with, the servers a failed start must not leave behind,
and the proxy variables no test traffic may follow."""

from __future__ import annotations

import os
import signal
import time

import pytest

from support import nginx as nginx_module
from support.builders import anthropic_stream, chat_stream
from support.nginx import INSTALL_NGINX, NginxProcess, render_site
from support.processes import (PROXY_VARIABLES, ROOT, ProxyProcess, free_port, group_members,
                               local_session)
from support.rawhttp import ResponseParser, parse_response
from support.sse import KEEPALIVE, Event, Splitter, parse, split

# ---------------------------------------------------------------------------
# The SSE parser
# ---------------------------------------------------------------------------


def test_events_parse_alike_in_every_line_ending_with_comments_skipped():
    lf = b": hello\n\nevent: a\ndata: 1\ndata:  2\n\ndata: [DONE]\n\n"
    for body in (lf, lf.replace(b"\n", b"\r\n"), lf.replace(b"\n", b"\r"), b"\xef\xbb\xbf" + lf):
        assert parse(body) == [Event("a", "1\n 2"), Event(None, "[DONE]")], body
    assert [e.type for e in parse(lf)] == ["a", "message"]
    assert parse(b"data: {\"x\": 1}\n\n")[0].json == {"x": 1} and parse(lf)[1].json is None


def test_a_stream_that_ends_inside_an_event_is_refused_or_cut_back_to_its_last_event():
    body = b"data: 1\n\ndata: 2\n"
    with pytest.raises(AssertionError, match="left open"):
        parse(body)
    assert parse(body, complete=False) == [Event(None, "1")]
    assert parse(b"data: 1\n\ndata: \xf0\x9f", complete=False) == [Event(None, "1")]  # a cut character


def test_split_finds_keepalives_between_events_and_sees_one_inside_an_event():
    events = anthropic_stream()
    body = KEEPALIVE + events[0] + KEEPALIVE + KEEPALIVE + b"".join(events[1:])
    assert split(body) == (events, [0, 1, 1])
    torn = events[0][:10] + KEEPALIVE + events[0][10:]  # a keepalive inside the first event
    got, keepalives = split(torn + b"".join(events[1:]))
    assert got[0] != events[0] and keepalives == []
    with pytest.raises(AssertionError, match="inside an event"):
        split(b"".join(events)[:-1])


def test_the_splitter_cuts_the_same_blocks_however_the_bytes_arrive():
    body = b"".join(chat_stream()) + KEEPALIVE
    expected = split(body)[0] + [KEEPALIVE]
    for size in (1, 2, 7, 100):
        splitter = Splitter()
        blocks = [b for i in range(0, len(body), size) for b in splitter.feed(body[i:i + size])]
        assert blocks == expected and splitter.pending == b"", size


# ---------------------------------------------------------------------------
# The raw HTTP client's response parser
# ---------------------------------------------------------------------------

CHUNKED = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\nX-A: 2\r\n\r\n"
           b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n")


def test_chunks_are_handed_out_whole_however_the_bytes_arrive():
    for size in (1, 3, len(CHUNKED)):
        parser = ResponseParser()
        pieces = [p for i in range(0, len(CHUNKED), size) for p in parser.feed(CHUNKED[i:i + size])]
        assert pieces == [b"hello", b" world"] and parser.complete, size
        assert parser.status == 200 and parser.header_all("x-a") == ["1", "2"]


def test_a_body_cut_short_is_told_from_one_that_ends_with_the_close():
    cut = parse_response(CHUNKED[:-5])
    assert (cut.complete, cut.truncated, cut.body) == (False, True, b"hello world")
    short = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
    assert (short.complete, short.truncated) == (False, True)
    whole = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloEXTRA")
    assert (whole.complete, whole.body) == (True, b"hello")
    closed = parse_response(b"HTTP/1.1 502 Bad Gateway\r\nConnection: close\r\n\r\n{}")
    assert (closed.status, closed.complete, closed.body) == (502, True, b"{}")
    with pytest.raises(AssertionError, match="bad chunk framing"):
        ResponseParser().feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX")


# ---------------------------------------------------------------------------
# No server outlives a start that failed
# ---------------------------------------------------------------------------

def assert_group_ends(pgid: int, timeout: float = 5.0) -> None:
    """The group's processes are SIGKILLed; they are gone once the kernel has delivered it."""
    deadline = time.monotonic() + timeout
    while (alive := group_members(pgid)) and time.monotonic() < deadline:
        time.sleep(0.05)  # another process's death: no event to wait on
    if alive:
        for pid in alive:
            os.kill(pid, signal.SIGKILL)
        pytest.fail(f"processes {alive} of the failed server's group {pgid} survived its start")


@pytest.mark.parametrize("failure", ["never-healthy", "exits-at-start"])
def test_a_proxy_that_fails_to_come_up_leaves_no_process_behind(fake, tmp_path, failure):
    if failure == "never-healthy":  # it serves, but on another port than the one polled
        server = ProxyProcess(fake.url, tmp_path, LLM_PROXY_BIND=f"127.0.0.1:{free_port()}")
        expected, timeout = "did not come up", 4.0
    else:
        config = tmp_path / "bad.toml"
        config.write_text("[stream]\nheartbeet_interval = 1\n")  # an unknown key: no start
        server = ProxyProcess(fake.url, tmp_path, LLM_PROXY_CONFIG=str(config))
        expected, timeout = "exited", 20.0
    with pytest.raises(RuntimeError, match=expected):
        server.start(timeout=timeout)
    assert_group_ends(server.proc.pid)


def test_an_nginx_that_fails_to_come_up_leaves_no_process_behind(tmp_path):
    nginx = NginxProcess(tmp_path, "127.0.0.1:9")
    # it serves, but on another port than the one polled
    (tmp_path / "site.conf").write_text(render_site(free_port(), "127.0.0.1:9"))
    with pytest.raises(RuntimeError, match="did not come up"):
        nginx.start(timeout=2.0)
    assert_group_ends(nginx.proc.pid)


def test_without_nginx_the_nginx_tests_fail_naming_the_package_the_readme_installs(tmp_path,
                                                                                   monkeypatch):
    monkeypatch.setattr(nginx_module, "NGINX", str(tmp_path / "no-nginx-here"))
    with pytest.raises(pytest.fail.Exception, match=f"install it: {INSTALL_NGINX}"):
        NginxProcess(tmp_path, "127.0.0.1:9").start()
    assert INSTALL_NGINX in (ROOT / "README.md").read_text(), "README.md's test command installs nginx"


# ---------------------------------------------------------------------------
# Proxy variables
# ---------------------------------------------------------------------------

def test_proxy_variables_in_the_environment_reach_no_server(start_proxy, fake, monkeypatch):
    """With every proxy variable pointing at a closed port, the proxy still reaches the fake
    upstream (its environment leaves them out) and a local session still reaches the proxy."""
    for name in PROXY_VARIABLES:
        if not name.lower().startswith("no_"):
            monkeypatch.setenv(name, "http://127.0.0.1:9")
    server = start_proxy()
    assert not set(PROXY_VARIABLES) & set(server.env)
    with local_session() as session:
        r = session.post(server.url + "/v1/messages", timeout=10,
                         json={"model": "claude-x", "max_tokens": 5, "messages": []})
    assert r.status_code == 200, r.text
    assert [req.path for req in fake.requests] == ["/v1/messages"]
