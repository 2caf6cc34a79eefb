"""A complete streamed answer assembled into the non-streaming body (proxy/formats/assemble.py).

Each result is checked twice: the official SDKs' non-streaming types must parse it (that is
what a client of the cache gets), and its values must be the stream's (text, thinking and
signature, tool input, finish reasons, usage, ids, model).  A stream that is not one whole
answer must raise `NotAssembled`, and nothing else, whatever odd shape it has.
"""

from __future__ import annotations

import copy
import json
from typing import Any, Iterator

import anthropic.types
import openai.types.chat
import openai.types.responses
import pytest

from proxy.formats.assemble import NotAssembled, assemble_stream
from support.builders import (ANTHROPIC_TEXT, ANTHROPIC_TOOL, CHAT_TEXT, CHAT_TOOL,
                              DEFAULT_RESPONSES_MODEL, DEFAULT_TEXT, DEFAULT_USAGE, RESPONSES_TEXT,
                              anthropic_error_event, anthropic_stream, chat_error_event,
                              chat_stream, chat_usage, responses_error_event, responses_stream, sse,
                              total_input)

KEEPALIVE = b": keepalive\n\n"


def joined(events: list[bytes]) -> bytes:
    return b"".join(events)


def anthropic_ok(body: bytes) -> tuple[dict, anthropic.types.Message]:
    result = assemble_stream("anthropic", body)
    return result, anthropic.types.Message.model_validate(result)


def chat_ok(body: bytes) -> tuple[dict, openai.types.chat.ChatCompletion]:
    result = assemble_stream("openai-chat", body)
    return result, openai.types.chat.ChatCompletion.model_validate(result)


def refused(fmt: str, body: bytes) -> NotAssembled:
    """The stream is refused, by a check made on purpose (not by the last-resort `except`
    that turns a stray KeyError or TypeError into a refusal)."""
    with pytest.raises(NotAssembled) as caught:
        assemble_stream(fmt, body)
    assert "malformed stream" not in str(caught.value), caught.value
    return caught.value


# -- Anthropic ----------------------------------------------------------------------------

def ant(obj: dict) -> bytes:
    """One Anthropic event, named after its type as the API does."""
    return sse(obj, obj["type"])


def ant_start(usage: dict | None = None, **extra: Any) -> bytes:
    return ant({"type": "message_start", "message": {
        "id": "msg_rich", "type": "message", "role": "assistant", "model": "claude-opus-4-1",
        "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": usage or {"input_tokens": 12, "cache_read_input_tokens": 3, "output_tokens": 1},
        **extra}})


def ant_block(index: int, start: dict, *deltas: dict) -> list[bytes]:
    return ([ant({"type": "content_block_start", "index": index, "content_block": start})]
            + [ant({"type": "content_block_delta", "index": index, "delta": d}) for d in deltas]
            + [ant({"type": "content_block_stop", "index": index})])


