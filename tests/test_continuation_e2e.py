"""Answers that survive a broken upstream: a stream that breaks after content is continued
(an assistant prefill of the text the client has) and stitched into the same response.

Real gunicorn and one fake upstream; the official SDKs read the answers.  Each fault breaks
the first call after "The quick brown fox "; the continuation call answers the rest, as a
model would, from the trimmed prefill "The quick brown fox": " jumps over the lazy dog.".
The client must see the whole sentence, each word once, in one valid answer.
"""

from __future__ import annotations

import json

import anthropic
import httpx2
import openai
import pytest
import requests

from support.builders import (DEFAULT_USAGE, anthropic_error_body, anthropic_error_event,
                              anthropic_stream, chat_error_event, chat_stream, responses_error_event,
                              responses_stream, sse)
from support.fake import FakeUpstream
from support.processes import ProxyProcess
from support.rawhttp import RID
from support.sse import KEEPALIVE
from support.steps import Cut, End, Send, Sleep, Stall, Status, json_reply, sse_reply

SENTENCE = "The quick brown fox jumps over the lazy dog."
FIRST = ["The quick ", "brown fox "]  # what the client has when the first call breaks
REST = [" jumps over", " the lazy dog."]  # the continuation, from the trimmed prefill
PREFILL = "The quick brown fox"
IDLE_TIMEOUT = 1.0
SSE = {"Content-Type": "text/event-stream; charset=utf-8"}
MALFORMED_ANTHROPIC = b'event: content_block_delta\ndata: {"type":"content_block_delta", not json\n\n'
MALFORMED_CHAT = b'data: {"choices": [ not json\n\n'
MESSAGES = [{"role": "user", "content": "Say the sentence."}]


def write_config(path, fake: FakeUpstream) -> None:
    path.write_text("\n".join([
        "[stream]", f"idle_timeout = {IDLE_TIMEOUT}", "",
        "[retry]", "max_attempts = 2", "backoff_base = 0.01", "",
        "[breaker]", "failure_threshold = 1000", "min_requests = 1000", "",
        '[prices."claude-c"]', "input = 3.0", "output = 15.0", "cache_read = 0.3", "cache_write = 3.75", "",
        '[prices."local-c"]', "input = 1.0", "output = 2.0", "",
        "[providers.claude]", f'base_url = "{fake.url}"', 'format = "anthropic"', "",
        "[providers.local]", f'base_url = "{fake.url}"', 'format = "openai"',
        "prefill_params = { continue_final_message = true, add_generation_prompt = false }", "",
        "[providers.stubborn]", f'base_url = "{fake.url}"', 'format = "anthropic"',
        "continuation = false", "",
        '[routes."cont-claude"]', 'deployments = [{ provider = "claude", model = "claude-c", name = "claude-c" }]', "",
        '[routes."cont-local"]', 'deployments = [{ provider = "local", model = "local-c", name = "local-c" }]', "",
        '[routes."cont-three"]', "max_attempts = 4",
        'deployments = [{ provider = "claude", model = "claude-c", name = "claude-three" }]', "",
        '[routes."cont-next"]', "max_attempts = 1",
        'deployments = [{ provider = "claude", model = "claude-c", name = "first" },',
        '               { provider = "claude", model = "claude-c", name = "second" }]', "",
        '[routes."cont-stubborn"]',
        'deployments = [{ provider = "stubborn", model = "claude-c", name = "stubborn" }]', "",
        '[routes."cont-across"]', "max_attempts = 1",
        'deployments = [{ provider = "claude", model = "claude-c", name = "claude-across" },',
        '               { provider = "local", model = "local-c", name = "local-across" }]', "",
        "[providers.stubchat]", f'base_url = "{fake.url}"', 'format = "openai"', "continuation = false", "",
        '[routes."cont-unpriced"]', 'deployments = [{ provider = "claude", model = "nope-c", name = "unpriced" }]', "",
        '[routes."cont-one"]', "max_attempts = 1",
        'deployments = [{ provider = "claude", model = "claude-c", name = "one" }]', "",
        '[routes."cont-stubchat"]', 'deployments = [{ provider = "stubchat", model = "local-c", name = "stubchat" }]', "",
        '[routes."cont-nomodel"]', 'deployments = [{ provider = "claude", name = "nomodel" }]', "",
        '[routes."cont-after-stubborn"]',
        'deployments = [{ provider = "stubborn", model = "claude-c", name = "s1" },',
        '               { provider = "claude", model = "claude-c", name = "c2" }]', "",
        '[routes."cont-untranslatable"]', "max_attempts = 1",
        'deployments = [{ provider = "local", model = "local-c", name = "local-u" },',
        '               { provider = "claude", model = "claude-c", name = "claude-u" }]', "",
        '[routes."cont-deployment-off"]',
        'deployments = [{ provider = "claude", model = "claude-c", name = "dep-off", continuation = false }]', "",
        '[routes."cont-deployment-params"]',
        'deployments = [{ provider = "local", model = "local-c", name = "dep-params", '
        "prefill_params = { continue_final_message = true } }]", ""]))


