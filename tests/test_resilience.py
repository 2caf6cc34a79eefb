"""Retries, fail-over and circuit breakers end to end: real gunicorn, three fake upstreams.

The proxies of this module run from a TOML config written to tmp: providers `primary`,
`backup`, `big` (Anthropic format) and `primary_oai`, `backup_oai` (OpenAI format, same fake
servers); `claude-*` routes to [primary, backup, big (larger_context)] and `gpt-*` to
[primary_oai, backup_oai]; first_token_timeout 0.5 s, 2 tries per deployment, 50 ms backoff,
Retry-After honoured up to 2 s, breakers open after 3 failures for 1 s, idle_timeout 1 s.

Breakers are per process and keyed by deployment name, so each scenario gets its own route
(`claude-<key>-*`, deployments named `primary-<key>`, `backup-<key>`, `big-<key>`): no state
leaks between scenarios while the proxies are shared by the whole module.

Two proxies run the same routes:
  * `held`  - commit_after = 5 s: every decision taken before content (retry, fail-over,
    fail fast) is visible in the status line and the `x-llm-proxy-deployment` header;
  * `early` - the default commit (one 50 ms heartbeat): streams commit to 200 early and fill
    the wait with keepalives, so a fail-over must stay invisible inside a committed stream.

Each scenario asserts how long the call took (wide bounds), exactly which requests each fake
saw, and that the client got either a complete answer or exactly one terminal error in its
own protocol - never a truncated answer that looks complete.  Conditions are waited for on
reads and `wait_for_requests`; the one timed wait is the breaker's cool-down itself.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field

import pytest
import requests

from support.builders import (DEFAULT_TEXT, DEFAULT_TEXT_PIECES, DEFAULT_USAGE, anthropic_error_body, anthropic_message,
                              anthropic_ping, anthropic_stream, chat_completion, chat_stream,
                              openai_error_body, responses_stream)
from support.fake import FakeUpstream
from support.processes import ProxyProcess
from support.rawhttp import RID
from support.sse import Event, parse, split
from support.steps import Cut, End, Reset, Send, Sleep, Stall, Status, json_reply, sse_reply

DEPLOYMENT = "x-llm-proxy-deployment"
FIRST_TOKEN_TIMEOUT = 0.5
IDLE_TIMEOUT = 1.0
RETRY_AFTER_MAX = 2.0
BACKOFF_BASE = 0.05
FAILURE_THRESHOLD = 3
COOLDOWN = 1.0
CLIENT_TIMEOUT = 8.0  # for a whole answer: the slowest scenario takes IDLE_TIMEOUT + a little

# One route per scenario (see the module docstring).
KEYS = ("s01", "s02", "s02j", "s03", "s03j", "s04", "s04j", "s05", "s06", "s07", "s08", "s08c", "s08r", "s09",
        "s10a", "s10b", "s11", "s11b", "s12", "s12b", "s13", "s15", "s16", "s17", "s18", "ramax",
        "all", "brk", "brk2")


# ---------------------------------------------------------------------------
# Config and fixtures
# ---------------------------------------------------------------------------

def _deployments(items: list[tuple[str, str, bool]]) -> str:
    parts = []
    for provider, name, larger in items:
        extra = ", larger_context = true" if larger else ""
        parts.append(f'  {{ provider = "{provider}", name = "{name}"{extra} }},')
    return "deployments = [\n" + "\n".join(parts) + "\n]\n"


def write_config(path, primary: FakeUpstream, backup: FakeUpstream, big: FakeUpstream,
                 commit_after: float | None) -> None:
    lines = ["[stream]", f"idle_timeout = {IDLE_TIMEOUT}"]
    if commit_after is not None:
        lines.append(f"commit_after = {commit_after}")
    lines += ["", "[retry]", "max_attempts = 2", f"backoff_base = {BACKOFF_BASE}",
              f"retry_after_max = {RETRY_AFTER_MAX}", "",
              "[breaker]", f"failure_threshold = {FAILURE_THRESHOLD}", f"cooldown = {COOLDOWN}", ""]
    for name, fake, fmt in (("anthropic", primary, "anthropic"), ("openai", primary, "openai"),
                            ("primary", primary, "anthropic"), ("backup", backup, "anthropic"),
                            ("big", big, "anthropic"), ("primary_oai", primary, "openai"),
                            ("backup_oai", backup, "openai")):
        lines += [f"[providers.{name}]", f'base_url = "{fake.url}"', f'format = "{fmt}"', ""]
    routes = [(f"claude-{k}-*", [("primary", f"primary-{k}", False), ("backup", f"backup-{k}", False),
                                 ("big", f"big-{k}", True)]) for k in KEYS]
    routes += [(f"gpt-{k}-*", [("primary_oai", f"primary-{k}", False),
                               ("backup_oai", f"backup-{k}", False)]) for k in KEYS]
    # The catch-alls last: routes are matched in the order written.
    routes += [("claude-*", [("primary", "primary", False), ("backup", "backup", False),
                             ("big", "big", True)]),
               ("gpt-*", [("primary_oai", "primary", False), ("backup_oai", "backup", False)])]
    for pattern, items in routes:
        lines += [f'[routes."{pattern}"]', f"first_token_timeout = {FIRST_TOKEN_TIMEOUT}",
                  _deployments(items)]
    path.write_text("\n".join(lines))


def _fake():
    upstream = FakeUpstream()
    upstream.start()
    return upstream


@pytest.fixture(scope="module")
def primary():
    upstream = _fake()
    yield upstream
    upstream.stop()


@pytest.fixture(scope="module")
def backup():
    upstream = _fake()
    yield upstream
    upstream.stop()


@pytest.fixture(scope="module")
def big():
    upstream = _fake()
    yield upstream
    upstream.stop()


def _start(tmp_path_factory, primary, backup, big, commit_after) -> ProxyProcess:
    tmp = tmp_path_factory.mktemp("resilience")
    config = tmp / "proxy.toml"
    write_config(config, primary, backup, big, commit_after)
    # conftest sets LLM_PROXY_IDLE_TIMEOUT=5 in the environment, which beats the file.
    return ProxyProcess(primary.url, tmp, LLM_PROXY_CONFIG=str(config),
                        LLM_PROXY_IDLE_TIMEOUT=str(IDLE_TIMEOUT)).start()


@pytest.fixture(scope="module")
def held_proxy(tmp_path_factory, primary, backup, big):
    server = _start(tmp_path_factory, primary, backup, big, commit_after=5.0)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def early_proxy(tmp_path_factory, primary, backup, big):
    server = _start(tmp_path_factory, primary, backup, big, commit_after=None)
    yield server
    server.stop()


@pytest.fixture(params=["held", "early"])
def mode(request):
    return request.param


@pytest.fixture
def proxy_for(mode, request):
    """The proxy of the parametrized commit mode."""
    return request.getfixturevalue(f"{mode}_proxy")


@pytest.fixture(autouse=True)
def _clean_fakes(primary, backup, big):
    for upstream in (primary, backup, big):
        upstream.reset()
    yield
    for upstream in (primary, backup, big):
        assert not upstream.errors, f"fake upstream script errors: {upstream.errors}"


# ---------------------------------------------------------------------------
# Client side
# ---------------------------------------------------------------------------

@dataclass
class Result:
    status: int
    headers: requests.structures.CaseInsensitiveDict
    body: bytes
    elapsed: float
    events: list[Event] = field(default_factory=list)
    comments: int = 0

    @property
    def request_id(self) -> str:
        rid = self.headers.get(RID)
        assert rid, f"no {RID} header: {dict(self.headers)}"
        return rid

    @property
    def deployment(self) -> str | None:
        return self.headers.get(DEPLOYMENT)

    def json(self):
        return json.loads(self.body)


ANTHROPIC_PATH, CHAT_PATH, RESPONSES_PATH = "/v1/messages", "/v1/chat/completions", "/v1/responses"


def body_for(path: str, model: str, stream: bool) -> dict:
    if path == ANTHROPIC_PATH:
        return {"model": model, "max_tokens": 32, "stream": stream,
                "messages": [{"role": "user", "content": "hi"}]}
    if path == CHAT_PATH:
        body = {"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body
    return {"model": model, "input": "hi", "stream": stream}


def call(server: ProxyProcess, path: str, model: str, stream: bool = True) -> Result:
    """One request; the whole answer must arrive within CLIENT_TIMEOUT (keepalives every 50 ms
    would keep a per-read timeout from ever firing on a stream that never ends)."""
    headers = {"x-api-key": "sk-test", "anthropic-version": "2023-06-01"} if path == ANTHROPIC_PATH \
        else {"authorization": "Bearer sk-test"}
    started = time.monotonic()
    with requests.post(server.url + path, json=body_for(path, model, stream), headers=headers,
                       stream=True, timeout=(5, CLIENT_TIMEOUT)) as r:
        body = b""
        for piece in r.iter_content(chunk_size=None):
            body += piece
            assert time.monotonic() - started < CLIENT_TIMEOUT, \
                f"no end of the answer within {CLIENT_TIMEOUT} s: {body[-600:]!r}\n" + diag(server)
        elapsed = time.monotonic() - started
    result = Result(r.status_code, r.headers, body, elapsed)
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        result.events = parse(body)
        result.comments = len(split(body)[1])
    return result


def claude(key: str) -> str:
    return f"claude-{key}-sonnet"


def gpt(key: str) -> str:
    return f"gpt-{key}-4o"


def seen(*upstreams: FakeUpstream) -> tuple[int, ...]:
    return tuple(len(u.requests) for u in upstreams)


def diag(server: ProxyProcess, result: Result | None = None) -> str:
    """Context for a failed assertion: the response and the end of the gunicorn log."""
    head = ""
    if result is not None:
        head = f"status={result.status} headers={dict(result.headers)} body={result.body[-1500:]!r}\n"
    return head + "--- gunicorn log (tail) ---\n" + server.log()[-4000:]


def health(server: ProxyProcess) -> dict:
    r = requests.get(server.url + "/health", timeout=5)
    assert r.status_code == 200
    return r.json()


# ---------------------------------------------------------------------------
# What a complete answer and a terminal error look like, per protocol
# ---------------------------------------------------------------------------

def assert_complete_anthropic(res: Result, message_id: str, server: ProxyProcess) -> None:
    assert res.status == 200, diag(server, res)
    names = [e.name for e in res.events]
    assert "error" not in names, diag(server, res)
    starts = [e for e in res.events if e.name == "message_start"]
    assert len(starts) == 1, f"message_start x{len(starts)}\n" + diag(server, res)
    assert starts[0].json["message"]["id"] == message_id, diag(server, res)
    assert names[0] == "message_start" and names[-1] == "message_stop", diag(server, res)
    assert names.count("message_stop") == 1
    text = "".join(e.json["delta"].get("text", "") for e in res.events
                   if e.name == "content_block_delta")
    assert text == DEFAULT_TEXT, diag(server, res)


def assert_complete_chat(res: Result, completion_id: str, server: ProxyProcess) -> None:
    assert res.status == 200, diag(server, res)
    assert res.events and res.events[-1].data == "[DONE]", diag(server, res)
    assert [e.data for e in res.events].count("[DONE]") == 1
    chunks = [e.json for e in res.events[:-1]]
    assert all(isinstance(c, dict) and "error" not in c for c in chunks), diag(server, res)
    assert {c["id"] for c in chunks} == {completion_id}, diag(server, res)
    roles = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("role")]
    assert len(roles) == 1, diag(server, res)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == DEFAULT_TEXT, diag(server, res)
    assert any(c["choices"] and c["choices"][0]["finish_reason"] == "stop" for c in chunks)


def assert_complete_responses(res: Result, response_id: str, server: ProxyProcess) -> None:
    assert res.status == 200, diag(server, res)
    types = [e.json["type"] for e in res.events]
    assert "error" not in types and "response.failed" not in types, diag(server, res)
    assert types.count("response.created") == 1 and types[-1] == "response.completed", diag(server, res)
    ids = {e.json["response"]["id"] for e in res.events if "response" in e.json}
    assert ids == {response_id}, diag(server, res)
    seqs = [e.json["sequence_number"] for e in res.events]
    assert seqs == list(range(len(seqs))), diag(server, res)
    assert res.events[-1].json["response"]["output"][0]["content"][0]["text"] == DEFAULT_TEXT


COMPLETE = {ANTHROPIC_PATH: assert_complete_anthropic, CHAT_PATH: assert_complete_chat,
            RESPONSES_PATH: assert_complete_responses}


def assert_one_terminal_error(res: Result, path: str, server: ProxyProcess,
                              anthropic_type: str | None = None) -> dict:
    """The stream ended with exactly one error event in the client's protocol, and nothing
    in it claims the answer was complete."""
    assert res.status == 200, diag(server, res)
    assert res.events, diag(server, res)
    last = res.events[-1]
    if path == ANTHROPIC_PATH:
        errors = [e for e in res.events if e.name == "error"]
        assert len(errors) == 1 and last is errors[0], diag(server, res)
        assert last.json["type"] == "error" and last.json["error"]["message"], diag(server, res)
        if anthropic_type:
            assert last.json["error"]["type"] == anthropic_type, diag(server, res)
        assert not any(e.name in ("message_stop", "message_delta") for e in res.events), diag(server, res)
        return last.json["error"]
    if path == CHAT_PATH:
        errors = [e for e in res.events if isinstance(e.json, dict) and "error" in e.json]
        assert len(errors) == 1 and last is errors[0] and last.name is None, diag(server, res)
        assert set(last.json) == {"error"} and last.json["error"]["message"], diag(server, res)
        assert not any(e.data == "[DONE]" for e in res.events), diag(server, res)
        return last.json["error"]
    errors = [e for e in res.events if e.json.get("type") in ("error", "response.failed")]
    assert len(errors) == 1 and last is errors[0], diag(server, res)
    assert not any(e.json.get("type") in ("response.completed", "response.incomplete")
                   for e in res.events), diag(server, res)
    seqs = [e.json["sequence_number"] for e in res.events]
    assert seqs == list(range(len(seqs))), diag(server, res)
    return last.json


def assert_header(res: Result, expected: str, mode: str, server: ProxyProcess) -> None:
    """The deployment header names who answered; a stream that committed before anyone
    answered (early mode) cannot carry it, but must never name someone else."""
    if mode == "held":
        assert res.deployment == expected, diag(server, res)
    else:
        assert res.deployment in (None, expected), diag(server, res)


def assert_tokens(row: dict) -> None:
    assert (row["input_tokens"], row["output_tokens"], row["cache_read_tokens"],
            row["cache_write_tokens"]) == (DEFAULT_USAGE["input"], DEFAULT_USAGE["output"],
                                           DEFAULT_USAGE["cache_read"], DEFAULT_USAGE["cache_write"]), row
    assert row["usage_complete"] == 1, row


# Scripts ---------------------------------------------------------------------------

def anthropic_ok(message_id: str):
    return sse_reply(anthropic_stream(message_id=message_id))


def chat_ok(completion_id: str):
    return sse_reply(chat_stream(completion_id=completion_id))


def responses_ok(response_id: str):
    return sse_reply(responses_stream(response_id=response_id))


def anthropic_status(status: int, error_type: str, message: str, headers=None):
    return json_reply(anthropic_error_body(error_type, message), status=status, headers=headers)


SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8"}


# ---------------------------------------------------------------------------
# Waiting for upstream headers: retry, fall back, fail fast
# ---------------------------------------------------------------------------

def test_429_with_retry_after_is_retried_on_the_same_deployment(proxy_for, mode, primary, backup, big):
    primary.enqueue(anthropic_status(429, "rate_limit_error", "Rate limited", {"retry-after": "0.3"}),
                    anthropic_ok("msg_primary"))
    res = call(proxy_for, ANTHROPIC_PATH, claude("s01"))
    assert_complete_anthropic(res, "msg_primary", proxy_for)
    assert seen(primary, backup, big) == (2, 0, 0), diag(proxy_for, res)
    assert_header(res, "primary-s01", mode, proxy_for)
    gap = primary.requests[1].received_at - primary.requests[0].received_at
    assert 0.28 <= gap < 1.5, f"retry came {gap:.3f}s after the 429 (Retry-After: 0.3)"
    assert 0.3 <= res.elapsed < 3.0, res.elapsed
    row = proxy_for.row(res.request_id)
    assert (row["deployment"], row["attempts"], row["fallbacks"], row["end_reason"]) == \
        ("primary-s01", 2, 0, "complete"), row


def test_persistent_429_moves_to_the_backup_after_max_attempts(proxy_for, mode, primary, backup, big):
    primary.enqueue(*[anthropic_status(429, "rate_limit_error", "Rate limited")] * 5)
    backup.enqueue(anthropic_ok("msg_backup"))
    res = call(proxy_for, ANTHROPIC_PATH, claude("s02"))
    assert_complete_anthropic(res, "msg_backup", proxy_for)
    assert seen(primary, backup, big) == (2, 1, 0), diag(proxy_for, res)
    assert_header(res, "backup-s02", mode, proxy_for)
    assert res.elapsed < 3.0, res.elapsed


def test_persistent_429_non_streaming_names_the_backup(held_proxy, primary, backup, big):
    primary.enqueue(*[anthropic_status(429, "rate_limit_error", "Rate limited")] * 5)
    backup.enqueue(json_reply(anthropic_message(message_id="msg_backup_json")))
    res = call(held_proxy, ANTHROPIC_PATH, claude("s02j"), stream=False)
    assert res.status == 200, diag(held_proxy, res)
    assert res.deployment == "backup-s02j", diag(held_proxy, res)
    assert res.json()["id"] == "msg_backup_json" and res.json()["content"][0]["text"] == DEFAULT_TEXT
    assert seen(primary, backup, big) == (2, 1, 0)
    assert res.elapsed < 3.0, res.elapsed


def test_500_once_is_retried_on_the_primary(proxy_for, mode, primary, backup, big):
    primary.enqueue(anthropic_status(500, "api_error", "Internal server error"), anthropic_ok("msg_primary"))
    res = call(proxy_for, ANTHROPIC_PATH, claude("s03"))
    assert_complete_anthropic(res, "msg_primary", proxy_for)
    assert seen(primary, backup, big) == (2, 0, 0), diag(proxy_for, res)
    assert_header(res, "primary-s03", mode, proxy_for)
    assert res.elapsed < 3.0, res.elapsed


def test_500_once_non_streaming_chat_is_retried(held_proxy, primary, backup, big):
    primary.enqueue(json_reply(openai_error_body("The server had an error", "server_error"), status=500),
                    json_reply(chat_completion(completion_id="chatcmpl-primary")))
    res = call(held_proxy, CHAT_PATH, gpt("s03j"), stream=False)
    assert res.status == 200, diag(held_proxy, res)
    assert res.deployment == "primary-s03j", diag(held_proxy, res)
    body = res.json()
    assert body["id"] == "chatcmpl-primary" and body["choices"][0]["message"]["content"] == DEFAULT_TEXT
    assert seen(primary, backup, big) == (2, 0, 0)
    assert res.elapsed < 3.0, res.elapsed


def test_persistent_503_is_answered_by_the_backup(proxy_for, mode, primary, backup, big):
    primary.enqueue(*[anthropic_status(503, "overloaded_error", "Service unavailable")] * 5)
    backup.enqueue(anthropic_ok("msg_backup"))
    res = call(proxy_for, ANTHROPIC_PATH, claude("s04"))
    assert_complete_anthropic(res, "msg_backup", proxy_for)
    assert seen(primary, backup, big) == (2, 1, 0), diag(proxy_for, res)
    assert_header(res, "backup-s04", mode, proxy_for)
    assert res.elapsed < 3.0, res.elapsed


def test_persistent_503_non_streaming_is_answered_by_the_backup(held_proxy, primary, backup, big):
    primary.enqueue(*[anthropic_status(503, "overloaded_error", "Service unavailable")] * 5)
    backup.enqueue(json_reply(anthropic_message(message_id="msg_backup_json")))
    res = call(held_proxy, ANTHROPIC_PATH, claude("s04j"), stream=False)
    assert res.status == 200, diag(held_proxy, res)
    assert res.deployment == "backup-s04j"
    assert res.json()["id"] == "msg_backup_json" and res.json()["stop_reason"] == "end_turn"
    assert seen(primary, backup, big) == (2, 1, 0)
    row = held_proxy.row(res.request_id)
    assert (row["deployment"], row["attempts"], row["fallbacks"]) == ("backup-s04j", 3, 1), row
    assert_tokens(row)


def test_reset_before_headers_is_retried(proxy_for, mode, primary, backup, big):
    primary.enqueue([Reset()], anthropic_ok("msg_primary"))
    res = call(proxy_for, ANTHROPIC_PATH, claude("s05"))
    assert_complete_anthropic(res, "msg_primary", proxy_for)
    assert seen(primary, backup, big) == (2, 0, 0), diag(proxy_for, res)
    assert primary.requests[0].outcome == "reset"
    assert_header(res, "primary-s05", mode, proxy_for)
    assert res.elapsed < 3.0, res.elapsed


def test_silent_deployment_is_left_after_first_token_timeout_not_retried(proxy_for, mode, primary,
                                                                         backup, big):
    primary.enqueue([Stall()])
    backup.enqueue(anthropic_ok("msg_backup"))
    res = call(proxy_for, ANTHROPIC_PATH, claude("s06"))
    assert_complete_anthropic(res, "msg_backup", proxy_for)
    assert seen(primary, backup, big) == (1, 1, 0), diag(proxy_for, res)
    assert FIRST_TOKEN_TIMEOUT - 0.05 <= res.elapsed < 3.0, res.elapsed
    # The proxy hung up on the silent primary when it moved on.
    assert primary.requests[0].peer_closed.wait(2.0), "the proxy kept the silent primary open"
    assert_header(res, "backup-s06", mode, proxy_for)
    if mode == "early":
        # Committed long before the backup answered: keepalives filled the wait.
        assert res.deployment is None and res.comments >= 1, diag(proxy_for, res)
    row = proxy_for.row(res.request_id)
    log = json.loads(row["attempt_log"])
    assert [(f["deployment"], f["outcome"]) for f in log["failed"]] == \
        [("primary-s06", "first_token_timeout")], row


# ---------------------------------------------------------------------------
# Preamble held back: a switch before content is invisible
# ---------------------------------------------------------------------------

PREAMBLE_THEN_STALL = {
    ANTHROPIC_PATH: lambda: [Status(200, headers=SSE_HEADERS),
                             Send(anthropic_stream(message_id="msg_primary")[0]), Send(anthropic_ping()),
                             Stall()],
    CHAT_PATH: lambda: [Status(200, headers=SSE_HEADERS),
                        Send(chat_stream(completion_id="chatcmpl-primary")[0]), Stall()],
    RESPONSES_PATH: lambda: [Status(200, headers=SSE_HEADERS),
                             *[Send(e) for e in responses_stream(response_id="resp_primary")[:2]],
                             Stall()],
}
BACKUP_OK = {ANTHROPIC_PATH: lambda: anthropic_ok("msg_backup"),
             CHAT_PATH: lambda: chat_ok("chatcmpl-backup"),
             RESPONSES_PATH: lambda: responses_ok("resp_backup")}
BACKUP_ID = {ANTHROPIC_PATH: "msg_backup", CHAT_PATH: "chatcmpl-backup", RESPONSES_PATH: "resp_backup"}


@pytest.mark.parametrize("path", [ANTHROPIC_PATH, CHAT_PATH, RESPONSES_PATH],
                         ids=["anthropic", "chat", "responses"])
def test_slow_first_token_switches_to_the_backup_invisibly(proxy_for, mode, primary, backup, big, path):
    model = claude("s07") if path == ANTHROPIC_PATH else gpt("s07")
    primary.enqueue(PREAMBLE_THEN_STALL[path]())
    backup.enqueue(BACKUP_OK[path]())
    res = call(proxy_for, path, model)
    # Only the backup's answer: its message_start / role chunk / response.created, once.
    COMPLETE[path](res, BACKUP_ID[path], proxy_for)
    assert b"primary" not in res.body, diag(proxy_for, res)
    assert seen(primary, backup, big) == (1, 1, 0), diag(proxy_for, res)
    assert FIRST_TOKEN_TIMEOUT - 0.05 <= res.elapsed < 3.0, res.elapsed
    assert primary.requests[0].peer_closed.wait(2.0), "the proxy kept the stalled primary open"
    assert_header(res, "backup-s07", mode, proxy_for)
    if mode == "early":
        assert res.deployment is None and res.comments >= 1, diag(proxy_for, res)
    row = proxy_for.row(res.request_id)
    assert (row["deployment"], row["fallbacks"], row["end_reason"]) == ("backup-s07", 1, "complete"), row


# ---------------------------------------------------------------------------
# After content: one terminal error, never a fail-over, never a fake end
# ---------------------------------------------------------------------------

CONTENT_THEN = {  # the upstream transcript up to and including the first content
    ANTHROPIC_PATH: lambda: anthropic_stream(message_id="msg_primary")[:4],  # start, block, ping, delta
    CHAT_PATH: lambda: chat_stream(completion_id="chatcmpl-primary")[:2],  # role, "Hello"
    RESPONSES_PATH: lambda: responses_stream(response_id="resp_primary")[:5],  # ... first delta
}


REST_OF_ANSWER = {  # what a continuation from the prefill "Hello" answers (the rest of it)
    ANTHROPIC_PATH: lambda: sse_reply(anthropic_stream(DEFAULT_TEXT_PIECES[1:],
                                                       message_id="msg_continuation")),
    CHAT_PATH: lambda: sse_reply(chat_stream(DEFAULT_TEXT_PIECES[1:], completion_id="chatcmpl-continuation")),
    RESPONSES_PATH: lambda: sse_reply(responses_stream(DEFAULT_TEXT_PIECES[1:],
                                                       response_id="resp_continuation")),
}
FIRST_ID = {ANTHROPIC_PATH: "msg_primary", CHAT_PATH: "chatcmpl-primary", RESPONSES_PATH: "resp_primary"}


def assert_continued(res: Result, path: str, server: ProxyProcess, calls: int = 2) -> dict:
    """One whole answer (the first call's id, its text once), and a row that says so."""
    COMPLETE[path](res, FIRST_ID[path], server)
    row = server.row(res.request_id)
    assert (row["end_reason"], row["continuations"], row["attempts"]) == ("complete", 1, calls), row
    return row


@pytest.mark.parametrize("path", [ANTHROPIC_PATH, CHAT_PATH, RESPONSES_PATH],
                         ids=["anthropic", "chat", "responses"])
def test_stream_cut_mid_answer_is_continued_into_one_answer(held_proxy, primary, backup, big, path):
    # Each path its own route: every broken call counts against its deployment's breaker.
    key = {ANTHROPIC_PATH: "s08", CHAT_PATH: "s08c", RESPONSES_PATH: "s08r"}[path]
    model = claude(key) if path == ANTHROPIC_PATH else gpt(key)
    primary.enqueue([Status(200, headers=SSE_HEADERS), *[Send(e) for e in CONTENT_THEN[path]()], Cut()],
                    REST_OF_ANSWER[path]())
    res = call(held_proxy, path, model)
    assert_continued(res, path, held_proxy)
    assert seen(primary, backup, big) == (2, 0, 0), diag(held_proxy, res)  # the same deployment again
    assert res.deployment == f"primary-{key}"
    assert res.elapsed < 3.0, res.elapsed


def test_stall_after_content_is_continued_after_idle_timeout(held_proxy, primary, backup, big):
    primary.enqueue([Status(200, headers=SSE_HEADERS),
                     *[Send(e) for e in CONTENT_THEN[ANTHROPIC_PATH]()], Stall()],
                    REST_OF_ANSWER[ANTHROPIC_PATH]())
    res = call(held_proxy, ANTHROPIC_PATH, claude("s09"))
    row = assert_continued(res, ANTHROPIC_PATH, held_proxy)
    assert json.loads(row["attempt_log"])["failed"][0]["outcome"] == "idle_timeout", row
    assert seen(primary, backup, big) == (2, 0, 0), diag(held_proxy, res)
    assert IDLE_TIMEOUT - 0.1 <= res.elapsed < IDLE_TIMEOUT + 3.0, res.elapsed
    assert primary.requests[0].peer_closed.wait(2.0)


MALFORMED = b'event: content_block_delta\ndata: {"type":"content_block_delta", not json\n\n'


def test_malformed_event_before_content_falls_back(proxy_for, mode, primary, backup, big):
    primary.enqueue([Status(200, headers=SSE_HEADERS),
                     Send(anthropic_stream(message_id="msg_primary")[0]), Send(MALFORMED), Stall()])
    backup.enqueue(anthropic_ok("msg_backup"))
    res = call(proxy_for, ANTHROPIC_PATH, claude("s10a"))
    assert_complete_anthropic(res, "msg_backup", proxy_for)
    assert b"not json" not in res.body and b"msg_primary" not in res.body
    assert seen(primary, backup, big) == (1, 1, 0), diag(proxy_for, res)
    assert_header(res, "backup-s10a", mode, proxy_for)
    assert res.elapsed < FIRST_TOKEN_TIMEOUT + 0.4, f"waited for the timeout: {res.elapsed:.3f}s"


def test_malformed_event_after_content_is_a_break_at_the_last_good_event(held_proxy, primary, backup, big):
    primary.enqueue([Status(200, headers=SSE_HEADERS),
                     *[Send(e) for e in CONTENT_THEN[ANTHROPIC_PATH]()], Send(MALFORMED), Stall()],
                    REST_OF_ANSWER[ANTHROPIC_PATH]())
    res = call(held_proxy, ANTHROPIC_PATH, claude("s10b"))
    assert_continued(res, ANTHROPIC_PATH, held_proxy)
    assert b"not json" not in res.body, diag(held_proxy, res)
    assert seen(primary, backup, big) == (2, 0, 0), diag(held_proxy, res)
    assert res.elapsed < 3.0, res.elapsed


def test_chat_stream_cut_before_its_finish_reason_is_continued(held_proxy, primary, backup, big):
    events = chat_stream(completion_id="chatcmpl-primary", done=False)
    primary.enqueue(sse_reply(events[:2]),  # "Hello", then EOF: no finish reason, no usage
                    REST_OF_ANSWER[CHAT_PATH]())
    res = call(held_proxy, CHAT_PATH, gpt("s11"))
    assert_continued(res, CHAT_PATH, held_proxy)
    assert seen(primary, backup, big) == (2, 0, 0), diag(held_proxy, res)
    assert res.elapsed < 3.0, res.elapsed


def test_chat_stream_finished_by_its_finish_reasons_is_complete_without_done(held_proxy, primary,
                                                                             backup, big):
    """Some OpenAI-compatible servers end a whole answer without `data: [DONE]`: every choice
    has its finish reason and the body ends cleanly.  Nothing is appended, the row is whole."""
    events = chat_stream(completion_id="chatcmpl-primary", done=False)
    primary.enqueue(sse_reply(events))
    res = call(held_proxy, CHAT_PATH, gpt("s11b"))
    assert res.status == 200 and res.body.endswith(events[-1]), diag(held_proxy, res)
    assert b'"error"' not in res.body and b"[DONE]" not in res.body
    assert seen(primary, backup, big) == (1, 0, 0), diag(held_proxy, res)
    row = held_proxy.row(res.request_id)
    assert (row["end_reason"], row["output_tokens"], row["usage_complete"]) == ("complete", 15, 1), row


# ---------------------------------------------------------------------------
# Client errors: larger context, or fail fast with the provider's own answer
# ---------------------------------------------------------------------------

def test_context_length_exceeded_goes_to_the_larger_context_deployment(proxy_for, mode, primary,
                                                                       backup, big):
    primary.enqueue(anthropic_status(400, "invalid_request_error",
                                     "prompt is too long: 250000 tokens > 200000 maximum"))
    backup.enqueue(anthropic_ok("msg_backup"))  # must not be used: not marked larger_context
    big.enqueue(anthropic_ok("msg_big"))
    res = call(proxy_for, ANTHROPIC_PATH, claude("s12"))
    assert_complete_anthropic(res, "msg_big", proxy_for)
    assert seen(primary, backup, big) == (1, 0, 1), diag(proxy_for, res)
    assert_header(res, "big-s12", mode, proxy_for)
    assert res.elapsed < 3.0, res.elapsed


def test_plain_400_fails_fast_with_the_primarys_answer(held_proxy, primary, backup, big):
    message = "max_tokens: Field required"
    primary.enqueue(anthropic_status(400, "invalid_request_error", message))
    res = call(held_proxy, ANTHROPIC_PATH, claude("s12b"))
    assert res.status == 400, diag(held_proxy, res)
    body = res.json()
    assert body["error"] == {"type": "invalid_request_error", "message": message}, body
    assert res.deployment == "primary-s12b"
    assert seen(primary, backup, big) == (1, 0, 0)
    assert res.elapsed < 2.0, res.elapsed
    row = held_proxy.row(res.request_id)
    assert row["status"] == 400 and row["attempts"] == 1 and row["fallbacks"] == 0, row


def test_content_filter_rejection_fails_fast_with_the_providers_status(held_proxy, primary, backup,
                                                                       big):
    upstream = openai_error_body("Your request was rejected by our content filter (content_policy).",
                                 type="invalid_request_error", code="content_policy_violation")
    primary.enqueue(json_reply(upstream, status=400))
    res = call(held_proxy, CHAT_PATH, gpt("s13"))
    assert res.status == 400, diag(held_proxy, res)
    assert res.json() == upstream
    assert res.deployment == "primary-s13"
    assert seen(primary, backup, big) == (1, 0, 0)
    assert res.elapsed < 2.0, res.elapsed


def test_retry_after_longer_than_the_cap_moves_on_at_once(held_proxy, primary, backup, big):
    primary.enqueue(anthropic_status(429, "rate_limit_error", "Rate limited", {"retry-after": "10"}))
    backup.enqueue(anthropic_ok("msg_backup"))
    res = call(held_proxy, ANTHROPIC_PATH, claude("ramax"))
    assert_complete_anthropic(res, "msg_backup", held_proxy)
    assert seen(primary, backup, big) == (1, 1, 0), diag(held_proxy, res)
    assert res.deployment == "backup-ramax"
    assert res.elapsed < RETRY_AFTER_MAX, f"waited on a Retry-After over the cap: {res.elapsed:.3f}s"


def test_every_deployment_failing_gives_the_last_error_or_one_terminal_error(proxy_for, mode, primary,
                                                                             backup, big):
    """held: the last upstream error with its real status; early (committed): one terminal
    error event. Either way nothing that looks like an answer."""
    for upstream, name in ((primary, "primary"), (backup, "backup"), (big, "big")):
        upstream.enqueue(*[anthropic_status(503, "overloaded_error", f"{name} is down")] * 3)
    res = call(proxy_for, ANTHROPIC_PATH, claude("all"))
    assert seen(primary, backup, big) == (2, 2, 2), diag(proxy_for, res)
    assert res.elapsed < 4.0, res.elapsed
    if mode == "held":
        assert res.status == 503, diag(proxy_for, res)
        assert res.json()["error"]["message"] == "big is down"
        assert res.headers.get("x-should-retry") == "false", dict(res.headers)
    else:
        err = assert_one_terminal_error(res, ANTHROPIC_PATH, proxy_for)
        assert err["message"] == "big is down", err
        assert not any(e.name == "message_start" for e in res.events)
    row = proxy_for.row(res.request_id)
    assert row["end_reason"] == "upstream_error" and row["attempts"] == 6, row
    assert len(json.loads(row["attempt_log"])["failed"]) == 6, row


def test_unrouted_model_is_not_retried_by_the_proxy(held_proxy, primary, backup, big):
    body = anthropic_error_body("overloaded_error", "Overloaded (upstream)")
    primary.enqueue(json_reply(body, status=503, headers={"retry-after": "7"}), anthropic_ok("msg_second"))
    res = call(held_proxy, ANTHROPIC_PATH, "other-model")
    assert res.status == 503, diag(held_proxy, res)
    assert res.json() == body
    assert res.headers.get("retry-after") == "7"
    assert res.headers.get("x-should-retry") != "false"  # the client's SDK may retry it
    assert seen(primary, backup, big) == (1, 0, 0), diag(held_proxy, res)
    assert res.elapsed < 2.0, res.elapsed


# ---------------------------------------------------------------------------
# Fail-over accounting
# ---------------------------------------------------------------------------

def test_the_usage_row_of_a_fail_over_names_the_backup_and_each_failed_try(held_proxy, primary, backup, big):
    primary.enqueue(*[anthropic_status(429, "rate_limit_error", "Rate limited")] * 5)
    backup.enqueue(anthropic_ok("msg_backup"))
    res = call(held_proxy, ANTHROPIC_PATH, claude("s15"))
    assert_complete_anthropic(res, "msg_backup", held_proxy)
    assert seen(primary, backup, big) == (2, 1, 0)
    row = held_proxy.row(res.request_id)
    assert row["deployment"] == "backup-s15", row
    assert row["attempts"] >= 2 and row["attempts"] == 3, row
    assert row["fallbacks"] == 1, row
    assert row["end_reason"] == "complete" and row["status"] == 200, row
    log = json.loads(row["attempt_log"])
    assert [(f["deployment"], f["outcome"], f["status"]) for f in log["failed"]] == \
        [("primary-s15", "status", 429)] * 2, log
    assert all("Rate limited" in f.get("error", "") for f in log["failed"]), log
    assert "skipped_open" not in log, log
    assert_tokens(row)


# ---------------------------------------------------------------------------
# Circuit breaker
# ---------------------------------------------------------------------------

def breaker(server: ProxyProcess, name: str) -> dict:
    return health(server)["breakers"].get(name, {"state": "absent"})


def flip_script(down: threading.Event):
    """A queued callable: 503 while `down` is set, else the default answer."""
    def script(request):
        if down.is_set():
            return anthropic_status(503, "overloaded_error", "primary is down")
        return None
    return script


def test_breaker_opens_skips_the_primary_then_probes_it_after_the_cooldown(held_proxy, primary,
                                                                           backup, big):
    server = held_proxy
    down = threading.Event()
    down.set()
    primary.enqueue(*[flip_script(down)] * 50)
    model = claude("brk")

    # Failures 1-2, then 3 (opens the breaker) and the retry already under way.
    for _ in range(2):
        res = call(server, ANTHROPIC_PATH, model)
        assert res.status == 200 and res.deployment == "backup-brk", diag(server, res)
    assert breaker(server, "primary-brk")["state"] == "open", health(server)
    opened_seen = time.monotonic()
    before = len(primary.requests)
    assert before >= FAILURE_THRESHOLD, before

    # Open: the primary is skipped, the backup answers at once.
    res = call(server, ANTHROPIC_PATH, model)
    assert res.status == 200 and res.deployment == "backup-brk", diag(server, res)
    assert res.elapsed < 1.0, res.elapsed
    assert len(primary.requests) == before, "a request reached the primary while its breaker was open"
    skipped_request = res.request_id

    # The primary recovers; after the cool-down (the behaviour under test: a timed wait) one
    # probe goes to it, and it answers again.
    down.clear()
    backup_before = len(backup.requests)
    time.sleep(max(0.0, COOLDOWN + 0.2 - (time.monotonic() - opened_seen)))
    res = call(server, ANTHROPIC_PATH, model)
    assert res.status == 200 and res.deployment == "primary-brk", diag(server, res)
    assert len(primary.requests) == before + 1
    assert breaker(server, "primary-brk")["state"] == "closed", health(server)
    for _ in range(2):
        res = call(server, ANTHROPIC_PATH, model)
        assert res.status == 200 and res.deployment == "primary-brk", diag(server, res)
    assert len(primary.requests) == before + 3
    assert len(backup.requests) == backup_before, "the backup was used after the primary recovered"
    assert seen(big) == (0,)
    # The request that skipped the open breaker says so in its usage row.
    row = server.row(skipped_request)
    assert row["deployment"] == "backup-brk" and row["attempt_log"] is not None, row
    assert json.loads(row["attempt_log"]) == {"failed": [], "skipped_open": ["primary-brk"]}, row


def test_breaker_that_opens_mid_request_stops_the_retry_on_that_deployment(held_proxy, primary,
                                                                           backup, big):
    """Once failure_threshold failures have opened the breaker, the deployment gets no more
    requests - including the retry the request that opened it was about to make."""
    server = held_proxy
    primary.enqueue(*[anthropic_status(503, "overloaded_error", "primary is down")] * 10)
    backup.enqueue(anthropic_ok("msg_b1"), anthropic_ok("msg_b2"))
    model = claude("brk2")
    first = call(server, ANTHROPIC_PATH, model)  # failures 1 and 2
    assert_complete_anthropic(first, "msg_b1", server)
    assert seen(primary) == (2,)
    second = call(server, ANTHROPIC_PATH, model)  # failure 3 opens the breaker
    assert_complete_anthropic(second, "msg_b2", server)
    assert breaker(server, "primary-brk2")["state"] == "open", health(server)
    assert seen(primary, backup, big) == (FAILURE_THRESHOLD, 2, 0), \
        ("the primary was retried after its breaker had opened\n"
         + diag(server, second) + "\n" + json.dumps(server.row(second.request_id), default=str))


def test_a_json_answer_slower_than_the_first_token_timeout_is_waited_for(held_proxy, primary,
                                                                         backup, big):
    """first_token_timeout watches streams only: a plain request's JSON answer says nothing
    until it is whole, so a slow one is neither cut nor moved on (mutant a4)."""
    primary.enqueue([Sleep(FIRST_TOKEN_TIMEOUT * 1.6)] + json_reply(anthropic_message(message_id="msg_slow")))
    res = call(held_proxy, ANTHROPIC_PATH, claude("s16"), stream=False)
    assert res.status == 200 and res.json()["id"] == "msg_slow", diag(held_proxy, res)
    assert seen(primary, backup, big) == (1, 0, 0), diag(held_proxy, res)
    assert res.deployment == "primary-s16"


def test_a_stream_request_answered_with_a_slow_json_body_is_not_cut(held_proxy, primary, backup,
                                                                    big):
    """A streaming request answered with JSON: its first bytes are the answer's content, so
    the first-token deadline is over and a body that takes longer still arrives whole
    (mutant r19)."""
    payload = json.dumps(anthropic_message(message_id="msg_slow_body")).encode()
    half = len(payload) // 2
    primary.enqueue([Status(200, headers={"Content-Type": "application/json"}, body_mode="length"),
                     Send(payload[:half]), Sleep(FIRST_TOKEN_TIMEOUT * 1.6), Send(payload[half:]), End()])
    res = call(held_proxy, ANTHROPIC_PATH, claude("s17"), stream=True)
    assert res.status == 200 and res.body == payload, diag(held_proxy, res)
    assert seen(primary, backup, big) == (1, 0, 0), diag(held_proxy, res)
    assert held_proxy.row(res.request_id)["end_reason"] == "complete"


def test_an_upstreams_own_x_should_retry_never_reaches_the_client_after_retries(held_proxy, primary,
                                                                                backup, big):
    """After the proxy's retries the client's SDK is told `x-should-retry: false`, and only
    that: the upstream's `true` would make the SDK multiply the attempts (mutant p1)."""
    for upstream, name in ((primary, "primary"), (backup, "backup"), (big, "big")):
        upstream.enqueue(*[anthropic_status(503, "overloaded_error", f"{name} is down",
                                            {"x-should-retry": "true"})] * 3)
    res = call(held_proxy, ANTHROPIC_PATH, claude("s18"))
    assert res.status == 503 and res.json()["error"]["message"] == "big is down", diag(held_proxy, res)
    assert res.headers.get("x-should-retry") == "false", dict(res.headers)