def ant_end(stop_reason: str = "end_turn", usage: dict | None = None,
            stop_sequence: str | None = None) -> list[bytes]:
    return [ant({"type": "message_delta",
                 "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                 "usage": usage or {"output_tokens": 42}}),
            ant({"type": "message_stop"})]


def text_delta(text: str) -> dict:
    return {"type": "text_delta", "text": text}


def json_delta(fragment: str) -> dict:
    return {"type": "input_json_delta", "partial_json": fragment}


TOOL_INPUT = {"city": "Paris", "days": 3, "units": ["C", "F"], "note": "a \"quoted\" é"}


def rich_anthropic() -> list[bytes]:
    """Thinking (pieces + signature), redacted thinking, text, a tool whose input JSON is cut
    everywhere (inside a string, an escape, a number)."""
    tool_json = json.dumps(TOOL_INPUT, ensure_ascii=False)
    cuts = [0, 1, 5, 12, 22, 25, 40, len(tool_json)]
    fragments = [""] + [tool_json[a:b] for a, b in zip(cuts, cuts[1:])]
    return [ant_start(container={"id": "container_1", "expires_at": "2026-01-01T00:00:00Z"}),
            anthropic_ping_event(),
            *ant_block(0, {"type": "thinking", "thinking": "", "signature": ""},
                       {"type": "thinking_delta", "thinking": "Let me "},
                       {"type": "thinking_delta", "thinking": "think."},
                       {"type": "signature_delta", "signature": "EqQBCgIYAhIMsig=="}),
            *ant_block(1, {"type": "redacted_thinking", "data": "EmwKAhgBEgyREDACTED"}),
            *ant_block(2, {"type": "text", "text": ""},
                       text_delta("I will "), text_delta("check.")),
            *ant_block(3, {"type": "tool_use", "id": "toolu_9", "name": "forecast", "input": {}},
                       *[json_delta(f) for f in fragments]),
            *ant_end("tool_use", {"output_tokens": 77, "input_tokens": 13,
                                  "cache_read_input_tokens": None})]


def anthropic_ping_event() -> bytes:
    return sse({"type": "ping"}, "ping")


def test_anthropic_transcript_text() -> None:
    result, message = anthropic_ok(ANTHROPIC_TEXT)
    assert message.id == "msg_01XFDUDYJgAACzvnptvVoYEL"
    assert message.model == "claude-sonnet-4-5-20250929"
    assert message.role == "assistant" and message.type == "message"
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].text == "Hello!"
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    assert message.usage.input_tokens == 25
    assert message.usage.output_tokens == 15  # message_delta's, not message_start's 1
    assert message.usage.service_tier == "standard"
    assert result["usage"]["cache_creation"] == {"ephemeral_5m_input_tokens": 0,
                                                 "ephemeral_1h_input_tokens": 0}


def test_anthropic_builder_stream_with_pings_and_tool() -> None:
    body = joined(anthropic_stream(tool={"input": {"location": "Oslo"}, "fragments": None}))
    _, message = anthropic_ok(body)
    assert [b.type for b in message.content] == ["text", "tool_use"]
    assert message.content[0].text == DEFAULT_TEXT
    assert message.content[1].input == {"location": "Oslo"}
    assert message.stop_reason == "tool_use"
    assert message.usage.cache_read_input_tokens == DEFAULT_USAGE["cache_read"]
    assert message.usage.output_tokens == DEFAULT_USAGE["output"]


def test_anthropic_transcript_tool() -> None:
    _, message = anthropic_ok(ANTHROPIC_TOOL)
    tool = message.content[1]
    assert tool.type == "tool_use" and tool.id == "toolu_01T1x1fJ34qAmk2tNTrN7Up6"
    assert tool.name == "get_weather" and tool.input == {"location": "San Francisco, CA"}
    assert message.usage.input_tokens == 472 and message.usage.output_tokens == 89


def test_anthropic_thinking_signature_redacted_text_and_tool() -> None:
    result, message = anthropic_ok(joined(rich_anthropic()))
    assert [b.type for b in message.content] == [
        "thinking", "redacted_thinking", "text", "tool_use"]
    thinking, redacted, text, tool = message.content
    assert thinking.thinking == "Let me think." and thinking.signature == "EqQBCgIYAhIMsig=="
    assert redacted.data == "EmwKAhgBEgyREDACTED"
    assert text.text == "I will check."
    assert tool.id == "toolu_9" and tool.name == "forecast" and tool.input == TOOL_INPUT
    assert message.stop_reason == "tool_use"
    assert message.container is not None and message.container.id == "container_1"
    # message_delta's usage overrides key by key; a null there keeps message_start's value.
    assert result["usage"] == {"input_tokens": 13, "cache_read_input_tokens": 3,
                               "output_tokens": 77}


def test_anthropic_signature_in_a_block_started_without_one() -> None:
    body = joined([ant_start(),
                   *ant_block(0, {"type": "thinking", "thinking": ""},
                              {"type": "thinking_delta", "thinking": "hm"},
                              {"type": "signature_delta", "signature": "SIG"}),
                   *ant_block(1, {"type": "text", "text": ""}, text_delta("ok")),
                   *ant_end()])
    _, message = anthropic_ok(body)
    assert message.content[0].signature == "SIG" and message.content[0].thinking == "hm"


def test_anthropic_citations_and_server_tool_blocks() -> None:
    citation_1 = {"type": "web_search_result_location", "cited_text": "Paris is the capital",
                  "url": "https://example.org/paris", "title": "Paris", "encrypted_index": "Eo8B"}
    citation_2 = dict(citation_1, cited_text="of France", encrypted_index="Eo8C")
    search_result = {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1",
                     "content": [{"type": "web_search_result", "title": "Paris",
                                  "url": "https://example.org/paris", "encrypted_content": "EqgB",
                                  "page_age": None}]}
    body = joined([
        ant_start(),
        *ant_block(0, {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search",
                       "input": {}},
                   json_delta('{"query": "capital'), json_delta(' of France"}')),
        *ant_block(1, search_result),
        *ant_block(2, {"type": "text", "text": "", "citations": None},
                   {"type": "citations_delta", "citation": citation_1},
                   text_delta("Paris"),
                   {"type": "citations_delta", "citation": citation_2},
                   text_delta(" is the capital.")),
        *ant_end("end_turn", {"output_tokens": 30, "input_tokens": 900,
                              "server_tool_use": {"web_search_requests": 1,
                                                  "web_fetch_requests": 0}}),
    ])
    result, message = anthropic_ok(body)
    server_tool, results, text = message.content
    assert server_tool.type == "server_tool_use"
    assert server_tool.input == {"query": "capital of France"}
    assert results.type == "web_search_tool_result" and result["content"][1] == search_result
    assert text.text == "Paris is the capital."
    assert result["content"][2]["citations"] == [citation_1, citation_2]
    assert [c.cited_text for c in text.citations] == ["Paris is the capital", "of France"]
    assert message.usage.input_tokens == 900
    assert message.usage.server_tool_use.web_search_requests == 1


def test_anthropic_tool_with_empty_input() -> None:
    body = joined([ant_start(),
                   *ant_block(0, {"type": "tool_use", "id": "toolu_1", "name": "now", "input": {}},
                              json_delta("")),
                   *ant_end("tool_use")])
    _, message = anthropic_ok(body)
    assert message.content[0].input == {}


def test_anthropic_stop_sequence_and_unknown_things_kept_or_ignored() -> None:
    """An unknown event is ignored, an unknown block is kept as started, an unknown delta
    leaves its block alone: the API may add all three."""
    body = joined([ant_start(),
                   ant({"type": "future_event", "whatever": 1}),
                   *ant_block(0, {"type": "future_block", "payload": {"x": 1}},
                              {"type": "future_delta", "bits": "zz"}),
                   *ant_block(1, {"type": "text", "text": ""}, text_delta("a"),
                              {"type": "future_delta", "text": "NOT THIS"}, text_delta("b")),
                   *ant_end("stop_sequence", stop_sequence="STOP")])
    result = assemble_stream("anthropic", body)
    assert result["content"] == [{"type": "future_block", "payload": {"x": 1}},
                                 {"type": "text", "text": "ab"}]
    assert result["stop_reason"] == "stop_sequence" and result["stop_sequence"] == "STOP"


def test_anthropic_message_delta_carries_stop_details_and_container() -> None:
    body = joined([ant_start(),
                   *ant_block(0, {"type": "text", "text": ""}, text_delta("No.")),
                   ant({"type": "message_delta",
                        "delta": {"stop_reason": "refusal", "stop_sequence": None,
                                  "stop_details": {"type": "refusal", "category": "cyber",
                                                   "explanation": "not that"},
                                  "container": {"id": "container_7",
                                                "expires_at": "2026-01-01T00:00:00Z"}},
                        "usage": {"output_tokens": 3}}),
                   ant({"type": "message_stop"})])
    _, message = anthropic_ok(body)
    assert message.stop_reason == "refusal"
    assert message.stop_details.category == "cyber"
    assert message.container.id == "container_7"
    assert message.usage.output_tokens == 3 and message.usage.input_tokens == 12


def test_anthropic_blocks_ordered_by_index() -> None:
    body = joined([ant_start(),
                   ant({"type": "content_block_start", "index": 1,
                        "content_block": {"type": "text", "text": ""}}),
                   ant({"type": "content_block_start", "index": 0,
                        "content_block": {"type": "text", "text": ""}}),
                   ant({"type": "content_block_delta", "index": 1, "delta": text_delta("second")}),
                   ant({"type": "content_block_delta", "index": 0, "delta": text_delta("first")}),
                   ant({"type": "content_block_stop", "index": 0}),
                   ant({"type": "content_block_stop", "index": 1}),
                   *ant_end()])
    _, message = anthropic_ok(body)
    assert [b.text for b in message.content] == ["first", "second"]


# -- OpenAI Chat ---------------------------------------------------------------------------

CHUNK_HEAD = {"id": "chatcmpl-n2", "object": "chat.completion.chunk", "created": 1750000000,
              "model": "gpt-4.1-2025-04-14", "system_fingerprint": "fp_n2",
              "service_tier": "default"}


def chunk(*choices: dict, **fields: Any) -> bytes:
    return sse({**CHUNK_HEAD, "choices": list(choices), **fields})


def choice(index: int, finish: str | None = None, logprobs: Any = None, **delta: Any) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}


