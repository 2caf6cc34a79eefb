"""Usage parsers against byte-exact transcripts (protocols.md §2.4, §2.5, §3.2, §3.3, §4.4,
§4.5) and the awkward cases around them: cache and reasoning tokens, overwriting deltas, cut
streams, vendor variants and garbage."""

import json

import pytest

from proxy.formats import BY_NAME
from proxy.formats.openai_chat import is_usage_only_chunk
from proxy.usage import Usage, UsageRecord


def stream_parser(fmt: str):
    return BY_NAME[fmt].usage_parser()


def parse_body(fmt: str, body):
    return BY_NAME[fmt].body_usage(body)


def decoded(data: str):
    """An event's data as the relay hands it over: decoded JSON (garbage never gets this far:
    the relay ends a stream with a malformed event; here it must simply change nothing)."""
    try:
        return json.loads(data)
    except ValueError:
        return data

from support.sse import parse


def parse_stream(fmt: str, raw: bytes) -> Usage:
    parser = stream_parser(fmt)
    for name, data in parse(raw):
        parser.feed(name, decoded(data))
    return parser.result()


def frame(name: str | None, obj) -> bytes:
    """One SSE event; `obj` may be a dict (JSON-encoded) or raw text."""
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    head = f"event: {name}\n" if name else ""
    return f"{head}data: {data}\n\n".encode()


def cut_before(raw: bytes, marker: bytes) -> bytes:
    """The stream as a client would have seen it had the upstream died just before `marker`."""
    return raw[: raw.index(marker)]


# Byte-exact transcripts of protocols.md 2.4, 2.5, 3.2, 3.3, 4.4 and 4.5 (kept once, in
# tests/support/builders.py; tests/test_fakeupstream.py checks them against the document).
from support.builders import (ANTHROPIC_TEXT, CHAT_TEXT, RESPONSES_TEXT,  # noqa: E402
                              ANTHROPIC_TOOL as ANTHROPIC_TOOL_USE, CHAT_TOOL as CHAT_TOOL_CALL,
                              RESPONSES_TOOL as RESPONSES_FUNCTION_CALL)


# --- extra streams, built from frames ---------------------------------------------------------

SONNET = "claude-sonnet-4-5-20250929"


def anthropic_stream(start_usage: dict, *deltas: dict, stop=True, model=SONNET) -> bytes:
    """message_start, one text block, then a message_delta per usage dict, then message_stop."""
    message = {"id": "msg_1", "type": "message", "role": "assistant", "model": model,
               "content": [], "stop_reason": None, "stop_sequence": None, "usage": start_usage}
    raw = frame("message_start", {"type": "message_start", "message": message})
    raw += frame("content_block_start", {"type": "content_block_start", "index": 0,
                                         "content_block": {"type": "text", "text": ""}})
    raw += frame("content_block_delta", {"type": "content_block_delta", "index": 0,
                                         "delta": {"type": "text_delta", "text": "Hi"}})
    raw += frame("content_block_stop", {"type": "content_block_stop", "index": 0})
    for usage in deltas:
        raw += frame("message_delta", {"type": "message_delta", "usage": usage,
                                       "delta": {"stop_reason": "end_turn", "stop_sequence": None}})
    if stop:
        raw += frame("message_stop", {"type": "message_stop"})
    return raw


# The docs' web-search example: server tools raise input mid-stream; the delta's figure replaces
# message_start's (2679 + 10682 would double count).
ANTHROPIC_WEB_SEARCH = anthropic_stream(
    {"input_tokens": 2679, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
     "output_tokens": 3},
    {"input_tokens": 10682, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
     "output_tokens": 510, "server_tool_use": {"web_search_requests": 1}},
)

ANTHROPIC_CACHE = anthropic_stream(
    {"input_tokens": 12, "cache_creation_input_tokens": 1800, "cache_read_input_tokens": 24000,
     "output_tokens": 1},
    {"output_tokens": 230},
)

