"""The official SDKs as clients: anthropic 2.x and openai 3.x through the proxy (real gunicorn,
50 ms heartbeat) against the scripted fake upstream.

What a user of the proxy sees: replies parse into the SDKs' own objects (text, tool calls,
usage), keepalive comments never disturb a parser (protocols.md section 0, including the `id:`
edge case), a broken stream surfaces as the SDK's error rather than a short answer that looks
complete, and errors before the commit map to the SDK's status classes.
"""

from __future__ import annotations

import json

import anthropic
import httpx2
import openai
import pytest

from support.builders import (DEFAULT_COUNT_TOKENS, DEFAULT_MODELS, DEFAULT_TEXT,
                              DEFAULT_TEXT_PIECES, DEFAULT_TOOL_INPUT, DEFAULT_TOOL_NAME,
                              DEFAULT_USAGE, anthropic_error_body, anthropic_error_event,
                              anthropic_stream, chat_error_event, chat_stream, openai_error_body,
                              responses_error_event, responses_stream, total_input)
from support.processes import ProxyProcess
from support.rawhttp import RID
from support.sse import KEEPALIVE
from support.steps import Cut, End, Send, Sleep, Status, json_reply

ANTHROPIC_MODEL = "claude-opus-4-7"
CHAT_MODEL = "gpt-4o"
RESPONSES_MODEL = "gpt-4.1"
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER_SCHEMA = {"type": "object", "properties": {"location": {"type": "string"}},
                  "required": ["location"]}
ANTHROPIC_TOOLS = [{"name": DEFAULT_TOOL_NAME, "description": "Weather at a place",
                    "input_schema": WEATHER_SCHEMA}]
CHAT_TOOLS = [{"type": "function", "function": {"name": DEFAULT_TOOL_NAME, "parameters": WEATHER_SCHEMA}}]
RESPONSES_TOOLS = [{"type": "function", "name": DEFAULT_TOOL_NAME, "parameters": WEATHER_SCHEMA,
                    "strict": False}]
SILENCE = 0.5  # seconds of upstream silence mid-answer: about ten keepalives at 50 ms
KEEPALIVE_ALONE = b": keepalive\n"

# The normalised usage of every default reply, as the usage row stores it.
EXPECTED_ROW_TOKENS = {"input_tokens": DEFAULT_USAGE["input"], "output_tokens": DEFAULT_USAGE["output"],
                       "cache_read_tokens": DEFAULT_USAGE["cache_read"],
                       "cache_write_tokens": DEFAULT_USAGE["cache_write"]}


# ---------------------------------------------------------------------------------------------
# Clients that let the test see the wire

class _Tap(httpx2.SyncByteStream):
    """A response body stream that keeps a copy of every byte the SDK reads."""

    def __init__(self, inner, sink: bytearray) -> None:
        self._inner, self._sink = inner, sink

    def __iter__(self):
        for chunk in self._inner:
            self._sink.extend(chunk)
            yield chunk

    def close(self) -> None:
        self._inner.close()


class Wire:
    """One httpx2 client for both SDKs that records each response's headers and raw body."""

    def __init__(self) -> None:
        self.responses: list[tuple[httpx2.Headers, bytearray]] = []
        self.client = httpx2.Client(timeout=httpx2.Timeout(30.0, connect=5.0), trust_env=False,
                                    event_hooks={"response": [self._hook]})

    def _hook(self, response: httpx2.Response) -> None:
        body = bytearray()
        self.responses.append((response.headers, body))
        response.stream = _Tap(response.stream, body)

    @property
    def request_id(self) -> str:
        return self.responses[-1][0][RID]

    @property
    def body(self) -> bytes:
        return bytes(self.responses[-1][1])


@pytest.fixture
def wire():
    w = Wire()
    yield w
    w.client.close()


def make_anthropic(server: ProxyProcess, wire: Wire) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key="sk-ant-test", max_retries=0,
                               http_client=wire.client)


def make_openai(server: ProxyProcess, wire: Wire) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="sk-test", max_retries=0,
                         http_client=wire.client)


@pytest.fixture
def ant(proxy, wire):
    return make_anthropic(proxy, wire)


@pytest.fixture
def oai(proxy, wire):
    return make_openai(proxy, wire)


@pytest.fixture(scope="module")
def patient_proxy(fake, tmp_path_factory):
    """A proxy that waits up to 10 s for upstream headers before committing a stream.

    With the shared proxy's 50 ms heartbeat a stream commits after 50 ms, which a busy CI
    machine can exceed before the fake's instant error reply arrives; the pre-commit error
    path is what is under test here, not the race."""
    server = ProxyProcess(fake.url, tmp_path_factory.mktemp("patient"),
                          LLM_PROXY_COMMIT_AFTER="10").start()
    yield server
    server.stop()