@pytest.fixture(scope="module")
def upstream():
    fake = FakeUpstream()
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def server(upstream, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("continuation")
    write_config(tmp / "proxy.toml", upstream)
    proc = ProxyProcess(upstream.url, tmp, LLM_PROXY_CONFIG=str(tmp / "proxy.toml"),
                        LLM_PROXY_IDLE_TIMEOUT=str(IDLE_TIMEOUT)).start()
    yield proc
    proc.stop()


@pytest.fixture(autouse=True)
def _fresh_upstream(upstream):
    upstream.reset()


@pytest.fixture
def wire():
    headers: list = []
    client = httpx2.Client(timeout=httpx2.Timeout(30.0, connect=5.0), trust_env=False,
                           event_hooks={"response": [lambda r: headers.append(r.headers)]})
    client.headers_seen = headers
    yield client
    client.close()


@pytest.fixture
def ant(server, wire):
    return anthropic.Anthropic(base_url=server.url, api_key="sk-ant-test", max_retries=0, http_client=wire)


@pytest.fixture
def oai(server, wire):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="sk-test", max_retries=0, http_client=wire)


# -- the upstream's scripts -------------------------------------------------------------------
def broken(events: list[bytes], fault: str, malformed: bytes, error_event: bytes) -> list:
    """`events`, then the fault."""
    steps = [Status(200, headers=SSE), *[Send(e) for e in events]]
    return steps + {"cut": [Cut()], "stall": [Stall()], "malformed": [Send(malformed), Stall()],
                    "error_event": [Send(error_event), End()]}[fault]


def anthropic_first(fault: str, pieces=FIRST) -> list:
    return broken(anthropic_stream(pieces, model="claude-c")[:3 + len(pieces)], fault,
                  MALFORMED_ANTHROPIC, anthropic_error_event("overloaded_error", "Overloaded"))


def chat_first(fault: str, pieces=FIRST) -> list:
    return broken(chat_stream(pieces, model="local-c")[:1 + len(pieces)], fault, MALFORMED_CHAT,
                  chat_error_event("The server had an error", type="server_error"))


def responses_first(fault: str, pieces=FIRST) -> list:
    """created, in_progress, the message item and its part, the deltas; then the fault."""
    events = responses_stream(pieces, model="local-c", response_id="resp_first")[:4 + len(pieces)]
    error = responses_error_event("server_error", "The server had an error",
                                  sequence_number=4 + len(pieces))
    return broken(events, fault, b'event: response.output_text.delta\ndata: {"type": not json\n\n', error)


def responses_rest(pieces=REST) -> list:
    return sse_reply(responses_stream(pieces, model="local-c", response_id="resp_second"))


def anthropic_rest(pieces=REST) -> list:
    return sse_reply(anthropic_stream(pieces, model="claude-c", message_id="msg_second"))


def chat_rest(pieces=REST) -> list:
    return sse_reply(chat_stream(pieces, model="local-c", completion_id="chatcmpl-second"))


def last_message(request) -> dict:
    return request.json["messages"][-1]


FAULTS = ["cut", "stall", "malformed", "error_event"]