# Per-TTL split without the total: the parser adds the buckets up.
ANTHROPIC_CACHE_SPLIT_ONLY = anthropic_stream(
    {"input_tokens": 5, "cache_creation": {"ephemeral_5m_input_tokens": 100,
                                           "ephemeral_1h_input_tokens": 50}, "output_tokens": 1},
    {"output_tokens": 7},
)

ANTHROPIC_TWO_DELTAS = anthropic_stream(
    {"input_tokens": 40, "output_tokens": 1}, {"output_tokens": 100}, {"output_tokens": 250}
)

ANTHROPIC_NULL_FIELDS = anthropic_stream(
    {"input_tokens": 40, "cache_read_input_tokens": 300, "output_tokens": 1},
    {"input_tokens": None, "cache_read_input_tokens": None, "output_tokens": 20},
)

ANTHROPIC_THINKING = anthropic_stream(
    {"input_tokens": 90, "output_tokens": 1},
    {"output_tokens": 900, "output_tokens_details": {"thinking_tokens": 640}},
)

ANTHROPIC_ERROR = cut_before(ANTHROPIC_TEXT, b"event: message_delta") + frame(
    "error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
)

ANTHROPIC_GARBAGE = (
    frame("message_start", "not json")
    + frame(None, "{")
    + frame("ping", '{"type": "ping"}')
    + frame("message_delta", '{"type":"message_delta","delta":"odd","usage":"odd"}')
    + frame("mystery_event", '{"type":"mystery_event","usage":{"input_tokens":999}}')
    + frame(None, "[1, 2]")
)


def chat_chunk(model="gpt-4o-2024-08-06", choices=None, usage=None, **extra) -> dict:
    chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1741570283,
             "model": model, "choices": [] if choices is None else choices, "usage": usage}
    chunk.update(extra)
    return chunk


def choice(content=None, finish_reason=None) -> dict:
    delta = {} if content is None else {"content": content}
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


CHAT_CACHE_AND_REASONING = b"".join([
    frame(None, chat_chunk("o4-mini-2025-04-16", [choice("4")])),
    frame(None, chat_chunk("o4-mini-2025-04-16", [choice(None, "stop")])),
    frame(None, chat_chunk("o4-mini-2025-04-16", [], {
        "prompt_tokens": 2006, "completion_tokens": 300, "total_tokens": 2306,
        "prompt_tokens_details": {"cached_tokens": 1920, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 192, "audio_tokens": 0}})),
    frame(None, "[DONE]"),
])

CHAT_CACHE_WRITE = b"".join([
    frame(None, chat_chunk(choices=[choice("x", "stop")])),
    frame(None, chat_chunk(usage={
        "prompt_tokens": 1000, "completion_tokens": 10, "total_tokens": 1010,
        "prompt_tokens_details": {"cached_tokens": 200, "cache_write_tokens": 300}})),
    frame(None, "[DONE]"),
])

# Gemini's OpenAI-compatible endpoint: usage rides on the last content chunk.
CHAT_USAGE_ON_LAST_CONTENT = b"".join([
    frame(None, chat_chunk("gemini-2.5-flash", [choice("Hel")])),
    frame(None, chat_chunk("gemini-2.5-flash", [choice("lo", "stop")],
                           {"prompt_tokens": 8, "completion_tokens": 5, "total_tokens": 13})),
    frame(None, "[DONE]"),
])

# vLLM: the usage chunk has "choices": null.
CHAT_VLLM = b"".join([
    frame(None, chat_chunk("meta-llama/Llama-3.1-8B-Instruct", [choice("Hi", "stop")])),
    frame(None, {"id": "chatcmpl-2", "object": "chat.completion.chunk",
                 "model": "meta-llama/Llama-3.1-8B-Instruct", "choices": None,
                 "usage": {"prompt_tokens": 17, "completion_tokens": 2, "total_tokens": 19}}),
    frame(None, "[DONE]"),
])

