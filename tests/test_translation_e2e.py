"""Any client, any provider: the official SDKs through the proxy (real gunicorn) to a fake
upstream that speaks the *other* format.

The `anthropic` SDK talks to routes whose deployments are OpenAI-compatible servers, the
`openai` SDK to routes whose deployments are Anthropic's API.  Each test checks both ends:
what the SDK accumulates (its own final message or completion) and what the upstream was
sent (a valid request in its own protocol, with the provider's key and never the client's),
plus the usage row (the upstream's own usage, priced for the upstream model).
"""

from __future__ import annotations

import json

import anthropic
import httpx2
import openai
import pytest

from support.builders import (DEFAULT_TEXT, DEFAULT_TEXT_PIECES, DEFAULT_TOOL_NAME, DEFAULT_USAGE,
                              anthropic_error_body, anthropic_error_event, anthropic_stream,
                              chat_error_event, chat_stream, chat_usage, openai_error_body, sse,
                              total_input)
from support.fake import FakeUpstream
from support.processes import ProxyProcess
from support.rawhttp import RID
from support.steps import End, Send, Stall, Status, Trickle, default_script, json_reply, sse_reply

PROVIDER_KEY = "sk-local-provider-key-0123456789"  # the chat provider's own key (api_key_env)
CLIENT_KEY = "sk-ant-client-key-abcdefghijklmnop"  # the client's key: never leaves the proxy
LOCAL_MODEL = "qwen-local"  # the chat deployment's upstream model
CLAUDE_MODEL = "claude-upstream"  # the Anthropic deployment's upstream model
PRICES = {LOCAL_MODEL: (1.0, 2.0, 0.5, 1.25), CLAUDE_MODEL: (3.0, 15.0, 0.3, 3.75)}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
SCHEMA = {"type": "object", "properties": {"location": {"type": "string"}}}
ANTHROPIC_TOOLS = [{"name": DEFAULT_TOOL_NAME, "description": "Weather", "input_schema": SCHEMA},
                   {"name": "get_time", "input_schema": SCHEMA}]  # Claude Code omits `type`
CHAT_TOOLS = [{"type": "function", "function": {"name": n, "parameters": SCHEMA}}
              for n in (DEFAULT_TOOL_NAME, "get_time")]
FIRST_TOKEN_TIMEOUT = 0.5
DEFAULT_MAX_TOKENS = 777  # the claude provider's default_max_tokens
PARIS, TOKYO = {"location": "Paris"}, {"location": "Tokyo"}

# A 1x1 PNG, for the image turns.
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="


def write_config(path, fake: FakeUpstream) -> None:
    lines = ["[auth]", 'mode = "open"', "",  # the client's key passes; the provider's is used
             "[retry]", "max_attempts = 1", "",
             "[breaker]", "failure_threshold = 1000", "min_requests = 1000", "",  # not under test here
             "[providers.local]", f'base_url = "{fake.url}"', 'format = "openai"',
             'api_key_env = "LOCAL_PROVIDER_KEY"', "",
             # An OpenAI reasoning model's settings: its own name for max_tokens, reasoning_effort.
             "[providers.local_o]", f'base_url = "{fake.url}"', 'format = "openai"',
             'max_tokens_field = "max_completion_tokens"', "reasoning_effort = true", "",
             "[providers.claude]", f'base_url = "{fake.url}"', 'format = "anthropic"',
             f"default_max_tokens = {DEFAULT_MAX_TOKENS}", "reasoning_content = true", ""]
    for model, (inp, out, read, write) in PRICES.items():
        lines += [f'[prices."{model}"]', f"input = {inp}", f"output = {out}",
                  f"cache_read = {read}", f"cache_write = {write}", ""]
    routes = {
        "claude-on-local": [("local", LOCAL_MODEL, "local-qwen")],
        "gpt-on-claude": [("claude", CLAUDE_MODEL, "claude-up")],
        "claude-fallback": [("claude", "stalls", "claude-primary"), ("local", LOCAL_MODEL, "local-fallback")],
        "gpt-fallback": [("local", "stalls", "local-primary"), ("claude", CLAUDE_MODEL, "claude-fallback")],
        "claude-on-o": [("local_o", "o-model", "local-o")],
        "claude-first": [("claude", CLAUDE_MODEL, "claude-first"), ("local", LOCAL_MODEL, "local-second")],
    }
    for pattern, deployments in routes.items():
        items = ", ".join(f'{{ provider = "{p}", model = "{m}", name = "{n}" }}' for p, m, n in deployments)
        lines += [f'[routes."{pattern}"]', f"first_token_timeout = {FIRST_TOKEN_TIMEOUT}",
                  f"deployments = [{items}]", ""]
    lines += ['[routes."claude-bare"]', 'deployments = [{ provider = "local" }]', "",  # the client's model
              '[routes."claude-params"]', "max_attempts = 2",
              'deployments = [{ provider = "local", model = "qwen-local", name = "local-params", '
              "params = { frequency_penalty = 0.5 } }]", ""]
    path.write_text("\n".join(lines))