# ---------------------------------------------------------------------------------------------
# Helpers

def sse_script(events, *, pause_after: int | None = None, cut: bool = False, tail: bytes = b""):
    """200 event stream, one chunk per event, SILENCE s of nothing after `pause_after` events,
    then `tail` and either the chunked terminator or an abrupt close."""
    steps = [Status(200, headers={"Content-Type": "text/event-stream; charset=utf-8"})]
    for i, event in enumerate(events):
        steps.append(Send(event))
        if pause_after is not None and i + 1 == pause_after:
            steps.append(Sleep(SILENCE))
    if tail:
        steps.append(Send(tail))
    steps.append(Cut() if cut else End())
    return steps


def with_ids(events):
    """The same events, each led by an `id:` field (the SSE edge case of protocols.md section 0)."""
    return [b"id: %d\n" % i + event for i, event in enumerate(events)]


def assert_keepalives_between_events(body: bytes, minimum: int = 2) -> None:
    """The proxy kept the line alive during the silence, and every comment sits between events."""
    positions = [i for i in range(len(body)) if body.startswith(KEEPALIVE, i)]
    assert len(positions) >= minimum, f"expected keepalives during {SILENCE}s of silence:\n{body!r}"
    for i in positions:
        assert i == 0 or body[i - 2:i] == b"\n\n", f"keepalive inside an event at {i}:\n{body!r}"


def assert_row(server: ProxyProcess, request_id: str, **expected) -> dict:
    row = server.row(request_id)
    got = {k: row[k] for k in EXPECTED_ROW_TOKENS}
    assert got == EXPECTED_ROW_TOKENS, row
    for key, value in expected.items():
        assert row[key] == value, (key, row)
    return row


def assert_anthropic_usage(usage) -> None:
    assert usage.input_tokens == DEFAULT_USAGE["input"]
    assert usage.output_tokens == DEFAULT_USAGE["output"]
    assert usage.cache_read_input_tokens == DEFAULT_USAGE["cache_read"]
    assert usage.cache_creation_input_tokens == DEFAULT_USAGE["cache_write"]


def assert_chat_usage(usage) -> None:
    assert usage.prompt_tokens == total_input()
    assert usage.completion_tokens == DEFAULT_USAGE["output"]
    assert usage.total_tokens == total_input() + DEFAULT_USAGE["output"]
    assert usage.prompt_tokens_details.cached_tokens == DEFAULT_USAGE["cache_read"]


def assert_responses_usage(usage) -> None:
    assert usage.input_tokens == total_input()
    assert usage.output_tokens == DEFAULT_USAGE["output"]
    assert usage.total_tokens == total_input() + DEFAULT_USAGE["output"]
    assert usage.input_tokens_details.cached_tokens == DEFAULT_USAGE["cache_read"]


def chat_text(chunks) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def chat_tool_call(chunks) -> tuple[str | None, str]:
    name, args = None, ""
    for chunk in chunks:
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or ():
                if call.function and call.function.name:
                    name = call.function.name
                if call.function and call.function.arguments:
                    args += call.function.arguments
    return name, args


# ---------------------------------------------------------------------------------------------
# Anthropic Messages

def test_anthropic_create_returns_the_text_and_usage(ant, fake):
    msg = ant.messages.create(model=ANTHROPIC_MODEL, max_tokens=64, messages=MESSAGES)
    assert [block.type for block in msg.content] == ["text"]
    assert msg.content[0].text == DEFAULT_TEXT
    assert msg.stop_reason == "end_turn" and msg.model == ANTHROPIC_MODEL
    assert_anthropic_usage(msg.usage)
    assert fake.requests[-1].json["model"] == ANTHROPIC_MODEL


def test_anthropic_create_returns_the_tool_use(ant):
    msg = ant.messages.create(model=ANTHROPIC_MODEL, max_tokens=64, messages=MESSAGES,
                              tools=ANTHROPIC_TOOLS)
    assert msg.stop_reason == "tool_use"
    (block,) = msg.content
    assert block.type == "tool_use" and block.name == DEFAULT_TOOL_NAME
    assert block.input == DEFAULT_TOOL_INPUT


