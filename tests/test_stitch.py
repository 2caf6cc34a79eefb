"""The stitch on its own (I/O-free): what it lets continue, the prefill, and how it rewrites
a continuation's events so the client sees one answer."""

from __future__ import annotations

import pytest

from proxy.formats import ANTHROPIC, OPENAI_CHAT, OPENAI_RESPONSES
from proxy.formats.stitch import AnthropicStitch, ChatStitch, ResponsesStitch


def feed(stitch, events):
    for data in events:
        stitch.observe(data.get("type") if isinstance(data, dict) else None, data)


def rewrite(stitch, events):
    out = []
    for data in events:
        for name, new in stitch.rewrite(data.get("type") if isinstance(data, dict) else None, data):
            stitch.observe(name, new)
            out.append(new)
    return out


def start(usage=None):
    return {"type": "message_start", "message": {"id": "m", "usage": usage or {"input_tokens": 7}}}


def block(index, kind="text"):
    return {"type": "content_block_start", "index": index, "content_block": {"type": kind}}


def text(index, value):
    return {"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": value}}


def stop(index):
    return {"type": "content_block_stop", "index": index}


def test_which_requests_may_be_continued():
    assert isinstance(ANTHROPIC.stitch({"messages": []}), AnthropicStitch)
    assert ANTHROPIC.stitch({"thinking": {"type": "enabled", "budget_tokens": 1024}}) is None
    assert isinstance(ANTHROPIC.stitch({"thinking": {"type": "disabled"}}), AnthropicStitch)
    assert isinstance(OPENAI_CHAT.stitch({"messages": []}), ChatStitch)
    assert OPENAI_CHAT.stitch({"reasoning_effort": "low"}) is None
    assert OPENAI_CHAT.stitch({"n": 2}) is None
    assert isinstance(OPENAI_RESPONSES.stitch({"input": "hi"}), ResponsesStitch)
    assert OPENAI_RESPONSES.stitch({"input": "hi", "reasoning": {"effort": "low"}}) is None


def test_an_anthropic_answer_of_text_only_is_continuable_until_its_stop_reason():
    stitch = AnthropicStitch()
    assert not stitch.continuable()  # nothing started
    feed(stitch, [start(), block(0), text(0, "Hi "), stop(0), block(1), text(1, "there")])
    assert stitch.continuable() and stitch.text() == "Hi there"
    feed(stitch, [{"type": "message_delta", "delta": {"stop_reason": "end_turn"}}])
    assert not stitch.continuable()


@pytest.mark.parametrize("kind", ["tool_use", "thinking", "redacted_thinking", "server_tool_use"])
def test_an_anthropic_answer_with_any_other_block_is_not_continuable(kind):
    stitch = AnthropicStitch()
    feed(stitch, [start(), block(0, kind), stop(0), block(1), text(1, "after")])
    assert not stitch.continuable()


def test_the_continuations_first_text_block_goes_on_in_the_open_one_and_later_blocks_count_on():
    stitch = AnthropicStitch()
    feed(stitch, [start({"input_tokens": 7, "cache_read_input_tokens": 3}), block(0), text(0, "Hello, ")])
    assert stitch.begin() == "Hello,"
    out = rewrite(stitch, [start({"input_tokens": 99}), block(0), text(0, " world"), stop(0),
                           block(1, "tool_use"), stop(1),
                           {"type": "message_delta", "delta": {"stop_reason": "tool_use"},
                            "usage": {"input_tokens": 99, "cache_read_input_tokens": 50, "output_tokens": 4}},
                           {"type": "message_stop"}])
    assert out == [text(0, "world"), stop(0), block(1, "tool_use"), stop(1),
                   {"type": "message_delta", "delta": {"stop_reason": "tool_use"},
                    "usage": {"input_tokens": 7, "cache_read_input_tokens": 3, "output_tokens": 2 + 4}},
                   {"type": "message_stop"}]


def test_a_continuation_that_starts_with_another_block_closes_the_open_text_first():
    stitch = AnthropicStitch()
    feed(stitch, [start(), block(0), text(0, "Let me check")])
    stitch.begin()
    assert rewrite(stitch, [start(), block(0, "tool_use")]) == [stop(0), block(1, "tool_use")]


def test_a_break_between_blocks_continues_in_a_new_block():
    stitch = AnthropicStitch()
    feed(stitch, [start(), block(0), text(0, "Done."), stop(0)])
    stitch.begin()
    assert rewrite(stitch, [block(0), text(0, " More.")]) == [block(1), text(1, " More.")]