CHAT_ERROR = cut_before(CHAT_TEXT, b'data: {"id":"chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",'
                                   b'"object":"chat.completion.chunk","created":1741570283,'
                                   b'"model":"gpt-4o-2024-08-06","service_tier":"default",'
                                   b'"system_fingerprint":"fp_eb9dce56a8","choices":[{"index":0,'
                                   b'"delta":{"content":"!"}') + frame(None, {"error": {
    "message": "The server had an error while processing your request.",
    "type": "server_error", "param": None, "code": None}})

CHAT_GARBAGE = b"".join([
    frame(None, "not json"),
    frame(None, "{"),
    frame(None, "42"),
    frame(None, "null"),
    frame(None, '{"choices": "odd", "usage": "odd", "model": 7}'),
    frame(None, '{"choices": [1, null, {"finish_reason": 3}]}'),
    frame(None, "[DONE]"),
])


def responses_event(kind: str, seq: int, **response) -> bytes:
    base = {"id": "resp_1", "object": "response", "created_at": 1741290958,
            "status": "in_progress", "error": None, "incomplete_details": None,
            "model": "o3-2025-04-16", "output": [], "usage": None}
    base.update(response)
    return frame(kind, {"type": kind, "sequence_number": seq, "response": base})


RESPONSES_CACHE_AND_REASONING = responses_event("response.created", 0) + responses_event(
    "response.completed", 1, status="completed", usage={
        "input_tokens": 5000,
        "input_tokens_details": {"cached_tokens": 4096, "cache_write_tokens": 600},
        "output_tokens": 1200, "output_tokens_details": {"reasoning_tokens": 1024},
        "total_tokens": 6200})

RESPONSES_INCOMPLETE = responses_event("response.created", 0) + responses_event(
    "response.incomplete", 1, status="incomplete",
    incomplete_details={"reason": "max_output_tokens"},
    usage={"input_tokens": 30, "output_tokens": 16, "total_tokens": 46})

RESPONSES_FAILED_WITH_USAGE = responses_event("response.created", 0) + responses_event(
    "response.failed", 1, status="failed",
    error={"code": "server_error", "message": "The server had an error"},
    usage={"input_tokens": 20, "output_tokens": 3, "total_tokens": 23})

RESPONSES_FAILED_NO_USAGE = responses_event("response.created", 0) + responses_event(
    "response.failed", 1, status="failed",
    error={"code": "server_error", "message": "The server had an error"})

RESPONSES_ERROR_EVENT = responses_event("response.created", 0) + frame(
    "error", {"type": "error", "sequence_number": 1, "code": "server_error",
              "message": "The server had an error", "param": None})

# The SDK needs only the JSON "type"; the parser must not need the event: lines either.
RESPONSES_DATA_ONLY = b"\n".join(
    line for line in RESPONSES_TEXT.split(b"\n") if not line.startswith(b"event:")
)

GPT41 = "gpt-4.1-2025-04-14"