def test_anthropic_stream_text_and_usage_row(ant, proxy, wire):
    with ant.messages.stream(model=ANTHROPIC_MODEL, max_tokens=64, messages=MESSAGES) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert pieces == list(DEFAULT_TEXT_PIECES)
    assert final.content[0].text == DEFAULT_TEXT
    assert final.stop_reason == "end_turn"
    assert_anthropic_usage(final.usage)
    assert_row(proxy, wire.request_id, end_reason="complete", usage_complete=1, stream=1,
               endpoint="anthropic")


def test_anthropic_stream_assembles_the_tool_use(ant):
    with ant.messages.stream(model=ANTHROPIC_MODEL, max_tokens=64, messages=MESSAGES,
                             tools=ANTHROPIC_TOOLS) as stream:
        events = list(stream)
        final = stream.get_final_message()
    assert any(e.type == "input_json" for e in events)
    assert final.stop_reason == "tool_use"
    (block,) = final.content
    assert block.type == "tool_use" and block.name == DEFAULT_TOOL_NAME
    assert block.input == DEFAULT_TOOL_INPUT
    assert_anthropic_usage(final.usage)


def test_anthropic_count_tokens_returns_the_upstreams_count(ant, fake):
    count = ant.messages.count_tokens(model=ANTHROPIC_MODEL, messages=MESSAGES)
    assert count.input_tokens == DEFAULT_COUNT_TOKENS
    assert fake.requests[-1].route == "/v1/messages/count_tokens"


def test_anthropic_models_list_returns_the_upstreams_models(ant):
    assert [m.id for m in ant.models.list().data] == list(DEFAULT_MODELS)


# ---------------------------------------------------------------------------------------------
# OpenAI Chat Completions

def test_chat_create_returns_the_text_and_usage(oai):
    completion = oai.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES)
    assert completion.choices[0].message.content == DEFAULT_TEXT
    assert completion.choices[0].finish_reason == "stop"
    assert_chat_usage(completion.usage)


def test_chat_create_returns_the_tool_call(oai):
    completion = oai.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, tools=CHAT_TOOLS)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == DEFAULT_TOOL_NAME
    assert json.loads(call.function.arguments) == DEFAULT_TOOL_INPUT


@pytest.mark.parametrize("include_usage", [False, True], ids=["no_usage_asked", "include_usage"])
@pytest.mark.parametrize("tools", [None, CHAT_TOOLS], ids=["text", "tool"])
def test_chat_stream_yields_the_text_or_tool_call_and_one_finish_reason(oai, proxy, wire, fake, include_usage,
                                                                        tools):
    kwargs = {"stream_options": {"include_usage": True}} if include_usage else {}
    if tools:
        kwargs["tools"] = tools
    chunks = list(oai.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, stream=True,
                                              **kwargs))
    if tools:
        name, args = chat_tool_call(chunks)
        assert name == DEFAULT_TOOL_NAME and json.loads(args) == DEFAULT_TOOL_INPUT
        finish = "tool_calls"
    else:
        assert chat_text(chunks) == DEFAULT_TEXT
        finish = "stop"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [finish]
    usage_chunks = [c for c in chunks if not c.choices]
    if include_usage:
        assert usage_chunks == [chunks[-1]]
        assert_chat_usage(chunks[-1].usage)
    else:
        # The proxy asked the upstream for usage on the client's behalf; the client, which did
        # not ask, must not get the extra empty-choices chunk (design.md section 4).
        assert fake.requests[-1].json["stream_options"]["include_usage"] is True
        assert usage_chunks == []
        assert all(c.usage is None for c in chunks)
    assert wire.body.rstrip().endswith(b"data: [DONE]")
    assert_row(proxy, wire.request_id, end_reason="complete", usage_complete=1, stream=1,
               endpoint="openai-chat")


def test_chat_stream_helper_accumulates_text_and_tool_call(oai):
    with oai.chat.completions.stream(model=CHAT_MODEL, messages=MESSAGES) as stream:
        text = stream.get_final_completion()
    assert text.choices[0].message.content == DEFAULT_TEXT
    with oai.chat.completions.stream(model=CHAT_MODEL, messages=MESSAGES, tools=CHAT_TOOLS) as stream:
        tool = stream.get_final_completion()
    (call,) = tool.choices[0].message.tool_calls
    assert call.function.name == DEFAULT_TOOL_NAME
    assert json.loads(call.function.arguments) == DEFAULT_TOOL_INPUT
    assert tool.choices[0].finish_reason == "tool_calls"


# ---------------------------------------------------------------------------------------------
# OpenAI Responses

def test_responses_create_returns_the_text_and_usage(oai):
    response = oai.responses.create(model=RESPONSES_MODEL, input="hi")
    assert response.output_text == DEFAULT_TEXT
    assert response.status == "completed"
    assert_responses_usage(response.usage)