def call(index: int, arguments: str, **first: Any) -> dict:
    """A tool call delta; the first one of a call carries id, type and name."""
    out: dict[str, Any] = {"index": index, "function": {"arguments": arguments}}
    if first:
        out.update(id=first["id"], type="function")
        out["function"]["name"] = first["name"]
    return out


def token(text: str) -> dict:
    return {"token": text, "logprob": -0.5, "bytes": list(text.encode()), "top_logprobs": []}


USAGE = chat_usage({"output": 33})
DONE = sse("[DONE]")


def two_choices() -> list[bytes]:
    """n=2, interleaved: choice 0 makes two tool calls whose arguments are split over
    chunks (the two calls' deltas interleave too); choice 1 answers in text, with logprobs."""
    return [
        chunk(choice(0, role="assistant", content=None), choice(1, role="assistant", content="")),
        chunk(choice(0, tool_calls=[call(0, "", id="call_a", name="get_weather")]),
              choice(1, content="Hel", logprobs={"content": [token("Hel")], "refusal": None})),
        chunk(choice(0, tool_calls=[call(0, '{"city":'),
                                    call(1, "", id="call_b", name="get_time")])),
        chunk(choice(1, content="lo", logprobs={"content": [token("lo")], "refusal": None})),
        chunk(choice(0, tool_calls=[call(1, '{"tz": "CET"}')])),
        chunk(choice(0, tool_calls=[call(0, ' "Paris"}')])),
        chunk(choice(1, finish="stop")),
        chunk(choice(0, finish="tool_calls")),
        chunk(usage=USAGE),
        DONE,
    ]