STREAM_CASES = [
    # Transcripts from protocols.md, byte for byte.
    pytest.param("anthropic", ANTHROPIC_TEXT,
                 Usage(25, 15, 0, 0, None, "end_turn", SONNET, True), id="anthropic-text"),
    pytest.param("anthropic", ANTHROPIC_TOOL_USE,
                 Usage(472, 89, None, None, None, "tool_use", SONNET, True),
                 id="anthropic-tool-use"),
    pytest.param("openai-chat", CHAT_TEXT,
                 Usage(19, 3, 0, None, 0, "stop", "gpt-4o-2024-08-06", True), id="chat-text"),
    pytest.param("openai-chat", CHAT_TOOL_CALL,
                 Usage(62, 15, 0, None, 0, "tool_calls", "gpt-4.1-nano-2025-04-14", True),
                 id="chat-tool-call"),
    pytest.param("openai-responses", RESPONSES_TEXT,
                 Usage(36, 87, 0, None, 0, "completed", GPT41, True), id="responses-text"),
    pytest.param("openai-responses", RESPONSES_FUNCTION_CALL,
                 Usage(58, 17, 0, None, 0, "completed", GPT41, True), id="responses-function-call"),
    # Anthropic accounting rules.
    pytest.param("anthropic", ANTHROPIC_WEB_SEARCH,
                 Usage(10682, 510, 0, 0, None, "end_turn", SONNET, True),
                 id="anthropic-delta-overwrites-input"),
    pytest.param("anthropic", ANTHROPIC_CACHE,
                 Usage(12, 230, 24000, 1800, None, "end_turn", SONNET, True), id="anthropic-cache"),
    pytest.param("anthropic", ANTHROPIC_CACHE_SPLIT_ONLY,
                 Usage(5, 7, None, 150, None, "end_turn", SONNET, True),
                 id="anthropic-cache-creation-split"),
    pytest.param("anthropic", ANTHROPIC_TWO_DELTAS,
                 Usage(40, 250, None, None, None, "end_turn", SONNET, True),
                 id="anthropic-deltas-are-cumulative"),
    pytest.param("anthropic", ANTHROPIC_NULL_FIELDS,
                 Usage(40, 20, 300, None, None, "end_turn", SONNET, True),
                 id="anthropic-null-fields-keep-earlier"),
    pytest.param("anthropic", ANTHROPIC_THINKING,
                 Usage(90, 900, None, None, 640, "end_turn", SONNET, True),
                 id="anthropic-thinking"),
    # Cut after content: output is at least what was delivered ("Hello", "!": 2 deltas).
    pytest.param("anthropic", cut_before(ANTHROPIC_TEXT, b"event: message_delta"),
                 Usage(25, 2, 0, 0, None, None, SONNET, False), id="anthropic-cut-keeps-input"),
    pytest.param("anthropic", cut_before(ANTHROPIC_TEXT, b"event: content_block_start"),
                 Usage(25, 1, 0, 0, None, None, SONNET, False), id="anthropic-cut-in-preamble"),
    pytest.param("anthropic", ANTHROPIC_ERROR,
                 Usage(25, 2, 0, 0, None, None, SONNET, False), id="anthropic-error-event"),
    pytest.param("anthropic", b"", Usage(), id="anthropic-empty"),
    pytest.param("anthropic", ANTHROPIC_GARBAGE, Usage(), id="anthropic-garbage"),
    # Chat variants.
    pytest.param("openai-chat", CHAT_CACHE_AND_REASONING,
                 Usage(86, 300, 1920, None, 192, "stop", "o4-mini-2025-04-16", True),
                 id="chat-cache-and-reasoning"),
    pytest.param("openai-chat", CHAT_CACHE_WRITE,
                 Usage(500, 10, 200, 300, None, "stop", "gpt-4o-2024-08-06", True),
                 id="chat-cache-write-excluded-from-input"),
    pytest.param("openai-chat", CHAT_USAGE_ON_LAST_CONTENT,
                 Usage(8, 5, None, None, None, "stop", "gemini-2.5-flash", True),
                 id="chat-usage-on-last-content-chunk"),
    pytest.param("openai-chat", CHAT_VLLM,
                 Usage(17, 2, None, None, None, "stop", "meta-llama/Llama-3.1-8B-Instruct", True),
                 id="chat-vllm-choices-null"),
    pytest.param("openai-chat", cut_before(CHAT_TEXT, b'data: {"id":"chatcmpl-B9MHDbslfkBeAs8l4b'
                                                      b'ebGdFOJ6PeG","object":"chat.completion.c'
                                                      b'hunk","created":1741570283,"model":"gpt-'
                                                      b'4o-2024-08-06","service_tier":"default",'
                                                      b'"system_fingerprint":"fp_eb9dce56a8","ch'
                                                      b'oices":[],"usage":{'),
                 Usage(None, 2, None, None, None, "stop", "gpt-4o-2024-08-06", False),
                 id="chat-cut-before-usage"),
    pytest.param("openai-chat", CHAT_ERROR,
                 Usage(output_tokens=2, model="gpt-4o-2024-08-06"), id="chat-error-chunk"),
    pytest.param("openai-chat", CHAT_GARBAGE, Usage(), id="chat-garbage"),
    # Responses variants.
    pytest.param("openai-responses", RESPONSES_CACHE_AND_REASONING,
                 Usage(304, 1200, 4096, 600, 1024, "completed", "o3-2025-04-16", True),
                 id="responses-cache-and-reasoning"),
    pytest.param("openai-responses", RESPONSES_INCOMPLETE,
                 Usage(30, 16, None, None, None, "max_output_tokens", "o3-2025-04-16", True),
                 id="responses-incomplete"),
    pytest.param("openai-responses", RESPONSES_FAILED_WITH_USAGE,
                 Usage(20, 3, None, None, None, "failed", "o3-2025-04-16", True),
                 id="responses-failed-with-usage"),
    pytest.param("openai-responses", RESPONSES_FAILED_NO_USAGE,
                 Usage(None, None, None, None, None, "failed", "o3-2025-04-16", False),
                 id="responses-failed-without-usage"),
    pytest.param("openai-responses", RESPONSES_ERROR_EVENT,
                 Usage(model="o3-2025-04-16"), id="responses-error-event"),
    pytest.param("openai-responses", cut_before(RESPONSES_TEXT, b"event: response.completed"),
                 Usage(output_tokens=3, model=GPT41), id="responses-cut-before-terminal"),
    pytest.param("openai-responses", RESPONSES_DATA_ONLY,
                 Usage(36, 87, 0, None, 0, "completed", GPT41, True), id="responses-data-only"),
    pytest.param("openai-responses", frame(None, "[DONE]") + frame(None, "garbage"),
                 Usage(), id="responses-garbage"),
]