def test_responses_create_returns_the_function_call(oai):
    response = oai.responses.create(model=RESPONSES_MODEL, input="hi", tools=RESPONSES_TOOLS)
    (item,) = response.output
    assert item.type == "function_call" and item.name == DEFAULT_TOOL_NAME
    assert json.loads(item.arguments) == DEFAULT_TOOL_INPUT


def test_responses_stream_text_and_usage_row(oai, proxy, wire):
    with oai.responses.stream(model=RESPONSES_MODEL, input="hi") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert deltas == list(DEFAULT_TEXT_PIECES)
    assert final.output_text == DEFAULT_TEXT and final.status == "completed"
    assert_responses_usage(final.usage)
    assert_row(proxy, wire.request_id, end_reason="complete", usage_complete=1, stream=1,
               endpoint="openai-responses")


def test_responses_stream_assembles_the_function_call_and_usage(oai):
    with oai.responses.stream(model=RESPONSES_MODEL, input="hi", tools=RESPONSES_TOOLS) as stream:
        final = stream.get_final_response()
    (item,) = final.output
    assert item.type == "function_call" and item.name == DEFAULT_TOOL_NAME
    assert json.loads(item.arguments) == DEFAULT_TOOL_INPUT
    assert_responses_usage(final.usage)


def test_openai_models_list_returns_the_upstreams_models(oai):
    assert [m.id for m in oai.models.list().data] == list(DEFAULT_MODELS)


# ---------------------------------------------------------------------------------------------
# Keepalives never disturb the SDKs' parsers

def test_keepalives_during_silence_anthropic(ant, fake, wire):
    fake.enqueue(sse_script(anthropic_stream(), pause_after=4))  # after the first text delta
    with ant.messages.stream(model=ANTHROPIC_MODEL, max_tokens=64, messages=MESSAGES) as stream:
        final = stream.get_final_message()
    assert final.content[0].text == DEFAULT_TEXT
    assert_anthropic_usage(final.usage)
    assert_keepalives_between_events(wire.body)


def test_keepalives_during_silence_chat(oai, fake, wire):
    fake.enqueue(sse_script(chat_stream(), pause_after=2))
    chunks = list(oai.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, stream=True,
                                              stream_options={"include_usage": True}))
    assert chat_text(chunks) == DEFAULT_TEXT
    assert_chat_usage(chunks[-1].usage)
    assert_keepalives_between_events(wire.body)


def test_keepalives_during_silence_responses(oai, fake, wire):
    fake.enqueue(sse_script(responses_stream(), pause_after=5))  # after the first text delta
    with oai.responses.stream(model=RESPONSES_MODEL, input="hi") as stream:
        final = stream.get_final_response()
    assert final.output_text == DEFAULT_TEXT
    assert_responses_usage(final.usage)
    assert_keepalives_between_events(wire.body)


def _assert_id_safe_keepalives(body: bytes) -> None:
    first_id = body.index(b"id: ")
    assert body.count(KEEPALIVE_ALONE, first_id) >= 2, f"no keepalives during the silence:\n{body!r}"
    # After an `id:` a blank line would dispatch an empty event, which the openai SDK cannot parse.
    assert KEEPALIVE not in body[first_id:], body


def test_keepalives_after_upstream_ids_dispatch_no_empty_event_chat(oai, fake, wire):
    fake.enqueue(sse_script(with_ids(chat_stream()), pause_after=2))
    chunks = list(oai.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, stream=True,
                                              stream_options={"include_usage": True}))
    assert chat_text(chunks) == DEFAULT_TEXT
    assert_chat_usage(chunks[-1].usage)
    _assert_id_safe_keepalives(wire.body)


def test_keepalives_after_upstream_ids_dispatch_no_empty_event_responses(oai, fake, wire):
    fake.enqueue(sse_script(with_ids(responses_stream()), pause_after=5))
    with oai.responses.stream(model=RESPONSES_MODEL, input="hi") as stream:
        final = stream.get_final_response()
    assert final.output_text == DEFAULT_TEXT
    _assert_id_safe_keepalives(wire.body)


# ---------------------------------------------------------------------------------------------
# A broken stream is an SDK error, never an answer that looks complete

FAILURES = ["cut", "error_event"]  # the upstream closes mid-answer / sends its own error event


def broken_script(events, failure: str, error_event: bytes):
    if failure == "cut":
        return sse_script(events, cut=True)
    return sse_script(events, tail=error_event)