@pytest.mark.parametrize("sent, pieces, expected", [
    ("a ", ["b"], "a b"),
    ("a ", [" b"], "a b"),
    ("a\n\n", ["\n", "\nb"], "a\n\nb"),  # the repeated whitespace arrives in two pieces
    ("a\n", ["\n\nb"], "a\n\nb"),
    ("a", [" b"], "a b"),  # nothing was trimmed: nothing is dropped
    ("a  ", ["\tb"], "a  \tb"),  # different whitespace is the model's own
])
def test_whitespace_the_trimmed_prefill_would_repeat_is_dropped_once(sent, pieces, expected):
    stitch = AnthropicStitch()
    feed(stitch, [start(), block(0), text(0, sent)])
    stitch.begin()
    out = rewrite(stitch, [block(0)] + [text(0, p) for p in pieces])
    assert sent + "".join(e["delta"]["text"] for e in out) == expected


def test_the_prefill_goes_after_a_prefill_the_client_sent_itself():
    stitch = AnthropicStitch()
    payload = {"model": "m", "messages": [{"role": "user", "content": "Hi"},
                                          {"role": "assistant", "content": [{"type": "text", "text": "{"}]}]}
    assert stitch.request(payload, '"a": 1')["messages"] == [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": '{"a": 1'}]
    assert payload["messages"][-1]["content"] == [{"type": "text", "text": "{"}]  # not changed
    assert stitch.request({"messages": [{"role": "user", "content": "Hi"}]}, "")["messages"] == [
        {"role": "user", "content": "Hi"}]  # only whitespace was sent: nothing to prefill


def chunk(delta=None, finish=None, cid="c1", usage=None, choices=True):
    out = {"id": cid, "object": "chat.completion.chunk", "created": 1, "model": "m"}
    out["choices"] = [{"index": 0, "delta": delta or {}, "finish_reason": finish}] if choices else []
    if usage is not None:
        out["usage"] = usage
    return out


def test_a_chat_answer_is_continuable_until_a_tool_call_reasoning_or_its_finish():
    for delta in ({"tool_calls": [{"index": 0}]}, {"reasoning_content": "hm"}, {"refusal": "no"}):
        stitch = ChatStitch()
        feed(stitch, [chunk({"role": "assistant", "content": ""}), chunk({"content": "a"}), chunk(delta)])
        assert not stitch.continuable(), delta
    stitch = ChatStitch()
    feed(stitch, [chunk({"content": "a"})])
    assert stitch.continuable()
    feed(stitch, [chunk(finish="stop")])
    assert not stitch.continuable()


def test_a_chat_continuation_keeps_the_first_id_drops_its_role_chunk_and_moves_the_prefill_to_output():
    stitch = ChatStitch()
    feed(stitch, [chunk({"role": "assistant", "content": ""}), chunk({"content": "Hello, wor"})])
    assert stitch.begin() == "Hello, wor"
    out = rewrite(stitch, [chunk({"role": "assistant", "content": ""}, cid="c2"),
                           chunk({"content": "ld"}, cid="c2"), chunk(finish="stop", cid="c2"),
                           chunk(cid="c2", choices=False, usage={"prompt_tokens": 10, "completion_tokens": 1}),
                           "[DONE]"])
    assert out == [chunk({"content": "ld"}), chunk(finish="stop"),
                   chunk(choices=False, usage={"prompt_tokens": 10 - 3, "completion_tokens": 1 + 3}),
                   "[DONE]"]


def test_a_responses_prefill_is_an_assistant_input_item_after_the_users_input():
    stitch = ResponsesStitch()
    assert stitch.request({"model": "m", "input": "Hi"}, "Hel")["input"] == [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel"}]
    items = [{"role": "user", "content": "Hi"},
             {"role": "assistant", "content": [{"type": "output_text", "text": "He"}]}]
    assert stitch.request({"input": items}, "llo")["input"][-1] == {"role": "assistant", "content": "Hello"}


def test_a_responses_answer_with_a_function_call_or_reasoning_is_not_continuable():
    for item in ({"type": "function_call", "id": "fc"}, {"type": "reasoning", "id": "rs"}):
        stitch = ResponsesStitch()
        feed(stitch, [{"type": "response.created", "sequence_number": 0, "response": {"id": "r"}},
                      {"type": "response.output_item.added", "output_index": 0, "item": item}])
        assert not stitch.continuable(), item


def test_a_second_choice_makes_a_chat_answer_not_continuable():
    stitch = ChatStitch()
    feed(stitch, [{"id": "c1", "choices": [{"index": 1, "delta": {"content": "a"}}]}])
    assert not stitch.continuable()


def test_the_prompt_never_goes_below_zero_when_the_prefill_moves_to_output():
    stitch = ChatStitch()
    feed(stitch, [chunk({"content": "Hello, wor"})])
    stitch.begin()
    out = rewrite(stitch, [chunk(cid="c2", choices=False, usage={"prompt_tokens": 1, "completion_tokens": 1})])
    assert out[0]["usage"] == {"prompt_tokens": 0, "completion_tokens": 4}