# -- each client format, each fault --------------------------------------------------------------
@pytest.mark.parametrize("fault", FAULTS)
def test_an_anthropic_stream_broken_mid_answer_is_continued_into_one_answer(ant, upstream, server, wire,
                                                                             fault):
    upstream.enqueue(anthropic_first(fault), anthropic_rest())
    with ant.messages.stream(model="cont-claude", max_tokens=64, messages=MESSAGES) as stream:
        events = [event.type for event in stream]
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["text"] and final.content[0].text == SENTENCE
    assert events.count("message_start") == 1 and events.count("content_block_start") == 1
    assert events[-1] == "message_stop" and "error" not in events
    assert final.stop_reason == "end_turn" and final.id == "msg_fake01"  # the first call's message
    assert final.usage.output_tokens == 5 + DEFAULT_USAGE["output"]  # 20 characters delivered, then the rest
    assert final.usage.input_tokens == DEFAULT_USAGE["input"]  # the prompt as first sent
    assert len(upstream.requests) == 2
    assert last_message(upstream.requests[1]) == {"role": "assistant", "content": PREFILL}
    assert upstream.requests[1].json["messages"][:-1] == MESSAGES
    row = server.row(wire.headers_seen[-1][RID])
    assert (row["end_reason"], row["continuations"], row["attempts"]) == ("complete", 1, 2), row
    assert row["output_tokens"] == 5 + DEFAULT_USAGE["output"]
    assert row["input_tokens"] == 2 * DEFAULT_USAGE["input"]  # the prompt went up twice
    # Each call priced for itself ($3 / $15 / $0.30 / $3.75 per million): the broken one with
    # the output the client got (5 tokens), the continuation with its own; and apart, what
    # sending the prompt again cost.
    first = (25 * 3 + 5 * 15 + 10 * 0.3 + 5 * 3.75) / 1e6
    second = (25 * 3 + 15 * 15 + 10 * 0.3 + 5 * 3.75) / 1e6
    assert row["cost_usd"] == pytest.approx(first + second)
    assert row["continuation_cost_usd"] == pytest.approx((25 * 3 + 10 * 0.3 + 5 * 3.75) / 1e6)
    log = json.loads(row["attempt_log"])["failed"]
    assert [(a["deployment"], a.get("continued")) for a in log] == [("claude-c", True)]


@pytest.mark.parametrize("fault", FAULTS)
def test_a_chat_stream_broken_mid_answer_is_continued_into_one_answer(oai, upstream, server, wire, fault):
    upstream.enqueue(chat_first(fault), chat_rest())
    chunks = list(oai.chat.completions.create(model="cont-local", messages=MESSAGES, stream=True,
                                              stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == SENTENCE
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.role) == 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert {c.id for c in chunks} == {"chatcmpl-fake01"}  # one completion, the first call's id
    usage = chunks[-1].usage
    assert usage.completion_tokens == 5 + DEFAULT_USAGE["output"]
    request = upstream.requests[1]
    assert last_message(request) == {"role": "assistant", "content": PREFILL}
    assert (request.json["continue_final_message"], request.json["add_generation_prompt"]) == (True, False)
    assert "continue_final_message" not in upstream.requests[0].json
    row = server.row(wire.headers_seen[-1][RID])
    assert (row["end_reason"], row["continuations"]) == ("complete", 1), row


@pytest.mark.parametrize("fault", FAULTS)
def test_a_responses_stream_broken_mid_answer_is_continued_into_one_answer(oai, upstream, server, wire,
                                                                            fault):
    upstream.enqueue(responses_first(fault), responses_rest())
    events = list(oai.responses.create(model="cont-local", input="Say the sentence.", stream=True))
    types = [e.type for e in events]
    assert types.count("response.created") == 1 and types[-1] == "response.completed", types
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == SENTENCE
    done = [e for e in events if e.type == "response.output_text.done"]
    assert [d.text for d in done] == [SENTENCE]
    assert types.count("response.output_item.added") == 1 and types.count("response.content_part.added") == 1
    final = events[-1].response
    assert (final.id, final.output_text) == ("resp_first", SENTENCE)
    assert [item.id for item in final.output] == ["msg_fake01"]
    assert {e.item_id for e in events if hasattr(e, "item_id")} == {"msg_fake01"}
    assert final.usage.output_tokens == 5 + DEFAULT_USAGE["output"]
    request = upstream.requests[1]
    assert request.json["input"][-1] == {"role": "assistant", "content": PREFILL}
    assert request.json["input"][0] == {"role": "user", "content": "Say the sentence."}
    row = server.row(wire.headers_seen[-1][RID])
    assert (row["end_reason"], row["continuations"]) == ("complete", 1), row


def test_a_continuation_goes_to_the_next_deployment_when_the_first_has_no_retries_left(ant, upstream, server,
                                                                                        wire):
    upstream.enqueue(anthropic_first("cut"), anthropic_rest())
    with ant.messages.stream(model="cont-next", max_tokens=64, messages=MESSAGES) as stream:
        final = stream.get_final_message()
    assert final.content[0].text == SENTENCE
    row = server.row(wire.headers_seen[-1][RID])
    assert (row["deployment"], row["continuations"], row["fallbacks"]) == ("second", 1, 1), row


def test_a_continuation_may_cross_formats(ant, upstream, server, wire):
    """The first deployment speaks Anthropic, the next Chat: the prefill is translated too."""
    upstream.enqueue(anthropic_first("cut"), chat_rest())
    with ant.messages.stream(model="cont-across", max_tokens=64, messages=MESSAGES) as stream:
        events = [event.type for event in stream]
        final = stream.get_final_message()
    assert final.content[0].text == SENTENCE and events.count("message_start") == 1
    assert upstream.requests[1].route == "/v1/chat/completions"
    assert last_message(upstream.requests[1]) == {"role": "assistant", "content": PREFILL}
    assert server.row(wire.headers_seen[-1][RID])["deployment"] == "local-across"


@pytest.mark.parametrize("fault", ["cut", "error_event"])
def test_a_translated_answer_broken_mid_way_is_continued_too(ant, upstream, server, wire, fault):
    """An Anthropic client on a Chat deployment: the stitch works on the translated events."""
    upstream.enqueue(chat_first(fault), chat_rest())
    with ant.messages.stream(model="cont-local", max_tokens=64, messages=MESSAGES) as stream:
        events = [event.type for event in stream]
        final = stream.get_final_message()
    assert final.content[0].text == SENTENCE and final.stop_reason == "end_turn"
    assert events.count("message_start") == 1 and events.count("content_block_start") == 1
    assert [r.route for r in upstream.requests] == ["/v1/chat/completions"] * 2
    assert last_message(upstream.requests[1]) == {"role": "assistant", "content": PREFILL}
    assert server.row(wire.headers_seen[-1][RID])["continuations"] == 1


# -- whitespace ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("first, rest, expected", [
    (["Dear Sir, ", "hello "], ["there."], "Dear Sir, hello there."),  # the model left the space out
    (["Dear Sir, ", "hello "], [" there."], "Dear Sir, hello there."),  # ...or said it again
    (["Line one.\n"], ["\n\nLine two."], "Line one.\n\nLine two."),  # part of a blank line was sent
    (["Line one.\n\n"], ["\n\nLine two."], "Line one.\n\nLine two."),
    (["Line one.\n\n"], ["Line two."], "Line one.\n\nLine two."),
])
def test_whitespace_at_the_break_is_neither_doubled_nor_lost(ant, upstream, first, rest, expected):
    upstream.enqueue(anthropic_first("cut", first), anthropic_rest(rest))
    with ant.messages.stream(model="cont-claude", max_tokens=64, messages=MESSAGES) as stream:
        final = stream.get_final_message()
    assert final.content[0].text == expected
    prefill = last_message(upstream.requests[1])["content"]
    assert prefill == "".join(first).rstrip()


