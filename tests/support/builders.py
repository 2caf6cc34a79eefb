"""Protocol builders for the fake upstream and the tests: pure functions, no I/O.

`sse` frames one event; `anthropic_stream`, `chat_stream` and `responses_stream` build a whole
streamed answer (a list of event bytes) in the shape protocols.md describes, and
`anthropic_message`, `chat_completion`, `responses_response` the non-streaming ones; the
error events and bodies of each protocol; the usage objects; and, at the end, the byte-exact
transcripts copied from protocols.md (`ANTHROPIC_TEXT` ... `RESPONSES_TOOL`, checked against
the document by tests/test_fakeupstream.py).  The `DEFAULT_*` constants are what the fake's
default replies carry: tests assert against them.

Standard library only.
"""

from __future__ import annotations

import itertools
import json

# ---------------------------------------------------------------------------
# Constants used by the default replies. Tests assert against these.
# ---------------------------------------------------------------------------

DEFAULT_ANTHROPIC_MODEL = "claude-sonnet-4-5-20250929"
DEFAULT_CHAT_MODEL = "gpt-4o-2024-08-06"
DEFAULT_RESPONSES_MODEL = "gpt-4.1-2025-04-14"
DEFAULT_MODELS = (DEFAULT_CHAT_MODEL, DEFAULT_RESPONSES_MODEL, DEFAULT_ANTHROPIC_MODEL)

# Multi-byte UTF-8 on purpose ("é" is 2 bytes, "🌍" is 4), so split-UTF-8 tests are natural.
DEFAULT_TEXT_PIECES = ("Hello", ", héllo", " 🌍", "!")
DEFAULT_TEXT = "".join(DEFAULT_TEXT_PIECES)  # "Hello, héllo 🌍!"

# The tool call of default replies to requests that carry `tools`; the name is replaced
# by the name of the request's first tool.
DEFAULT_TOOL_NAME = "get_weather"
DEFAULT_TOOL_INPUT = {"location": "Paris"}

# Token counts of every default reply, normalised across the three protocols:
#   input       uncached input tokens
#   cache_read  input tokens read from the prompt cache
#   cache_write input tokens written to the prompt cache
#   output      output tokens (reasoning included)
#   reasoning   the reasoning share of output
# On the wire (see anthropic_usage / chat_usage / responses_usage):
#   Anthropic: input_tokens=25, cache_read_input_tokens=10, cache_creation_input_tokens=5,
#              output_tokens=1 in message_start and 15 in message_delta.
#   OpenAI chat: prompt_tokens=40 (cached_tokens=10, cache_write_tokens=5),
#              completion_tokens=15, total_tokens=55.
#   OpenAI responses: input_tokens=40 (cached_tokens=10, cache_write_tokens=5),
#              output_tokens=15, total_tokens=55.
DEFAULT_USAGE = {"input": 25, "output": 15, "cache_read": 10, "cache_write": 5, "reasoning": 0}
DEFAULT_TOTAL_INPUT = 40  # input + cache_read + cache_write, the same in every protocol
DEFAULT_COUNT_TOKENS = 42  # POST /v1/messages/count_tokens -> {"input_tokens": 42}

ANTHROPIC_START_OUTPUT_TOKENS = 1  # output_tokens in message_start (not final)


# ---------------------------------------------------------------------------
# Usage helpers
# ---------------------------------------------------------------------------

def _usage(usage):
    merged = dict(DEFAULT_USAGE)
    if usage:
        unknown = set(usage) - set(DEFAULT_USAGE)
        if unknown:
            raise ValueError(f"unknown usage keys {sorted(unknown)}; use {sorted(DEFAULT_USAGE)}")
        merged.update(usage)
    return merged


def total_input(usage=None):
    """input + cache_read + cache_write for a normalised usage dict (default: DEFAULT_USAGE)."""
    u = _usage(usage)
    return u["input"] + u["cache_read"] + u["cache_write"]


def anthropic_usage(usage=None, *, start=False):
    """The Anthropic `usage` object: message_start's when start=True, else the final one."""
    u = _usage(usage)
    out = {
        "input_tokens": u["input"],
        "cache_creation_input_tokens": u["cache_write"],
        "cache_read_input_tokens": u["cache_read"],
        "cache_creation": {"ephemeral_5m_input_tokens": u["cache_write"], "ephemeral_1h_input_tokens": 0},
        "output_tokens": ANTHROPIC_START_OUTPUT_TOKENS if start else u["output"],
        "service_tier": "standard",
    }
    if u["reasoning"] and not start:
        out["output_tokens_details"] = {"thinking_tokens": u["reasoning"]}
    return out