@pytest.fixture(scope="module")
def upstream():
    fake = FakeUpstream()
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def server(upstream, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("translation")
    write_config(tmp / "proxy.toml", upstream)
    proc = ProxyProcess(upstream.url, tmp, LLM_PROXY_CONFIG=str(tmp / "proxy.toml"),
                        LOCAL_PROVIDER_KEY=PROVIDER_KEY).start()
    yield proc
    proc.stop()


@pytest.fixture(autouse=True)
def _fresh_upstream(upstream):
    upstream.reset()


class Wire:
    """Response headers as the SDK received them (an httpx event hook)."""

    def __init__(self) -> None:
        self.headers: list[httpx2.Headers] = []
        self.client = httpx2.Client(timeout=httpx2.Timeout(30.0, connect=5.0), trust_env=False,
                                    event_hooks={"response": [lambda r: self.headers.append(r.headers)]})

    @property
    def request_id(self) -> str:
        return self.headers[-1][RID]


@pytest.fixture
def wire():
    w = Wire()
    yield w
    w.client.close()


@pytest.fixture
def ant(server, wire):
    return anthropic.Anthropic(base_url=server.url, api_key=CLIENT_KEY, max_retries=0,
                               http_client=wire.client)


@pytest.fixture
def oai(server, wire):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=CLIENT_KEY, max_retries=0,
                         http_client=wire.client)


def cost_of(model: str, usage=DEFAULT_USAGE) -> float:
    inp, out, read, write = PRICES[model]
    return (usage["input"] * inp + usage["output"] * out + usage["cache_read"] * read
            + usage["cache_write"] * write) / 1e6


def assert_row(server: ProxyProcess, request_id: str, deployment: str, upstream_model: str) -> dict:
    """The row names the deployment that answered, holds the upstream's own usage in the
    normalised meaning (no cached token counted twice) and is priced for the upstream model."""
    row = server.row(request_id)
    assert (row["deployment"], row["upstream_model"], row["end_reason"]) == (
        deployment, upstream_model, "complete"), row
    assert (row["input_tokens"], row["output_tokens"], row["cache_read_tokens"],
            row["cache_write_tokens"]) == (DEFAULT_USAGE["input"], DEFAULT_USAGE["output"],
                                           DEFAULT_USAGE["cache_read"], DEFAULT_USAGE["cache_write"])
    assert row["cost_usd"] == pytest.approx(cost_of(upstream_model)), row
    return row


def assert_sent_to_chat(request, stream: bool) -> dict:
    """A valid Chat request, with the provider's key and nothing of the client's."""
    assert request.route == "/v1/chat/completions"
    assert request.headers.get("authorization") == f"Bearer {PROVIDER_KEY}"
    assert "x-api-key" not in request.headers and "anthropic-version" not in request.headers
    assert all(CLIENT_KEY not in value for value in request.headers.values())
    body = request.json
    assert body["model"] == LOCAL_MODEL
    if stream:
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    return body


def assert_sent_to_anthropic(request) -> dict:
    assert request.route == "/v1/messages"
    assert request.headers.get("anthropic-version") == "2023-06-01"
    assert "authorization" not in request.headers and "x-api-key" not in request.headers
    body = request.json
    assert body["model"] == CLAUDE_MODEL
    return body