def test_chat_transcript_text() -> None:
    result, completion = chat_ok(CHAT_TEXT)
    assert completion.id == "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG"
    assert completion.object == "chat.completion"
    assert completion.created == 1741570283 and completion.model == "gpt-4o-2024-08-06"
    assert completion.system_fingerprint == "fp_eb9dce56a8" and completion.service_tier == "default"
    (only,) = completion.choices
    assert only.index == 0 and only.finish_reason == "stop" and only.logprobs is None
    assert only.message.role == "assistant" and only.message.content == "Hello!"
    assert only.message.refusal is None and only.message.tool_calls is None
    assert "reasoning_content" not in result["choices"][0]["message"]
    assert completion.usage.prompt_tokens == 19 and completion.usage.completion_tokens == 3
    assert completion.usage.total_tokens == 22


def test_chat_transcript_tool() -> None:
    _, completion = chat_ok(CHAT_TOOL)
    message = completion.choices[0].message
    assert message.content is None and completion.choices[0].finish_reason == "tool_calls"
    (tool_call,) = message.tool_calls
    assert tool_call.id == "call_PieqNSej6kM9hgYbcQdbZSaC" and tool_call.type == "function"
    assert tool_call.function.name == "get_weather"
    assert json.loads(tool_call.function.arguments) == {"location": "Paris"}


def test_chat_two_choices_with_tool_calls_split_across_chunks() -> None:
    result, completion = chat_ok(joined(two_choices()))
    first, second = completion.choices
    assert first.index == 0 and first.finish_reason == "tool_calls"
    assert first.message.content is None
    assert [(c.id, c.function.name) for c in first.message.tool_calls] == [
        ("call_a", "get_weather"), ("call_b", "get_time")]
    assert [json.loads(c.function.arguments) for c in first.message.tool_calls] == [
        {"city": "Paris"}, {"tz": "CET"}]
    assert second.index == 1 and second.finish_reason == "stop"
    assert second.message.content == "Hello" and second.message.tool_calls is None
    assert "tool_calls" not in result["choices"][1]["message"]
    assert [t.token for t in second.logprobs.content] == ["Hel", "lo"]
    assert first.logprobs is None
    assert completion.usage.completion_tokens == 33
    assert completion.usage.prompt_tokens == total_input()
    assert completion.usage.prompt_tokens_details.cached_tokens == DEFAULT_USAGE["cache_read"]


def test_chat_builder_stream_with_usage_chunk() -> None:
    result, completion = chat_ok(joined(chat_stream(usage={"output": 7}, tool={})))
    assert completion.choices[0].message.content == DEFAULT_TEXT
    assert completion.choices[0].message.tool_calls[0].function.arguments == '{"location":"Paris"}'
    assert result["usage"] == chat_usage({"output": 7})
    assert completion.system_fingerprint == "fp_fake"