def chat_usage(usage=None):
    """The OpenAI Chat `CompletionUsage` object (cached tokens are part of prompt_tokens)."""
    u = _usage(usage)
    prompt = total_input(u)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": u["output"],
        "total_tokens": prompt + u["output"],
        "prompt_tokens_details": {
            "cached_tokens": u["cache_read"], "audio_tokens": 0, "cache_write_tokens": u["cache_write"],
        },
        "completion_tokens_details": {
            "reasoning_tokens": u["reasoning"], "audio_tokens": 0,
            "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0,
        },
    }


def responses_usage(usage=None):
    """The OpenAI Responses `ResponseUsage` object."""
    u = _usage(usage)
    inp = total_input(u)
    return {
        "input_tokens": inp,
        "input_tokens_details": {"cached_tokens": u["cache_read"], "cache_write_tokens": u["cache_write"]},
        "output_tokens": u["output"],
        "output_tokens_details": {"reasoning_tokens": u["reasoning"]},
        "total_tokens": inp + u["output"],
    }


# ---------------------------------------------------------------------------
# Transcript builders (pure)
# ---------------------------------------------------------------------------

def json_text(obj):
    """Compact JSON, UTF-8 kept; text UTF-8 cannot carry (a lone surrogate a client sent in its
    model name, say) is escaped, as a real API would echo it."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(obj, separators=(",", ":"))
    return text


def sse(data, event=None, newline="\n"):
    """One SSE event as bytes. `data`: dict/list (compact JSON, UTF-8 kept), str or bytes.

    A str with line feeds becomes several `data:` lines. The event ends with a blank line.
    """
    if isinstance(data, (dict, list)):
        data = json_text(data)
    elif isinstance(data, bytes):
        data = data.decode("utf-8")
    lines = [] if event is None else [f"event: {event}"]
    lines += [f"data: {line}" for line in data.split("\n")]
    return (newline.join(lines) + newline + newline).encode("utf-8")


def _tool(tool, default_id):
    """Normalise a tool spec -> (id, name, arguments_json, fragments).

    A tool spec is a dict: name (default "get_weather"), input (a dict) or arguments
    (a JSON string), optional id, optional fragments (how to split the arguments).
    """
    tool = dict(tool or {})
    if "arguments" in tool:
        args = tool["arguments"]
    else:
        args = json_text(tool.get("input", DEFAULT_TOOL_INPUT))
    fragments = tool.get("fragments")
    if fragments is None:
        cut = args.find(":") + 1 or len(args) // 2
        fragments = [p for p in (args[:cut], args[cut:]) if p]
    if "".join(fragments) != args:
        raise ValueError("tool fragments must join to the arguments")
    return tool.get("id", default_id), tool.get("name", DEFAULT_TOOL_NAME), args, list(fragments)


def _tool_input(args):
    try:
        return json.loads(args)
    except ValueError:
        return {}


def _pieces(value):
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return list(value)


def anthropic_ping(newline="\n"):
    """The ping event exactly as Anthropic sends it (note the space in the JSON)."""
    return f'event: ping{newline}data: {{"type": "ping"}}{newline}{newline}'.encode()


def anthropic_stream(text_pieces=DEFAULT_TEXT_PIECES, model=DEFAULT_ANTHROPIC_MODEL, usage=None,
                     stop_reason=None, tool=None, thinking=None, *, message_id="msg_fake01",
                     ping=True, delta_usage=None, newline="\n"):
    """Anthropic Messages stream (protocols.md §2) as a list of event bytes.

    message_start (usage: input, cache read/write, output 1), optional ping after the first
    content_block_start, an optional thinking block (thinking pieces + signature), a text
    block (when text_pieces is non-empty or there is no tool), an optional tool_use block
    (input_json_delta "" then the fragments), message_delta (stop_reason; usage
    `delta_usage` or {"output_tokens": output}), message_stop.
    stop_reason None means "tool_use" with a tool, else "end_turn".
    """
    u = _usage(usage)
    text_pieces = _pieces(text_pieces)
    events = []

    def ev(obj):
        events.append(sse(obj, obj["type"], newline))

    def block(index, start, deltas):
        ev({"type": "content_block_start", "index": index, "content_block": start})
        if ping and index == 0:
            events.append(anthropic_ping(newline))
        for delta in deltas:
            ev({"type": "content_block_delta", "index": index, "delta": delta})
        ev({"type": "content_block_stop", "index": index})

    ev({"type": "message_start", "message": {
        "id": message_id, "type": "message", "role": "assistant", "model": model, "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": anthropic_usage(u, start=True)}})
    index = 0
    if thinking is not None:
        deltas = [{"type": "thinking_delta", "thinking": t} for t in _pieces(thinking)]
        deltas.append({"type": "signature_delta", "signature": "EqQBCgIYAhIMfakeSignature"})
        block(index, {"type": "thinking", "thinking": ""}, deltas)
        index += 1
    if text_pieces or tool is None:
        block(index, {"type": "text", "text": ""},
              [{"type": "text_delta", "text": t} for t in text_pieces])
        index += 1
    if tool is not None:
        tool_id, name, _, fragments = _tool(tool, "toolu_fake01")
        block(index, {"type": "tool_use", "id": tool_id, "name": name, "input": {}},
              [{"type": "input_json_delta", "partial_json": f} for f in [""] + fragments])
    ev({"type": "message_delta",
        "delta": {"stop_reason": stop_reason or ("tool_use" if tool is not None else "end_turn"),
                  "stop_sequence": None},
        "usage": delta_usage if delta_usage is not None else {"output_tokens": u["output"]}})
    ev({"type": "message_stop"})
    return events


def anthropic_message(text=DEFAULT_TEXT, model=DEFAULT_ANTHROPIC_MODEL, usage=None,
                      stop_reason=None, tool=None, *, message_id="msg_fake01"):
    """A non-streaming Anthropic Message dict (protocols.md §2.7)."""
    content = []
    if text:
        content.append({"type": "text", "text": text})
    if tool is not None:
        tool_id, name, args, _ = _tool(tool, "toolu_fake01")
        content.append({"type": "tool_use", "id": tool_id, "name": name, "input": _tool_input(args)})
    usage_obj = anthropic_usage(usage)
    return {"id": message_id, "type": "message", "role": "assistant", "model": model,
            "content": content,
            "stop_reason": stop_reason or ("tool_use" if tool is not None else "end_turn"),
            "stop_sequence": None, "usage": usage_obj}


def anthropic_error_event(type="overloaded_error", message="Overloaded", newline="\n"):
    """Anthropic mid-stream error event (protocols.md §2.6)."""
    return sse({"type": "error", "error": {"type": type, "message": message}}, "error", newline)


def anthropic_error_body(type="invalid_request_error", message="Invalid request",
                         request_id="req_fake"):
    """Anthropic HTTP error body (protocols.md §2.6)."""
    return {"type": "error", "error": {"type": type, "message": message}, "request_id": request_id}


def chat_stream(text_pieces=DEFAULT_TEXT_PIECES, model=DEFAULT_CHAT_MODEL, include_usage=True,
                tool=None, finish_reason=None, *, usage=None, completion_id="chatcmpl-fake01",
                created=1741570283, done=True, newline="\n"):
    """OpenAI Chat Completions stream (protocols.md §3) as a list of event bytes.

    A role chunk, one chunk per text piece, tool_calls deltas (id/name first, then argument
    fragments), the finish chunk, the usage chunk with empty `choices` (only if
    include_usage; then every chunk carries "usage": null), then `data: [DONE]` (if done).
    finish_reason None means "tool_calls" with a tool, else "stop".
    """
    text_pieces = _pieces(text_pieces)
    base = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
            "model": model, "service_tier": "default", "system_fingerprint": "fp_fake"}

    def chunk(delta, finish=None):
        obj = dict(base, choices=[{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}])
        if include_usage:
            obj["usage"] = None
        return sse(obj, None, newline)

    first_content = "" if (text_pieces or tool is None) else None
    events = [chunk({"role": "assistant", "content": first_content, "refusal": None})]
    events += [chunk({"content": t}) for t in text_pieces]
    if tool is not None:
        tool_id, name, _, fragments = _tool(tool, "call_fake01")
        events.append(chunk({"tool_calls": [{"index": 0, "id": tool_id, "type": "function",
                                             "function": {"name": name, "arguments": ""}}]}))
        events += [chunk({"tool_calls": [{"index": 0, "function": {"arguments": f}}]}) for f in fragments]
    events.append(chunk({}, finish_reason or ("tool_calls" if tool is not None else "stop")))
    if include_usage:
        events.append(sse(dict(base, choices=[], usage=chat_usage(usage)), None, newline))
    if done:
        events.append(sse("[DONE]", None, newline))
    return events


def chat_completion(text=DEFAULT_TEXT, model=DEFAULT_CHAT_MODEL, usage=None, tool=None,
                    finish_reason=None, *, completion_id="chatcmpl-fake01", created=1741570283):
    """A non-streaming OpenAI ChatCompletion dict."""
    message = {"role": "assistant", "content": text or None, "refusal": None}
    if tool is not None:
        tool_id, name, args, _ = _tool(tool, "call_fake01")
        message["tool_calls"] = [{"id": tool_id, "type": "function",
                                  "function": {"name": name, "arguments": args}}]
    return {"id": completion_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": finish_reason or ("tool_calls" if tool is not None else "stop")}],
            "usage": chat_usage(usage), "service_tier": "default", "system_fingerprint": "fp_fake"}


def chat_error_event(message="The server had an error while processing your request.",
                     type="server_error", code=None, param=None, newline="\n"):
    """OpenAI Chat mid-stream error: a data-only event with a top-level `error` (§3.4)."""
    return sse({"error": {"message": message, "type": type, "param": param, "code": code}}, None, newline)


def openai_error_body(message="Invalid request", type="invalid_request_error", code=None, param=None):
    """OpenAI HTTP error body (Chat and Responses, protocols.md §3.4)."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _response_object(response_id, model, status, output, usage, created_at, error=None,
                     incomplete_details=None):
    return {"id": response_id, "object": "response", "created_at": created_at, "status": status,
            "error": error, "incomplete_details": incomplete_details, "instructions": None,
            "model": model, "output": output, "parallel_tool_calls": True, "tool_choice": "auto",
            "tools": [], "usage": usage}