# -- what is not continued -------------------------------------------------------------------------
def tool_call_broken() -> list:
    """Text, then a tool call whose arguments are cut."""
    events = anthropic_stream(["Let me check."], model="claude-c", tool={"name": "get_weather",
                                                                        "input": {"location": "Paris"}})
    return [Status(200, headers=SSE), *[Send(e) for e in events[:8]], Cut()]  # ... first argument piece


def thinking_broken() -> list:
    events = anthropic_stream(["unused"], model="claude-c", thinking=["Let me think ", "about it"])
    return [Status(200, headers=SSE), *[Send(e) for e in events[:4]], Cut()]  # inside the thinking block


@pytest.mark.parametrize("script, kwargs", [
    (tool_call_broken, {}),
    (thinking_broken, {"thinking": {"type": "enabled", "budget_tokens": 1024}, "max_tokens": 2048}),
    (thinking_broken, {}),  # thinking came though the request did not ask (a signature cannot be forged)
    (lambda: anthropic_first("cut"), {"thinking": {"type": "enabled", "budget_tokens": 1024},
                                      "max_tokens": 2048}),  # Anthropic refuses a prefill with thinking
], ids=["tool-arguments", "thinking-asked", "thinking-unasked", "text-with-thinking-on"])
def test_a_break_that_cannot_be_continued_is_one_terminal_error_and_nothing_is_sent(ant, upstream, server,
                                                                                      wire, script, kwargs):
    upstream.enqueue(script())
    params = {"max_tokens": 64, **kwargs}
    with pytest.raises(anthropic.APIStatusError) as info:
        with ant.messages.stream(model="cont-claude", messages=MESSAGES, **params) as stream:
            for event in stream:
                assert event.type != "message_stop"
    assert info.value.body["type"] == "error"
    assert len(upstream.requests) == 1  # no continuation request
    row = server.row(wire.headers_seen[-1][RID])
    assert (row["end_reason"], row["continuations"]) == ("upstream_error", 0), row


def test_a_deployment_that_does_not_continue_is_never_asked_to(ant, upstream, server, wire):
    upstream.enqueue(anthropic_first("cut"))
    with pytest.raises(anthropic.APIStatusError):
        with ant.messages.stream(model="cont-stubborn", max_tokens=64, messages=MESSAGES) as stream:
            list(stream)
    assert len(upstream.requests) == 1
    row = server.row(wire.headers_seen[-1][RID])
    assert (row["continuations"], row["input_tokens"], row["output_tokens"]) == (
        0, DEFAULT_USAGE["input"], 5), row  # the one call, counted once