@pytest.mark.parametrize("fmt, raw, expected", STREAM_CASES)
def test_each_stream_books_its_usage(fmt, raw, expected):
    assert parse_stream(fmt, raw) == expected


def _delta_events(fmt: str, pieces: list[str]) -> bytes:
    if fmt == "anthropic":
        return b"".join(frame("content_block_delta", json.dumps(
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": p}}))
            for p in pieces)
    if fmt == "openai-chat":
        return b"".join(frame(None, json.dumps(
            {"choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]}))
            for p in pieces)
    return b"".join(frame("response.output_text.delta", json.dumps(
        {"type": "response.output_text.delta", "delta": p})) for p in pieces)


@pytest.mark.parametrize("fmt", ["anthropic", "openai-chat", "openai-responses"])
def test_output_delivered_before_a_break_is_estimated(fmt):
    """A token per 4 characters, at least one per delta; never below what was reported."""
    assert parse_stream(fmt, _delta_events(fmt, ["x" * 400])).output_tokens == 100
    assert parse_stream(fmt, _delta_events(fmt, ["a"] * 7)).output_tokens == 7
    assert parse_stream(fmt, _delta_events(fmt, [])).output_tokens is None


def test_transcripts_are_whole_events():
    """Guard the copies: every transcript ends with a blank line, as protocols.md §0.5 requires."""
    for raw in (ANTHROPIC_TEXT, ANTHROPIC_TOOL_USE, CHAT_TEXT, CHAT_TOOL_CALL, RESPONSES_TEXT,
                RESPONSES_FUNCTION_CALL):
        assert raw.endswith(b"\n\n") and b"\r" not in raw


def test_result_mid_stream_then_more_events():
    """The relay may ask for a partial result (client gone) and the stream may still go on."""
    parser = stream_parser("openai-responses")
    events = parse(RESPONSES_TEXT)
    for name, data in events[:-1]:
        parser.feed(name, decoded(data))
    partial = parser.result()
    partial.input_tokens = 12345  # a caller mutating its copy must not touch the parser
    name, data = events[-1]
    parser.feed(name, decoded(data))
    assert partial.complete is False
    assert parser.result() == Usage(36, 87, 0, None, 0, "completed", GPT41, True)


# --- non-streaming bodies -----------------------------------------------------------------------

ANTHROPIC_BODY = {  # protocols.md §2.7
    "id": "msg_01XFDUDYJgAACzvnptvVoYEL", "type": "message", "role": "assistant",
    "model": "claude-sonnet-4-5-20250929", "content": [{"type": "text", "text": "Hello!"}],
    "stop_reason": "end_turn", "stop_sequence": None,
    "usage": {"input_tokens": 25, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
              "output_tokens": 15, "service_tier": "standard"},
}

CHAT_BODY = {
    "id": "chatcmpl-9", "object": "chat.completion", "created": 1741570283,
    "model": "gpt-4o-mini-2024-07-18",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "..."},
                 "logprobs": None, "finish_reason": "length"}],
    "usage": {"prompt_tokens": 1200, "completion_tokens": 50, "total_tokens": 1250,
              "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
              "completion_tokens_details": {"reasoning_tokens": 0}},
}

RESPONSE_BODY = {
    "id": "resp_9", "object": "response", "created_at": 1741290958, "status": "completed",
    "error": None, "incomplete_details": None, "model": "o3-2025-04-16", "output": [],
    "usage": {"input_tokens": 400, "input_tokens_details": {"cached_tokens": 128},
              "output_tokens": 900, "output_tokens_details": {"reasoning_tokens": 768},
              "total_tokens": 1300},
}

BODY_CASES = [
    pytest.param("anthropic", ANTHROPIC_BODY,
                 Usage(25, 15, 0, 0, None, "end_turn", "claude-sonnet-4-5-20250929", True),
                 id="anthropic-message"),
    pytest.param("openai-chat", CHAT_BODY,
                 Usage(176, 50, 1024, None, 0, "length", "gpt-4o-mini-2024-07-18", True),
                 id="chat-completion"),
    pytest.param("openai-responses", RESPONSE_BODY,
                 Usage(272, 900, 128, None, 768, "completed", "o3-2025-04-16", True),
                 id="response-object"),
    pytest.param("anthropic", {**ANTHROPIC_BODY, "usage": None},
                 Usage(stop_reason="end_turn", model="claude-sonnet-4-5-20250929"),
                 id="anthropic-without-usage"),
    pytest.param("openai-chat", {k: v for k, v in CHAT_BODY.items() if k != "usage"},
                 Usage(stop_reason="length", model="gpt-4o-mini-2024-07-18"),
                 id="chat-without-usage"),
    pytest.param("openai-chat", [1, 2], Usage(), id="not-an-object"),
    pytest.param("openai-responses", None, Usage(), id="none"),
]


@pytest.mark.parametrize("fmt, body, expected", BODY_CASES)
def test_each_body_books_its_usage(fmt, body, expected):
    assert parse_body(fmt, body) == expected


def test_body_and_stream_agree():
    """The same answer streamed or not must be booked the same."""
    assert parse_body("anthropic", ANTHROPIC_BODY) == parse_stream("anthropic", ANTHROPIC_TEXT)


# --- the chunk the proxy strips ------------------------------------------------------------------

USAGE = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}


@pytest.mark.parametrize("chunk, expected", [
    pytest.param(chat_chunk(choices=[], usage=USAGE), True, id="openai-empty-choices"),
    pytest.param({**chat_chunk(usage=USAGE), "choices": None}, True, id="vllm-choices-null"),
    pytest.param({"usage": USAGE}, True, id="choices-absent"),
    pytest.param(chat_chunk(choices=[choice("x", "stop")], usage=USAGE), False,
                 id="usage-on-content-chunk"),
    pytest.param(chat_chunk(choices=[choice("x")]), False, id="content-usage-null"),
    pytest.param(chat_chunk(choices=[], usage=None), False, id="empty-without-usage"),
    pytest.param({"error": {"message": "boom"}}, False, id="error-chunk"),
    pytest.param([], False, id="list"),
    pytest.param(None, False, id="none"),
])
def test_usage_only_chunks_are_told_from_content_chunks(chunk, expected):
    assert is_usage_only_chunk(chunk) is expected


@pytest.mark.parametrize("raw, usage_only", [
    (CHAT_TEXT, [False, False, False, False, True]),
    (CHAT_VLLM, [False, True]),
    (CHAT_USAGE_ON_LAST_CONTENT, [False, False]),
])
def test_usage_only_chunks_in_streams(raw, usage_only):
    chunks = [json.loads(data) for _, data in parse(raw) if data != "[DONE]"]
    assert [is_usage_only_chunk(c) for c in chunks] == usage_only


# --- the stored record ---------------------------------------------------------------------------


def test_record_defaults_allow_incremental_building():
    rec = UsageRecord(request_id="r1", started_at=1.0)
    rec.endpoint = "anthropic"
    assert rec.attempts == 1 and rec.fallbacks == 0 and rec.end_reason == "complete"
    assert rec.input_tokens is None and rec.cost_usd is None and rec.priced is False


def test_applying_usage_fills_the_record_and_keeps_the_upstreams_model_name():
    rec = UsageRecord(request_id="r1", upstream_model="claude-sonnet-4-5")
    rec.apply_usage(parse_stream("anthropic", ANTHROPIC_CACHE))
    assert (rec.input_tokens, rec.output_tokens, rec.cache_read_tokens, rec.cache_write_tokens) == (
        12, 230, 24000, 1800)
    assert rec.stop_reason == "end_turn" and rec.usage_complete is True
    assert rec.upstream_model == SONNET  # the upstream's own name is the one to price
    rec.apply_usage(Usage())
    assert rec.upstream_model == SONNET and rec.usage_complete is False


def test_a_record_survives_its_row_and_json():
    rec = UsageRecord(request_id="r1", started_at=1.5, ended_at=2.5, ttfb_ms=12.0, status=200,
                      endpoint="openai-chat", input_tokens=3, priced=True, usage_complete=True,
                      stream=True, client_key_id="k_ab12", error=None)
    row = rec.to_row()
    assert json.loads(json.dumps(row)) == row
    assert UsageRecord.from_row(row) == rec


def test_a_record_reads_a_stored_row_with_int_bools_and_unknown_columns():
    """SQLite gives bools back as 0/1 and may carry columns the record does not know."""
    row = {**UsageRecord(request_id="r2").to_row(), "priced": 1, "usage_complete": 0,
           "stream": 1, "id": 77, "column_from_the_future": "x"}
    rec = UsageRecord.from_row(row)
    assert rec.priced is True and rec.usage_complete is False and rec.stream is True
    assert UsageRecord.from_row({"request_id": "r3"}) == UsageRecord(request_id="r3")


def test_anthropic_final_counts_make_the_usage_complete_before_message_stop():
    """`message_delta` carries the final counts: a stream cut after it (before
    `message_stop`) has its whole usage, and no estimate replaces the reported output
    (mutant x10)."""
    usage = parse_stream("anthropic", cut_before(ANTHROPIC_TEXT, b"event: message_stop"))
    assert usage == Usage(25, 15, 0, 0, None, "end_turn", SONNET, True)


@pytest.mark.parametrize("choices", ["x", [1], [{"delta": "text"}], [{"delta": [1]}], [None]])
def test_a_chat_chunk_of_odd_shape_is_classified_without_an_error(choices):
    """An upstream chunk whose choices are not what the API says is forwarded as content
    (the client's SDK judges it), never an internal error in the proxy."""
    from proxy.formats import OPENAI_CHAT, EventKind
    view = OPENAI_CHAT.stream_view()
    assert view.classify(None, {"id": "c", "choices": choices}) is EventKind.CONTENT