def test_chat_without_usage_chunk_has_no_usage() -> None:
    result, completion = chat_ok(joined(chat_stream(include_usage=False)))
    assert "usage" not in result and completion.usage is None
    assert completion.choices[0].message.content == DEFAULT_TEXT


def test_chat_usage_on_the_last_content_chunk() -> None:
    """Gemini's compatible endpoint puts usage on the finishing chunk itself."""
    body = joined([chunk(choice(0, role="assistant", content="hi")),
                   chunk(choice(0, finish="stop"), usage=USAGE), DONE])
    result, _ = chat_ok(body)
    assert result["usage"] == USAGE


def test_chat_reasoning_content_and_refusal() -> None:
    body = joined([chunk(choice(0, role="assistant", content="")),
                   chunk(choice(0, reasoning_content="First, ")),
                   chunk(choice(0, reasoning_content="think.")),
                   chunk(choice(0, refusal="I can't ")),
                   chunk(choice(0, refusal="help with that.")),
                   chunk(choice(0, finish="stop")), DONE])
    result, completion = chat_ok(body)
    message = completion.choices[0].message
    assert result["choices"][0]["message"]["reasoning_content"] == "First, think."
    assert message.model_extra["reasoning_content"] == "First, think."
    assert message.refusal == "I can't help with that." and message.content is None


# -- OpenAI Responses ----------------------------------------------------------------------

def test_responses_transcript_is_the_completed_response_as_it_is() -> None:
    """(The document's transcript abbreviates its Response objects: no SDK check here.)"""
    completed = [json.loads(line[6:]) for line in RESPONSES_TEXT.decode().split("\n")
                 if line.startswith("data: ")][-1]
    assert assemble_stream("openai-responses", RESPONSES_TEXT) == completed["response"]


def test_responses_builder_text() -> None:
    result = assemble_stream("openai-responses", joined(responses_stream(usage={"output": 9})))
    response = openai.types.responses.Response.model_validate(result)
    assert response.id == "resp_fake01" and response.model == DEFAULT_RESPONSES_MODEL
    assert response.status == "completed" and response.output_text == DEFAULT_TEXT
    assert response.usage.input_tokens == total_input() and response.usage.output_tokens == 9


def test_responses_builder_tool() -> None:
    result = assemble_stream("openai-responses", joined(responses_stream(tool={"input": {"q": 1}})))
    response = openai.types.responses.Response.model_validate(result)
    calls = [item for item in response.output if item.type == "function_call"]
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"q": 1})]
    assert response.output_text == DEFAULT_TEXT
    assert response.usage.total_tokens == total_input() + DEFAULT_USAGE["output"]


def test_responses_with_a_done_marker() -> None:
    body = joined(responses_stream()) + DONE
    assert assemble_stream("openai-responses", body)["id"] == "resp_fake01"


# -- framing: CRLF, keepalives, BOM --------------------------------------------------------

def with_keepalives(events: list[bytes], keepalive: bytes = KEEPALIVE) -> bytes:
    return keepalive + keepalive.join(events) + keepalive


@pytest.mark.parametrize("fmt,build", [
    ("anthropic", lambda nl: anthropic_stream(thinking=["a", "b"], tool={}, newline=nl)),
    ("openai-chat", lambda nl: chat_stream(tool={}, newline=nl)),
    ("openai-responses", lambda nl: responses_stream(tool={}, newline=nl)),
])
def test_crlf_and_keepalive_comments_change_nothing(fmt: str, build: Any) -> None:
    plain = assemble_stream(fmt, joined(build("\n")))
    crlf = with_keepalives(build("\r\n"), b": keepalive\r\n\r\n")
    assert assemble_stream(fmt, crlf) == plain
    cr = with_keepalives(build("\r"), b": keepalive\r\r")
    assert assemble_stream(fmt, cr) == plain
    # a BOM, and a keepalive sent without its blank line at the very end
    assert assemble_stream(fmt, b"\xef\xbb\xbf" + joined(build("\n")) + b": keepalive\n") == plain


def test_keepalive_comment_lines_inside_an_event() -> None:
    body = ANTHROPIC_TEXT.replace(b"event: content_block_delta\n",
                                  b": keepalive\nevent: content_block_delta\n: more\n")
    assert assemble_stream("anthropic", body) == assemble_stream("anthropic", ANTHROPIC_TEXT)


# -- incomplete answers --------------------------------------------------------------------

def drop(events: list[bytes], *names: str) -> list[bytes]:
    return [e for e in events if not any(f"event: {n}\n".encode() in e for n in names)]