def test_a_deployment_that_rejects_the_prefill_ends_the_answer_with_one_terminal_error(ant, upstream, server,
                                                                                         wire):
    upstream.enqueue(anthropic_first("cut"), json_reply(anthropic_error_body(
        "invalid_request_error", "This model does not support assistant message prefill."), status=400))
    with pytest.raises(anthropic.APIStatusError) as info:
        with ant.messages.stream(model="cont-next", max_tokens=64, messages=MESSAGES) as stream:
            texts = [e.delta.text for e in stream if e.type == "content_block_delta"]
    assert "prefill" in info.value.body["error"]["message"]
    assert stream.current_message_snapshot.content[0].text == "The quick brown fox "  # never restarted
    assert len(upstream.requests) == 2
    assert server.row(wire.headers_seen[-1][RID])["end_reason"] == "upstream_error"


# -- a continuation that breaks too ----------------------------------------------------------------------
def test_a_continuation_that_breaks_is_continued_again(ant, upstream, server, wire):
    upstream.enqueue(anthropic_first("cut"), anthropic_first("cut", [" jumps over"]),
                     anthropic_rest([" the lazy dog."]))
    with ant.messages.stream(model="cont-three", max_tokens=64, messages=MESSAGES) as stream:
        final = stream.get_final_message()
    assert final.content[0].text == SENTENCE
    assert [last_message(r)["content"] for r in upstream.requests[1:]] == [
        PREFILL, "The quick brown fox jumps over"]
    assert server.row(wire.headers_seen[-1][RID])["continuations"] == 2


def test_no_more_than_max_continuations(ant, upstream, server, wire):
    upstream.enqueue(anthropic_first("cut"), anthropic_first("cut", [" jumps"]),
                     anthropic_first("cut", [" over"]), anthropic_rest([" the lazy dog."]))
    with pytest.raises(anthropic.APIStatusError):
        with ant.messages.stream(model="cont-three", max_tokens=64, messages=MESSAGES) as stream:
            list(stream)
    assert stream.current_message_snapshot.content[0].text == "The quick brown fox jumps over"
    assert len(upstream.requests) == 3  # the first call and two continuations
    row = server.row(wire.headers_seen[-1][RID])
    assert (row["continuations"], row["end_reason"]) == (2, "upstream_error"), row


# -- keepalives while the continuation is set up ------------------------------------------------------------
def test_keepalives_flow_between_events_while_the_continuation_is_slow_to_answer(server, upstream):
    upstream.enqueue(anthropic_first("cut"), [Sleep(0.4)] + anthropic_rest())
    resp = requests.post(server.url + "/v1/messages", json={
        "model": "cont-claude", "max_tokens": 64, "stream": True, "messages": MESSAGES},
        headers={"anthropic-version": "2023-06-01"}, timeout=30)
    body = resp.content
    positions = [i for i in range(len(body)) if body.startswith(KEEPALIVE, i)]
    assert len(positions) >= 3, body
    assert all(body[i - 2:i] == b"\n\n" for i in positions)  # never inside an event
    assert body.count(b"event: message_start") == 1 and body.rstrip().endswith(b'{"type":"message_stop"}')


# -- edges a mutation pass found untested ---------------------------------------------------------
def raw_messages(server, model, **extra):
    return requests.post(server.url + "/v1/messages", json={
        "model": model, "max_tokens": 64, "stream": True, "messages": MESSAGES, **extra},
        headers={"anthropic-version": "2023-06-01"}, timeout=30)


def raw_chat(server, model):
    return requests.post(server.url + "/v1/chat/completions", json={
        "model": model, "stream": True, "messages": MESSAGES}, timeout=30)


# a break before any content, on the last option, is not continued
def test_a_break_before_any_content_on_the_last_option_is_not_continued(server, upstream):
    events = anthropic_stream(FIRST, model="claude-c")[:1]  # message_start only (preamble)
    upstream.enqueue([Status(200, headers=SSE), *[Send(e) for e in events], Cut()], anthropic_rest())
    resp = raw_messages(server, "cont-one")
    assert b"event: error" in resp.content
    assert len(upstream.requests) == 1
    row = server.row(resp.headers[RID])
    assert row["continuations"] == 0, row
    assert "continued" not in (row["attempt_log"] or ""), row


# finding: break after content with nowhere left to continue
def test_a_break_with_no_deployment_left_is_one_call_counted_once(server, upstream):
    upstream.enqueue(anthropic_first("cut"))
    resp = raw_messages(server, "cont-one")
    assert b"event: error" in resp.content and len(upstream.requests) == 1
    row = server.row(resp.headers[RID])
    assert row["continuations"] == 0 and row["input_tokens"] == DEFAULT_USAGE["input"], row