def chat_chunk(delta: dict, finish: str | None = None, usage: dict | None = None) -> bytes:
    return sse({"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1, "model": LOCAL_MODEL,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], "usage": usage})


def chat_usage_chunk() -> bytes:
    return sse({"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1, "model": LOCAL_MODEL,
                "choices": [], "usage": chat_usage()})


def tool_call(index: int, call_id: str, name: str, arguments: str) -> dict:
    return {"index": index, "id": call_id, "type": "function",
            "function": {"name": name, "arguments": arguments}}


def anthropic_events(*events: dict) -> list[bytes]:
    return [sse(e, e["type"]) for e in events]


def anthropic_tool_stream() -> list[bytes]:
    """Two parallel tool_use blocks after a text block, as Anthropic streams them."""
    start = anthropic_stream()[0]  # message_start with the default usage
    events = [start]
    blocks = [({"type": "text", "text": ""}, [{"type": "text_delta", "text": "Checking."}]),
              ({"type": "tool_use", "id": "toolu_01", "name": DEFAULT_TOOL_NAME, "input": {}},
               [{"type": "input_json_delta", "partial_json": '{"location":'},
                {"type": "input_json_delta", "partial_json": ' "Paris"}'}]),
              ({"type": "tool_use", "id": "toolu_02", "name": "get_time", "input": {}},
               [{"type": "input_json_delta", "partial_json": '{"location": "Tokyo"}'}])]
    for index, (block, deltas) in enumerate(blocks):
        events += anthropic_events({"type": "content_block_start", "index": index, "content_block": block},
                                   *[{"type": "content_block_delta", "index": index, "delta": d} for d in deltas],
                                   {"type": "content_block_stop", "index": index})
    events += anthropic_events({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                                "usage": {"output_tokens": DEFAULT_USAGE["output"]}},
                               {"type": "message_stop"})
    return events


# -- the anthropic SDK on an OpenAI-compatible upstream -------------------------------------
def test_anthropic_stream_of_text_from_a_chat_upstream(ant, upstream, server, wire):
    with ant.messages.stream(model="claude-on-local", max_tokens=64, system="Be brief.",
                             messages=MESSAGES) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert pieces == list(DEFAULT_TEXT_PIECES)
    assert [b.type for b in final.content] == ["text"] and final.content[0].text == DEFAULT_TEXT
    assert final.stop_reason == "end_turn" and final.model == LOCAL_MODEL
    assert (final.usage.input_tokens, final.usage.output_tokens, final.usage.cache_read_input_tokens,
            final.usage.cache_creation_input_tokens) == (25, 15, 10, 5)
    body = assert_sent_to_chat(upstream.requests[-1], stream=True)
    assert body["messages"] == [{"role": "system", "content": "Be brief."}, MESSAGES[0]]
    assert body["max_tokens"] == 64
    assert wire.headers[-1]["x-llm-proxy-deployment"] == "local-qwen"
    assert wire.headers[-1]["content-type"].startswith("text/event-stream")
    assert "x-request-id" not in wire.headers[-1]  # the upstream's headers describe another API
    assert_row(server, wire.request_id, "local-qwen", LOCAL_MODEL)


def test_a_chat_stream_arriving_a_few_bytes_at_a_time_translates_whole(ant, upstream, server, wire):
    upstream.enqueue([Status(200, headers={"Content-Type": "text/event-stream"}),
                      Trickle(b"".join(chat_stream(model=LOCAL_MODEL, newline="\r\n")), size=3), End()])
    with ant.messages.stream(model="claude-on-local", max_tokens=64, messages=MESSAGES) as stream:
        final = stream.get_final_message()
    assert final.content[0].text == DEFAULT_TEXT and final.stop_reason == "end_turn"
    assert_row(server, wire.request_id, "local-qwen", LOCAL_MODEL)


def test_a_chat_stream_without_done_but_finished_ends_the_anthropic_message(ant, upstream, server, wire):
    """Some OpenAI-compatible servers end without `data: [DONE]`: every choice finished is
    a whole answer, and the translated message gets its own end."""
    upstream.enqueue(sse_reply(chat_stream(model=LOCAL_MODEL, done=False)))
    with ant.messages.stream(model="claude-on-local", max_tokens=64, messages=MESSAGES) as stream:
        events = [event.type for event in stream]
        final = stream.get_final_message()
    assert events[-1] == "message_stop" and final.stop_reason == "end_turn"
    assert final.content[0].text == DEFAULT_TEXT
    assert_row(server, wire.request_id, "local-qwen", LOCAL_MODEL)


def test_a_held_translated_preamble_goes_out_translated_when_content_comes(ant, upstream, server, wire):
    """The first of two deployments speaks Chat: its role chunk is held back (the fallback
    remains) and becomes the client's one message_start once its content arrives."""
    with ant.messages.stream(model="gpt-fallback", max_tokens=64, messages=MESSAGES) as stream:
        events = [event.type for event in stream]
        final = stream.get_final_message()
    assert events.count("message_start") == 1 and events[-1] == "message_stop"
    assert final.content[0].text == DEFAULT_TEXT and final.model == "stalls"
    assert [r.route for r in upstream.requests] == ["/v1/chat/completions"]
    assert wire.headers[-1]["x-llm-proxy-deployment"] == "local-primary"
    assert "x-request-id" not in wire.headers[-1]  # the proxy's own headers, not the chat server's


def test_anthropic_create_of_text_from_a_chat_upstream(ant, upstream, server, wire):
    msg = ant.messages.create(model="claude-on-local", max_tokens=64, messages=MESSAGES)
    assert [b.type for b in msg.content] == ["text"] and msg.content[0].text == DEFAULT_TEXT
    assert (msg.stop_reason, msg.model, msg.usage.input_tokens, msg.usage.output_tokens,
            msg.usage.cache_read_input_tokens) == ("end_turn", LOCAL_MODEL, 25, 15, 10)
    body = assert_sent_to_chat(upstream.requests[-1], stream=False)
    assert "stream" not in body and "stream_options" not in body
    assert wire.headers[-1]["x-llm-proxy-deployment"] == "local-qwen"
    assert_row(server, wire.request_id, "local-qwen", LOCAL_MODEL)


def test_anthropic_message_start_reports_an_estimate_of_the_prompt(server, upstream):
    """Claude Code's context meter reads message_start: never a bare 0 input."""
    import requests
    resp = requests.post(server.url + "/v1/messages", json={
        "model": "claude-on-local", "max_tokens": 64, "stream": True,
        "messages": [{"role": "user", "content": "x" * 4000}]}, timeout=30)
    first = next(line for line in resp.text.splitlines() if line.startswith("data: "))
    start = json.loads(first[len("data: "):])
    assert start["type"] == "message_start"
    assert 900 <= start["message"]["usage"]["input_tokens"] <= 1100


def test_anthropic_create_with_two_parallel_tool_calls(ant, upstream, server, wire):
    upstream.enqueue(json_reply({
        "id": "chatcmpl-x", "object": "chat.completion", "created": 1, "model": LOCAL_MODEL,
        "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": None, "tool_calls": [
                {"id": "call_a", "type": "function", "function": {"name": DEFAULT_TOOL_NAME,
                                                                  "arguments": json.dumps(PARIS)}},
                {"id": "call.b/2", "type": "function", "function": {"name": "get_time",
                                                                    "arguments": json.dumps(TOKYO)}}]}}],
        "usage": chat_usage()}, headers={"x-request-id": "req_upstream", "openai-processing-ms": "5"}))
    msg = ant.messages.create(model="claude-on-local", max_tokens=64, messages=MESSAGES,
                              tools=ANTHROPIC_TOOLS, tool_choice={"type": "any"})
    assert not {"x-request-id", "openai-processing-ms"} & set(wire.headers[-1])
    assert msg.stop_reason == "tool_use"
    assert [(b.type, b.name, b.input) for b in msg.content] == [
        ("tool_use", DEFAULT_TOOL_NAME, PARIS), ("tool_use", "get_time", TOKYO)]
    assert msg.content[0].id == "call_a"
    assert wire.headers[-1]["x-llm-proxy-deployment"] == "local-qwen"
    assert all(c.isalnum() or c in "_-" for c in msg.content[1].id)  # Anthropic's id rule
    body = assert_sent_to_chat(upstream.requests[-1], stream=False)
    assert body["tool_choice"] == "required"
    assert [t["function"]["name"] for t in body["tools"]] == [DEFAULT_TOOL_NAME, "get_time"]
    assert_row(server, wire.request_id, "local-qwen", LOCAL_MODEL)

    # The history replayed: the mapped id goes back upstream as the server's own id.
    ant.messages.create(model="claude-on-local", max_tokens=64, tools=ANTHROPIC_TOOLS, messages=[
        MESSAGES[0], {"role": "assistant", "content": [b.model_dump() for b in msg.content]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": msg.content[0].id, "content": "18 C"},
            {"type": "tool_result", "tool_use_id": msg.content[1].id, "content": "09:00"}]}])
    sent = upstream.requests[-1].json["messages"]
    assert [m.get("tool_call_id") for m in sent if m["role"] == "tool"] == ["call_a", "call.b/2"]
    assert [c["id"] for c in sent[1]["tool_calls"]] == ["call_a", "call.b/2"]


