"""Never pay twice for the same answer: replay of finished answers and joining of live ones.

Real gunicorn and one fake upstream that counts the calls it gets; the official SDKs read
replayed answers.  Each test sends its own prompt (`prompt()`), so answers kept by earlier
tests never match (the window is 10 s, the defaults').
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import sqlite3
import threading
import time

import anthropic
import httpx2
import openai
import pytest

from support.builders import (DEFAULT_USAGE, anthropic_error_event, anthropic_message,
                              anthropic_stream, chat_stream, responses_stream)
from support.fake import FakeUpstream
from support.processes import ProxyProcess
from support.rawhttp import RID, RawConnection, RawResponse
from support.sse import KEEPALIVE, parse
from support.steps import Cut, End, Send, Stall, Status, WaitFor, json_reply, sse_reply

SSE = {"Content-Type": "text/event-stream; charset=utf-8"}
DEDUP = "x-llm-proxy-dedup"
KEY = "sk-ant-dedup-test-key-0001"
# The API version is part of the key: the SDK is told to send the one the raw requests send.
VERSION = {"anthropic-version": "2023-06-01"}
OTHER_KEY = "sk-ant-dedup-test-key-0002"
_numbers = itertools.count(1)


def prompt(model: str = "claude-d", stream: bool = True, **extra) -> dict:
    """A request no other test sends (each answer kept for replay matches only its own)."""
    return {"model": model, "max_tokens": 64, "stream": stream,
            "messages": [{"role": "user", "content": f"question {next(_numbers)} {time.time()}"}],
            **extra}


def chat_prompt(model: str = "gpt-d", stream: bool = True, **extra) -> dict:
    body = prompt(model, stream, **extra)
    del body["max_tokens"]
    return body


def write_config(path, fake: FakeUpstream) -> None:
    path.write_text("\n".join([
        "[stream]", "idle_timeout = 3.0", "",
        "[retry]", "max_attempts = 1", "max_continuations = 0", "",
        '[prices."claude-d"]', "input = 3.0", "output = 15.0", "cache_read = 0.3", "cache_write = 3.75", "",
        "[providers.anthropic]", f'base_url = "{fake.url}"', "",
        "[providers.openai]", f'base_url = "{fake.url}"', "",
        '[routes."short-*"]', "replay_window = 0.5",
        'deployments = [{ provider = "anthropic", model = "claude-d", name = "short" }]', "",
        '[routes."join-*"]', "join_live = true",
        'deployments = [{ provider = "anthropic", model = "claude-d", name = "join" }]', "",
        '[routes."fjoin-*"]', "join_live = true", "max_attempts = 1",
        'deployments = [{ provider = "anthropic", model = "claude-d", name = "fjoin-1" },',
        '               { provider = "anthropic", model = "claude-d", name = "fjoin-2" }]', "",
        '[routes."cjoin-*"]', "join_live = true",
        'deployments = [{ provider = "openai", name = "cjoin" }]', "",
        '[routes."orphan-*"]', "orphan_grace = 5.0",
        'deployments = [{ provider = "anthropic", model = "claude-d", name = "orphan" }]', "",
        '[routes."off-*"]', "replay_window = 0",
        'deployments = [{ provider = "anthropic", model = "claude-d", name = "off" }]', ""]))


@pytest.fixture(scope="module")
def upstream():
    fake = FakeUpstream()
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def server(upstream, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dedup")
    write_config(tmp / "proxy.toml", upstream)
    proc = ProxyProcess(upstream.url, tmp, LLM_PROXY_CONFIG=str(tmp / "proxy.toml"),
                        LLM_PROXY_REPLAY_WINDOW="10", LLM_PROXY_IDLE_TIMEOUT="3").start()
    yield proc
    proc.stop()


@pytest.fixture(autouse=True)
def _fresh_upstream(upstream):
    upstream.reset()


def ant_headers(key: str = KEY, **extra) -> dict:
    return {"x-api-key": key, "anthropic-version": "2023-06-01", **extra}


def send(server, body: dict, path: str = "/v1/messages", headers: dict | None = None,
         timeout: float = 10) -> RawResponse:
    r = RawResponse(server.url, path, body, headers=ant_headers() if headers is None else headers,
                    timeout=timeout).read_head()
    r.read_all()
    return r


def events_of(body: bytes) -> bytes:
    """The body without the proxy's keepalive comments (they are not part of the answer)."""
    return body.replace(KEEPALIVE, b"")