def test_a_break_no_deployment_continues_is_one_call_counted_once(server, upstream):
    upstream.enqueue(anthropic_first("cut"))
    resp = raw_messages(server, "cont-stubborn")
    assert len(upstream.requests) == 1
    row = server.row(resp.headers[RID])
    assert row["continuations"] == 0 and row["input_tokens"] == DEFAULT_USAGE["input"], row


# a non-transient error event is not continued
def test_an_error_event_that_is_not_transient_is_not_continued(server, upstream):
    steps = broken(anthropic_stream(FIRST, model="claude-c")[:5], "error_event", MALFORMED_ANTHROPIC,
                   anthropic_error_event("invalid_request_error", "Bad"))
    upstream.enqueue(steps, anthropic_rest())
    resp = raw_messages(server, "cont-claude")
    assert b'"invalid_request_error"' in resp.content and b"message_stop" not in resp.content
    assert len(upstream.requests) == 1
    assert server.row(resp.headers[RID])["continuations"] == 0


# every transient type is continued (api_error here)
@pytest.mark.parametrize("kind", ["api_error", "overloaded_error"])
def test_every_transient_error_event_is_continued(ant, server, upstream, kind):
    steps = broken(anthropic_stream(FIRST, model="claude-c")[:5], "error_event", MALFORMED_ANTHROPIC,
                   anthropic_error_event(kind, "Internal"))
    upstream.enqueue(steps, anthropic_rest())
    with ant.messages.stream(model="cont-claude", max_tokens=64, messages=MESSAGES) as stream:
        final = stream.get_final_message()
    assert final.content[0].text == SENTENCE


# an untranslatable answer is not continued
def test_an_answer_that_cannot_be_translated_is_not_continued(server, upstream):
    events = chat_stream(FIRST, model="local-c", finish_reason="mystery")
    upstream.enqueue(sse_reply(events), anthropic_rest())
    resp = raw_messages(server, "cont-untranslatable")
    assert b"event: error" in resp.content, resp.content
    assert len(upstream.requests) == 1
    assert server.row(resp.headers[RID])["continuations"] == 0


# a transient error event that no deployment continues reaches the client as it came
def test_a_chat_error_event_not_continued_reaches_the_client_as_it_came(server, upstream):
    upstream.enqueue(chat_first("error_event"))
    resp = raw_chat(server, "cont-stubchat")
    assert len(upstream.requests) == 1
    assert resp.content.endswith(chat_error_event("The server had an error", type="server_error")), resp.content


def test_an_anthropic_error_event_not_continued_reaches_the_client_as_it_came(server, upstream):
    upstream.enqueue(anthropic_first("error_event"))
    resp = raw_messages(server, "cont-stubborn")
    assert resp.content.endswith(anthropic_error_event("overloaded_error", "Overloaded")), resp.content


# a translated continuation that ends without [DONE] still gets the whole answer's usage
def test_a_translated_continuation_without_done_still_reports_the_whole_usage(ant, server, upstream, wire):
    upstream.enqueue(anthropic_first("cut"), sse_reply(chat_stream(REST, model="local-c", done=False)))
    with ant.messages.stream(model="cont-across", max_tokens=64, messages=MESSAGES) as stream:
        final = stream.get_final_message()
    assert final.content[0].text == SENTENCE
    assert final.usage.output_tokens == 5 + DEFAULT_USAGE["output"], final.usage
    assert final.usage.input_tokens == DEFAULT_USAGE["input"], final.usage


# a translated continuation's non-transient error event reaches the client
def test_a_translated_continuations_own_error_reaches_the_client(server, upstream):
    cont = chat_stream([" jumps over"], model="local-c")[:2]
    upstream.enqueue(anthropic_first("cut"),
                     [Status(200, headers=SSE), *[Send(e) for e in cont],
                      Send(chat_error_event("Nope", type="invalid_request_error")), End()])
    resp = raw_messages(server, "cont-across")
    assert b"event: error" in resp.content, resp.content
    assert b"Nope" in resp.content


# a deployment that does not edit the body still sends the continuation
def test_a_deployment_without_a_model_still_gets_the_prefill(ant, server, upstream):
    upstream.enqueue(anthropic_first("cut"), anthropic_rest())
    with ant.messages.stream(model="cont-nomodel", max_tokens=64, messages=MESSAGES) as stream:
        final = stream.get_final_message()
    assert last_message(upstream.requests[1]) == {"role": "assistant", "content": PREFILL}
    assert final.content[0].text == SENTENCE