def test_anthropic_stream_of_parallel_tool_calls_from_one_chunk(ant, upstream):
    """Several tool calls in one chunk each get their block, and arguments that arrive on
    the finishing chunk are not lost."""
    upstream.enqueue(sse_reply([
        chat_chunk({"role": "assistant", "content": None}),
        chat_chunk({"tool_calls": [tool_call(0, "call_a", DEFAULT_TOOL_NAME, json.dumps(PARIS)),
                                   tool_call(1, "call_b", "get_time", "")]}),
        chat_chunk({"tool_calls": [{"index": 1, "function": {"arguments": json.dumps(TOKYO)}}]},
                   finish="tool_calls"),
        chat_usage_chunk(), sse("[DONE]")]))
    with ant.messages.stream(model="claude-on-local", max_tokens=64, messages=MESSAGES,
                             tools=ANTHROPIC_TOOLS) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert [(b.type, b.id, b.name, b.input) for b in final.content] == [
        ("tool_use", "call_a", DEFAULT_TOOL_NAME, PARIS), ("tool_use", "call_b", "get_time", TOKYO)]


def test_a_tool_call_that_ends_with_stop_is_still_a_tool_use(ant, upstream):
    """A server that says "stop" after a tool call (the tool must still run), with empty
    arguments (they become {})."""
    upstream.enqueue(sse_reply([
        chat_chunk({"role": "assistant"}),
        chat_chunk({"tool_calls": [tool_call(0, "call_c", DEFAULT_TOOL_NAME, "")]}),
        chat_chunk({}, finish="stop"), chat_usage_chunk(), sse("[DONE]")]))
    with ant.messages.stream(model="claude-on-local", max_tokens=64, messages=MESSAGES,
                             tools=ANTHROPIC_TOOLS) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert [(b.type, b.name, b.input) for b in final.content] == [("tool_use", DEFAULT_TOOL_NAME, {})]


def test_anthropic_multi_turn_history_with_tool_results_and_an_image(ant, upstream):
    history = [
        {"role": "user", "content": [{"type": "text", "text": "What is in this picture, and the weather?"},
                                     {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                  "data": PNG}}]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "Let me look.", "signature": "sig"},
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_01", "name": DEFAULT_TOOL_NAME, "input": PARIS}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_01", "is_error": True,
             "content": [{"type": "text", "text": "timeout"},
                         {"type": "image", "source": {"type": "url", "url": "https://example.com/map.png"}}]},
            {"type": "text", "text": "Try again."}]}]
    msg = ant.messages.create(model="claude-on-local", max_tokens=64, messages=history,
                              tools=ANTHROPIC_TOOLS, stop_sequences=["END"], metadata={"user_id": "u-42"},
                              extra_body={"temperature": 0.2, "top_k": 5})
    assert msg.content[0].type == "tool_use"  # the fake calls the first tool it is offered
    body = assert_sent_to_chat(upstream.requests[-1], stream=False)
    assert body["messages"] == [
        {"role": "user", "content": [
            {"type": "text", "text": "What is in this picture, and the weather?"},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}]},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "toolu_01", "type": "function",
             "function": {"name": DEFAULT_TOOL_NAME, "arguments": json.dumps(PARIS)}}]},
        {"role": "tool", "tool_call_id": "toolu_01", "content": "Error: timeout"},
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/map.png"}},
            {"type": "text", "text": "Try again."}]}]
    assert (body["stop"], body["temperature"], body["user"]) == (["END"], 0.2, "u-42")
    assert "top_k" not in body and "metadata" not in body