@pytest.mark.parametrize("failure", FAILURES)
def test_anthropic_broken_stream_raises(ant, fake, failure):
    fake.enqueue(broken_script(anthropic_stream()[:5], failure,  # up to ", héllo"
                               anthropic_error_event("overloaded_error", "Overloaded")))
    with pytest.raises(anthropic.APIStatusError) as info:
        with ant.messages.stream(model=ANTHROPIC_MODEL, max_tokens=64, messages=MESSAGES) as stream:
            for event in stream:
                assert event.type != "message_stop"
    assert stream.current_message_snapshot.content[0].text == "".join(DEFAULT_TEXT_PIECES[:2])
    body = info.value.body
    assert isinstance(body, dict) and body.get("type") == "error", body
    if failure == "error_event":
        assert body["error"] == {"type": "overloaded_error", "message": "Overloaded"}


@pytest.mark.parametrize("failure", FAILURES)
def test_chat_broken_stream_raises(oai, fake, failure):
    fake.enqueue(broken_script(chat_stream()[:3], failure, chat_error_event("The server had an error")))
    chunks = []
    with pytest.raises(openai.APIError) as info:
        for chunk in oai.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, stream=True):
            chunks.append(chunk)
    # A terminal error event, not a torn connection (that would be APIConnectionError).
    assert not isinstance(info.value, openai.APIConnectionError), repr(info.value)
    assert chat_text(chunks) == "".join(DEFAULT_TEXT_PIECES[:2])
    assert all(not c.choices or c.choices[0].finish_reason is None for c in chunks)
    if failure == "error_event":
        assert info.value.message == "The server had an error"


@pytest.mark.parametrize("failure", FAILURES)
def test_responses_broken_stream_yields_error(oai, fake, failure):
    fake.enqueue(broken_script(responses_stream()[:6], failure,  # up to the second text delta
                               responses_error_event("server_error", "The server had an error", 6)))
    with oai.responses.stream(model=RESPONSES_MODEL, input="hi") as stream:
        events = list(stream)
        with pytest.raises(RuntimeError, match="response.completed"):
            stream.get_final_response()
    types = [e.type for e in events]
    assert types[-1] == "error", types
    assert "response.completed" not in types
    assert [e.delta for e in events if e.type == "response.output_text.delta"] == list(DEFAULT_TEXT_PIECES[:2])
    if failure == "error_event":
        assert events[-1].message == "The server had an error"


# ---------------------------------------------------------------------------------------------
# Errors before the commit: the SDK's own status classes, the upstream's message

STATUS_CASES = {
    429: ("rate_limit_error", anthropic.RateLimitError, openai.RateLimitError),
    400: ("invalid_request_error", anthropic.BadRequestError, openai.BadRequestError),
    404: ("not_found_error", anthropic.NotFoundError, openai.NotFoundError),
}


def _call(api: str, server: ProxyProcess, wire: Wire, stream: bool):
    if api == "anthropic":
        client = make_anthropic(server, wire)
        if stream:
            with client.messages.stream(model=ANTHROPIC_MODEL, max_tokens=64, messages=MESSAGES) as s:
                return s.get_final_message()
        return client.messages.create(model=ANTHROPIC_MODEL, max_tokens=64, messages=MESSAGES)
    client = make_openai(server, wire)
    if api == "chat":
        result = client.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, stream=stream)
        return list(result) if stream else result
    if stream:
        with client.responses.stream(model=RESPONSES_MODEL, input="hi") as s:
            return s.get_final_response()
    return client.responses.create(model=RESPONSES_MODEL, input="hi")


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("api", ["anthropic", "chat", "responses"])
@pytest.mark.parametrize("status", sorted(STATUS_CASES))
def test_upstream_error_before_commit_maps_to_sdk_class(request, fake, wire, status, api, stream):
    # Streams go through a proxy that waits long enough for the headers (see patient_proxy).
    server = request.getfixturevalue("patient_proxy" if stream else "proxy")
    anthropic_type, anthropic_cls, openai_cls = STATUS_CASES[status]
    message = f"upstream says {status} for {api}"
    if api == "anthropic":
        body, cls = anthropic_error_body(anthropic_type, message), anthropic_cls
    else:
        body, cls = openai_error_body(message, type=anthropic_type, code=f"code_{status}"), openai_cls
    fake.enqueue(json_reply(body, status=status))
    with pytest.raises(cls) as info:
        _call(api, server, wire, stream)
    err = info.value
    assert err.status_code == status
    assert message in err.message
    if api == "anthropic":
        assert err.body["error"]["message"] == message
    else:
        assert err.body["message"] == message and err.code == f"code_{status}"
    row = server.row(wire.request_id)
    assert row["status"] == status and row["stream"] == int(stream)
