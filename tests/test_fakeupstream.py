"""Tests for the scripted fake upstream, over real loopback sockets."""

import gzip
import json
import socket
import threading
import time
import zlib

import pytest
import requests

from support.builders import (ANTHROPIC_START_OUTPUT_TOKENS, ANTHROPIC_TEXT, ANTHROPIC_TOOL,
                              CHAT_TEXT, CHAT_TOOL, DEFAULT_ANTHROPIC_MODEL, DEFAULT_COUNT_TOKENS,
                              DEFAULT_MODELS, DEFAULT_TEXT, DEFAULT_TEXT_PIECES, DEFAULT_TOOL_INPUT,
                              DEFAULT_TOTAL_INPUT, DEFAULT_USAGE, RESPONSES_TEXT, RESPONSES_TOOL,
                              anthropic_error_event, anthropic_message, anthropic_stream,
                              anthropic_usage, chat_error_event, chat_stream, chat_usage,
                              responses_error_event, responses_stream, responses_usage, sse)
from support.fake import FakeUpstream, Headers
from support.processes import ROOT, local_session
from support.rawhttp import exchange
from support.sse import parse, split
from support.steps import (Cut, End, Raw, Reset, Send, SendGzip, Sleep, Stall, Status, Trickle,
                           WaitFor, json_reply, sse_reply)

TIMEOUT = 5


@pytest.fixture
def fake():
    with FakeUpstream() as server:
        yield server


@pytest.fixture
def session():
    # Streaming needs a Session: module-level requests.get(stream=True) closes its
    # temporary Session on return, and with it the connection still being read.
    with local_session() as s:
        yield s


def json_events(data):
    return [(e.name, json.loads(e.data)) for e in parse(data) if e.data != "[DONE]"]


# -- default replies -------------------------------------------------------------------