def without_finish(events: list[bytes]) -> list[bytes]:
    return [e for e in events if b'"finish_reason":"stop"' not in e]


INCOMPLETE = {
    "anthropic no message_stop": ("anthropic", drop(anthropic_stream(), "message_stop")),
    "anthropic no message_delta": ("anthropic", drop(anthropic_stream(), "message_delta")),
    "anthropic block never stopped": ("anthropic", drop(anthropic_stream(), "content_block_stop")),
    "anthropic error event": ("anthropic", anthropic_stream()[:4] + [anthropic_error_event()]),
    "anthropic error after the end": ("anthropic", anthropic_stream() + [anthropic_error_event()]),
    "anthropic nothing": ("anthropic", []),
    "chat no [DONE]": ("openai-chat", chat_stream(done=False)),
    "chat choice without finish_reason": ("openai-chat", without_finish(chat_stream())),
    "chat one of two choices unfinished": (
        "openai-chat", [e for e in two_choices() if b'"finish_reason":"stop"' not in e]),
    "chat error chunk": ("openai-chat", chat_stream(done=False)[:3] + [chat_error_event()]),
    "chat error chunk then [DONE]": ("openai-chat", chat_stream()[:3] + [chat_error_event(), DONE]),
    "chat only [DONE]": ("openai-chat", [DONE]),
    "chat error chunk in a finished answer": (
        "openai-chat", chat_stream()[:-1] + [chat_error_event(), DONE]),
    "responses no terminal": ("openai-responses", responses_stream(terminal=None)),
    "responses failed": ("openai-responses", responses_stream(terminal="failed")),
    "responses incomplete": ("openai-responses", responses_stream(terminal="incomplete")),
    "responses error event": ("openai-responses",
                              responses_stream(terminal=None) + [responses_error_event()]),
    "responses error after completed": ("openai-responses",
                                        responses_stream() + [responses_error_event()]),
    "responses failed after completed": (
        "openai-responses", responses_stream() + responses_stream(terminal="failed")[-1:]),
    "responses incomplete before completed": (
        "openai-responses", responses_stream(terminal="incomplete") + responses_stream()[-1:]),
}


@pytest.mark.parametrize("fmt,events", INCOMPLETE.values(), ids=INCOMPLETE.keys())
def test_incomplete_answers_are_refused(fmt: str, events: list[bytes]) -> None:
    refused(fmt, joined(events))


COMPLETE = {
    "anthropic": joined(rich_anthropic()),
    "openai-chat": joined(two_choices()),
    "openai-responses": joined(responses_stream(tool={})),
}


@pytest.mark.parametrize("fmt", COMPLETE)
def test_a_stream_cut_anywhere_in_its_last_event_is_refused(fmt: str) -> None:
    body = COMPLETE[fmt]
    last_event_start = body.rstrip(b"\n").rfind(b"\n\n") + 2
    for cut in range(last_event_start + 1, len(body) - 1):
        refused(fmt, body[:cut])


@pytest.mark.parametrize("fmt", COMPLETE)
@pytest.mark.parametrize("tail", [b"event: ping\n", b"data: {}", b"data: [DONE]\n",
                                  b"\n: ka\nid: 1\n"])
def test_an_unfinished_event_after_the_answer_is_refused(fmt: str, tail: bytes) -> None:
    """The bytes after the last blank line are an event the client never got: only line
    breaks and comments (which would dispatch nothing anyway) may be left over."""
    refused(fmt, COMPLETE[fmt] + tail)
    assert assemble_stream(fmt, COMPLETE[fmt] + b"\n: keepalive\n: again") == \
        assemble_stream(fmt, COMPLETE[fmt])


@pytest.mark.parametrize("fmt", COMPLETE)
def test_a_stream_cut_at_any_event_boundary_is_refused(fmt: str) -> None:
    body = COMPLETE[fmt]
    ends = [i + 2 for i in range(len(body) - 1) if body[i:i + 2] == b"\n\n"]
    assert ends[-1] == len(body)
    for end in ends[:-1]:
        refused(fmt, body[:end])
    assert isinstance(assemble_stream(fmt, body), dict)


# -- garbage: refused, never another exception --------------------------------------------

ANT = anthropic_stream(tool={})
CHAT = chat_stream(tool={})
RESP = responses_stream()


def edit(fmt: str, events: list[bytes], old: bytes, new: bytes,
         count: int = 1) -> tuple[str, bytes]:
    body = joined(events)
    assert old in body, old
    return fmt, body.replace(old, new, count)


