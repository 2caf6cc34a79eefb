"""The I/O-free translators between API formats, rule by rule (issue "Any client, any
provider"): Anthropic Messages clients on OpenAI Chat Completions upstreams so far.  The
translated streams are accumulated by the official `anthropic` SDK's own accumulator."""

from __future__ import annotations

import json

import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import RawMessageStreamEvent
from pydantic import TypeAdapter

from proxy.errors import BadRequest, UpstreamBroken
from pathlib import Path

from proxy.formats.translate import anthropic_chat, chat_anthropic
from proxy.formats.translate.anthropic_chat import (ChatToAnthropicStream, ChatUpstream,
                                                    anthropic_usage, message_from_completion,
                                                    to_chat_request)
from proxy.formats.translate.common import (anthropic_stop_reason, chat_finish_reason,
                                            id_for_anthropic, id_from_anthropic)
from support.sse import parse

PNG = "iVBORw0KGgo="


def request(**fields) -> dict:
    return {"model": "local-model", "max_tokens": 100, "messages": [], **fields}


# -- requests ---------------------------------------------------------------------------------
@pytest.mark.parametrize("fields, expected", [
    pytest.param(dict(system="Be brief."), {"messages": [{"role": "system", "content": "Be brief."}]},
                 id="system-string"),
    pytest.param(dict(system=[{"type": "text", "text": "A", "cache_control": {"type": "ephemeral"}},
                              {"type": "text", "text": "B"}]),
                 {"messages": [{"role": "system", "content": "A\n\nB"}]}, id="system-blocks"),
    pytest.param(dict(messages=[{"role": "user", "content": "hi"}]),
                 {"messages": [{"role": "user", "content": "hi"}]}, id="user-text"),
    pytest.param(dict(messages=[{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
        {"type": "image", "source": {"type": "url", "url": "https://x.test/a.png"}}]}]),
        {"messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
            {"type": "image_url", "image_url": {"url": "https://x.test/a.png"}}]}]},
        id="images-base64-and-url"),
    pytest.param(dict(messages=[
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "hmm", "signature": "sig"},
            {"type": "text", "text": "Let me look."},
            {"type": "tool_use", "id": "toolu_1", "name": "read", "input": {"path": "a"}},
            {"type": "tool_use", "id": "toolu_2", "name": "read", "input": {"path": "b"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "A"},
            {"type": "tool_result", "tool_use_id": "toolu_2", "is_error": True,
             "content": [{"type": "text", "text": "no such file"},
                         {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                      "data": PNG}}]},
            {"type": "text", "text": "go on"}]}]),
        {"messages": [
            {"role": "assistant", "content": "Let me look.", "tool_calls": [
                {"id": "toolu_1", "type": "function",
                 "function": {"name": "read", "arguments": '{"path": "a"}'}},
                {"id": "toolu_2", "type": "function",
                 "function": {"name": "read", "arguments": '{"path": "b"}'}}]},
            {"role": "tool", "tool_call_id": "toolu_1", "content": "A"},
            {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: no such file"},
            {"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                {"type": "text", "text": "go on"}]}]},
        id="tool-turn-thinking-dropped-image-moves-after-the-results"),
    pytest.param(dict(messages=[{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_9", "content": [{"type": "text", "text": "a\nb"}]}]}]),
        {"messages": [{"role": "tool", "tool_call_id": "toolu_9", "content": "a\nb"}]},
        id="a-turn-of-tool-results-only"),
    pytest.param(dict(messages=[{"role": "assistant", "content": [
        {"type": "tool_use", "id": "toolu_9", "name": "ls", "input": {}}]}]),
        {"messages": [{"role": "assistant", "content": None, "tool_calls": [
            {"id": "toolu_9", "type": "function", "function": {"name": "ls", "arguments": "{}"}}]}]},
        id="tool-calls-without-text-have-no-empty-content"),
    pytest.param(dict(tools=[{"name": "Bash", "description": "run", "input_schema": {
        "type": "object", "properties": {"command": {"type": "string"}}}}],
        tool_choice={"type": "any", "disable_parallel_tool_use": True}),
        {"tools": [{"type": "function", "function": {
            "name": "Bash", "description": "run",
            "parameters": {"type": "object", "properties": {"command": {"type": "string"}}}}}],
         "tool_choice": "required", "parallel_tool_calls": False},
        id="claude-code-tool-without-type-and-any"),
    pytest.param(dict(tool_choice={"type": "tool", "name": "Bash"}),
                 {"tool_choice": {"type": "function", "function": {"name": "Bash"}}}, id="tool-choice-named"),
    pytest.param(dict(tool_choice={"type": "auto"}), {"tool_choice": "auto"}, id="tool-choice-auto"),
    pytest.param(dict(tool_choice={"type": "none"}), {"tool_choice": "none"}, id="tool-choice-none"),
    pytest.param(dict(stop_sequences=["END"], temperature=0.2, top_p=0.9, top_k=5,
                      metadata={"user_id": "u-1"}),
                 {"stop": ["END"], "temperature": 0.2, "top_p": 0.9, "user": "u-1"},
                 id="sampling-stop-user-top-k-dropped"),
    pytest.param(dict(stream=True), {"stream": True, "stream_options": {"include_usage": True}},
                 id="stream-asks-for-usage"),
    pytest.param(dict(thinking={"type": "enabled", "budget_tokens": 10000}), {},
                 id="thinking-dropped-without-reasoning-effort"),
])
def test_a_messages_request_as_chat(fields, expected):
    got = to_chat_request(request(**fields))
    want = {"model": "local-model", "max_tokens": 100, "messages": [], **expected}
    assert got == want


@pytest.mark.parametrize("budget, effort", [(2000, "low"), (10000, "medium"), (32000, "high")])
def test_thinking_becomes_reasoning_effort_where_the_provider_takes_it(budget, effort):
    upstream = ChatUpstream(max_tokens_field="max_completion_tokens", reasoning_effort=True)
    got = to_chat_request(request(thinking={"type": "enabled", "budget_tokens": budget}), upstream)
    assert (got["reasoning_effort"], got["max_completion_tokens"]) == (effort, 100)
    assert "max_tokens" not in got


@pytest.mark.parametrize("fields, needle", [
    (dict(messages=[{"role": "system", "content": "x"}]), "role"),
    (dict(messages=[{"role": "user", "content": [{"type": "document", "source": {}}]}]), "document"),
    (dict(tools=[{"type": "web_search_20250305", "name": "web_search"}]), "web_search_20250305"),
    (dict(messages="hi"), "messages"),
])
def test_what_a_chat_upstream_cannot_take_is_a_clear_400(fields, needle):
    with pytest.raises(BadRequest, match=needle):
        to_chat_request(request(**fields))


@pytest.mark.parametrize("original", ["call_abc-12", "call:1", "fc_1/2", "llmp_looks_encoded", "ü"])
def test_tool_ids_anthropic_would_refuse_are_mapped_reversibly(original):
    mapped = id_for_anthropic(original)
    assert all(c.isalnum() or c in "_-" for c in mapped)
    assert id_from_anthropic(mapped) == original
    replayed = to_chat_request(request(messages=[{"role": "assistant", "content": [
        {"type": "tool_use", "id": mapped, "name": "f", "input": {}}]}]))
    assert replayed["messages"][0]["tool_calls"][0]["id"] == original


# -- stop reasons, one table both ways ------------------------------------------------------------
@pytest.mark.parametrize("finish, tools, stop", [
    ("stop", False, "end_turn"), ("stop", True, "tool_use"), ("tool_calls", True, "tool_use"),
    ("length", True, "max_tokens"), ("length", False, "max_tokens"),
    ("content_filter", False, "refusal"), (None, False, "end_turn"), ("function_call", True, "tool_use"),
])
def test_stop_reasons(finish, tools, stop):
    assert anthropic_stop_reason(finish, tools) == stop


@pytest.mark.parametrize("stop, tools, finish", [
    ("end_turn", False, "stop"), ("end_turn", True, "tool_calls"), ("tool_use", True, "tool_calls"),
    ("max_tokens", True, "length"), ("refusal", False, "content_filter"), ("stop_sequence", False, "stop"),
])
def test_finish_reasons(stop, tools, finish):
    assert chat_finish_reason(stop, tools) == finish


def test_an_unknown_reason_is_an_upstream_fault_never_a_silent_stop():
    with pytest.raises(UpstreamBroken, match="weird"):
        anthropic_stop_reason("weird", False)
    with pytest.raises(UpstreamBroken, match="weird"):
        chat_finish_reason("weird", False)


# -- usage: each protocol's own meaning -----------------------------------------------------------
def test_cached_prompt_tokens_are_not_counted_twice():
    assert anthropic_usage({"prompt_tokens": 1000, "completion_tokens": 50,
                            "prompt_tokens_details": {"cached_tokens": 800}}) == {
        "input_tokens": 200, "output_tokens": 50, "cache_read_input_tokens": 800}


def test_cache_writes_in_the_prompt_are_reported_beside_the_input():
    assert anthropic_usage({"prompt_tokens": 40, "completion_tokens": 15, "prompt_tokens_details": {
        "cached_tokens": 10, "cache_write_tokens": 5}}) == {
        "input_tokens": 25, "output_tokens": 15, "cache_read_input_tokens": 10,
        "cache_creation_input_tokens": 5}


# -- the JSON answer ----------------------------------------------------------------------------
def test_a_completion_with_reasoning_text_and_parallel_tool_calls_as_a_message():
    completion = {"id": "chatcmpl-1", "object": "chat.completion", "model": "qwen3",
                  "choices": [{"index": 0, "finish_reason": "stop", "message": {
                      "role": "assistant", "content": "Reading both.", "reasoning_content": "two files",
                      "tool_calls": [
                          {"id": "call:1", "type": "function",
                           "function": {"name": "read", "arguments": '{"path":"a"}'}},
                          {"id": "call_2", "type": "function", "function": {"name": "ls", "arguments": ""}}]}}],
                  "usage": {"prompt_tokens": 30, "completion_tokens": 12}}
    message = message_from_completion(completion)
    assert message["content"] == [
        {"type": "thinking", "thinking": "two files", "signature": ""},
        {"type": "text", "text": "Reading both."},
        {"type": "tool_use", "id": id_for_anthropic("call:1"), "name": "read", "input": {"path": "a"}},
        {"type": "tool_use", "id": "call_2", "name": "ls", "input": {}}]
    assert message["stop_reason"] == "tool_use"  # "stop" after tool calls would leave them unrun
    assert message["usage"] == {"input_tokens": 30, "output_tokens": 12}


# -- the stream ---------------------------------------------------------------------------------
def chunk(delta: dict | None = None, finish: str | None = None, **extra) -> dict:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return {"id": "chatcmpl-7", "object": "chat.completion.chunk", "model": "qwen3",
            "choices": choices, **extra}


def tool(index: int, call_id: str | None = None, name: str | None = None, args: str | None = None):
    call: dict = {"index": index}
    if call_id:
        call.update(id=call_id, type="function")
    function = {k: v for k, v in (("name", name), ("arguments", args)) if v is not None}
    if function:
        call["function"] = function
    return call


def translate(chunks: list[dict], estimate: int = 42) -> tuple[list[tuple[str, dict]], object]:
    """The events for `chunks` (then the stream's end), and the message the official SDK
    accumulates from them."""
    stream = ChatToAnthropicStream(model="qwen3", input_estimate=estimate)
    raw = b"".join(b"".join(stream.feed(c)) for c in chunks) + b"".join(stream.finish())
    assert stream.finish() == []  # the end is said once
    events = [(name, json.loads(data)) for name, data in parse(raw)]
    snapshot, bufs = None, {}
    adapter = TypeAdapter(RawMessageStreamEvent)
    for _, data in events:
        snapshot = accumulate_event(event=adapter.validate_python(data), current_snapshot=snapshot,
                                    json_bufs=bufs)
    return events, snapshot


USAGE = {"prompt_tokens": 120, "completion_tokens": 9, "prompt_tokens_details": {"cached_tokens": 100}}


def test_a_text_stream_becomes_one_text_block_with_the_final_usage():
    events, message = translate([
        chunk({"role": "assistant", "content": ""}), chunk({"content": "Hel"}),
        chunk({"content": "lo"}, finish="stop"), chunk(None, usage=USAGE)])
    assert [name for name, _ in events] == [
        "message_start", "content_block_start", "content_block_delta", "content_block_delta",
        "content_block_stop", "message_delta", "message_stop"]
    assert events[0][1]["message"]["usage"]["input_tokens"] == 42  # the estimate, never 0
    assert [(b.type, b.text) for b in message.content] == [("text", "Hello")]
    assert message.stop_reason == "end_turn"
    assert (message.usage.input_tokens, message.usage.output_tokens,
            message.usage.cache_read_input_tokens) == (20, 9, 100)


def test_parallel_tool_calls_in_one_chunk_each_get_their_block_after_the_text():
    events, message = translate([
        chunk({"role": "assistant", "content": "Both."}),
        chunk({"tool_calls": [tool(0, "call_a", "read", '{"pa'), tool(1, "call:b", "ls", "")]}),
        chunk({"tool_calls": [tool(1, args='{"dir":"/"}')]}),
        chunk({}, finish="tool_calls"), chunk(None, usage=USAGE)])
    assert [(b.type, getattr(b, "text", None), getattr(b, "name", None), getattr(b, "input", None))
            for b in message.content] == [
        ("text", "Both.", None, None), ("tool_use", None, "read", {}), ("tool_use", None, "ls", {"dir": "/"})]
    assert message.content[2].id == id_for_anthropic("call:b")
    assert message.stop_reason == "tool_use"
    deltas = [e for n, e in events if n == "content_block_delta"]
    assert all(d["delta"].get("partial_json") != "" for d in deltas)  # no empty json deltas


def test_the_read_tool_whose_arguments_were_cut_is_left_as_the_sdk_reads_it():
    """`{"pa` never completed: the SDK's accumulator keeps `{}` until valid JSON arrives;
    what matters here is that the block got exactly the bytes the upstream sent."""
    events, _ = translate([chunk({"tool_calls": [tool(0, "call_a", "read", '{"pa')]}),
                           chunk({"tool_calls": [tool(0, args='th":"a"}')]}, finish="tool_calls")])
    partial = "".join(e["delta"]["partial_json"] for n, e in events if n == "content_block_delta")
    assert json.loads(partial) == {"path": "a"}


def test_arguments_on_the_final_chunk_are_kept_and_stop_after_tools_means_tool_use():
    _, message = translate([
        chunk({"role": "assistant"}),
        chunk({"tool_calls": [tool(0, "call_a", "read")]}),
        chunk({"tool_calls": [tool(0, args='{"path":"x"}')]}, finish="stop")])
    assert [(b.type, b.input) for b in message.content] == [("tool_use", {"path": "x"})]
    assert message.stop_reason == "tool_use"


def test_reasoning_then_text_are_two_blocks_and_length_wins():
    _, message = translate([
        chunk({"reasoning_content": "let me think"}), chunk({"reasoning": " more"}),
        chunk({"content": "Answer"}, finish="length")])
    assert [(b.type, getattr(b, "thinking", None) or getattr(b, "text", None)) for b in message.content] == [
        ("thinking", "let me think more"), ("text", "Answer")]
    assert message.stop_reason == "max_tokens"


def test_an_empty_stream_is_still_one_well_formed_message():
    events, message = translate([])
    assert [name for name, _ in events] == ["message_start", "message_delta", "message_stop"]
    assert message.content == [] and message.stop_reason == "end_turn"


def test_going_back_to_a_finished_tool_call_is_an_upstream_fault():
    stream = ChatToAnthropicStream()
    stream.feed(chunk({"tool_calls": [tool(0, "call_a", "a", "{}"), tool(1, "call_b", "b", "{}")]}))
    with pytest.raises(UpstreamBroken, match="finished tool call"):
        stream.feed(chunk({"tool_calls": [tool(0, args='"x"')]}))


# ===========================================================================================
# Chat Completions clients on Anthropic upstreams
# ===========================================================================================
from openai.lib.streaming.chat import ChatCompletionStreamState  # noqa: E402
from openai.types.chat import ChatCompletionChunk  # noqa: E402

from proxy.formats.translate.chat_anthropic import (AnthropicToChatStream,  # noqa: E402
                                                    AnthropicUpstream, chat_usage,
                                                    completion_from_message, to_messages_request)


def chat_request(**fields) -> dict:
    return {"model": "claude-sonnet-5", "messages": [], **fields}


@pytest.mark.parametrize("fields, expected", [
    pytest.param(dict(messages=[{"role": "system", "content": "A"}, {"role": "developer", "content": "B"},
                                {"role": "user", "content": "hi"}]),
                 {"system": "A\n\nB", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]},
                 id="system-and-developer"),
    pytest.param(dict(messages=[
        {"role": "user", "content": [{"type": "text", "text": "see"},
                                     {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                                     {"type": "image_url", "image_url": {"url": "https://x.test/a.png"}}]}]),
        {"messages": [{"role": "user", "content": [
            {"type": "text", "text": "see"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
            {"type": "image", "source": {"type": "url", "url": "https://x.test/a.png"}}]}]},
        id="images"),
    pytest.param(dict(messages=[
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call:1", "type": "function", "function": {"name": "read", "arguments": '{"p":1}'}},
            {"id": "call_2", "type": "function", "function": {"name": "ls", "arguments": ""}}]},
        {"role": "tool", "tool_call_id": "call:1", "content": "A"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "B"}]},
        {"role": "user", "content": "and?"}]),
        {"messages": [
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": id_for_anthropic("call:1"), "name": "read", "input": {"p": 1}},
                {"type": "tool_use", "id": "call_2", "name": "ls", "input": {}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": id_for_anthropic("call:1"), "content": "A"},
                {"type": "tool_result", "tool_use_id": "call_2", "content": "B"},
                {"type": "text", "text": "and?"}]}]},
        id="tool-turn-one-user-message-no-empty-text"),
    pytest.param(dict(max_completion_tokens=50, stop="END", user="u-1", temperature=0.1,
                      tools=[{"type": "function", "function": {"name": "f", "description": "d",
                                                               "parameters": {"type": "object"}}}],
                      tool_choice="required", parallel_tool_calls=False, stream=True),
                 {"max_tokens": 50, "stop_sequences": ["END"], "metadata": {"user_id": "u-1"},
                  "temperature": 0.1, "stream": True,
                  "tools": [{"name": "f", "description": "d", "input_schema": {"type": "object"}}],
                  "tool_choice": {"type": "any", "disable_parallel_tool_use": True}},
                 id="limits-stop-user-tools"),
    pytest.param(dict(tool_choice={"type": "function", "function": {"name": "f"}}),
                 {"tool_choice": {"type": "tool", "name": "f"}}, id="named-tool-choice"),
])
def test_a_chat_request_as_messages(fields, expected):
    got = to_messages_request(chat_request(**fields), AnthropicUpstream(default_max_tokens=777))
    want = {"model": "claude-sonnet-5", "messages": [], "max_tokens": 777, **expected}
    assert got == want