def _responses_items(text, tool):
    """-> (message item or None, function_call item or None), both completed."""
    message = fcall = None
    if text is not None:
        message = {"id": "msg_fake01", "type": "message", "status": "completed", "role": "assistant",
                   "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}
    if tool is not None:
        tool_id, name, args, _ = _tool(tool, "call_fake01")
        fcall = {"id": "fc_fake01", "type": "function_call", "status": "completed",
                 "arguments": args, "call_id": tool_id, "name": name}
    return message, fcall


def responses_stream(text_pieces=DEFAULT_TEXT_PIECES, model=DEFAULT_RESPONSES_MODEL, tool=None, *,
                     usage=None, response_id="resp_fake01", terminal="completed",
                     created_at=1741290958, newline="\n"):
    """OpenAI Responses stream (protocols.md §4) as a list of event bytes.

    Every event has `event:` and a `sequence_number` counting from 0: response.created,
    response.in_progress, a message item (when text_pieces is non-empty or there is no
    tool) with output_text deltas, a function_call item with arguments deltas (if tool),
    then the terminal event: terminal="completed" | "incomplete" | "failed" (each with
    usage) or None (no terminal event: a truncated stream).
    """
    text_pieces = _pieces(text_pieces)
    seq = itertools.count()
    events = []

    def ev(type_, **fields):
        events.append(sse({"type": type_, "sequence_number": next(seq), **fields}, type_, newline))

    with_text = bool(text_pieces) or tool is None
    message, fcall = _responses_items("".join(text_pieces) if with_text else None, tool)
    in_progress = _response_object(response_id, model, "in_progress", [], None, created_at)
    ev("response.created", response=in_progress)
    ev("response.in_progress", response=in_progress)
    output_index = 0
    if message is not None:
        item_id, text = message["id"], message["content"][0]["text"]
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        ev("response.output_item.added", output_index=output_index,
           item=dict(message, status="in_progress", content=[]))
        ev("response.content_part.added", item_id=item_id, output_index=output_index, content_index=0, part=part)
        for t in text_pieces:
            ev("response.output_text.delta", item_id=item_id, output_index=output_index, content_index=0,
               delta=t, logprobs=[])
        ev("response.output_text.done", item_id=item_id, output_index=output_index, content_index=0,
           text=text, logprobs=[])
        ev("response.content_part.done", item_id=item_id, output_index=output_index, content_index=0,
           part=dict(part, text=text))
        ev("response.output_item.done", output_index=output_index, item=message)
        output_index += 1
    if fcall is not None:
        _, _, args, fragments = _tool(tool, "call_fake01")
        ev("response.output_item.added", output_index=output_index,
           item=dict(fcall, status="in_progress", arguments=""))
        for f in fragments:
            ev("response.function_call_arguments.delta", item_id=fcall["id"], output_index=output_index, delta=f)
        ev("response.function_call_arguments.done", item_id=fcall["id"], output_index=output_index, arguments=args)
        ev("response.output_item.done", output_index=output_index, item=fcall)
    output = [item for item in (message, fcall) if item is not None]
    usage_obj = responses_usage(usage)
    if terminal == "completed":
        ev("response.completed",
           response=_response_object(response_id, model, "completed", output, usage_obj, created_at))
    elif terminal == "incomplete":
        ev("response.incomplete",
           response=_response_object(response_id, model, "incomplete", output, usage_obj, created_at,
                                     incomplete_details={"reason": "max_output_tokens"}))
    elif terminal == "failed":
        ev("response.failed",
           response=_response_object(response_id, model, "failed", output, usage_obj, created_at,
                                     error={"code": "server_error", "message": "The server had an error"}))
    elif terminal is not None:
        raise ValueError(f"terminal must be completed, incomplete, failed or None, not {terminal!r}")
    return events


def responses_response(text=DEFAULT_TEXT, model=DEFAULT_RESPONSES_MODEL, usage=None, tool=None, *,
                       response_id="resp_fake01", created_at=1741290958):
    """A non-streaming OpenAI Responses `Response` dict."""
    message, fcall = _responses_items(text or None, tool)
    output = [item for item in (message, fcall) if item is not None]
    return _response_object(response_id, model, "completed", output, responses_usage(usage), created_at)


def responses_error_event(code="server_error", message="The server had an error", sequence_number=0,
                          param=None, newline="\n"):
    """OpenAI Responses mid-stream `event: error` (protocols.md §4.5)."""
    return sse({"type": "error", "sequence_number": sequence_number, "code": code, "message": message,
                "param": param}, "error", newline)


def models_list(models=DEFAULT_MODELS):
    """GET /v1/models body in OpenAI shape."""
    return {"object": "list",
            "data": [{"id": m, "object": "model", "created": 1700000000, "owned_by": "fake-upstream"}
                     for m in models]}


# ---------------------------------------------------------------------------
# Byte-exact transcripts copied from protocols.md (each event ends with a blank line)
# ---------------------------------------------------------------------------

ANTHROPIC_TEXT = rb"""event: message_start
data: {"type":"message_start","message":{"id":"msg_01XFDUDYJgAACzvnptvVoYEL","type":"message","role":"assistant","model":"claude-sonnet-4-5-20250929","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":25,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"cache_creation":{"ephemeral_5m_input_tokens":0,"ephemeral_1h_input_tokens":0},"output_tokens":1,"service_tier":"standard"}}}

event: content_block_start
data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}

event: ping
data: {"type": "ping"}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hello"}}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"!"}}

event: content_block_stop
data: {"type":"content_block_stop","index":0}

event: message_delta
data: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":15}}

event: message_stop
data: {"type":"message_stop"}

"""

ANTHROPIC_TOOL = rb"""event: message_start
data: {"type":"message_start","message":{"id":"msg_014p7gG3wDgGV9EUtLvnow3U","type":"message","role":"assistant","model":"claude-sonnet-4-5-20250929","stop_sequence":null,"usage":{"input_tokens":472,"output_tokens":2},"content":[],"stop_reason":null}}

event: content_block_start
data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Okay, let's check the weather for San Francisco, CA:"}}

event: content_block_stop
data: {"type":"content_block_stop","index":0}

event: content_block_start
data: {"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"toolu_01T1x1fJ34qAmk2tNTrN7Up6","name":"get_weather","input":{}}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":""}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"location\":"}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":" \"San Francisco, CA\"}"}}

event: content_block_stop
data: {"type":"content_block_stop","index":1}

event: message_delta
data: {"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},"usage":{"output_tokens":89}}

event: message_stop
data: {"type":"message_stop"}

"""

CHAT_TEXT = rb"""data: {"id":"chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG","object":"chat.completion.chunk","created":1741570283,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_eb9dce56a8","choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}],"usage":null}

data: {"id":"chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG","object":"chat.completion.chunk","created":1741570283,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_eb9dce56a8","choices":[{"index":0,"delta":{"content":"Hello"},"logprobs":null,"finish_reason":null}],"usage":null}

data: {"id":"chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG","object":"chat.completion.chunk","created":1741570283,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_eb9dce56a8","choices":[{"index":0,"delta":{"content":"!"},"logprobs":null,"finish_reason":null}],"usage":null}

data: {"id":"chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG","object":"chat.completion.chunk","created":1741570283,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_eb9dce56a8","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}],"usage":null}

data: {"id":"chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG","object":"chat.completion.chunk","created":1741570283,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_eb9dce56a8","choices":[],"usage":{"prompt_tokens":19,"completion_tokens":3,"total_tokens":22,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}

data: [DONE]

"""

CHAT_TOOL = rb"""data: {"id":"chatcmpl-BQb0iSFzE1zz1OVhaqg3u2Yqn1Ezf","object":"chat.completion.chunk","created":1745678496,"model":"gpt-4.1-nano-2025-04-14","service_tier":"default","system_fingerprint":"fp_eede8f0d45","choices":[{"index":0,"delta":{"role":"assistant","content":null,"refusal":null},"logprobs":null,"finish_reason":null}],"usage":null}

data: {"id":"chatcmpl-BQb0iSFzE1zz1OVhaqg3u2Yqn1Ezf","object":"chat.completion.chunk","created":1745678496,"model":"gpt-4.1-nano-2025-04-14","service_tier":"default","system_fingerprint":"fp_eede8f0d45","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_PieqNSej6kM9hgYbcQdbZSaC","type":"function","function":{"name":"get_weather","arguments":""}}]},"logprobs":null,"finish_reason":null}],"usage":null}

data: {"id":"chatcmpl-BQb0iSFzE1zz1OVhaqg3u2Yqn1Ezf","object":"chat.completion.chunk","created":1745678496,"model":"gpt-4.1-nano-2025-04-14","service_tier":"default","system_fingerprint":"fp_eede8f0d45","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"location\":"}}]},"logprobs":null,"finish_reason":null}],"usage":null}

data: {"id":"chatcmpl-BQb0iSFzE1zz1OVhaqg3u2Yqn1Ezf","object":"chat.completion.chunk","created":1745678496,"model":"gpt-4.1-nano-2025-04-14","service_tier":"default","system_fingerprint":"fp_eede8f0d45","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"\"Paris\"}"}}]},"logprobs":null,"finish_reason":null}],"usage":null}

data: {"id":"chatcmpl-BQb0iSFzE1zz1OVhaqg3u2Yqn1Ezf","object":"chat.completion.chunk","created":1745678496,"model":"gpt-4.1-nano-2025-04-14","service_tier":"default","system_fingerprint":"fp_eede8f0d45","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"tool_calls"}],"usage":null}

data: {"id":"chatcmpl-BQb0iSFzE1zz1OVhaqg3u2Yqn1Ezf","object":"chat.completion.chunk","created":1745678496,"model":"gpt-4.1-nano-2025-04-14","service_tier":"default","system_fingerprint":"fp_eede8f0d45","choices":[],"usage":{"prompt_tokens":62,"completion_tokens":15,"total_tokens":77,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}

data: [DONE]

"""

RESPONSES_TEXT = rb"""event: response.created
data: {"type":"response.created","sequence_number":0,"response":{"id":"resp_67c9fdcecf488190","object":"response","created_at":1741290958,"status":"in_progress","error":null,"incomplete_details":null,"model":"gpt-4.1-2025-04-14","output":[],"usage":null}}

event: response.in_progress
data: {"type":"response.in_progress","sequence_number":1,"response":{"id":"resp_67c9fdcecf488190","object":"response","created_at":1741290958,"status":"in_progress","error":null,"incomplete_details":null,"model":"gpt-4.1-2025-04-14","output":[],"usage":null}}

event: response.output_item.added
data: {"type":"response.output_item.added","sequence_number":2,"output_index":0,"item":{"id":"msg_67c9fdcf37fc8190","type":"message","status":"in_progress","role":"assistant","content":[]}}

event: response.content_part.added
data: {"type":"response.content_part.added","sequence_number":3,"item_id":"msg_67c9fdcf37fc8190","output_index":0,"content_index":0,"part":{"type":"output_text","text":"","annotations":[],"logprobs":[]}}

event: response.output_text.delta
data: {"type":"response.output_text.delta","sequence_number":4,"item_id":"msg_67c9fdcf37fc8190","output_index":0,"content_index":0,"delta":"Hi","logprobs":[]}

event: response.output_text.delta
data: {"type":"response.output_text.delta","sequence_number":5,"item_id":"msg_67c9fdcf37fc8190","output_index":0,"content_index":0,"delta":" there!","logprobs":[]}

event: response.output_text.done
data: {"type":"response.output_text.done","sequence_number":6,"item_id":"msg_67c9fdcf37fc8190","output_index":0,"content_index":0,"text":"Hi there!","logprobs":[]}

event: response.content_part.done
data: {"type":"response.content_part.done","sequence_number":7,"item_id":"msg_67c9fdcf37fc8190","output_index":0,"content_index":0,"part":{"type":"output_text","text":"Hi there!","annotations":[],"logprobs":[]}}

event: response.output_item.done
data: {"type":"response.output_item.done","sequence_number":8,"output_index":0,"item":{"id":"msg_67c9fdcf37fc8190","type":"message","status":"completed","role":"assistant","content":[{"type":"output_text","text":"Hi there!","annotations":[],"logprobs":[]}]}}

event: response.completed
data: {"type":"response.completed","sequence_number":9,"response":{"id":"resp_67c9fdcecf488190","object":"response","created_at":1741290958,"status":"completed","error":null,"incomplete_details":null,"model":"gpt-4.1-2025-04-14","output":[{"id":"msg_67c9fdcf37fc8190","type":"message","status":"completed","role":"assistant","content":[{"type":"output_text","text":"Hi there!","annotations":[],"logprobs":[]}]}],"usage":{"input_tokens":36,"input_tokens_details":{"cached_tokens":0},"output_tokens":87,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":123}}}

"""

RESPONSES_TOOL = rb"""event: response.created
data: {"type":"response.created","sequence_number":0,"response":{"id":"resp_abc","object":"response","created_at":1741290958,"status":"in_progress","error":null,"incomplete_details":null,"model":"gpt-4.1-2025-04-14","output":[],"usage":null}}

event: response.output_item.added
data: {"type":"response.output_item.added","sequence_number":1,"output_index":0,"item":{"id":"fc_123","type":"function_call","status":"in_progress","arguments":"","call_id":"call_XYZ","name":"get_weather"}}

event: response.function_call_arguments.delta
data: {"type":"response.function_call_arguments.delta","sequence_number":2,"item_id":"fc_123","output_index":0,"delta":"{\"location\":"}

event: response.function_call_arguments.delta
data: {"type":"response.function_call_arguments.delta","sequence_number":3,"item_id":"fc_123","output_index":0,"delta":"\"Paris\"}"}

event: response.function_call_arguments.done
data: {"type":"response.function_call_arguments.done","sequence_number":4,"item_id":"fc_123","output_index":0,"arguments":"{\"location\":\"Paris\"}"}

event: response.output_item.done
data: {"type":"response.output_item.done","sequence_number":5,"output_index":0,"item":{"id":"fc_123","type":"function_call","status":"completed","arguments":"{\"location\":\"Paris\"}","call_id":"call_XYZ","name":"get_weather"}}

event: response.completed
data: {"type":"response.completed","sequence_number":6,"response":{"id":"resp_abc","object":"response","created_at":1741290958,"status":"completed","error":null,"incomplete_details":null,"model":"gpt-4.1-2025-04-14","output":[{"id":"fc_123","type":"function_call","status":"completed","arguments":"{\"location\":\"Paris\"}","call_id":"call_XYZ","name":"get_weather"}],"usage":{"input_tokens":58,"input_tokens_details":{"cached_tokens":0},"output_tokens":17,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":75}}}

"""
