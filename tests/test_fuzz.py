"""Seeded fuzzing of the whole proxy: thousands of malformed requests, hundreds of broken
upstream answers, against one real worker.

What must hold, whatever arrives: the proxy never answers 500 (the fuzzed upstreams never
send one, so a 500 can only be the proxy's own failure), its worker never dies, a streamed
answer always ends properly (its protocol's end or one terminal error), and every request
that got an answer has exactly one usage row (requests whose bytes never made a request
line get an answer but no row; none gets a row without an answer).

The seed is printed; set LLM_PROXY_FUZZ_SEED to replay a run, LLM_PROXY_FUZZ_REQUESTS and
LLM_PROXY_FUZZ_UPSTREAMS to change its size.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import random
import zlib

import pytest

from support.builders import (anthropic_message, anthropic_stream, chat_completion, chat_stream,
                              responses_stream)
from support.processes import ProxyProcess
from support.rawhttp import RID, exchange, parse_response
from support.steps import Cut, End, Raw, Reset, Send, Stall, Status, json_reply, sse_reply

SEED = int(os.environ.get("LLM_PROXY_FUZZ_SEED", "20261130"))
REQUESTS = int(os.environ.get("LLM_PROXY_FUZZ_REQUESTS", "2500"))
UPSTREAMS = int(os.environ.get("LLM_PROXY_FUZZ_UPSTREAMS", "500"))
MAX_EVENT = 64 * 1024

ENDPOINTS = {
    "/v1/messages": {"model": "claude-sonnet-4-5", "max_tokens": 32,
                     "messages": [{"role": "user", "content": "hi"}]},
    "/v1/chat/completions": {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
    "/v1/responses": {"model": "gpt-4.1", "input": "hi"},
    "/v1/messages/count_tokens": {"model": "claude-sonnet-4-5", "messages": []},
}
ODD_VALUES = [None, True, 0, -1, 1e308, "", "x" * 5000, "\\ud800", [], {}, [[[]]], {"a": None},
              "true", 1, "\u2028", "\x00"]


# ---------------------------------------------------------------------------
# Malformed requests
# ---------------------------------------------------------------------------

def fuzzed_body(rng: random.Random, path: str) -> bytes:
    payload = dict(ENDPOINTS.get(path, ENDPOINTS["/v1/messages"]))
    payload["stream"] = rng.random() < 0.5
    for _ in range(rng.randint(0, 3)):
        key = rng.choice(["model", "stream", "stream_options", "max_tokens", "messages", "extra"])
        payload[key] = rng.choice(ODD_VALUES)
    body = json.dumps(payload, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")
    body = body.replace(b'"\\\\ud800"', b'"\\ud800"')
    roll = rng.random()
    if roll < 0.15:
        body = body[:rng.randint(0, len(body))]
    elif roll < 0.25:
        at = rng.randint(0, len(body))
        body = body[:at] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 8))) + body[at:]
    elif roll < 0.30:
        depth = rng.choice([50, 5000, 200_000])
        body = b'{"model": "m", "x": ' + b"[" * depth + b"]" * depth + b"}"
    elif roll < 0.35:
        body = rng.choice([b"", b"null", b"[]", b"42", b'"s"', b"\xff\xfe\x00", b"{" * 10])
    return body


def fuzzed_request(rng: random.Random) -> tuple[bytes, bool]:
    """Raw request bytes, and whether the client half-closes after sending them."""
    path = rng.choice(list(ENDPOINTS) * 3 + ["/v1/models", "/nope", "/v1/messages%0aX", "/health"])
    method = rng.choice(["POST"] * 8 + ["GET", "PUT", "P\x01ST", "DELETE"])
    body = fuzzed_body(rng, path)
    headers = [("Host", "proxy"), ("Content-Type", "application/json")]
    if rng.random() < 0.3:
        headers.append(("x-api-key", rng.choice(["sk-fuzz-key-123456", "\xa0k", "k\x01", "x" * 9000])))
    if rng.random() < 0.2:
        headers.append((rng.choice(["X-Odd", "Bad Name", "X:Y", "X-\xff"]),
                        rng.choice(["\xa0v", "v\x01", "v" * 20000, "ok", "\x85v", "a\nb"])))
    framing = rng.random()
    half_close = False
    if framing < 0.6:
        headers.append(("Content-Length", str(len(body))))
        wire = body
    elif framing < 0.75:
        headers.append(("Transfer-Encoding", "chunked"))
        wire = fuzzed_chunks(rng, body)
    elif framing < 0.85:  # a length the body never reaches, then EOF
        headers.append(("Content-Length", str(len(body) + rng.randint(1, 500))))
        wire, half_close = body, True
    elif framing < 0.9:
        headers += [("Content-Length", str(len(body))), ("Transfer-Encoding", "chunked")]
        wire = body
    elif framing < 0.95:  # lengths int() would take, or choke on
        headers.append(("Content-Length", rng.choice(["-1", "+5", "0x10", "1_0", "\xb2", "9" * 5000,
                                                      " 5", "5 5", ""])))
        wire = body
    else:
        wire = body  # no length at all
    headers.append(("Connection", "close"))
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    return head.encode("latin-1", "replace") + wire, half_close


def fuzzed_chunks(rng: random.Random, body: bytes) -> bytes:
    out, pos = b"", 0
    while pos < len(body):
        size = rng.randint(1, 64)
        out += b"%x\r\n%s\r\n" % (len(body[pos:pos + size]), body[pos:pos + size])
        pos += size
    tail = rng.random()
    if tail < 0.65:
        return out + b"0\r\n\r\n"
    if tail < 0.7:
        return out + rng.choice([b"-6\r\n", b"+5\r\nhello\r\n0\r\n\r\n", b"0x5\r\nhello\r\n",
                                 b"7fffffffffffffffff\r\n", b"\xb2\r\nx\r\n0\r\n\r\n"])
    if tail < 0.8:
        return out + b"zz\r\nabc\r\n0\r\n\r\n"
    if tail < 0.9:
        return out + b"0\r\nX-Trailer: ok\r\nno colon\r\n\r\n"
    return out + b"5\r\nabcdeXX0\r\n\r\n"


# ---------------------------------------------------------------------------
# Broken upstreams
# ---------------------------------------------------------------------------

def transcript(path: str) -> list[bytes]:
    return {"/v1/messages": anthropic_stream, "/v1/chat/completions": chat_stream,
            "/v1/responses": responses_stream}[path]()


def broken_upstream(rng: random.Random, path: str, stream: bool) -> list:
    events = transcript(path)
    k = rng.randint(0, len(events))
    head = [Status(200, headers={"Content-Type": "text/event-stream"})] + [Send(e) for e in events[:k]]
    kind = rng.choice(["valid", "cut", "reset", "garbage", "not-json", "huge", "stall", "status",
                       "bad-header", "html", "gzip-garbage", "bad-chunk", "json-answer", "no-blank"])
    if kind == "valid":
        return sse_reply(events) if stream else json_reply(
            anthropic_message() if path == "/v1/messages" else chat_completion())
    if kind == "cut":
        return head + [Cut()]
    if kind == "reset":
        return head + [Reset()]
    if kind == "garbage":
        return head + [Send(bytes(rng.randrange(256) for _ in range(rng.randint(1, 300)))), End()]
    if kind == "not-json":
        return head + [Send(b"data: {oops\n\n"), End()]
    if kind == "huge":
        return head + [Send(b"data: " + b"x" * (MAX_EVENT + 10) + b"\n\n"), End()]
    if kind == "stall":
        return head + [Stall()]
    if kind == "status":
        status = rng.choice([400, 401, 403, 404, 408, 413, 422, 429, 502, 503, 504, 529, 599])
        body = rng.choice([b'{"error": {"message": "nope", "type": "x"}}', b"<html>down</html>", b"",
                           b'{"type":"error","error":{"type":"overloaded_error","message":"busy"}}'])
        return [Status(status, body_mode="length"), Send(body), End()] if body else \
            [Status(status, body_mode="length"), End()]
    if kind == "bad-header":
        return [Raw(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nX-Odd: a\x01b\r\n"
                    b"Content-Length: 0\r\n\r\n"), Cut()]
    if kind == "html":
        return [Status(200, headers={"Content-Type": "text/html"}, body_mode="length"),
                Send(b"<html>portal</html>"), End()]
    if kind == "gzip-garbage":
        comp = zlib.compressobj(wbits=31)
        good = comp.compress(b"".join(events)) + comp.flush()
        return [Status(200, headers={"Content-Type": "text/event-stream", "Content-Encoding": "gzip"}),
                Send(good[:rng.randint(0, len(good))] + b"\x00garbage"), End()]
    if kind == "bad-chunk":
        return [Raw(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n"), Cut()]
    if kind == "json-answer":
        return json_reply(anthropic_message())
    return head + [Send(b"data: {\"no\": \"blank line\"}"), End()]


# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fuzz_proxy(fake, tmp_path_factory):
    server = ProxyProcess(fake.url, tmp_path_factory.mktemp("fuzz"), threads=32,
                          LLM_PROXY_IDLE_TIMEOUT="0.5", LLM_PROXY_PLAIN_TIMEOUT="1",
                          LLM_PROXY_MAX_EVENT_BYTES=str(MAX_EVENT), LLM_PROXY_CLIENT_TIMEOUT="5",
                          LLM_PROXY_MAX_BODY_BYTES=str(1024 * 1024)).start()
    yield server
    server.stop()


def check_answers(server: ProxyProcess, answers: list[bytes]) -> None:
    request_ids = []
    for answer in answers:
        if not answer:
            continue  # no request line ever arrived (or the client's bytes never formed one)
        response = parse_response(answer)
        status, body, complete = response.status, response.body, response.complete
        assert status != 500 and b"internal error" not in body, answer[:600]
        assert complete, f"the answer was cut: {answer[-300:]!r}"
        if "text/event-stream" in (response.header("content-type") or ""):
            tail = body.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
            assert (b"message_stop" in tail or b"[DONE]" in tail or b"response.completed" in tail
                    or b"error" in tail or b"finish_reason" in tail), body[-400:]
        if response.header(RID) is not None:
            request_ids.append(response.header(RID))
    server.flush()
    rows = [r["request_id"] for r in server.rows()]
    assert len(rows) == len(set(rows)), "a request with more than one row"
    assert set(rows) == set(request_ids), (
        f"{len(set(request_ids) - set(rows))} answers without a row, "
        f"{len(set(rows) - set(request_ids))} rows without an answer")


@pytest.mark.timeout(120)  # 3,000 exchanges on one worker
def test_fuzzed_requests_and_upstreams(fuzz_proxy, fake):
    print(f"\nfuzz seed {SEED}: {REQUESTS} requests, {UPSTREAMS} upstream answers")
    rng = random.Random(SEED)
    pid = fuzz_proxy.health()["pid"]
    requests_ = [fuzzed_request(rng) for _ in range(REQUESTS)]
    upstreams = []
    for i in range(UPSTREAMS):
        path = rng.choice(["/v1/messages", "/v1/chat/completions", "/v1/responses"])
        stream = rng.random() < 0.7
        fake.named[f"fuzz{i}"] = broken_upstream(rng, path, stream)
        body = dict(ENDPOINTS[path], stream=stream)
        raw = (f"POST {path} HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n"
               f"x-fake-script: fuzz{i}\r\nContent-Length: {len(json.dumps(body))}\r\n"
               f"Connection: close\r\n\r\n{json.dumps(body)}").encode()
        upstreams.append((raw, False))
    work = requests_ + upstreams
    rng.shuffle(work)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda item: exchange(fuzz_proxy.port, item[0], half_close=item[1],
                                                      timeout=15), work))
    assert fuzz_proxy.health()["pid"] == pid, "the worker died"
    assert not fake.errors, fake.errors[:3]
    check_answers(fuzz_proxy, answers)
    assert "Traceback" not in fuzz_proxy.log(), fuzz_proxy.log()[-3000:]