@pytest.mark.parametrize("fields, needle", [
    (dict(n=2), "`n`"), (dict(logprobs=True), "logprobs"),
    (dict(response_format={"type": "json_schema", "json_schema": {}}), "json_schema"),
    (dict(messages=[{"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]), "not valid JSON"),
    (dict(messages=[{"role": "user", "content": [{"type": "input_audio"}]}]), "input_audio"),
])
def test_what_anthropic_cannot_express_is_a_clear_400(fields, needle):
    with pytest.raises(BadRequest, match=needle):
        to_messages_request(chat_request(**fields))


def test_anthropic_usage_in_chat_terms_counts_cached_input_once():
    assert chat_usage({"input_tokens": 20, "output_tokens": 9, "cache_read_input_tokens": 100,
                       "cache_creation_input_tokens": 30}) == {
        "prompt_tokens": 150, "completion_tokens": 9, "total_tokens": 159,
        "prompt_tokens_details": {"cached_tokens": 100}}


def test_a_message_with_tool_use_as_a_completion():
    message = {"id": "msg_1", "type": "message", "model": "claude-sonnet-5", "stop_reason": "tool_use",
               "content": [{"type": "thinking", "thinking": "hm", "signature": "s"},
                           {"type": "text", "text": "Reading."},
                           {"type": "tool_use", "id": id_for_anthropic("call:9"), "name": "read",
                            "input": {"p": 1}}],
               "usage": {"input_tokens": 5, "output_tokens": 7}}
    completion = completion_from_message(message, created=1700000000, reasoning=True)
    choice = completion["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"] == {"role": "assistant", "content": "Reading.", "reasoning_content": "hm",
                                 "tool_calls": [{"id": "call:9", "type": "function", "function": {
                                     "name": "read", "arguments": '{"p": 1}'}}]}
    assert completion["usage"] == {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}


def chat_translate(events: list[tuple[str, dict]], include_usage: bool = True):
    """The Chat chunks for Messages `events`, and the completion the official openai SDK
    accumulates from them."""
    stream = AnthropicToChatStream(created=1700000000, include_usage=include_usage)
    raw = b"".join(b"".join(stream.feed(name, data)) for name, data in events) + b"".join(stream.finish())
    frames = [data for _, data in parse(raw)]
    assert frames[-1] == "[DONE]" and frames.count("[DONE]") == 1
    state = ChatCompletionStreamState()
    chunks = [json.loads(f) for f in frames[:-1]]
    for c in chunks:
        state.handle_chunk(ChatCompletionChunk.model_validate(c))
    return chunks, state.current_completion_snapshot


def anthropic_events(*blocks: tuple[str, list[dict]], stop: str = "end_turn") -> list[tuple[str, dict]]:
    """A Messages stream: (content_block_start block, its deltas) per block."""
    events = [("message_start", {"type": "message_start", "message": {
        "id": "msg_s", "type": "message", "role": "assistant", "model": "claude-sonnet-5", "content": [],
        "stop_reason": None, "usage": {"input_tokens": 20, "cache_read_input_tokens": 100,
                                       "output_tokens": 1}}}), ("ping", {"type": "ping"})]
    for index, (block, deltas) in enumerate(blocks):
        events.append(("content_block_start", {"type": "content_block_start", "index": index,
                                               "content_block": block}))
        events += [("content_block_delta", {"type": "content_block_delta", "index": index, "delta": d})
                   for d in deltas]
        events.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
    events.append(("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop},
                                     "usage": {"output_tokens": 11}}))
    events.append(("message_stop", {"type": "message_stop"}))
    return events


def test_a_messages_stream_with_text_and_parallel_tools_as_chat_chunks():
    chunks, completion = chat_translate(anthropic_events(
        ({"type": "thinking", "thinking": ""}, [{"type": "thinking_delta", "thinking": "hidden"}]),
        ({"type": "text", "text": ""}, [{"type": "text_delta", "text": "Two "},
                                        {"type": "text_delta", "text": "calls."}]),
        ({"type": "tool_use", "id": "toolu_a", "name": "read", "input": {}},
         [{"type": "input_json_delta", "partial_json": '{"p":'}, {"type": "input_json_delta", "partial_json": '1}'}]),
        ({"type": "tool_use", "id": id_for_anthropic("call:b"), "name": "ls", "input": {}}, []),
        stop="tool_use"))
    choice = completion.choices[0]
    assert choice.message.content == "Two calls." and choice.finish_reason == "tool_calls"
    assert [(t.id, t.function.name, t.function.arguments) for t in choice.message.tool_calls] == [
        ("toolu_a", "read", '{"p":1}'), ("call:b", "ls", "")]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all("reasoning_content" not in c["choices"][0]["delta"] for c in chunks if c["choices"])
    assert chunks[-1] == {"id": "chatcmpl-msg_s", "object": "chat.completion.chunk", "created": 1700000000,
                          "model": "claude-sonnet-5", "choices": [], "usage": {
                              "prompt_tokens": 120, "completion_tokens": 11, "total_tokens": 131,
                              "prompt_tokens_details": {"cached_tokens": 100}}}


def test_no_usage_chunk_unless_the_client_asked_and_max_tokens_is_length():
    chunks, completion = chat_translate(anthropic_events(
        ({"type": "text", "text": ""}, [{"type": "text_delta", "text": "cut"}]), stop="max_tokens"),
        include_usage=False)
    assert all(c["choices"] for c in chunks)
    assert (completion.choices[0].message.content, completion.choices[0].finish_reason) == ("cut", "length")


# ===========================================================================================
# What is dropped is dropped, and the README says so
# ===========================================================================================
README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def _dropped_row(heading: str) -> str:
    table = README.split(heading, 1)[1]
    return next(line for line in table.splitlines() if line.startswith("| **dropped**"))


@pytest.mark.parametrize("module, heading, translate, base", [
    (anthropic_chat, "Anthropic request → Chat upstream:", to_chat_request,
     {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}),
    (chat_anthropic, "Chat request → Anthropic upstream:", to_messages_request,
     {"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
])
def test_every_dropped_field_is_dropped_and_listed_in_the_readme(module, heading, translate, base):
    row = _dropped_row(heading)
    for name in module.DROPPED_FIELDS:
        assert f"`{name}`" in row, f"{name} is dropped but the README does not say so"
        assert name not in translate(dict(base, **{name: {"x": 1}}))


# ===========================================================================================
# Byte-split streams: the framer hands the translators whole events, wherever the cuts fall
# ===========================================================================================
from proxy.formats.translate.bridge import AnthropicOnChat, ChatOnAnthropic  # noqa: E402
from proxy.sse import SSEFramer  # noqa: E402
from proxy.limits import parse_upstream_json  # noqa: E402
from support.builders import anthropic_stream, chat_stream  # noqa: E402

TOOL = {"name": "get_weather", "input": {"location": "Paris"}}


def _translated(bridge, wire: bytes, cuts: list[int]) -> bytes:
    """The client's bytes for an upstream stream delivered in pieces cut at `cuts`."""
    framer = SSEFramer()
    translator = bridge.events({"model": "m", "messages": []}, include_usage=True, created=7)
    out = []
    bounds = [0, *cuts, len(wire)]
    for start, end in zip(bounds, bounds[1:]):
        for event in framer.feed(wire[start:end]):
            data = event.data
            payload = "[DONE]" if data.strip() == "[DONE]" else parse_upstream_json(data)
            out += translator.feed(event.event, payload)
            if payload == "[DONE]":
                out += translator.finish()
    return b"".join(out)


@pytest.mark.parametrize("bridge, wire", [
    (AnthropicOnChat(), b"".join(chat_stream(tool=TOOL, newline="\r\n"))),
    (ChatOnAnthropic(), b"".join(anthropic_stream(tool=TOOL, thinking="hmm", newline="\r\n"))),
], ids=["chat-upstream", "anthropic-upstream"])
def test_a_stream_cut_anywhere_translates_to_the_same_bytes(bridge, wire):
    whole = _translated(bridge, wire, [])
    assert whole.count(b"\n\n") >= 6
    for cut in range(1, len(wire)):  # every two-piece split, CRLF pairs and UTF-8 included
        assert _translated(bridge, wire, [cut]) == whole, cut
    assert _translated(bridge, wire, list(range(1, len(wire)))) == whole  # a byte at a time


# -- error events and statuses across formats ---------------------------------------------------
from proxy.formats import ANTHROPIC, OPENAI_CHAT  # noqa: E402
from proxy.formats.translate.bridge import Bridges, ProviderTranslation, foreign_error  # noqa: E402


@pytest.mark.parametrize("bridge, payload, status, client_type", [
    (AnthropicOnChat(), {"error": {"type": "rate_limit_exceeded", "message": "m"}}, 429, "rate_limit_error"),
    (AnthropicOnChat(), {"error": {"type": "server_error", "message": "m"}}, 500, "api_error"),
    (AnthropicOnChat(), {"error": {"type": "made_up", "message": "m"}}, 500, "api_error"),
    (AnthropicOnChat(), {"error": {"message": "m"}}, 500, "api_error"),
    (ChatOnAnthropic(), {"type": "error", "error": {"type": "overloaded_error", "message": "m"}}, 503,
     "server_error"),
    (ChatOnAnthropic(), {"type": "error", "error": {"type": "invalid_request_error", "message": "m"}}, 400,
     "invalid_request_error"),
])
def test_an_upstream_error_event_is_told_with_a_status_and_type_of_the_clients_protocol(
        bridge, payload, status, client_type):
    err = bridge.event_error(payload)
    assert (err.status, err.message, bridge.client.error_type(err)) == (status, "m", client_type)


def test_anthropic_clients_keep_529_and_openai_clients_get_503():
    assert foreign_error(ANTHROPIC, 529, "busy").status == 529
    assert ANTHROPIC.error_type(foreign_error(ANTHROPIC, 529, "busy")) == "overloaded_error"
    assert foreign_error(OPENAI_CHAT, 529, "busy").status == 503


def test_bridges_join_only_formats_they_can_translate():
    bridges = Bridges({"a": ProviderTranslation("anthropic"), "o": ProviderTranslation("openai")})
    assert isinstance(bridges.between(ANTHROPIC, "o"), AnthropicOnChat)
    assert isinstance(bridges.between(OPENAI_CHAT, "a"), ChatOnAnthropic)
    assert bridges.between(ANTHROPIC, "a") is None and bridges.between(OPENAI_CHAT, "o") is None
    assert not bridges.reaches(ANTHROPIC, "unknown")


def test_a_chat_stream_without_a_model_names_the_requested_one():
    translator = AnthropicOnChat().events({"model": "claude-x", "messages": []}, True, 0)
    start = parse(b"".join(translator.feed(None, {"id": "c", "choices": [
        {"index": 0, "delta": {"content": "Hi"}}]})))[0]
    assert json.loads(start.data)["message"]["model"] == "claude-x"