def ant_edit(old: bytes, new: bytes) -> tuple[str, bytes]:
    return edit("anthropic", ANT, old, new)


def chat_edit(old: bytes, new: bytes, count: int = 1) -> tuple[str, bytes]:
    return edit("openai-chat", CHAT, old, new, count)


def chat_with_last_chunk(**fields: Any) -> tuple[str, bytes]:
    """The usage chunk replaced by one with `fields`."""
    return "openai-chat", joined(CHAT[:-2] + [chunk(**fields), DONE])


GARBAGE = {
    "anthropic delta index a string": ant_edit(b'"content_block_delta","index":0',
                                               b'"content_block_delta","index":"0"'),
    "anthropic delta index true": ant_edit(b'"content_block_delta","index":0',
                                           b'"content_block_delta","index":true'),
    "anthropic block index negative": ant_edit(b'"content_block_start","index":0',
                                               b'"content_block_start","index":-1'),
    "anthropic delta for a block never started": ant_edit(b'"content_block_delta","index":0',
                                                          b'"content_block_delta","index":7'),
    "anthropic delta not an object": ant_edit(b'"delta":{"type":"text_delta","text":"Hello"}',
                                              b'"delta":"Hello"'),
    "anthropic delta type a list": ant_edit(b'"type":"text_delta"', b'"type":["text_delta"]'),
    "anthropic text not a string": ant_edit(b'"text":"Hello"', b'"text":5'),
    "anthropic text delta to a tool block": ant_edit(
        b'"index":1,"delta":{"type":"input_json_delta","partial_json":""}',
        b'"index":1,"delta":{"type":"text_delta","text":"x"}'),
    "anthropic tool input not JSON": ant_edit(b'"partial_json":""', b'"partial_json":"{\\"a\\""'),
    "anthropic tool input not an object": ("anthropic", joined(
        [ant_start(), *ant_block(0, {"type": "tool_use", "id": "t", "name": "n", "input": {}},
                                 json_delta("[1, "), json_delta("2]")), *ant_end("tool_use")])),
    "anthropic content_block null": ant_edit(b'"content_block":{"type":"text","text":""}',
                                             b'"content_block":null'),
    "anthropic message a list": (
        "anthropic", joined([ant({"type": "message_start", "message": [1]})] + ANT[1:])),
    "anthropic usage a number": ant_edit(b'"usage":{"output_tokens":15}', b'"usage":15'),
    "anthropic event data a list": ant_edit(b'data: {"type":"message_stop"}', b"data: []"),
    "anthropic event data not JSON": ant_edit(b'data: {"type":"message_stop"}', b"data: {"),
    "anthropic NaN": ant_edit(b'"output_tokens":15', b'"output_tokens":NaN'),
    "anthropic event without a name": ant_edit(b"event: message_stop\n", b""),
    "anthropic name and type differ": ant_edit(b"event: message_stop\n", b"event: ping\n"),
    "anthropic delta after its block stopped": (
        "anthropic", joined(ANT[:3] + [ANT[7], ANT[3]] + ANT[4:7] + ANT[8:])),
    "anthropic second message_start": ("anthropic", joined(ANT[:1] + ANT)),
    "anthropic invalid UTF-8": ant_edit(b"Hello", b"He\xffllo"),
    "chat choices an object": chat_with_last_chunk(choices={}, usage=USAGE),
    "chat choices a string": chat_with_last_chunk(choices="none", usage=USAGE),
    "chat choice a number": chat_with_last_chunk(choices=[3], usage=USAGE),
    "chat choice index false": chat_edit(b'"index":0,"delta"', b'"index":false,"delta"', -1),
    "chat tool call index true": chat_edit(b'"tool_calls":[{"index":0',
                                           b'"tool_calls":[{"index":true', -1),
    "chat choice index a string": chat_edit(b'"index":0,"delta":{"content"',
                                            b'"index":"0","delta":{"content"'),
    "chat choice index missing": chat_edit(b'"index":0,"delta":{"content"', b'"delta":{"content"'),
    "chat choice indexes with a gap": chat_edit(b'"index":0,"delta":{},', b'"index":2,"delta":{},'),
    "chat delta a string": chat_edit(b'"delta":{"content":"Hello"}', b'"delta":"Hello"'),
    "chat content a number": chat_edit(b'"content":"Hello"', b'"content":1'),
    "chat tool_calls an object": chat_edit(b'"delta":{"content":"Hello"}',
                                           b'"delta":{"tool_calls":{"index":0}}'),
    "chat tool call without id": chat_edit(b'"id":"call_fake01",', b""),
    "chat tool call index a string": chat_edit(b'"tool_calls":[{"index":0',
                                               b'"tool_calls":[{"index":"0"'),
    "chat arguments a number": chat_edit(b'"arguments":""', b'"arguments":0'),
    "chat finish_reason a number": chat_edit(b'"finish_reason":"tool_calls"', b'"finish_reason":1'),
    "chat logprobs a list": chat_edit(b'"logprobs":null', b'"logprobs":[]'),
    "chat usage a list": chat_with_last_chunk(choices=[], usage=[USAGE]),
    "chat created a string": chat_edit(b'"created":1741570283', b'"created":"1741570283"', -1),
    "chat no model": chat_edit(b'"model":"gpt-4o-2024-08-06",', b"", -1),
    "chat chunk a list": ("openai-chat", joined([sse([1, 2])] + CHAT)),
    "chat audio": chat_edit(b'"delta":{"content":"Hello"}',
                            b'"delta":{"audio":{"id":"a","data":"AAA"}}'),
    "chat Infinity": chat_edit(b'"created":1741570283', b'"created":Infinity'),
    "responses response a string": ("openai-responses", joined(
        responses_stream(terminal=None)
        + [sse({"type": "response.completed", "response": "done"}, "response.completed")])),
    "responses event a number": ("openai-responses", joined([sse("5")] + RESP)),
    "responses event type a list": edit("openai-responses", RESP, b'"type":"response.created"',
                                        b'"type":["response.created"]'),
    "responses two completed": ("openai-responses", joined(RESP + RESP[-1:])),
    "responses completed but status failed": edit(
        "openai-responses", RESP, b'"status":"completed","error"', b'"status":"failed","error"'),
    "unknown format": ("gemini", joined(ANT)),
}