def rich_stream() -> list[bytes]:
    """Thinking with its signature, text and usage: everything a replay must keep."""
    return anthropic_stream(["The answer", " is 42."], model="claude-d", thinking=["Let me ", "think."])


# -- replay of finished answers ----------------------------------------------------------
def test_a_duplicate_stream_within_the_window_is_replayed_byte_identical(server, upstream):
    upstream.enqueue(sse_reply(rich_stream()))
    body = prompt()
    first = send(server, body)
    second = send(server, body)
    assert first.status == second.status == 200
    assert (first.header(DEDUP), second.header(DEDUP)) == ("miss", "replay")
    assert events_of(second.body) == events_of(first.body) == b"".join(rich_stream())
    assert second.header("content-type").startswith("text/event-stream")
    assert len(upstream.requests) == 1
    kept = server.health()["dedup"]
    assert kept["kept_answers"] >= 1 and kept["kept_bytes"] >= len(events_of(first.body))
    paid, replayed = server.row(first.request_id), server.row(second.request_id)
    assert paid["end_reason"] == "complete" and paid["cost_usd"] > 0 and paid["paid_by"] is None
    assert replayed["end_reason"] == "replay" and replayed["paid_by"] == first.request_id
    assert replayed["cost_usd"] == 0 and replayed["attempts"] == 0
    assert replayed["saved_cost_usd"] == pytest.approx(paid["cost_usd"])
    for field in ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens"):
        assert replayed[field] == paid[field], field
    assert replayed["bytes_out"] == len(second.body)


def test_a_non_streaming_duplicate_of_a_stream_gets_the_json_body_the_sdk_parses(server, upstream):
    upstream.enqueue(sse_reply(rich_stream()))
    body = prompt()
    first = send(server, body)
    client = anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0, default_headers=VERSION,
                                 http_client=httpx2.Client(trust_env=False, timeout=10))
    raw = client.messages.with_raw_response.create(**dict(body, stream=False))
    message = raw.parse()
    assert raw.headers[DEDUP] == "replay"
    assert [b.type for b in message.content] == ["thinking", "text"]
    assert message.content[0].thinking == "Let me think."
    assert message.content[0].signature == "EqQBCgIYAhIMfakeSignature"
    assert message.content[1].text == "The answer is 42."
    assert message.stop_reason == "end_turn" and message.id == "msg_fake01"
    assert message.usage.output_tokens == DEFAULT_USAGE["output"]
    assert message.usage.cache_read_input_tokens == DEFAULT_USAGE["cache_read"]
    assert len(upstream.requests) == 1
    row = server.row(raw.headers[RID])
    assert (row["end_reason"], row["paid_by"], row["stream"]) == ("replay", first.request_id, 0)


def test_a_chat_stream_replayed_as_json_keeps_the_usage_its_client_never_asked_for(server, upstream):
    """The proxy asked for the usage chunk itself and kept it from the streaming client; the
    JSON body of a non-streaming duplicate still has the usage."""
    upstream.enqueue(sse_reply(chat_stream(["For", "ty-two."], model="gpt-d")))
    body = chat_prompt()
    first = send(server, body, "/v1/chat/completions", {"authorization": f"Bearer {KEY}"})
    assert b'"usage":{' not in first.body  # the client did not ask for it
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0,
                           http_client=httpx2.Client(trust_env=False, timeout=10))
    raw = client.chat.completions.with_raw_response.create(**dict(body, stream=False))
    completion = raw.parse()
    assert raw.headers[DEDUP] == "replay"
    assert completion.choices[0].message.content == "Forty-two."
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.completion_tokens == DEFAULT_USAGE["output"]
    assert completion.id == "chatcmpl-fake01" and completion.object == "chat.completion"
    assert len(upstream.requests) == 1