def test_anthropic_stream_with_thinking_from_reasoning_content(ant, upstream):
    upstream.enqueue(sse_reply([
        chat_chunk({"role": "assistant", "content": ""}),
        chat_chunk({"reasoning_content": "Paris is in France. "}),
        chat_chunk({"reasoning_content": "Say hello."}),
        chat_chunk({"content": "Hello"}),
        chat_chunk({"content": " there"}),
        chat_chunk({}, finish="stop"), chat_usage_chunk(), sse("[DONE]")]))
    with ant.messages.stream(model="claude-on-local", max_tokens=2048, messages=MESSAGES,
                             thinking={"type": "enabled", "budget_tokens": 1024}) as stream:
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == "Paris is in France. Say hello."
    assert final.content[1].text == "Hello there"
    assert "reasoning_effort" not in upstream.requests[-1].json  # not configured for it


def test_anthropic_count_tokens_on_a_chat_route_is_a_local_estimate(ant, upstream, server, wire):
    raw = ant.messages.with_raw_response.count_tokens(model="claude-on-local", messages=[
        {"role": "user", "content": "y" * 4000}])
    count = raw.parse()
    assert 900 <= count.input_tokens <= 1100
    assert wire.headers[-1]["x-llm-proxy-estimate"] == "true"
    assert upstream.requests == []  # nothing went upstream
    row = server.row(wire.request_id)
    assert (row["deployment"], row["endpoint"], row["end_reason"], row["cost_usd"], row["input_tokens"],
            row["attempts"], row["bytes_out"]) == (
        "proxy-estimate", "count_tokens", "complete", None, None, 0, len(raw.http_response.content))


def test_count_tokens_on_a_route_that_starts_with_anthropic_goes_upstream_and_nowhere_else(
        ant, upstream, wire):
    upstream.enqueue(json_reply(anthropic_error_body("api_error", "boom"), status=500))
    with pytest.raises(anthropic.InternalServerError):
        ant.messages.count_tokens(model="claude-first", messages=MESSAGES)
    assert [r.route for r in upstream.requests] == ["/v1/messages/count_tokens"]  # never to Chat
    assert "x-llm-proxy-estimate" not in wire.headers[-1]


# -- the openai SDK on Anthropic's API ----------------------------------------------------------
def test_chat_stream_of_text_with_the_usage_chunk(oai, upstream, server, wire):
    chunks = list(oai.chat.completions.create(
        model="gpt-on-claude", stream=True, stream_options={"include_usage": True},
        messages=[{"role": "developer", "content": "Be brief."}, *MESSAGES]))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == DEFAULT_TEXT
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["stop"]
    usage = chunks[-1].usage
    assert not chunks[-1].choices and (usage.prompt_tokens, usage.completion_tokens,
                                       usage.prompt_tokens_details.cached_tokens) == (
        total_input(), DEFAULT_USAGE["output"], DEFAULT_USAGE["cache_read"])
    body = assert_sent_to_anthropic(upstream.requests[-1])
    assert (body["system"], body["messages"], body["max_tokens"], body["stream"]) == (
        "Be brief.", [{"role": "user", "content": [{"type": "text", "text": MESSAGES[0]["content"]}]}],
        DEFAULT_MAX_TOKENS, True)
    assert wire.headers[-1]["x-llm-proxy-deployment"] == "claude-up"
    assert_row(server, wire.request_id, "claude-up", CLAUDE_MODEL)


def test_chat_create_of_text_from_anthropic(oai, upstream, server, wire):
    completion = oai.chat.completions.create(model="gpt-on-claude", messages=MESSAGES,
                                             max_completion_tokens=77)
    choice = completion.choices[0]
    assert (choice.message.role, choice.message.content, choice.finish_reason) == (
        "assistant", DEFAULT_TEXT, "stop")
    assert (completion.object, completion.model, completion.usage.prompt_tokens,
            completion.usage.completion_tokens) == ("chat.completion", CLAUDE_MODEL, total_input(), 15)
    assert assert_sent_to_anthropic(upstream.requests[-1])["max_tokens"] == 77
    assert_row(server, wire.request_id, "claude-up", CLAUDE_MODEL)


def test_chat_stream_without_include_usage_gets_no_usage_chunk(oai, server, wire):
    chunks = list(oai.chat.completions.create(model="gpt-on-claude", messages=MESSAGES, stream=True))
    assert all(c.usage is None for c in chunks) and all(c.choices for c in chunks)
    assert_row(server, wire.request_id, "claude-up", CLAUDE_MODEL)  # the row has it all the same