@pytest.mark.parametrize("fmt,body", GARBAGE.values(), ids=GARBAGE.keys())
def test_garbage_is_refused(fmt: str, body: bytes) -> None:
    refused(fmt, body)


def test_a_body_that_is_not_bytes_is_refused() -> None:
    refused("anthropic", ANTHROPIC_TEXT.decode())  # type: ignore[arg-type]


def replacements(obj: Any) -> Iterator[Any]:
    """`obj` with one value anywhere in it replaced by an odd one, every way there is."""
    odd = [None, "x", 7, -1, True, [], {}, [None], {"type": "x"}]
    if isinstance(obj, dict):
        for key, value in obj.items():
            for new in [*odd, *replacements(value)]:
                yield {**obj, key: new}
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            for new in [*odd, *replacements(value)]:
                yield obj[:i] + [new] + obj[i + 1:]


def events_of(fmt: str, body: bytes) -> list[tuple[str | None, Any]]:
    out = []
    for raw in body.split(b"\n\n")[:-1]:
        lines = raw.decode().split("\n")
        name = next((line[7:] for line in lines if line.startswith("event: ")), None)
        data = "\n".join(line[6:] for line in lines if line.startswith("data: "))
        out.append((name, data if data == "[DONE]" else json.loads(data)))
    return out


@pytest.mark.parametrize("fmt", COMPLETE)
def test_any_odd_value_anywhere_is_refused_or_assembled(fmt: str) -> None:
    """Every value of every event replaced, one at a time, by every odd JSON value: the
    result is a dict or a deliberate refusal, never an exception from an unchecked shape."""
    events = events_of(fmt, COMPLETE[fmt])
    tried = 0
    for i, (name, data) in enumerate(events):
        for odd in replacements(data):
            body = joined([sse(d, n) for n, d in events[:i]] + [sse(odd, name)]
                          + [sse(d, n) for n, d in events[i + 1:]])
            tried += 1
            try:
                assert isinstance(assemble_stream(fmt, body), dict)
            except NotAssembled as exc:
                assert "malformed stream" not in str(exc), (odd, exc)
    assert tried > 500


def test_the_result_is_a_fresh_copy() -> None:
    """Two assemblies of the same bytes share nothing (a cache may hand one out and edit it)."""
    first = assemble_stream("anthropic", joined(rich_anthropic()))
    second = assemble_stream("anthropic", joined(rich_anthropic()))
    pristine = copy.deepcopy(second)
    first["usage"]["input_tokens"] = -1
    first["content"][0]["thinking"] = "changed"
    assert second == pristine