def test_a_json_answer_is_replayed_as_json(server, upstream):
    upstream.enqueue(json_reply(anthropic_message("Plain answer.", model="claude-d")))
    body = prompt(stream=False)
    first, second = send(server, body), send(server, body)
    assert (first.header(DEDUP), second.header(DEDUP)) == ("miss", "replay")
    assert second.json() == first.json() and second.json()["content"][0]["text"] == "Plain answer."
    assert second.header("content-type") == "application/json"
    assert len(upstream.requests) == 1


def test_key_order_and_whitespace_do_not_matter_but_every_other_field_does(server, upstream):
    upstream.enqueue(sse_reply(rich_stream()), sse_reply(rich_stream()))
    body = prompt()
    first = send(server, body)
    reordered = json.dumps(dict(reversed(list(body.items()))), indent=3).encode()
    assert send(server, reordered).header(DEDUP) == "replay"
    assert send(server, dict(body, temperature=0.5)).header(DEDUP) == "miss"
    assert len(upstream.requests) == 2
    assert first.header(DEDUP) == "miss"


@pytest.mark.parametrize("change", ["beta_header", "query"])
def test_headers_and_query_strings_that_change_the_answer_are_part_of_the_key(server, upstream, change):
    upstream.enqueue(sse_reply(rich_stream()), sse_reply(rich_stream()))
    body = prompt()
    send(server, body)
    if change == "beta_header":
        other = send(server, body, headers=ant_headers(**{"anthropic-beta": "context-1m-2025-08-07"}))
    else:
        other = send(server, body, path="/v1/messages?beta=true")
    assert other.header(DEDUP) == "miss" and len(upstream.requests) == 2


def test_different_keys_never_share_and_a_request_without_a_key_is_never_deduped(server, upstream):
    body = prompt()
    for _ in range(2):
        upstream.enqueue(sse_reply(rich_stream()))
    mine = send(server, body)
    theirs = send(server, body, headers=ant_headers(OTHER_KEY))
    assert (mine.header(DEDUP), theirs.header(DEDUP)) == ("miss", "miss")
    anonymous = prompt()
    upstream.enqueue(sse_reply(rich_stream()), sse_reply(rich_stream()))
    headers = {"anthropic-version": "2023-06-01"}
    assert [send(server, anonymous, headers=headers).header(DEDUP) for _ in range(2)] == ["off", "off"]
    assert len(upstream.requests) == 4


def test_every_credential_a_request_carries_is_part_of_its_scope(server, upstream):
    """Claude Code sends x-api-key and Authorization when both are set: requests that share
    one of them but not the other are different clients."""
    upstream.enqueue(sse_reply(rich_stream()), sse_reply(rich_stream()))
    body = prompt()
    first = send(server, body, headers=ant_headers(authorization="Bearer user-a-token"))
    other = send(server, body, headers=ant_headers(authorization="Bearer user-b-token"))
    same = send(server, body, headers=ant_headers(authorization="Bearer user-a-token"))
    assert [r.header(DEDUP) for r in (first, other, same)] == ["miss", "miss", "replay"]
    assert len(upstream.requests) == 2


@pytest.mark.parametrize("opt_out", [{"Cache-Control": "no-cache"}, {DEDUP: "off"},
                                     {"Pragma": "no-cache"}])
def test_a_client_can_opt_out_per_request(server, upstream, opt_out):
    upstream.enqueue(sse_reply(rich_stream()), sse_reply(rich_stream()))
    body = prompt()
    send(server, body)
    fresh = send(server, body, headers=ant_headers(**opt_out))
    assert fresh.header(DEDUP) == "off" and len(upstream.requests) == 2
    assert DEDUP not in upstream.requests[1].headers  # the proxy's own header stays here