def test_the_default_anthropic_json_answer_carries_the_default_text_and_usage(fake):
    r = requests.post(fake.url + "/v1/messages", json={"model": "claude-x", "max_tokens": 5,
                                                       "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200 and r.headers["content-length"] == str(len(r.content))
    body = r.json()
    assert body["model"] == "claude-x"
    assert body["content"] == [{"type": "text", "text": DEFAULT_TEXT}]
    assert body["usage"]["input_tokens"] == DEFAULT_USAGE["input"] == 25
    assert body["usage"]["cache_read_input_tokens"] == DEFAULT_USAGE["cache_read"]
    assert body["usage"]["cache_creation_input_tokens"] == DEFAULT_USAGE["cache_write"]
    assert body["usage"]["output_tokens"] == DEFAULT_USAGE["output"] == 15
    assert "request-id" in r.headers


def test_the_default_anthropic_stream_carries_the_default_text_and_usage(fake):
    r = requests.post(fake.url + "/v1/messages", json={"model": "claude-x", "stream": True, "messages": []})
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["transfer-encoding"] == "chunked"
    events = json_events(r.content)
    names = [n for n, _ in events]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    assert all(n == obj["type"] for n, obj in events)
    start = events[0][1]["message"]
    assert start["model"] == "claude-x"
    assert start["usage"] == anthropic_usage(start=True)
    assert start["usage"]["output_tokens"] == ANTHROPIC_START_OUTPUT_TOKENS
    text = "".join(o["delta"]["text"] for n, o in events if n == "content_block_delta")
    assert text == DEFAULT_TEXT and "🌍" in text
    assert events[-2][1]["usage"] == {"output_tokens": 15}
    assert events[-2][1]["delta"]["stop_reason"] == "end_turn"


def test_an_anthropic_request_with_tools_gets_a_tool_use_of_its_first_tool(fake):
    tools = [{"name": "lookup", "input_schema": {"type": "object"}}]
    r = requests.post(fake.url + "/v1/messages", json={"model": "m", "stream": True, "tools": tools})
    events = json_events(r.content)
    starts = [o["content_block"] for n, o in events if n == "content_block_start"]
    assert [b["type"] for b in starts] == ["tool_use"] and starts[0]["name"] == "lookup"
    args = "".join(o["delta"]["partial_json"] for n, o in events if n == "content_block_delta")
    assert json.loads(args) == DEFAULT_TOOL_INPUT
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"

    body = requests.post(fake.url + "/v1/messages", json={"model": "m", "tools": tools}).json()
    assert body["content"][0]["type"] == "tool_use" and body["stop_reason"] == "tool_use"


def test_count_tokens_models_and_unknown_paths_get_their_default_answers(fake):
    r = requests.post(fake.url + "/v1/messages/count_tokens", json={"model": "m", "messages": []})
    assert r.json() == {"input_tokens": DEFAULT_COUNT_TOKENS}
    models = requests.get(fake.url + "/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == list(DEFAULT_MODELS)
    assert all(m["object"] == "model" for m in models["data"])
    body = requests.post(fake.url + "/v1/messages", json={"messages": []}).json()
    assert body["model"] == DEFAULT_ANTHROPIC_MODEL  # no model in the request
    r = requests.post(fake.url + "/v1/nope?x=1", json={})
    assert r.status_code == 404 and r.json()["error"]["message"]
    assert fake.requests[-1].path == "/v1/nope?x=1" and fake.requests[-1].route == "/v1/nope"


def test_chat_default_json_and_stream_usage_only_when_asked(fake):
    body = requests.post(fake.url + "/v1/chat/completions", json={"model": "gpt-x", "messages": []}).json()
    assert body["model"] == "gpt-x" and body["choices"][0]["message"]["content"] == DEFAULT_TEXT
    assert body["usage"] == chat_usage() and body["usage"]["prompt_tokens"] == DEFAULT_TOTAL_INPUT

    url = fake.url + "/v1/chat/completions"
    plain = requests.post(url, json={"model": "gpt-x", "stream": True}).content
    assert plain.endswith(b"data: [DONE]\n\n")
    chunks = [o for _, o in json_events(plain)]
    assert all("usage" not in c and c["choices"] for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == DEFAULT_TEXT

    with_usage = requests.post(url, json={"model": "gpt-x", "stream": True,
                                          "stream_options": {"include_usage": True}}).content
    chunks = [o for _, o in json_events(with_usage)]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 55
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"


def test_a_chat_request_with_tools_gets_a_call_of_its_first_tool(fake):
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]
    chunks = [o for _, o in json_events(requests.post(
        fake.url + "/v1/chat/completions", json={"model": "m", "stream": True, "tools": tools}).content)]
    calls = [tc for c in chunks for tc in c["choices"][0]["delta"].get("tool_calls", [])]
    assert calls[0]["function"]["name"] == "lookup" and calls[0]["id"]
    assert json.loads("".join(tc["function"]["arguments"] for tc in calls)) == DEFAULT_TOOL_INPUT
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    body = requests.post(fake.url + "/v1/chat/completions", json={"model": "m", "tools": tools}).json()
    assert body["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "lookup"


def test_the_default_responses_answers_carry_the_default_text_and_usage(fake):
    url = fake.url + "/v1/responses"
    body = requests.post(url, json={"model": "gpt-r", "input": "hi"}).json()
    assert body["model"] == "gpt-r" and body["usage"] == responses_usage()
    assert body["output"][0]["content"][0]["text"] == DEFAULT_TEXT

    events = json_events(requests.post(url, json={"model": "gpt-r", "stream": True}).content)
    assert [o["sequence_number"] for _, o in events] == list(range(len(events)))
    assert all(n == o["type"] for n, o in events)
    assert events[0][0] == "response.created" and events[-1][0] == "response.completed"
    text = "".join(o["delta"] for n, o in events if n == "response.output_text.delta")
    assert text == DEFAULT_TEXT
    final = events[-1][1]["response"]
    assert final["model"] == "gpt-r" and final["usage"]["total_tokens"] == 55

    tools = [{"type": "function", "name": "lookup", "parameters": {}}]
    events = json_events(requests.post(url, json={"model": "m", "stream": True, "tools": tools}).content)
    item = events[-1][1]["response"]["output"][0]
    assert item["type"] == "function_call" and item["name"] == "lookup"
    assert json.loads(item["arguments"]) == DEFAULT_TOOL_INPUT


def test_invalid_json_body_is_400(fake):
    r = requests.post(fake.url + "/v1/chat/completions", data=b"{not json")
    assert r.status_code == 400
    assert fake.requests[0].json is None and fake.requests[0].body == b"{not json"


# -- connections and request bodies ----------------------------------------------------

def test_keep_alive_reuses_one_connection(fake):
    with local_session() as s:
        for _ in range(3):
            assert s.post(fake.url + "/v1/messages", json={"model": "m", "stream": True}).ok
            assert s.get(fake.url + "/v1/models").ok
    reqs = fake.wait_for_requests(6)
    assert fake.connection_count == 1
    assert {r.connection_id for r in reqs} == {1}
    assert [r.index for r in reqs] == [1, 2, 3, 4, 5, 6]
    assert all(r.outcome == "end" for r in reqs)


def test_a_chunked_request_body_and_its_headers_are_recorded(fake):
    payload = json.dumps({"model": "m", "messages": [{"role": "user", "content": "héllo"}]}).encode()

    def gen():
        yield payload[:7]
        yield payload[7:]

    r = requests.post(fake.url + "/v1/chat/completions?a=b", data=gen(), headers={"X-Custom": "v"})
    assert r.ok
    [req] = fake.wait_for_requests(1)
    assert req.chunked and req.body == payload and req.json["model"] == "m"
    assert req.method == "POST" and req.path == "/v1/chat/completions?a=b" and req.query == "a=b"
    assert req.headers["x-custom"] == req.headers["X-CUSTOM"] == "v" and "X-Custom" in req.headers
    assert ("X-Custom", "v") in req.headers.raw
    assert req.received_at <= time.monotonic()


def test_raw_chunked_request_with_extension_and_trailer(fake):
    out = exchange(fake.port, b"POST /v1/messages/count_tokens HTTP/1.1\r\nHost: x\r\n"
                            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                            b"4;ext=1\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\nTrailer: t\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200 OK\r\n") and out.endswith(b'{"input_tokens":42}')
    assert fake.requests[0].body == b'{"a":1}'


def test_headers_class_joins_repeats():
    h = Headers([("A", "1"), ("a", "2"), ("B", "3")])
    assert h["a"] == "1, 2" and h.get_all("A") == ["1", "2"] and h.get("b") == "3" and "A" in h


# -- script selection --------------------------------------------------------------------

def test_named_then_queue_then_default(fake):
    fake.named["boom"] = json_reply({"named": True}, status=503)
    fake.named["echo"] = lambda req: json_reply({"echo": req.json["model"]})
    fake.named["fallback"] = lambda req: None  # None -> the default reply
    fake.enqueue(json_reply({"n": 1}), json_reply({"n": 2}))
    url = fake.url + "/v1/chat/completions"
    assert requests.post(url, json={"model": "m"}).json() == {"n": 1}
    r = requests.post(url, json={"model": "m"}, headers={"x-fake-script": "boom"})
    assert r.status_code == 503 and r.json() == {"named": True}
    assert requests.post(url, json={"model": "z"}, headers={"x-fake-script": "echo"}).json() == {"echo": "z"}
    assert requests.post(url, json={"model": "m"}).json() == {"n": 2}
    assert requests.post(url, json={"model": "m"}, headers={"x-fake-script": "fallback"}).json()["choices"]
    assert requests.post(url, json={"model": "m"}).json()["object"] == "chat.completion"
    assert requests.post(url, json={}, headers={"x-fake-script": "missing"}).status_code == 500
    assert [r.script_source for r in fake.requests] == [
        "queue", "named:boom", "named:echo", "queue", "named:fallback", "default", "named:missing"]
    assert fake.pending == 0 and fake.errors


def test_reset_clears_everything(fake):
    fake.enqueue(json_reply({}))
    fake.named["x"] = json_reply({})
    requests.get(fake.url + "/v1/models")
    fake.reset()
    assert fake.requests == [] and fake.named == {} and fake.pending == 0


def test_wait_for_requests_times_out(fake):
    with pytest.raises(TimeoutError):
        fake.wait_for_requests(1, timeout=0.05)


def test_wait_for_requests_wakes_on_arrival(fake):
    result = {}
    waiter = threading.Thread(target=lambda: result.update(reqs=fake.wait_for_requests(2, TIMEOUT)))
    waiter.start()
    requests.get(fake.url + "/v1/models")
    requests.get(fake.url + "/v1/models")
    waiter.join(TIMEOUT)
    assert len(result["reqs"]) == 2


# -- steps ---------------------------------------------------------------------------

def test_trickle_arrives_in_pieces(fake, session):
    fake.enqueue([Status(), Trickle(b"abcdef", size=2, delay=0.05)])
    with session.get(fake.url + "/x", stream=True) as r:
        pieces = list(r.iter_content(None))
    assert pieces == [b"ab", b"cd", b"ef"]


def test_trickle_framing_on_the_wire(fake):
    fake.enqueue([Status(headers={"X-A": "1"}), Trickle("é".encode(), size=1)])
    out = exchange(fake.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, body = out.split(b"\r\n\r\n", 1)
    assert b"Transfer-Encoding: chunked" in head and b"X-A: 1" in head
    assert b"Content-Type: text/event-stream" in head
    assert body == b"1\r\n\xc3\r\n1\r\n\xa9\r\n0\r\n\r\n"


def test_waitfor_gates_the_next_send(fake, session):
    gate = threading.Event()
    fake.enqueue([Status(), Send(b"first"), WaitFor(gate), Send(b"second")])
    with session.get(fake.url + "/x", stream=True) as r:
        it = r.iter_content(None)
        assert next(it) == b"first"
        gate.set()
        assert b"".join(it) == b"second"


def test_stall_records_peer_closed(fake, session):
    fake.enqueue(sse_reply([b"data: 1\n\n"])[:-1] + [Stall()])  # drop the End
    r = session.get(fake.url + "/x", stream=True, timeout=TIMEOUT)
    chunks = r.iter_content(None)  # keep it: a dropped generator closes the connection
    assert next(chunks) == b"data: 1\n\n"
    [req] = fake.wait_for_requests(1)
    assert not req.peer_closed.is_set()
    before = time.monotonic()
    r.close()
    assert req.peer_closed.wait(TIMEOUT)
    assert req.peer_closed_at >= before
    assert req.finished.wait(TIMEOUT) and req.outcome == "peer_closed"


def test_sleep_notices_hang_up_from_raw_socket(fake):
    fake.enqueue([Sleep(30)])
    sock = socket.create_connection((fake.host, fake.port))
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    [req] = fake.wait_for_requests(1)
    sock.close()
    assert req.peer_closed.wait(TIMEOUT) and req.finished.wait(TIMEOUT)


def test_write_failure_sets_peer_closed(fake, session):
    fake.enqueue([Status(), Trickle(b"x" * 200, size=1, delay=0.002)])
    r = session.get(fake.url + "/x", stream=True)
    chunks = r.iter_content(None)
    next(chunks)
    r.close()
    [req] = fake.wait_for_requests(1)
    assert req.peer_closed.wait(TIMEOUT) and req.outcome == "peer_closed"


def test_reset_gives_connection_error(fake):
    fake.enqueue([Reset()])
    with pytest.raises(requests.ConnectionError):
        requests.get(fake.url + "/x")
    [req] = fake.wait_for_requests(1)
    assert req.finished.wait(TIMEOUT) and req.outcome == "reset"


def test_a_reset_mid_body_is_a_client_side_error(fake):
    fake.enqueue([Status(), Send(b"data: 1\n\n"), Reset()])
    with pytest.raises((requests.exceptions.ChunkedEncodingError, requests.ConnectionError)):
        requests.get(fake.url + "/x").content


def test_cut_gives_truncated_body_error(fake):
    fake.enqueue([Status(), Send(b"partial"), Cut()])
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        requests.get(fake.url + "/x")
    out = exchange(fake.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 404")


def test_cut_short_content_length_body(fake):
    fake.enqueue([Status(body_mode="length", content_length=10), Send(b"short"), Cut()])
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        requests.get(fake.url + "/x")


def test_cut_before_headers_and_raw_garbage(fake):
    fake.enqueue([Cut()], [Raw(b"NOT HTTP\r\n\r\n"), Cut()])
    with pytest.raises(requests.ConnectionError):
        requests.get(fake.url + "/x")
    with pytest.raises(requests.ConnectionError):
        requests.get(fake.url + "/x")


def test_length_mode_computes_content_length_and_close_mode(fake):
    fake.enqueue([Status(body_mode="length"), Send(b"abc"), Trickle(b"de", size=1), End()],
                 [Status(201, body_mode="close", headers={"Content-Type": "text/plain"}), Send(b"xyz")])
    with local_session() as s:
        r = s.get(fake.url + "/x")
        assert r.headers["content-length"] == "5" and r.content == b"abcde"
        r = s.get(fake.url + "/x")
        assert r.status_code == 201 and r.content == b"xyz" and r.headers["content-type"] == "text/plain"
        assert r.headers["connection"] == "close"
    assert fake.connection_count == 1


def test_send_gzip_decodes_with_requests(fake):
    fake.enqueue([Status(headers={"Content-Encoding": "gzip"}), SendGzip([b"data: 1\n\n", "é🌍".encode()])])
    r = requests.get(fake.url + "/x")
    assert r.content == "data: 1\n\né🌍".encode()


def test_send_gzip_pieces_are_sync_flushed():
    step = SendGzip([b"hello ", b"world"])
    chunks = step.chunks()
    assert len(chunks) == 3
    d = zlib.decompressobj(wbits=31)
    assert d.decompress(chunks[0]) == b"hello "  # decodable before the next piece arrives
    assert d.decompress(chunks[1]) == b"world"
    assert gzip.decompress(b"".join(chunks)) == b"hello world"


def test_stop_is_prompt_with_stalled_connections():
    fake = FakeUpstream().start()
    fake.enqueue([Stall()], [Status(), Send(b"x"), Stall()], [WaitFor(threading.Event(), timeout=60)])
    socks = []
    for _ in range(3):
        s = socket.create_connection((fake.host, fake.port))
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        socks.append(s)
    reqs = fake.wait_for_requests(3)
    idle = socket.create_connection((fake.host, fake.port))  # keep-alive connection with no request
    started = time.monotonic()
    fake.stop()
    assert time.monotonic() - started < 2
    assert all(r.finished.is_set() and r.outcome == "stopped" for r in reqs)
    assert not any(r.peer_closed.is_set() for r in reqs)
    for s in socks + [idle]:
        s.close()
    with pytest.raises(OSError):
        socket.create_connection((fake.host, fake.port), timeout=1)


def test_a_script_without_end_is_ended_and_any_status_can_be_sent(fake):
    fake.enqueue([Send(b"x")], json_reply({"type": "error"}, status=529, headers={"retry-after": "1"}))
    r = requests.get(fake.url + "/x")
    assert r.status_code == 200 and r.content == b"x"
    r = requests.get(fake.url + "/x")
    assert r.status_code == 529 and r.headers["retry-after"] == "1"
    assert r.headers["content-type"] == "application/json"


def test_sse_reply_with_builders_round_trip(fake):
    fake.enqueue(sse_reply(anthropic_stream(["a"])[:2] + [anthropic_error_event()]))
    events = json_events(requests.post(fake.url + "/v1/messages", json={}).content)
    assert events[-1] == ("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})


# -- builders ------------------------------------------------------------------------

def test_sse_frames_json_text_and_multiline_data():
    assert sse({"a": "é"}) == '{"a":"é"}'.join(["data: ", "\n\n"]).encode()
    assert sse("x", event="e", newline="\r\n") == b"event: e\r\ndata: x\r\n\r\n"
    assert sse("a\nb") == b"data: a\ndata: b\n\n"


@pytest.mark.parametrize("builder", [
    lambda nl: anthropic_stream(newline=nl),
    lambda nl: anthropic_stream(["x"], tool={"name": "t"}, thinking="hm", newline=nl),
    lambda nl: chat_stream(newline=nl),
    lambda nl: chat_stream([], tool={"name": "t", "arguments": '{"a":1}'}, include_usage=False, newline=nl),
    lambda nl: responses_stream(newline=nl),
    lambda nl: responses_stream(["x"], tool={"name": "t"}, terminal="failed", newline=nl),
    lambda nl: [anthropic_error_event(newline=nl), chat_error_event(newline=nl),
                responses_error_event(newline=nl)],
])
def test_crlf_builders_match_lf(builder):
    lf, crlf = b"".join(builder("\n")), b"".join(builder("\r\n"))
    assert b"\r" not in lf
    assert crlf.count(b"\n") == crlf.count(b"\r\n") and crlf.endswith(b"\r\n\r\n")
    assert parse(lf) == parse(crlf)


def test_builder_usage_overrides_and_terminals():
    events = json_events(b"".join(anthropic_stream(usage={"input": 7, "output": 3},
                                                   delta_usage={"output_tokens": 3, "input_tokens": 9})))
    assert events[0][1]["message"]["usage"]["input_tokens"] == 7
    assert events[-2][1]["usage"] == {"output_tokens": 3, "input_tokens": 9}
    assert anthropic_message(usage={"output": 3})["usage"]["output_tokens"] == 3
    assert json_events(b"".join(responses_stream(terminal="incomplete")))[-1][0] == "response.incomplete"
    assert json_events(b"".join(responses_stream(terminal=None)))[-1][0] == "response.output_item.done"
    assert not b"".join(chat_stream(done=False)).endswith(b"[DONE]\n\n")
    assert "".join(DEFAULT_TEXT_PIECES) == DEFAULT_TEXT
    assert len(DEFAULT_TEXT.encode()) > len(DEFAULT_TEXT)  # multi-byte UTF-8 on purpose
    with pytest.raises(ValueError):
        anthropic_usage({"inputs": 1})


# -- transcripts from protocols.md ----------------------------------------------------------

TRANSCRIPTS = {"ANTHROPIC_TEXT": ANTHROPIC_TEXT, "ANTHROPIC_TOOL": ANTHROPIC_TOOL,
               "CHAT_TEXT": CHAT_TEXT, "CHAT_TOOL": CHAT_TOOL,
               "RESPONSES_TEXT": RESPONSES_TEXT, "RESPONSES_TOOL": RESPONSES_TOOL}


@pytest.mark.parametrize("name", sorted(TRANSCRIPTS))
def test_transcripts_are_well_formed(name):
    data = TRANSCRIPTS[name]
    assert isinstance(data, bytes)
    assert data.endswith(b"}\n\n") or data.endswith(b"[DONE]\n\n")
    assert b"\n\n\n" not in data
    events = parse(data)
    assert len(events) == data.count(b"\n\n")
    for event, payload in events:
        if payload != "[DONE]":
            obj = json.loads(payload)
            assert event is None or event == obj["type"]
    if name.startswith("CHAT"):
        assert events[-1] == (None, "[DONE]")


PROTOCOLS_DOC = ROOT.parent / "shared" / "docs" / "protocols.md"  # beside the repository


def test_transcripts_match_protocols_doc():
    doc = PROTOCOLS_DOC
    if not doc.is_file():
        pytest.fail(f"protocols.md not found at {doc} (../shared/docs/protocols.md from the "
                    "repository root): the transcripts are checked against it")
    text = doc.read_text(encoding="utf-8")

    def block(heading):
        start = text.index("```\n", text.index(heading)) + 4
        return (text[start:text.index("\n```", start)] + "\n").encode()

    for heading, name in (("### 2.4", "ANTHROPIC_TEXT"), ("### 2.5", "ANTHROPIC_TOOL"),
                          ("### 3.2", "CHAT_TEXT"), ("### 3.3", "CHAT_TOOL"),
                          ("### 4.4", "RESPONSES_TEXT"), ("### 4.5", "RESPONSES_TOOL")):
        assert block(heading) == TRANSCRIPTS[name], name


def test_transcripts_serve_byte_exact(fake):
    fake.enqueue(sse_reply([CHAT_TEXT]), sse_reply(split(ANTHROPIC_TEXT)[0]))
    assert requests.post(fake.url + "/v1/chat/completions", json={}).content == CHAT_TEXT
    assert requests.post(fake.url + "/v1/messages", json={}).content == ANTHROPIC_TEXT