def test_chat_create_with_parallel_tool_calls(oai, upstream, server, wire):
    upstream.enqueue(json_reply({
        "id": "msg_01", "type": "message", "role": "assistant", "model": CLAUDE_MODEL,
        "content": [{"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "toolu_01", "name": DEFAULT_TOOL_NAME, "input": PARIS},
                    {"type": "tool_use", "id": "toolu_02", "name": "get_time", "input": TOKYO}],
        "stop_reason": "tool_use", "stop_sequence": None,
        "usage": {"input_tokens": 25, "output_tokens": 15, "cache_read_input_tokens": 10,
                  "cache_creation_input_tokens": 5}}))
    completion = oai.chat.completions.create(model="gpt-on-claude", messages=MESSAGES,
                                             tools=CHAT_TOOLS, parallel_tool_calls=False, max_tokens=99)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking."
    assert [(c.id, c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == [
        ("toolu_01", DEFAULT_TOOL_NAME, PARIS), ("toolu_02", "get_time", TOKYO)]
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (total_input(), 15)
    body = assert_sent_to_anthropic(upstream.requests[-1])
    assert body["max_tokens"] == 99
    assert body["tool_choice"] == {"type": "auto", "disable_parallel_tool_use": True}
    assert [t["name"] for t in body["tools"]] == [DEFAULT_TOOL_NAME, "get_time"]
    assert_row(server, wire.request_id, "claude-up", CLAUDE_MODEL)


def test_chat_stream_of_parallel_tool_calls_accumulates(oai, upstream):
    upstream.enqueue(sse_reply(anthropic_tool_stream()))
    with oai.chat.completions.stream(model="gpt-on-claude", messages=MESSAGES, tools=CHAT_TOOLS) as stream:
        for _ in stream:
            pass
        completion = stream.get_final_completion()
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "tool_calls" and message.content == "Checking."
    assert [(c.id, c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == [
        ("toolu_01", DEFAULT_TOOL_NAME, PARIS), ("toolu_02", "get_time", TOKYO)]


def test_chat_tool_history_goes_to_anthropic_as_tool_results(oai, upstream):
    oai.chat.completions.create(model="gpt-on-claude", tools=CHAT_TOOLS, messages=[
        {"role": "system", "content": "Be brief."}, *MESSAGES,
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": DEFAULT_TOOL_NAME,
                                                              "arguments": json.dumps(PARIS)}},
            {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": ""}}]},
        {"role": "tool", "tool_call_id": "call_a", "content": "18 C"},
        {"role": "tool", "tool_call_id": "call_b", "content": "09:00"},
        {"role": "user", "content": [{"type": "text", "text": "And this?"},
                                     {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}]}])
    body = assert_sent_to_anthropic(upstream.requests[-1])
    assert body["messages"][1:] == [
        {"role": "assistant", "content": [  # no empty text block
            {"type": "tool_use", "id": "call_a", "name": DEFAULT_TOOL_NAME, "input": PARIS},
            {"type": "tool_use", "id": "call_b", "name": "get_time", "input": {}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "call_a", "content": "18 C"},
            {"type": "tool_result", "tool_use_id": "call_b", "content": "09:00"},
            {"type": "text", "text": "And this?"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}]}]


@pytest.mark.parametrize("extra, says", [
    (dict(n=2), "`n`"),
    (dict(logprobs=True), "`logprobs`"),
    (dict(messages=[*MESSAGES, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]),
     "not valid JSON"),
])
def test_chat_requests_anthropic_cannot_express_are_refused_in_openai_shape(oai, upstream, extra, says):
    kwargs = dict(model="gpt-on-claude", messages=MESSAGES) | extra
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(**kwargs)
    assert info.value.status_code == 400 and says in info.value.message
    assert info.value.body["type"] == "invalid_request_error"
    assert upstream.requests == []


# -- errors in the client's own shape --------------------------------------------------------------
def test_a_chat_upstreams_429_is_an_anthropic_rate_limit_error(ant, upstream, server, wire):
    upstream.enqueue(json_reply(openai_error_body("Rate limit reached", type="requests",
                                                  code="rate_limit_exceeded"),
                                status=429, headers={"retry-after": "7"}))
    with pytest.raises(anthropic.RateLimitError) as info:
        ant.messages.create(model="claude-on-local", max_tokens=64, messages=MESSAGES)
    assert info.value.body["error"] == {"type": "rate_limit_error", "message": "Rate limit reached"}
    assert info.value.response.headers["retry-after"] == "7"
    assert wire.headers[-1]["x-llm-proxy-deployment"] == "local-qwen"
    row = server.row(wire.request_id)
    assert (row["status"], row["end_reason"], row["error"]) == (429, "upstream_error", "Rate limit reached")


@pytest.mark.parametrize("status, error, sdk_error, client_status", [
    (529, anthropic_error_body("overloaded_error", "Overloaded"), openai.InternalServerError, 503),
    (400, anthropic_error_body("invalid_request_error", "prompt is too long: 210000 tokens > 200000 maximum"),
     openai.BadRequestError, 400),
    (401, anthropic_error_body("authentication_error", "invalid x-api-key"), openai.AuthenticationError, 401),
])
def test_an_anthropic_upstreams_error_is_the_openai_sdks_error(oai, upstream, status, error, sdk_error,
                                                                client_status):
    upstream.enqueue(json_reply(error, status=status))
    with pytest.raises(sdk_error) as info:
        oai.chat.completions.create(model="gpt-on-claude", messages=MESSAGES, stream=True)
    assert info.value.status_code == client_status
    assert info.value.body["message"] == error["error"]["message"]
    assert info.value.body["type"] == ("server_error" if client_status >= 500 else "invalid_request_error")


def test_an_error_event_after_content_is_one_terminal_error_in_chat_shape(oai, upstream, server, wire):
    upstream.enqueue(sse_reply(anthropic_stream()[:4] + [anthropic_error_event("overloaded_error", "Overloaded")]))
    chunks = []
    with pytest.raises(openai.APIError) as info:
        for chunk in oai.chat.completions.create(model="gpt-on-claude", messages=MESSAGES, stream=True):
            chunks.append(chunk)
    assert not isinstance(info.value, openai.APIConnectionError)
    assert info.value.message == "Overloaded" and info.value.body["type"] == "server_error"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == DEFAULT_TEXT_PIECES[0]
    row = server.row(wire.request_id)
    assert (row["end_reason"], row["error"], row["deployment"]) == ("upstream_error", "Overloaded", "claude-up")


def test_an_error_chunk_after_content_is_one_anthropic_error_event(ant, upstream):
    upstream.enqueue(sse_reply(chat_stream()[:2] + [chat_error_event("The server had an error")]))
    with pytest.raises(anthropic.APIStatusError) as info:
        with ant.messages.stream(model="claude-on-local", max_tokens=64, messages=MESSAGES) as stream:
            for event in stream:
                assert event.type != "message_stop"
    assert info.value.body["error"] == {"type": "api_error", "message": "The server had an error"}
    assert stream.current_message_snapshot.content[0].text == DEFAULT_TEXT_PIECES[0]


def test_an_unknown_finish_reason_is_a_terminal_error_not_a_silent_stop(ant, upstream, server, wire):
    upstream.enqueue(sse_reply([chat_chunk({"role": "assistant", "content": ""}), chat_chunk({"content": "Hi"}),
                                chat_chunk({}, finish="made_up"), chat_usage_chunk(), sse("[DONE]")]))
    with pytest.raises(anthropic.APIStatusError) as info:
        with ant.messages.stream(model="claude-on-local", max_tokens=64, messages=MESSAGES) as stream:
            list(stream)
    assert "made_up" in info.value.body["error"]["message"]
    row = server.row(wire.request_id)
    assert row["end_reason"] == "upstream_error" and "made_up" in row["error"]
    assert "made_up" in server.log()


# -- fallback across formats ---------------------------------------------------------------------
def stall_after(first_event: bytes):
    return [Status(200, headers={"Content-Type": "text/event-stream"}), Send(first_event), Stall()]


def test_anthropic_client_falls_back_from_a_stalled_anthropic_primary_to_a_chat_deployment(
        ant, upstream, server, wire):
    upstream.enqueue(stall_after(anthropic_stream()[0]), default_script)
    with ant.messages.stream(model="claude-fallback", max_tokens=64, messages=MESSAGES) as stream:
        events = [event.type for event in stream]
        final = stream.get_final_message()
    assert final.content[0].text == DEFAULT_TEXT and final.model == LOCAL_MODEL
    assert events.count("message_start") == 1 and events[-1] == "message_stop"
    assert [r.route for r in upstream.requests] == ["/v1/messages", "/v1/chat/completions"]
    # Its own provider (no key configured) gets the client's key, as ever; the other never does.
    assert CLIENT_KEY in str(upstream.requests[0].headers.raw)
    row = assert_row(server, wire.request_id, "local-fallback", LOCAL_MODEL)
    assert (row["attempts"], row["fallbacks"]) == (2, 1)


def test_chat_client_falls_back_from_a_stalled_chat_primary_to_anthropic(oai, upstream, server, wire):
    upstream.enqueue(stall_after(chat_stream()[0]), default_script)
    chunks = list(oai.chat.completions.create(model="gpt-fallback", messages=MESSAGES, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == DEFAULT_TEXT
    assert sum(1 for c in chunks if c.choices[0].delta.role) == 1
    assert [r.route for r in upstream.requests] == ["/v1/chat/completions", "/v1/messages"]
    row = assert_row(server, wire.request_id, "claude-fallback", CLAUDE_MODEL)
    assert (row["attempts"], row["fallbacks"]) == (2, 1)


# -- provider settings, deployments and odd answers ----------------------------------------------
def test_a_reasoning_models_settings_shape_the_chat_request(ant, upstream):
    with ant.messages.stream(model="claude-on-o", max_tokens=4096, messages=MESSAGES,
                             thinking={"type": "enabled", "budget_tokens": 2048}) as stream:
        stream.get_final_message()
    body = upstream.requests[-1].json
    assert (body["model"], body["max_completion_tokens"], body["reasoning_effort"]) == ("o-model", 4096, "low")
    assert "max_tokens" not in body and "thinking" not in body


def test_chat_clients_get_claudes_thinking_as_reasoning_content(oai, upstream):
    upstream.enqueue(sse_reply(anthropic_stream(thinking=["Let me ", "think."], model=CLAUDE_MODEL)))
    chunks = list(oai.chat.completions.create(model="gpt-on-claude", messages=MESSAGES, stream=True,
                                              reasoning_effort="medium", max_completion_tokens=8000))
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
                        for c in chunks if c.choices)
    assert reasoning == "Let me think."
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == DEFAULT_TEXT
    assert upstream.requests[-1].json["thinking"] == {"type": "enabled", "budget_tokens": 4096}

    upstream.enqueue(json_reply({
        "id": "msg_02", "type": "message", "role": "assistant", "model": CLAUDE_MODEL,
        "content": [{"type": "thinking", "thinking": "Hmm.", "signature": "sig"},
                    {"type": "text", "text": "Hi"}],
        "stop_reason": "end_turn", "stop_sequence": None, "usage": {"input_tokens": 3, "output_tokens": 2}}))
    message = oai.chat.completions.create(model="gpt-on-claude", messages=MESSAGES).choices[0].message
    assert (message.content, message.model_extra.get("reasoning_content")) == ("Hi", "Hmm.")


def test_a_bridged_deployment_without_a_model_of_its_own_is_still_translated(ant, upstream, server, wire):
    msg = ant.messages.create(model="claude-bare", max_tokens=64, messages=MESSAGES)
    assert msg.content[0].text == DEFAULT_TEXT
    request = upstream.requests[-1]
    assert request.route == "/v1/chat/completions" and request.json["model"] == "claude-bare"
    assert request.json["messages"] == MESSAGES
    assert server.row(wire.request_id)["deployment"] == "local"


def test_deployment_params_apply_to_the_translated_request_and_a_retried_refusal_says_so(
        ant, upstream, wire):
    for _ in range(2):
        upstream.enqueue(json_reply(openai_error_body("slow down", type="requests"), status=429,
                                    headers={"retry-after": "0"}))
    with pytest.raises(anthropic.RateLimitError):
        ant.messages.create(model="claude-params", max_tokens=64, messages=MESSAGES)
    assert len(upstream.requests) == 2
    assert upstream.requests[-1].json["frequency_penalty"] == 0.5
    assert wire.headers[-1]["x-should-retry"] == "false"  # the proxy retried already


def test_a_translated_json_answer_masks_an_echoed_key(ant, upstream):
    upstream.enqueue(json_reply({
        "id": "chatcmpl-x", "object": "chat.completion", "created": 1, "model": LOCAL_MODEL,
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": f"your key is {PROVIDER_KEY}"}}],
        "usage": chat_usage()}))
    msg = ant.messages.create(model="claude-on-local", max_tokens=64, messages=MESSAGES)
    assert msg.content[0].text.startswith("your key is ") and PROVIDER_KEY not in msg.content[0].text


@pytest.mark.parametrize("reply, says", [
    (json_reply([]), "not an object"),
    (json_reply(b"{not json"), "not JSON"),
    (json_reply({"id": "x", "object": "chat.completion", "choices": []}), "without a choice"),
])
def test_an_unreadable_json_answer_from_a_chat_upstream_is_a_502(ant, upstream, server, wire, reply, says):
    upstream.enqueue(reply)
    with pytest.raises(anthropic.APIStatusError) as info:
        ant.messages.create(model="claude-on-local", max_tokens=64, messages=MESSAGES)
    assert info.value.status_code == 502 and info.value.body["error"]["type"] == "api_error"
    assert says in info.value.body["error"]["message"]
    assert server.row(wire.request_id)["end_reason"] == "upstream_error"


def test_a_json_answer_to_a_translated_stream_is_a_broken_upstream(ant, upstream):
    upstream.enqueue(json_reply({"id": "x", "object": "chat.completion", "model": LOCAL_MODEL, "choices": [
        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "raw"}}]}))
    with pytest.raises(anthropic.APIStatusError) as info:
        with ant.messages.stream(model="claude-on-local", max_tokens=64, messages=MESSAGES) as stream:
            list(stream)
    assert "non-stream body" in info.value.body["error"]["message"]


def test_a_chat_servers_own_comments_do_not_reach_an_anthropic_client(server, upstream):
    import requests
    events = chat_stream(model=LOCAL_MODEL)
    upstream.enqueue(sse_reply(events[:2] + [b": upstream-ping\n\n"] + events[2:]))
    resp = requests.post(server.url + "/v1/messages", json={
        "model": "claude-on-local", "max_tokens": 64, "stream": True, "messages": MESSAGES}, timeout=30)
    assert b"upstream-ping" not in resp.content and b"event: message_stop" in resp.content



# -- a request one deployment cannot express ---------------------------------------------------------
DOCUMENT = [{"role": "user", "content": [
    {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "A memo."}},
    {"type": "text", "text": "Summarise it."}]}]


def test_a_deployment_that_cannot_express_the_request_is_passed_over(ant, upstream, server, wire):
    """A Chat deployment cannot carry a `document` block: the next deployment (Anthropic)
    takes the request; no request goes to the Chat server."""
    msg = ant.messages.create(model="gpt-fallback", max_tokens=64, messages=DOCUMENT)
    assert msg.content[0].text == DEFAULT_TEXT
    assert [r.route for r in upstream.requests] == ["/v1/messages"]
    assert server.row(wire.request_id)["deployment"] == "claude-fallback"


def test_when_the_only_other_deployment_cannot_express_it_the_client_gets_the_real_error(ant, upstream):
    upstream.enqueue(json_reply(anthropic_error_body("overloaded_error", "Overloaded"), status=529))
    with pytest.raises(anthropic.APIStatusError) as info:
        ant.messages.create(model="claude-first", max_tokens=64, messages=DOCUMENT)
    assert info.value.status_code == 529  # not a 400 about the Chat deployment
    assert [r.route for r in upstream.requests] == ["/v1/messages"]


def test_a_request_no_deployment_can_express_is_a_400(ant, upstream):
    with pytest.raises(anthropic.BadRequestError) as info:
        ant.messages.create(model="claude-on-local", max_tokens=64, messages=DOCUMENT)
    assert "document" in info.value.body["error"]["message"] and upstream.requests == []