def test_a_duplicate_after_the_window_goes_upstream(server, upstream):
    upstream.enqueue(sse_reply(rich_stream()), sse_reply(rich_stream()))
    body = prompt("short-model")  # its route keeps answers 0.5 s
    first = send(server, body)
    time.sleep(0.8)  # the window is the thing under test: it has to pass
    late = send(server, body)
    assert (first.header(DEDUP), late.header(DEDUP)) == ("miss", "miss")
    assert len(upstream.requests) == 2


def test_a_route_can_turn_replay_off(server, upstream):
    upstream.enqueue(sse_reply(rich_stream()), sse_reply(rich_stream()))
    body = prompt("off-model")
    assert [send(server, body).header(DEDUP) for _ in range(2)] == ["off", "off"]
    assert len(upstream.requests) == 2


@pytest.mark.parametrize("fault", ["cut", "stall", "error_event"])
def test_a_partial_answer_is_never_replayed(server, upstream, fault):
    head = rich_stream()[:6]
    ending = {"cut": [Cut()], "stall": [Stall()],
              "error_event": [Send(anthropic_error_event("overloaded_error", "Overloaded")), End()]}
    upstream.enqueue([Status(200, headers=SSE), *[Send(e) for e in head], *ending[fault]],
                     sse_reply(rich_stream()))
    body = prompt()
    broken = send(server, body)
    assert b"event: error" in broken.body and b"message_stop" not in broken.body
    retry = send(server, body)
    assert retry.header(DEDUP) == "miss" and b"message_stop" in retry.body
    assert len(upstream.requests) == 2
    assert server.row(broken.request_id)["end_reason"] != "complete"


def test_an_error_answer_is_never_replayed(server, upstream):
    error = {"type": "error", "error": {"type": "invalid_request_error", "message": "no"}}
    upstream.enqueue(json_reply(error, status=400), json_reply(error, status=400))
    body = prompt(stream=False)
    assert [send(server, body).status for _ in range(2)] == [400, 400]
    assert len(upstream.requests) == 2


# -- across the workers of one host -----------------------------------------------------------
def connection_to_other_worker(proc: ProxyProcess) -> tuple[RawConnection, RawConnection]:
    """Two kept-alive connections served by different workers: the second is opened while
    the first one's worker is stopped (SIGSTOP, for the moment it takes), so only the other
    worker can accept it."""
    def pid_of(conn: RawConnection) -> int:
        answer = RawResponse(proc.url, "/health", method="GET", conn=conn).read_head()
        answer.read_all()
        return answer.json()["pid"]

    here = RawConnection(proc.url)
    first = pid_of(here)
    os.kill(first, signal.SIGSTOP)
    try:
        there = RawConnection(proc.url)
        second = pid_of(there)
    finally:
        os.kill(first, signal.SIGCONT)
    assert second != first
    return here, there