# passing over a deployment starts the next one's retries afresh
def test_passing_over_a_deployment_starts_the_next_ones_retries_afresh(ant, server, upstream, wire):
    upstream.enqueue(anthropic_first("cut"),
                     json_reply({"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}, status=529),
                     anthropic_rest())
    with ant.messages.stream(model="cont-after-stubborn", max_tokens=64, messages=MESSAGES) as stream:
        final = stream.get_final_message()
    assert final.content[0].text == SENTENCE
    assert len(upstream.requests) == 3
    row = server.row(wire.headers_seen[-1][RID])
    assert (row["deployment"], row["continuations"]) == ("c2", 1), row


# a deployment's own `continuation = false`
def test_a_deployments_own_continuation_setting_wins(ant, upstream):
    upstream.enqueue(anthropic_first("cut"), anthropic_rest())
    with pytest.raises(anthropic.APIStatusError):
        with ant.messages.stream(model="cont-deployment-off", max_tokens=64, messages=MESSAGES) as stream:
            list(stream)
    assert len(upstream.requests) == 1


# a deployment's own prefill_params replace the provider's
def test_a_deployments_own_prefill_params_replace_the_providers(oai, upstream):
    upstream.enqueue(chat_first("cut"), chat_rest())
    chunks = list(oai.chat.completions.create(model="cont-deployment-params", messages=MESSAGES, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == SENTENCE
    body = upstream.requests[1].json
    assert body["continue_final_message"] is True and "add_generation_prompt" not in body, body


# the row of a continued answer
def test_the_row_of_an_answer_continued_across_models_prices_each_call(ant, server, upstream, wire):
    upstream.enqueue(anthropic_first("cut"), chat_rest())
    with ant.messages.stream(model="cont-across", max_tokens=64, messages=MESSAGES) as stream:
        stream.get_final_message()
    row = server.row(wire.headers_seen[-1][RID])
    first = (25 * 3 + 5 * 15 + 10 * 0.3 + 5 * 3.75) / 1e6
    assert row["upstream_model"] == "local-c", row
    assert row["usage_complete"] == 1, row
    assert row["stop_reason"] == "stop", row
    second = (25 * 1.0 + 15 * 2.0 + (10 + 5) * 1.0) / 1e6  # local-c: cache priced at its input price
    assert row["cost_usd"] == pytest.approx(first + second), row


def test_the_row_of_a_continued_answer_adds_up_every_count(ant, server, upstream, wire):
    upstream.enqueue(anthropic_first("cut"), anthropic_rest())
    with ant.messages.stream(model="cont-claude", max_tokens=64, messages=MESSAGES) as stream:
        stream.get_final_message()
    row = server.row(wire.headers_seen[-1][RID])
    assert (row["usage_complete"], row["stop_reason"]) == (1, "end_turn"), row
    assert (row["cache_read_tokens"], row["cache_write_tokens"]) == (2 * 10, 2 * 5), row


# the continuation's re-encoded end is not followed by the upstream's split LF
def test_a_continuations_split_crlf_end_is_not_written_after_the_stitched_end(server, upstream):
    events = anthropic_stream(REST, model="claude-c", message_id="msg_second", newline="\r\n")
    last = events[-1]
    upstream.enqueue(anthropic_first("cut"),
                     [Status(200, headers=SSE), *[Send(e) for e in events[:-1]], Send(last[:-1]), Sleep(0.3),
                      Send(last[-1:]), End()])
    resp = raw_messages(server, "cont-claude")
    assert resp.content.endswith(b'data: {"type":"message_stop"}\n\n'), resp.content[-80:]


# events with `id:` in a continuation do not change the keepalives
def test_ids_in_a_continuation_do_not_change_the_keepalives(server, upstream):
    events = [b"id: 7\n" + e for e in anthropic_stream(REST, model="claude-c", message_id="msg_second")]
    upstream.enqueue(anthropic_first("cut"),
                     [Status(200, headers=SSE), *[Send(e) for e in events[:5]], Sleep(0.5),
                      *[Send(e) for e in events[5:]], End()])
    resp = raw_messages(server, "cont-claude")
    body = resp.content
    assert body.count(b": keepalive\n") >= 2, body
    assert body.count(b": keepalive\n") == body.count(b": keepalive\n\n"), body


def test_an_unpriced_continued_answer_has_no_cost(ant, server, upstream, wire):
    upstream.enqueue(broken(anthropic_stream(FIRST, model="nope-c")[:5], "cut", b"", b""),
                     sse_reply(anthropic_stream(REST, model="nope-c", message_id="msg_second")))
    with ant.messages.stream(model="cont-unpriced", max_tokens=64, messages=MESSAGES) as stream:
        assert stream.get_final_message().content[0].text == SENTENCE
    row = server.row(wire.headers_seen[-1][RID])
    assert (row["priced"], row["cost_usd"], row["continuation_cost_usd"]) == (0, None, None), row



# -- what a review found --------------------------------------------------------------------------
def test_a_continuation_answered_with_json_fails_that_try_and_the_stream_still_ends(server, upstream):
    """A JSON body cannot continue an event stream already under way: the try fails (here,
    nothing is left, so the stream ends with the terminal error; it never hangs)."""
    upstream.enqueue(anthropic_first("cut"), json_reply({"type": "message", "content": []}))
    resp = raw_messages(server, "cont-claude")
    assert b"event: error" in resp.content and b"message_stop" not in resp.content
    row = server.row(resp.headers[RID])
    assert row["end_reason"] == "upstream_error", row


def test_an_echoed_key_never_goes_to_the_next_deployment_in_the_prefill(server, upstream):
    secret = "sk-ant-client-secret-0123456789"
    upstream.enqueue(broken(anthropic_stream(["Your key is ", secret, " and"], model="claude-c")[:6],
                            "cut", b"", b""), chat_rest([" that is all."]))
    resp = requests.post(server.url + "/v1/messages", json={
        "model": "cont-across", "max_tokens": 64, "stream": True, "messages": MESSAGES},
        headers={"anthropic-version": "2023-06-01", "x-api-key": secret}, timeout=30)
    assert secret.encode() not in resp.content and b"that is all." in resp.content
    prefill = last_message(upstream.requests[1])["content"]
    assert prefill.startswith("Your key is ") and secret not in prefill


def test_an_event_of_an_odd_shape_neither_kills_the_stream_nor_is_continued(server, upstream):
    odd = sse({"type": "content_block_delta", "index": 0, "delta": "oops"}, "content_block_delta")
    upstream.enqueue([Status(200, headers=SSE), *[Send(e) for e in anthropic_stream(FIRST, model="claude-c")[:5]],
                      Send(odd), Cut()])
    resp = raw_messages(server, "cont-claude")
    assert b"event: error" in resp.content and b"internal error" not in resp.content
    assert len(upstream.requests) == 1  # the stitch gave up: no continuation
    assert "Traceback" not in server.log()


def test_a_responses_terminal_error_after_a_continuations_preamble_keeps_counting(oai, upstream):
    preamble = responses_stream(REST, model="local-c", response_id="resp_second")[:2]
    upstream.enqueue(responses_first("cut"),
                     [Status(200, headers=SSE), *[Send(e) for e in preamble], Cut()])
    events = list(oai.responses.create(model="cont-local", input="Say the sentence.", stream=True))
    assert events[-1].type == "error"  # the SDK yields a Responses error event
    numbers = [e.sequence_number for e in events]
    assert numbers == list(range(len(numbers))) and len(numbers) >= 7, numbers


def test_an_unpriced_call_in_a_continued_answer_leaves_the_row_unpriced(ant, server, upstream, wire):
    upstream.enqueue(anthropic_first("cut"), sse_reply(anthropic_stream(REST, model="nope-c")))
    with ant.messages.stream(model="cont-claude", max_tokens=64, messages=MESSAGES) as stream:
        assert stream.get_final_message().content[0].text == SENTENCE
    row = server.row(wire.headers_seen[-1][RID])
    assert row["priced"] == 0 and row["cost_usd"] == pytest.approx((25 * 3 + 5 * 15 + 10 * 0.3 + 5 * 3.75) / 1e6)


def test_a_break_with_nothing_left_to_try_is_not_logged_as_continued(server, upstream):
    upstream.enqueue(anthropic_first("cut"))
    resp = raw_messages(server, "cont-one")
    row = server.row(resp.headers[RID])
    assert (row["continuations"], json.loads(row["attempt_log"])["failed"][0].get("continued")) == (0, None)


@pytest.mark.parametrize("model", ["claude-unrouted", "cont-stubborn"])
def test_a_stream_that_cannot_be_continued_anywhere_is_not_watched_for_it(server, upstream, model):
    """An unrouted model (one try) or a route whose deployments never continue: no stitch,
    so nothing is asked for, and the break is told as it was before continuation existed."""
    upstream.enqueue(anthropic_first("cut"))
    resp = raw_messages(server, model)
    assert b"event: error" in resp.content and len(upstream.requests) == 1
    request_id = resp.headers[RID]
    row = server.row(request_id)
    assert (row["continuations"], row["attempt_log"]) == (0, None), row
    assert not [line for line in server.log().splitlines()
                if request_id in line and "continuation" in line]