def answer_kept(proc: ProxyProcess, paid_by: str, timeout: float = 5.0) -> None:
    """Until the paying request's answer is in the store (its worker's writer put it there)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with sqlite3.connect(proc.db_path) as db:
                if db.execute("SELECT 1 FROM dedup_answers WHERE paid_by = ?", (paid_by,)).fetchone():
                    return
        except sqlite3.OperationalError:
            pass  # the schema is being created
        time.sleep(0.02)  # another process's commit: there is no event to wait on
    raise AssertionError(f"the answer of {paid_by} was never stored")


def test_a_finished_answer_is_replayed_by_another_worker(upstream, tmp_path):
    proc = ProxyProcess(upstream.url, tmp_path, workers=2, threads=1,
                        LLM_PROXY_REPLAY_WINDOW="10").start()
    try:
        here, there = connection_to_other_worker(proc)
        upstream.enqueue(sse_reply(rich_stream()))
        body = prompt()
        first = RawResponse(proc.url, "/v1/messages", body, headers=ant_headers(), conn=here).read_head()
        first.read_all()
        answer_kept(proc, first.request_id)
        stream = RawResponse(proc.url, "/v1/messages", body, headers=ant_headers(), conn=there).read_head()
        stream.read_all()
        plain = RawResponse(proc.url, "/v1/messages", dict(body, stream=False), headers=ant_headers(),
                            conn=there).read_head()
        plain.read_all()
        assert (stream.header(DEDUP), plain.header(DEDUP)) == ("replay", "replay")
        assert events_of(stream.body) == events_of(first.body)
        assert plain.json()["content"][1]["text"] == "The answer is 42."
        assert len(upstream.requests) == 1
    finally:
        proc.stop()


# -- joining a live stream ---------------------------------------------------------------------
def held_stream(release: threading.Event, events: list[bytes] | None = None, head: int = 4,
                ending: list | None = None) -> list:
    """The first `head` events, then nothing until `release`, then the rest (or `ending`)."""
    events = events or rich_stream()
    return [Status(200, headers=SSE), *[Send(e) for e in events[:head]], WaitFor(release, 20),
            *(ending if ending is not None else [*[Send(e) for e in events[head:]], End()])]


def open_stream(server, body: dict, upto: bytes) -> RawResponse:
    """A stream read until `upto` arrived (keepalives aside)."""
    r = RawResponse(server.url, "/v1/messages", body, headers=ant_headers(), timeout=30).read_head()
    r.read_until(lambda got: events_of(got).startswith(upto), "the events so far")
    return r


def wait_for_log(server, text: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in server.log():
        assert time.monotonic() < deadline, f"the proxy never logged {text!r}"
        time.sleep(0.02)  # the log is another process's file: nothing to wait on


def test_ten_identical_live_streams_share_one_upstream_call(server, upstream):
    release = threading.Event()
    upstream.enqueue(held_stream(release))
    body = prompt("join-model")
    head = b"".join(rich_stream()[:4])
    first = open_stream(server, body, head)
    joined = [open_stream(server, body, head) for _ in range(9)]
    assert first.header(DEDUP) == "miss" and {r.header(DEDUP) for r in joined} == {"joined"}
    for r in (first, joined[-1]):  # the silence is kept alive for every client
        r.read_until(lambda got: got.endswith(KEEPALIVE), "a keepalive during the silence")
    release.set()
    for r in [first, *joined]:
        r.read_all()
        assert r.complete and events_of(r.body) == b"".join(rich_stream())
    assert len(upstream.requests) == 1
    paid = server.row(first.request_id)
    assert paid["end_reason"] == "complete" and paid["cost_usd"] > 0
    for r in joined:
        row = server.row(r.request_id)
        assert (row["end_reason"], row["paid_by"], row["cost_usd"]) == ("joined", first.request_id, 0)
        assert row["output_tokens"] == paid["output_tokens"]
        assert row["saved_cost_usd"] == pytest.approx(paid["cost_usd"])


def test_the_first_client_leaves_and_the_joined_ones_still_finish(server, upstream):
    release = threading.Event()
    upstream.enqueue(held_stream(release))
    body = prompt("join-model")
    head = b"".join(rich_stream()[:4])
    first = open_stream(server, body, head)
    others = [open_stream(server, body, head) for _ in range(2)]
    first.close()
    wait_for_log(server, f"request {first.request_id}: its client left")
    [call] = upstream.requests
    assert not call.peer_closed.is_set()  # the upstream goes on for the others
    release.set()
    for r in others:
        r.read_all()
        assert events_of(r.body) == b"".join(rich_stream())
    assert call.outcome == "end" and len(upstream.requests) == 1


def test_when_every_client_leaves_the_shared_upstream_is_shut_at_once(server, upstream):
    release = threading.Event()
    upstream.enqueue(held_stream(release))
    body = prompt("join-model")
    head = b"".join(rich_stream()[:4])
    clients = [open_stream(server, body, head) for _ in range(3)]
    [call] = upstream.requests
    for r in clients[:-1]:
        r.close()
    assert not call.peer_closed.wait(0.3), "the upstream was shut while a client remained"
    closed_at = time.monotonic()
    clients[-1].close()
    assert call.peer_closed.wait(2.0), "the upstream was never shut"
    print(f"\nlast client gone -> upstream shut after {(call.peer_closed_at - closed_at) * 1000:.1f} ms")
    assert call.peer_closed_at - closed_at < 0.25
    rows = [server.row(r.request_id) for r in clients]
    assert {row["end_reason"] for row in rows} == {"client_gone"}
    release.set()


@pytest.mark.parametrize("fault", ["error_event", "stall"])
def test_a_joined_client_of_a_failed_stream_gets_the_same_terminal_error(server, upstream, fault):
    release = threading.Event()
    error = anthropic_error_event("overloaded_error", "Overloaded")
    ending = [Send(error), End()] if fault == "error_event" else [Stall()]
    upstream.enqueue(held_stream(release, ending=ending))
    body = prompt("join-model")
    head = b"".join(rich_stream()[:4])
    first, joined = open_stream(server, body, head), open_stream(server, body, head)
    release.set()
    bodies = [events_of(r.read_all()) for r in (first, joined)]
    assert bodies[0] == bodies[1] and bodies[0].startswith(head)
    terminal = parse(bodies[0])[-1]
    assert terminal.name == "error" and b"message_stop" not in bodies[0]
    if fault == "error_event":
        assert bodies[0] == head + error
    else:
        assert "idle timeout" in terminal.json["error"]["message"]
    row = server.row(joined.request_id)
    reason = "upstream_error" if fault == "error_event" else "idle_timeout"
    assert row["end_reason"] == reason and row["cost_usd"] in (None, 0)
    retry = send(server, body)  # a failed answer is never kept
    assert retry.header(DEDUP) == "miss" and len(upstream.requests) == 2


def test_a_non_streaming_duplicate_of_a_live_stream_gets_the_whole_answer_as_json(server, upstream):
    release = threading.Event()
    events = chat_stream(["Live ", "answer."], model="gpt-d")
    upstream.enqueue(held_stream(release, events, head=2))
    body = chat_prompt("cjoin-model")
    headers = {"authorization": f"Bearer {KEY}"}
    first = RawResponse(server.url, "/v1/chat/completions", body, headers=headers, timeout=30).read_head()
    first.read_until(lambda got: b"Live " in got, "the first content")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0,
                           http_client=httpx2.Client(trust_env=False, timeout=30))
    result: dict = {}
    waiter = threading.Thread(target=lambda: result.update(raw=client.chat.completions.with_raw_response
                                                           .create(**dict(body, stream=False))))
    waiter.start()
    wait_for_log(server, f"joined the live call of {first.request_id}")
    release.set()
    waiter.join(10)
    completion = result["raw"].parse()
    assert result["raw"].headers[DEDUP] == "joined"
    assert completion.choices[0].message.content == "Live answer."
    assert completion.usage.prompt_tokens == 40 and completion.usage.completion_tokens == 15
    first.read_all()
    assert len(upstream.requests) == 1


def test_the_retry_pattern_joins_an_orphaned_call_during_its_grace(server, upstream):
    """Claude Code's pattern: a stream silent for long, the client gives up and asks again
    without streaming.  With orphan_grace the retry joins the first call."""
    release = threading.Event()
    upstream.enqueue(held_stream(release))
    body = prompt("orphan-model")
    first = open_stream(server, body, b"".join(rich_stream()[:4]))
    [call] = upstream.requests
    first.close()
    time.sleep(1.0)  # the retry comes a second later
    assert not call.peer_closed.is_set(), "the orphaned upstream was shut before its grace"
    client = anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0, default_headers=VERSION,
                                 http_client=httpx2.Client(trust_env=False, timeout=30))
    result: dict = {}
    waiter = threading.Thread(target=lambda: result.update(raw=client.messages.with_raw_response
                                                           .create(**dict(body, stream=False))))
    waiter.start()
    wait_for_log(server, f"joined the live call of {first.request_id}")
    release.set()
    waiter.join(10)
    message = result["raw"].parse()
    assert result["raw"].headers[DEDUP] == "joined"
    assert message.content[1].text == "The answer is 42." and message.content[0].signature
    assert len(upstream.requests) == 1
    paid = server.row(first.request_id)
    assert paid["end_reason"] == "complete" and paid["output_tokens"] == DEFAULT_USAGE["output"]
    joined = server.row(result["raw"].headers[RID])
    assert (joined["end_reason"], joined["paid_by"]) == ("joined", first.request_id)


def test_with_the_defaults_the_retry_pattern_makes_two_calls_and_shuts_the_first(server, upstream):
    release = threading.Event()
    upstream.enqueue(held_stream(release), json_reply(anthropic_message("Fresh.", model="claude-d")))
    body = prompt()  # the defaults: no orphan grace, no joining
    first = open_stream(server, body, b"".join(rich_stream()[:4]))
    [call] = upstream.requests
    closed_at = time.monotonic()
    first.close()
    assert call.peer_closed.wait(2.0)
    assert call.peer_closed_at - closed_at < 0.25
    retry = send(server, dict(body, stream=False))
    assert retry.header(DEDUP) == "miss" and retry.json()["content"][0]["text"] == "Fresh."
    assert len(upstream.requests) == 2
    release.set()


def test_a_joined_client_that_falls_too_far_behind_is_ended_without_stalling_the_others(server, upstream):
    """Each client of a shared stream has its own bounded queue: one that stops reading
    gets a terminal error once it is 4 MiB behind, and the others get everything."""
    head = rich_stream()[:2]
    deltas = [b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
              b'"delta":{"type":"thinking_delta","thinking":"' + bytes([97 + i]) * (3 << 20) + b'"}}\n\n'
              for i in range(6)]
    events = head + deltas + rich_stream()[-3:]
    release = threading.Event()
    upstream.enqueue(held_stream(release, events, head=2))
    body = prompt("join-model")
    fast = open_stream(server, body, b"".join(head))
    slow = open_stream(server, body, b"".join(head))  # and then it stops reading
    release.set()
    assert events_of(fast.read_all()) == b"".join(events)
    got = slow.read_all()
    assert b"message_stop" not in got and got.rstrip().endswith(b"}")
    error = parse(got.replace(KEEPALIVE, b""), complete=True)[-1]
    assert error.name == "error" and "too far behind" in error.json["error"]["message"]
    assert server.row(slow.request_id)["end_reason"] == "client_gone"
    assert server.row(fast.request_id)["end_reason"] == "complete"
    assert len(upstream.requests) == 1


def test_a_stream_already_further_along_than_a_client_may_fall_behind_is_not_joined(server, upstream):
    """Joining hands the events so far to the new client at once; past 4 MiB of them it
    would start out too far behind, so it makes its own call instead."""
    big = [b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
           b'"delta":{"type":"thinking_delta","thinking":"' + bytes([97 + i]) * (3 << 20) + b'"}}\n\n'
           for i in range(2)]
    events = rich_stream()[:2] + big + rich_stream()[-3:]
    release = threading.Event()
    upstream.enqueue(held_stream(release, events, head=4), sse_reply(rich_stream()))
    body = prompt("join-model")
    first = open_stream(server, body, b"".join(events[:4]))
    late = send(server, body)
    assert late.header(DEDUP) == "miss" and events_of(late.body) == b"".join(rich_stream())
    release.set()
    assert events_of(first.read_all()) == b"".join(events)
    assert len(upstream.requests) == 2


def test_a_client_that_joined_before_content_gets_the_invisible_fallback_too(server, upstream):
    """The first deployment fails before any content while a second client waits on the
    call: both get the answer of the next deployment, as the first client alone would."""
    release = threading.Event()
    start = rich_stream()[0]
    upstream.enqueue([Status(200, headers=SSE), Send(start), WaitFor(release, 20), Cut()],
                     sse_reply(rich_stream()))
    body = prompt("fjoin-model")
    first = RawResponse(server.url, "/v1/messages", body, headers=ant_headers(), timeout=30)
    [call] = upstream.wait_for_requests(1)
    joined = RawResponse(server.url, "/v1/messages", body, headers=ant_headers(), timeout=30)
    wait_for_log(server, f"joined the live call of {call.headers[RID]}")
    release.set()
    for r in (first, joined):
        r.read_head()
        assert events_of(r.read_all()) == b"".join(rich_stream())
    assert joined.header(DEDUP) == "joined"
    assert len(upstream.requests) == 2  # the failed try and the fallback: none for the joiner
    assert server.row(joined.request_id)["deployment"] == "fjoin-2"


def test_on_sigterm_a_joined_client_ends_as_the_first_one_does(upstream, tmp_path):
    proc = ProxyProcess(upstream.url, tmp_path, LLM_PROXY_JOIN_LIVE="true",
                        LLM_PROXY_SHUTDOWN_GRACE="0.2").start()
    try:
        release = threading.Event()
        upstream.enqueue(held_stream(release))
        body = prompt()
        head = b"".join(rich_stream()[:4])
        first, joined = open_stream(proc, body, head), open_stream(proc, body, head)
        assert joined.header(DEDUP) == "joined"
        proc.signal(signal.SIGTERM)
        bodies = [events_of(r.read_all()) for r in (first, joined)]
        for got in bodies:
            terminal = parse(got)[-1]
            assert terminal.name == "error" and terminal.json["error"]["type"] == "overloaded_error"
        proc.proc.wait(timeout=20)  # each worker stores its rows before it exits
        assert {r["end_reason"] for r in proc.rows()} == {"shutdown"}
    finally:
        release.set()
        proc.stop()


@pytest.mark.parametrize("commit", ["before_commit", "after_commit"])
def test_a_shareable_stream_whose_client_hangs_up_before_any_header_is_shut_at_once(server, upstream,
                                                                                    commit):
    """A stream others may join has no client of its own upstream: the last client's
    hang-up still shuts the upstream within 250 ms, before any answer too."""
    upstream.enqueue([Stall()])
    r = RawResponse(server.url, "/v1/messages", prompt("join-model"), headers=ant_headers(), timeout=10)
    [call] = upstream.wait_for_requests(1)
    if commit == "after_commit":
        r.read_head()  # 200 went out while the upstream's headers are pending
    closed_at = time.monotonic()
    r.close()
    assert call.peer_closed.wait(2.0), "the upstream was never shut"
    assert call.peer_closed_at - closed_at < 0.25
    assert server.row(call.headers[RID])["end_reason"] == "client_gone"


def test_joined_responses_streams_get_the_same_events_and_sequence_numbers(server, upstream):
    release = threading.Event()
    events = responses_stream(["Shared ", "answer."], model="gpt-d")
    upstream.enqueue(held_stream(release, events, head=5))
    body = {"model": "cjoin-model", "input": f"question {next(_numbers)}", "stream": True}
    headers = {"authorization": f"Bearer {KEY}"}
    opened = []
    for _ in range(2):
        r = RawResponse(server.url, "/v1/responses", body, headers=headers, timeout=30).read_head()
        r.read_until(lambda got: events_of(got).startswith(b"".join(events[:5])), "the events so far")
        opened.append(r)
    release.set()
    bodies = [events_of(r.read_all()) for r in opened]
    assert bodies[0] == bodies[1] == b"".join(events)
    assert [r.header(DEDUP) for r in opened] == ["miss", "joined"]
    assert len(upstream.requests) == 1


def test_a_non_streaming_joiner_of_a_failed_stream_gets_an_error_and_its_row_says_so(server, upstream):
    release = threading.Event()
    upstream.enqueue(held_stream(release, ending=[Cut()]))
    body = prompt("join-model")
    first = open_stream(server, body, b"".join(rich_stream()[:4]))
    result: dict = {}
    waiter = threading.Thread(target=lambda: result.update(r=send(server, dict(body, stream=False),
                                                                  timeout=30)))
    waiter.start()
    wait_for_log(server, f"joined the live call of {first.request_id}")
    release.set()
    waiter.join(10)
    joined = result["r"]
    assert joined.status == 502 and joined.header(DEDUP) == "joined"
    assert joined.json()["type"] == "error"
    row = server.row(joined.request_id)
    assert row["status"] == 502 and row["end_reason"] != "joined" and row["cost_usd"] in (None, 0)
    assert len(upstream.requests) == 1
