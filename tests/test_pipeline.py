"""The pipeline's stages one at a time, in process, with a stub upstream: the commit rule's
states, each way a try can end, what each format says about events and errors, and the
record's one writer.  (End to end, the same code runs under gunicorn in the other files.)"""

from __future__ import annotations

import json
import logging
import sqlite3

import pytest
from werkzeug.test import Client

from proxy import formats
from proxy.app import App
from proxy.config import load_config
from proxy.errors import (AllDeploymentsUnavailable, BadRequest, ClientGone, FirstTokenTimeout,
                          MethodNotAllowed, NotFound, Overloaded, PayloadTooLarge, ProxyError,
                          RequestTimeout, ShuttingDown, UpstreamBroken, UpstreamHTTPError,
                          UpstreamTimeout, UpstreamUnreachable)
from proxy.formats import EventKind
from proxy.heartbeat import Exchange
from proxy.pipeline.attempt import Outcome, TryDeps, TryLoop
from proxy.pipeline.commit import CommitRule, Phase
from proxy.pipeline.finalize import RequestRecord
from proxy.pipeline.request import ProxyRequest
from proxy.pricing import PriceTable
from proxy.routing import (BreakerPolicy, Breakers, Deployment, RetryPolicy, Route, Router)
from proxy.upstream import UpstreamRequests
from proxy.config import Provider
from proxy.formats.translate.bridge import Bridges, ProviderTranslation


# -- a stub upstream ------------------------------------------------------------------------
class StubResponse:
    """What the try stage reads of an upstream answer."""

    def __init__(self, status: int, body: bytes = b"{}", content_type: str = "application/json",
                 headers: list[tuple[str, str]] | None = None) -> None:
        self.status, self.reason, self.body = status, "", body
        self.headers = [("Content-Type", content_type)] + list(headers or [])
        self.is_json = content_type == "application/json"
        self.is_event_stream = content_type == "text/event-stream"
        self.closed = False
        self.whole = False  # read whole before the headers (prefetch_answer)

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def read_limited(self, limit: int) -> bytes:
        return self.body[:limit]

    def close(self) -> None:
        self.closed = True


class StubUpstream:
    """Answers each send with the next scripted response (or raises the scripted error)."""

    def __init__(self, *script) -> None:
        self.script = list(script)
        self.sent: list[str] = []

    def send(self, method, url, headers, body, handle, read_timeout):
        self.sent.append(url)
        step = self.script.pop(0)
        if isinstance(step, BaseException):
            raise step
        return step


class Sink:
    def __init__(self) -> None:
        self.rows = []

    def record(self, rec) -> None:
        self.rows.append(rec)


PROVIDERS = {name: Provider(name, f"http://{name}.test", "anthropic") for name in ("a", "b")}


def tries(upstream: StubUpstream, *names: str, attempts: int = 2, breakers=None):
    deployments = tuple(Deployment(n, n, None) for n in names)
    route = Route("m*", deployments, None, RetryPolicy(max_attempts=attempts, backoff_base=0.0))
    router = Router([route], breakers or Breakers(BreakerPolicy()))
    deps = TryDeps(upstream, UpstreamRequests(PROVIDERS), Bridges({n: ProviderTranslation(p.format) for n, p in PROVIDERS.items()}),
                   router, plain_timeout=5.0)
    preq = ProxyRequest(request_id="req_t", endpoint="anthropic", fmt=formats.ANTHROPIC,
                        route=route, method="POST", path="/v1/messages", headers=[],
                        body=b"{}", model="m1")
    record = RequestRecord(Sink(), PriceTable({}), request_id="req_t", endpoint="anthropic",
                           client_key_id=None, bytes_in=2)
    return TryLoop(deps, preq, record, Exchange(None, None, lambda err: None)), record


def take_it(resp, attempt, bridge=None) -> Outcome:
    return Outcome.taken()


ERROR_429 = b'{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}'


# -- the try stage: every way a try ends -----------------------------------------------------
@pytest.mark.parametrize("script, take, expect", [
    pytest.param([StubResponse(200)], take_it,
                 dict(answered=True, sent=["a"], attempts=1, deployment="a"), id="answered"),
    pytest.param([StubResponse(500), StubResponse(200)], take_it,
                 dict(answered=True, sent=["a", "a"], attempts=2, deployment="a"),
                 id="5xx-retried-on-the-same-deployment"),
    pytest.param([UpstreamUnreachable("refused"), StubResponse(200)], take_it,
                 dict(answered=True, sent=["a", "a"], attempts=2, deployment="a"),
                 id="connect-error-retried"),
    pytest.param([UpstreamTimeout("silent"), StubResponse(200)], take_it,
                 dict(answered=True, sent=["a", "b"], attempts=2, deployment="b"),
                 id="silence-moves-on"),
    pytest.param([StubResponse(200, content_type="text/html"), StubResponse(200)], take_it,
                 dict(answered=True, sent=["a", "b"], attempts=2, deployment="b"),
                 id="html-200-is-broken-and-moves-on"),
    pytest.param([StubResponse(200), StubResponse(200)],
                 lambda resp, attempt, bridge: (Outcome.failed(UpstreamBroken("cut before content"))
                                        if attempt.deployment.name == "a" else Outcome.taken()),
                 dict(answered=True, sent=["a", "b"], attempts=2, deployment="b"),
                 id="failed-before-content-moves-on"),
    pytest.param([StubResponse(200)],
                 lambda resp, attempt, bridge: Outcome.taken(broke=UpstreamBroken("cut after content")),
                 dict(answered=True, sent=["a"], attempts=1, deployment="a", error=UpstreamBroken),
                 id="broke-after-content-is-not-retried"),
    pytest.param([StubResponse(429, ERROR_429)] * 4, take_it,
                 dict(answered=False, sent=["a", "a", "b", "b"], attempts=4, reply=429),
                 id="every-try-429-gives-the-last-answer"),
    pytest.param([StubResponse(401, b'{"error":{"message":"bad key"}}')], take_it,
                 dict(answered=False, sent=["a"], attempts=1, reply=401, final=True),
                 id="4xx-goes-to-the-client-at-once"),
    pytest.param([BadRequest("header cannot be sent")], take_it,
                 dict(answered=False, sent=["a"], attempts=1, error=BadRequest, final=True),
                 id="client-fault-is-never-retried"),
])
def test_each_way_a_try_ends(script, take, expect):
    loop, record = tries(StubUpstream(*script), "a", "b")
    outcome = loop.run(take)
    hosts = [url.split("//")[1].split(".")[0] for url in loop.deps.upstream.sent]
    assert (outcome.answered, hosts, record.row.attempts) == (
        expect["answered"], expect["sent"], expect["attempts"])
    assert outcome.final == expect.get("final", False)
    if "deployment" in expect:
        assert record.row.deployment == expect["deployment"]
    if "reply" in expect:
        assert outcome.reply is not None and outcome.reply.status == expect["reply"]
    assert type(outcome.error) is expect.get("error", type(None)) or (
        outcome.error is not None and isinstance(outcome.error, expect["error"]))


def test_broke_after_content_counts_against_the_deployment_and_a_client_fault_does_not():
    breakers = Breakers(BreakerPolicy(failure_threshold=1))
    loop, _ = tries(StubUpstream(StubResponse(200)), "a", breakers=breakers)
    loop.run(lambda resp, attempt, bridge: Outcome.taken(broke=UpstreamBroken("cut")))
    assert breakers.snapshot()["a"]["state"] == "open"
    breakers = Breakers(BreakerPolicy(failure_threshold=1))
    loop, _ = tries(StubUpstream(BadRequest("unsendable")), "a", breakers=breakers)
    loop.run(take_it)
    assert breakers.snapshot()["a"]["state"] == "closed"


def test_every_breaker_open_is_all_deployments_unavailable_with_a_retry_after():
    breakers = Breakers(BreakerPolicy(failure_threshold=1, cooldown=30))
    for name in ("a", "b"):
        breakers.get(name).record_failure("down")
    loop, record = tries(StubUpstream(), "a", "b", breakers=breakers)
    outcome = loop.run(take_it)
    assert isinstance(outcome.error, AllDeploymentsUnavailable) and not loop.deps.upstream.sent
    assert 1 <= int(outcome.error.retry_after) <= 30
    assert json.loads(record.row.attempt_log)["skipped_open"] == ["a", "b"]


# -- the commit rule ---------------------------------------------------------------------------
STREAM, JSON = StubResponse(200, content_type="text/event-stream"), StubResponse(200)


@pytest.mark.parametrize("steps, phase", [
    pytest.param([("wait", Phase.COMMITTED), ("answer", STREAM, True), ("answer", JSON, False),
                  ("refuse", False)], Phase.COMMITTED, id="commit-first"),
    pytest.param([("answer", JSON, True), ("wait", Phase.ANSWERING), ("refuse", False)],
                 Phase.ANSWERING, id="answer-first"),
    pytest.param([("refuse", True), ("wait", Phase.REFUSED), ("answer", STREAM, False),
                  ("refuse", True)], Phase.REFUSED, id="refuse-first"),
])
def test_the_commit_rule_moves_once_out_of_waiting(steps, phase):
    rule = CommitRule()
    first_refusal = Outcome.failed(ClientGone("first"))
    for step in steps:
        if step[0] == "wait":
            assert rule.wait(0.0) is step[1]
        elif step[0] == "answer":
            assert rule.answer_with(step[1], "d") is step[2]
        else:
            assert rule.refuse(first_refusal if rule.refusal is None else Outcome()) is step[1]
    assert rule.phase is phase
    assert rule.streaming is (phase in (Phase.COMMITTED, Phase.ANSWERING))
    if phase is Phase.REFUSED:
        assert rule.refusal is first_refusal  # the first reason to refuse is the one answered


# -- formats: what each protocol says ----------------------------------------------------------
@pytest.mark.parametrize("fmt, name, data, kind", [
    (formats.ANTHROPIC, "message_start", {"type": "message_start"}, EventKind.PREAMBLE),
    (formats.ANTHROPIC, "ping", {"type": "ping"}, EventKind.PREAMBLE),
    (formats.ANTHROPIC, "content_block_delta", {"type": "content_block_delta"}, EventKind.CONTENT),
    (formats.ANTHROPIC, "message_stop", {"type": "message_stop"}, EventKind.DONE),
    (formats.ANTHROPIC, "error", {"type": "error"}, EventKind.UPSTREAM_ERROR),
    (formats.OPENAI_CHAT, None, {"choices": [{"index": 0, "delta": {"role": "assistant"}}]},
     EventKind.PREAMBLE),
    (formats.OPENAI_CHAT, None, {"choices": [{"index": 0, "delta": {"content": "hi"}}]},
     EventKind.CONTENT),
    (formats.OPENAI_CHAT, None, "[DONE]", EventKind.DONE),
    (formats.OPENAI_CHAT, None, {"error": {"message": "x"}}, EventKind.UPSTREAM_ERROR),
    (formats.OPENAI_CHAT, None, {"choices": [], "usage": {"prompt_tokens": 1}}, EventKind.SKIP),
    (formats.OPENAI_RESPONSES, "response.created", {"type": "response.created"}, EventKind.PREAMBLE),
    (formats.OPENAI_RESPONSES, "response.output_text.delta",
     {"type": "response.output_text.delta"}, EventKind.CONTENT),
    (formats.OPENAI_RESPONSES, "response.completed", {"type": "response.completed"}, EventKind.DONE),
    (formats.OPENAI_RESPONSES, "response.failed", {"type": "response.failed"},
     EventKind.UPSTREAM_ERROR),
])
def test_classify(fmt, name, data, kind):
    assert fmt.stream_view(strip_usage_chunk=True).classify(name, data) is kind


# (error, Anthropic status and type, OpenAI status, type and code)
ERROR_TABLE = [
    (BadRequest("x"), 400, "invalid_request_error", 400, "invalid_request_error", None),
    (NotFound("x"), 404, "not_found_error", 404, "invalid_request_error", "not_found"),
    (MethodNotAllowed("x"), 405, "invalid_request_error", 405, "invalid_request_error", None),
    (RequestTimeout("x"), 408, "invalid_request_error", 408, "invalid_request_error", "request_timeout"),
    (PayloadTooLarge("x"), 413, "request_too_large", 413, "invalid_request_error", "request_too_large"),
    (Overloaded("x"), 529, "overloaded_error", 503, "server_error", "proxy_overloaded"),
    (ShuttingDown("x"), 529, "overloaded_error", 503, "server_error", "proxy_shutting_down"),
    (UpstreamUnreachable("x"), 502, "api_error", 502, "server_error", "upstream_unreachable"),
    (UpstreamTimeout("x"), 504, "timeout_error", 504, "server_error", "upstream_timeout"),
    (FirstTokenTimeout("x"), 504, "timeout_error", 504, "server_error", "first_token_timeout"),
    (UpstreamBroken("x"), 502, "api_error", 502, "server_error", "upstream_stream_broken"),
    (AllDeploymentsUnavailable("x"), 503, "overloaded_error", 503, "server_error",
     "all_deployments_unavailable"),
    (ProxyError("x"), 500, "api_error", 500, "server_error", None),
    (UpstreamHTTPError(429, "x"), 429, "rate_limit_error", 429, "invalid_request_error",
     "upstream_status_429"),
    (UpstreamHTTPError(500, "x", "overloaded_error"), 500, "overloaded_error", 500,
     "overloaded_error", "upstream_status_500"),
]


@pytest.mark.parametrize("err, a_status, a_type, o_status, o_type, o_code", ERROR_TABLE,
                         ids=[type(row[0]).__name__ + str(row[0].status) for row in ERROR_TABLE])
def test_each_error_in_each_protocol(err, a_status, a_type, o_status, o_type, o_code):
    anthropic = formats.ANTHROPIC
    assert (anthropic.status_of(err), anthropic.error_body(err, "req_1")) == (
        a_status, {"type": "error", "error": {"type": a_type, "message": "x"}, "request_id": "req_1"})
    assert anthropic.terminal_error(err, anthropic.stream_view()) == (
        b'event: error\ndata: {"type":"error","error":{"type":"' + a_type.encode()
        + b'","message":"x"}}\n\n')
    error = {"message": "x", "type": o_type, "param": None, "code": o_code}
    for fmt in (formats.OPENAI_CHAT, formats.OPENAI_RESPONSES):
        assert (fmt.status_of(err), fmt.error_body(err)) == (o_status, {"error": error})
    chat = formats.OPENAI_CHAT
    assert chat.terminal_error(err, chat.stream_view()) == (
        b"data: " + json.dumps({"error": error}, separators=(",", ":")).encode() + b"\n\n")
    responses = formats.OPENAI_RESPONSES
    view = responses.stream_view()
    view.classify("response.output_text.delta", {"sequence_number": 7})
    assert json.loads(responses.terminal_error(err, view).split(b"data: ", 1)[1]) == {
        "type": "error", "code": o_code or o_type, "message": "x", "param": None,
        "sequence_number": 8}


# -- finalize: one writer, one row -------------------------------------------------------------
def test_the_row_is_priced_by_the_model_that_answered_not_the_one_asked_for():
    """A route that maps `claude-alias` to a cheaper model: the bill is the cheaper one's."""
    sink, prices = Sink(), PriceTable({})
    record = RequestRecord(sink, prices, request_id="req_p", endpoint="anthropic",
                           client_key_id=None, bytes_in=2)
    record.model_named("claude-opus-4-1")
    record.admitted(stream=False, usage_format=formats.ANTHROPIC)
    record.add_body_copy(json.dumps({"model": "claude-haiku-4-5", "stop_reason": "end_turn",
                                     "usage": {"input_tokens": 1000, "output_tokens": 1000}}).encode())
    record.complete(200, bytes_out=10)
    [row] = sink.rows
    assert row.upstream_model == "claude-haiku-4-5"
    assert row.cost_usd == pytest.approx(prices.cost(row, model="claude-haiku-4-5"))
    assert row.cost_usd != pytest.approx(prices.cost(row, model="claude-opus-4-1"))


def test_nothing_is_written_after_the_row_is_queued():
    sink = Sink()
    record = RequestRecord(sink, PriceTable({}), request_id="req_s", endpoint="anthropic",
                           client_key_id=None, bytes_in=2)
    record.failed(499, ClientGone("left"))
    record.tries_so_far(3, 2, '{"failed":[]}')
    record.try_started("late")
    record.complete(200, bytes_out=5)
    [row] = sink.rows
    assert (row.status, row.end_reason, row.attempts, row.deployment) == (499, "client_gone", 1, None)


class SeenMetrics:
    """Metrics that remember which requests they observed."""

    enabled = True

    def __init__(self) -> None:
        self.seen: list[str] = []

    def observe_request(self, rec, timing=None, overhead=None) -> None:
        self.seen.append(rec.request_id)


@pytest.fixture
def request_lines():
    """The request log lines finalize writes (the `proxy` logger may not propagate)."""
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("proxy.requests")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _observed(request_id: str, metrics: SeenMetrics, sink: Sink,
              endpoint: str = "anthropic") -> RequestRecord:
    return RequestRecord(sink, PriceTable({}), request_id=request_id, endpoint=endpoint,
                         client_key_id=None, bytes_in=2, metrics=metrics)


def _reported_later(request_id: str, metrics: SeenMetrics, sink: Sink) -> RequestRecord:
    record = _observed(request_id, metrics, sink)
    record.report_after_answer()
    record.complete(200, bytes_out=2)
    return record


def test_an_answer_sent_whole_has_its_row_before_its_bytes_and_its_report_after(request_lines):
    """The row is queued before the client can have the answer; the log line and the
    metrics wait until the server has written the bytes and asks for more."""
    sink, metrics = Sink(), SeenMetrics()
    record = _reported_later("req_w", metrics, sink)
    assert [row.request_id for row in sink.rows] == ["req_w"]
    body = iter(record.reported_after([b"{}"]))
    assert next(body) == b"{}"
    assert metrics.seen == [] and request_lines == []  # the server writes the bytes first
    assert list(body) == []
    assert metrics.seen == ["req_w"] and len(request_lines) == 1 and "req_w" in request_lines[0]
    record.report()
    assert metrics.seen == ["req_w"] and len(request_lines) == 1  # once


def test_an_answer_closed_unread_is_reported_all_the_same(request_lines):
    sink, metrics = Sink(), SeenMetrics()
    body = _reported_later("req_c", metrics, sink).reported_after([b"{}"])
    body.close()
    assert metrics.seen == ["req_c"] and len(request_lines) == 1


def test_a_request_not_sent_whole_is_reported_when_its_row_is_queued(request_lines):
    sink, metrics = Sink(), SeenMetrics()
    record = _observed("req_n", metrics, sink)
    record.complete(200, bytes_out=2)
    assert metrics.seen == ["req_n"] and len(request_lines) == 1


def test_an_answer_inside_a_wrapper_that_is_closed_early_is_reported(request_lines):
    """A WSGI middleware that iterates the body in a generator of its own and is closed
    after the first piece: the report still comes (the inner iteration is closed too)."""
    sink, metrics = Sink(), SeenMetrics()
    record = _reported_later("req_g", metrics, sink)

    def middleware():
        yield from record.reported_after([b"{", b"}"])

    wrapped = middleware()
    assert next(wrapped) == b"{"
    wrapped.close()
    assert metrics.seen == ["req_g"] and len(request_lines) == 1


def test_a_translated_answer_is_reported_after_its_bytes(request_lines):
    from proxy.pipeline.relay import TranslatedBody

    sink, metrics = Sink(), SeenMetrics()
    record = _observed("req_x", metrics, sink, endpoint="chat")
    route = Route("m*", (Deployment("a", "a", None),), None, RetryPolicy())
    preq = ProxyRequest(request_id="req_x", endpoint="chat", fmt=formats.OPENAI_CHAT, route=route,
                        method="POST", path="/v1/chat/completions", headers=[], body=b"{}", model="m")
    body = TranslatedBody(b'{"id":"chatcmpl-1"}', 200, "a").respond(preq, record, lambda *args: None)
    assert [row.request_id for row in sink.rows] == ["req_x"] and metrics.seen == []
    assert list(body) == [b'{"id":"chatcmpl-1"}']
    assert metrics.seen == ["req_x"] and len(request_lines) == 1


def test_a_request_that_fails_after_its_row_with_its_report_held_back_is_reported(request_lines):
    """The app's error boundary (a bug after the row was finished for an answer sent
    whole): the report held back for the answer comes with the error instead."""
    from proxy.app import ProxyApp
    from proxy.errors import ProxyError
    from proxy.pipeline.admit import Opened
    from proxy.redact import Redactor

    sink, metrics = Sink(), SeenMetrics()
    record = _reported_later("req_b", metrics, sink)
    ProxyApp._refuse(formats.ANTHROPIC, ProxyError("internal error in the proxy: KeyError"),
                     Opened("req_b", Redactor(), record), lambda *args: None)
    assert metrics.seen == ["req_b"] and len(request_lines) == 1


# -- admit and the admin endpoints, in process -------------------------------------------------
@pytest.fixture
def app(tmp_path):
    app = App(load_config(env={"LLM_PROXY_DB": str(tmp_path / "u.db")}))
    yield app
    app.close(1)


def test_one_key_has_one_key_id_whichever_header_carries_it(app):
    key = "sk-ant-client-0123456789"
    ids = {app.proxy.admission.open(headers, "anthropic").record.row.client_key_id
           for headers in ({"x-api-key": key}, {"authorization": f"Bearer {key}"},
                           {"authorization": f"bearer  {key} "})}
    assert len(ids) == 1 and None not in ids


def test_health_says_503_while_shutting_down_so_a_balancer_stops_sending(app):
    client = Client(app)
    assert client.get("/health").status_code == 200
    app.begin_shutdown()
    answer = client.get("/health")
    assert (answer.status_code, answer.json["status"]) == (503, "shutting_down")


def test_a_bug_in_an_admin_endpoint_is_a_json_500_and_no_row(tmp_path):
    class BrokenBreakers:
        def snapshot(self):
            raise RuntimeError("a bug")

    from proxy.admin import AdminApp, AdminDeps
    from proxy.limits import MemoryBudget
    admin = AdminApp(AdminDeps(db_path=str(tmp_path / "u.db"), started_tracker=lambda: None,
                               tracker=lambda: None, shutting_down=lambda: False,
                               live_streams=lambda: 0, breakers=BrokenBreakers(),
                               budget=MemoryBudget(1 << 20)))
    answer = Client(admin).get("/health", headers={"anthropic-version": "2023-06-01"})
    assert answer.status_code == 500
    assert answer.json["error"]["type"] == "api_error"
    assert "x-llm-proxy-request-id" not in answer.headers  # no row to point at


def test_a_stream_refused_before_any_try_is_recorded_as_a_stream(tmp_path):
    config = tmp_path / "c.toml"
    # Every provider speaks Anthropic's API: nothing serves the OpenAI endpoints.
    config.write_text('[providers.openai]\nbase_url = "http://127.0.0.1:9"\nformat = "anthropic"\n')
    app = App(load_config(str(config), env={"LLM_PROXY_DB": str(tmp_path / "u.db")}))
    try:
        answer = Client(app).post("/v1/chat/completions", json={
            "model": "gpt-x", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
        assert answer.status_code == 500
        assert answer.json["error"]["type"] == "server_error"
        assert "no openai provider" in answer.json["error"]["message"]
        app.tracker.flush(5)
        conn = sqlite3.connect(tmp_path / "u.db")
        row = conn.execute("SELECT stream, end_reason, model_requested FROM usage_records").fetchone()
        conn.close()
        assert row == (1, "upstream_error", "gpt-x")
    finally:
        app.close(1)


# -- the relay, with the stub upstream -------------------------------------------------------
class StubStream(StubResponse):
    """An event stream: its pieces, then its end (or the exception that ends it)."""

    def __init__(self, *pieces, then: BaseException | None = None) -> None:
        super().__init__(200, content_type="text/event-stream")
        self.pieces, self.then = pieces, then

    def decoded_chunks(self):
        yield from self.pieces
        if self.then is not None:
            raise self.then


START = b'event: message_start\ndata: {"type":"message_start","message":{"model":"m1"}}\n\n'
DELTA = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,' \
        b'"delta":{"type":"text_delta","text":"hi"}}\n\n'
STOP = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'


def relay_through(upstream: StubUpstream, *names: str, breakers=None, writes=None,
                  refuse=None):
    """Runs one streaming request through StreamRelay; (status, body, row).  With `writes`
    (a list), the stream is read and written by this thread (as under gunicorn): each write
    the server's `write` callable gets is appended to it with the rows queued by then."""
    from concurrent.futures import ThreadPoolExecutor

    from proxy.heartbeat import Heartbeat
    from proxy.pipeline.relay import RelayDeps, StreamRelay

    loop, record = tries(upstream, *names, breakers=breakers)
    sink = record._sink
    loop.preq.stream = True
    loop.preq.writes_directly = writes is not None
    record.admitted(stream=True, usage_format=formats.ANTHROPIC)
    pool = ThreadPoolExecutor(2)
    deps = RelayDeps(loop.deps, Heartbeat(60.0, 60.0), pool, commit_delay=5.0,
                     max_event_bytes=1 << 20)
    started = []

    def write(data: bytes) -> None:
        if refuse is not None and data == refuse:
            raise BrokenPipeError("the client left")
        writes.append((data, len(sink.rows)))

    def start_response(status, headers):
        started.append(status)
        return write

    body = b"".join(StreamRelay(deps, loop.preq, record).respond(start_response))
    if writes is not None:
        body += b"".join(data for data, _ in writes)
    pool.shutdown(wait=True)
    return started[0], body, sink.rows[0]


def test_a_stream_passes_through_event_for_event():
    status, body, row = relay_through(StubUpstream(StubStream(START, DELTA[:20], DELTA[20:], STOP)), "a")
    assert (status, body) == ("200 OK", START + DELTA + STOP)
    assert (row.end_reason, row.status, row.deployment, row.bytes_out) == (
        "complete", 200, "a", len(body))


def test_a_stream_read_by_the_server_thread_is_written_through_its_write_callable():
    writes: list = []
    status, body, row = relay_through(
        StubUpstream(StubStream(START, DELTA[:20], DELTA[20:], STOP)), "a", writes=writes)
    assert (status, body) == ("200 OK", START + DELTA + STOP)
    assert [data for data, _ in writes] == [b"", START, DELTA, STOP]  # headers, then each event
    assert (row.end_reason, row.bytes_out) == ("complete", len(body))


def test_the_row_is_queued_before_the_streams_end_is_written():
    """A client that has seen `message_stop` can flush and find its row: the thread that
    writes the end records the row first."""
    writes: list = []
    relay_through(StubUpstream(StubStream(START, DELTA, STOP)), "a", writes=writes)
    assert [queued for data, queued in writes if data == STOP] == [1]
    assert [queued for data, queued in writes if data == DELTA] == [0]


def test_a_client_that_leaves_just_before_the_end_still_gets_its_row():
    """The end arrives in the same read as an event the client no longer takes: the row
    says the client left (and it is written at all)."""
    writes: list = []
    status, body, row = relay_through(StubUpstream(StubStream(START, DELTA + STOP)), "a",
                                      writes=writes, refuse=DELTA)
    assert body == START and STOP not in body
    assert (row.end_reason, row.status) == ("client_gone", 499)


def test_a_deployment_that_breaks_before_content_is_left_without_the_client_seeing_it():
    upstream = StubUpstream(StubStream(START, then=UpstreamBroken("cut")),
                            StubStream(START, DELTA, STOP))
    status, body, row = relay_through(upstream, "a", "b")
    assert (status, body) == ("200 OK", START + DELTA + STOP)  # one message_start: b's
    assert (row.deployment, row.attempts, row.fallbacks) == ("b", 2, 1)


def test_a_bug_in_the_relay_is_the_proxys_error_not_the_deployments():
    breakers = Breakers(BreakerPolicy(failure_threshold=1))
    upstream = StubUpstream(StubStream(START, DELTA, then=RuntimeError("a bug")))
    status, body, row = relay_through(upstream, "a", breakers=breakers)
    assert status == "200 OK" and body.startswith(START + DELTA)
    assert body[len(START + DELTA):] == (
        b'event: error\ndata: {"type":"error","error":{"type":"api_error",'
        b'"message":"internal error in the proxy: RuntimeError"}}\n\n')
    assert (row.end_reason, row.error) == ("upstream_error", "internal error in the proxy: RuntimeError")
    assert breakers.snapshot()["a"]["state"] == "closed"  # the deployment did nothing wrong


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_a_plain_answer_queues_its_row_before_its_last_piece_is_handed_to_the_server(declared):
    """So a client that has the whole body can flush and find its row (as with streams);
    with a Content-Length every piece goes out as it arrives."""
    from proxy.heartbeat import Heartbeat
    from proxy.pipeline.commit import Answer
    from proxy.pipeline.relay import PassThrough

    answer = StubStream(b'{"type":"message","usage":', b'{"input_tokens":3,', b'"output_tokens":4}}')
    answer.is_event_stream, answer.is_json = False, True
    if declared:
        answer.headers.append(("Content-Length", str(len(b"".join(answer.pieces)))))
    loop, record = tries(StubUpstream(), "a")
    record.admitted(stream=False, usage_format=formats.ANTHROPIC)
    sink = record._sink
    exchange = Exchange(None, None, lambda err: None)
    body = PassThrough(Heartbeat(60.0, 60.0), loop.preq, record, exchange,
                       Answer(answer, "a")).respond(lambda status, headers: None)
    handed = [(piece, len(sink.rows)) for piece in body if piece]  # b"" sends the headers
    assert b"".join(piece for piece, _ in handed) == b"".join(answer.pieces)
    assert handed[-1][1] == 1  # queued before the last piece left
    if declared:
        assert [piece for piece, _ in handed] == list(answer.pieces)  # none held back
    assert (sink.rows[0].end_reason, sink.rows[0].output_tokens) == ("complete", 4)


def test_a_json_answer_read_whole_is_recorded_before_its_headers_which_carry_its_cost():
    """The headers of a whole JSON answer say what it cost: its row is finished (and
    queued) before start_response, with the usage the body reports."""
    from proxy.heartbeat import Heartbeat
    from proxy.pipeline.commit import Answer
    from proxy.pipeline.relay import PassThrough

    body = b'{"type":"message","model":"claude-sonnet-4-5","usage":{"input_tokens":1000,' \
           b'"output_tokens":200,"cache_read_input_tokens":50}}'
    answer = StubResponse(200, body, headers=[("Content-Length", "999")])
    answer.whole, answer.whole_body = True, body
    loop, record = tries(StubUpstream(), "a")
    record.admitted(stream=False, usage_format=formats.ANTHROPIC)
    sink = record._sink
    seen = {}

    def start(status, headers):
        seen.update(rows=len(sink.rows), headers=dict((k.lower(), v) for k, v in headers),
                    lengths=[v for k, v in headers if k.lower() == "content-length"])

    out = PassThrough(Heartbeat(60.0, 60.0), loop.preq, record, Exchange(None, None, lambda e: None),
                      Answer(answer, "a")).respond(start)
    assert b"".join(out) == body and seen["rows"] == 1 and answer.closed
    headers = seen["headers"]
    # Exactly one Content-Length, of what is sent: the upstream's (of a body it may have
    # encoded) is not kept beside it.
    assert seen["lengths"] == [str(len(body))]
    assert headers["x-llm-proxy-usage"] == "input=1000; output=200; cache_read=50"
    row = sink.rows[0]
    assert row.priced and float(headers["x-llm-proxy-cost-usd"]) == pytest.approx(row.cost_usd)
    assert row.cost_usd > 0


def test_the_cost_comment_is_one_comment_that_ends_without_a_blank_line_after_an_id():
    """After an upstream `id:` the blank line would dispatch an empty event that the OpenAI
    SDK cannot parse (protocols.md section 0): the comment then stands alone."""
    from proxy.pipeline.replies import cost_comment
    from proxy.usage import UsageRecord

    row = UsageRecord(request_id="r1", cost_usd=0.25, priced=True, input_tokens=3,
                      output_tokens=4, usage_complete=True)
    plain = cost_comment(row)
    assert plain.startswith(b": llm-proxy-usage {") and plain.endswith(b"}\n\n")
    assert plain.count(b"\n") == 2
    assert json.loads(plain[len(b": llm-proxy-usage "):]) == {
        "request_id": "r1", "cost_usd": 0.25, "priced": True, "input_tokens": 3,
        "output_tokens": 4, "cache_read_tokens": None, "cache_write_tokens": None,
        "reasoning_tokens": None, "usage_complete": True}
    assert cost_comment(row, after_id=True).endswith(b"}\n") and \
        cost_comment(row, after_id=True).count(b"\n") == 1
    unpriced = UsageRecord(request_id="r2", cost_usd=None, priced=False, output_tokens=1)
    assert json.loads(cost_comment(unpriced)[18:])["cost_usd"] is None


def test_a_streams_row_has_its_time_to_first_token():
    status, body, row = relay_through(StubUpstream(StubStream(START, DELTA, STOP)), "a")
    assert status == "200 OK" and row.end_reason == "complete"
    assert row.ttft_ms is not None and row.ttfb_ms is not None and row.ttft_ms >= row.ttfb_ms


def test_an_upstream_error_event_after_content_is_a_200_row_in_the_upstreams_words():
    error = b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error",' \
            b'"message":"Overloaded"}}\n\n'
    status, body, row = relay_through(StubUpstream(StubStream(START, DELTA, error)), "a")
    assert (status, body) == ("200 OK", START + DELTA + error)
    assert (row.status, row.end_reason, row.error, row.bytes_out) == (
        200, "upstream_error", "Overloaded", len(body))


def test_the_terminal_error_the_proxy_appends_is_counted_in_bytes_out():
    upstream = StubUpstream(StubStream(START, DELTA, then=UpstreamBroken("cut")))
    status, body, row = relay_through(upstream, "a")
    assert body.startswith(START + DELTA) and body.count(b"event: error") == 1
    assert (row.status, row.end_reason, row.bytes_out) == (200, "upstream_error", len(body))


# -- the held preamble (mutants r5, r6) ---------------------------------------------------------
UPSTREAM_COMMENT = b": upstream keepalive\n\n"


def test_the_upstreams_comments_in_a_held_preamble_never_reach_the_client():
    """While another deployment remains the preamble is held; the upstream's own keepalive
    comments in it are dropped, whether this deployment answers or is left."""
    answered = StubUpstream(StubStream(START, UPSTREAM_COMMENT, DELTA, STOP))
    status, body, row = relay_through(answered, "a", "b")
    assert (status, body, row.deployment) == ("200 OK", START + DELTA + STOP, "a")
    left = StubUpstream(StubStream(START, UPSTREAM_COMMENT, then=UpstreamBroken("cut")),
                        StubStream(START, DELTA, STOP))
    status, body, row = relay_through(left, "a", "b")
    assert (status, body, row.deployment) == ("200 OK", START + DELTA + STOP, "b")


# -- the heartbeat lets go of every exchange (mutants r3, r4) -------------------------------------
def test_every_stream_leaves_the_heartbeat_when_it_ends(monkeypatch):
    import proxy.heartbeat

    made = []

    class Watched(proxy.heartbeat.Heartbeat):
        def __init__(self, *args):
            super().__init__(*args)
            made.append(self)

    monkeypatch.setattr(proxy.heartbeat, "Heartbeat", Watched)
    for script in ([StubStream(START, DELTA, STOP)],
                   [StubStream(START, DELTA, then=UpstreamBroken("cut"))],
                   [StubResponse(401, b'{"error":{"message":"bad key"}}')]):
        relay_through(StubUpstream(*script), "a")
    assert [heartbeat.live_count() for heartbeat in made] == [0, 0, 0]


def test_a_refused_plain_request_leaves_the_heartbeat():
    from concurrent.futures import ThreadPoolExecutor

    from proxy.heartbeat import Heartbeat
    from proxy.pipeline.relay import RelayDeps, serve_plain

    loop, record = tries(StubUpstream(StubResponse(401, b'{"error":{"message":"bad key"}}')), "a")
    heartbeat = Heartbeat(60.0, 60.0)
    pool = ThreadPoolExecutor(1)
    deps = RelayDeps(loop.deps, heartbeat, pool, commit_delay=5.0, max_event_bytes=1 << 20)
    started = []
    body = b"".join(serve_plain(deps, loop.preq, record,
                                lambda status, headers: started.append(status)))
    pool.shutdown(wait=True)
    assert started[0].startswith("401") and b"bad key" in body
    assert heartbeat.live_count() == 0


# -- the try loop (mutant a2) ---------------------------------------------------------------------
def test_a_failed_try_is_on_the_row_before_the_next_try_starts():
    """The row can be sealed from outside while a later try is under way (a client that
    hangs up: the server thread records it): the tries that failed before are on it."""

    class ClientLeavesDuringTheSecondTry(StubUpstream):
        def send(self, *args):
            if self.sent:
                record.failed(499, ClientGone("the client left"))
            return super().send(*args)

    loop, record = tries(ClientLeavesDuringTheSecondTry(StubResponse(500), StubResponse(200)), "a")
    loop.run(take_it)
    [row] = record._sink.rows
    assert (row.status, row.end_reason) == (499, "client_gone")
    assert row.attempt_log, "the failed try is not on the row"
    assert [(t["deployment"], t["status"]) for t in json.loads(row.attempt_log)["failed"]] == [("a", 500)]


# -- a 4xx the client gets is an answer from the deployment (mutant a8) ---------------------------
def test_a_4xx_the_client_gets_is_the_answering_deployments_and_closes_its_breaker():
    loop, record = tries(StubUpstream(StubResponse(500), StubResponse(500),
                                      StubResponse(401, b'{"error":{"message":"bad key"}}')), "a", "b")
    outcome = loop.run(take_it)
    assert outcome.final and outcome.reply.status == 401
    assert (record.row.attempts, record.row.fallbacks, record.row.deployment) == (3, 1, "b")
    # a half-open breaker whose probe is answered with a 4xx: the deployment works again
    breakers = Breakers(BreakerPolicy(failure_threshold=1, cooldown=0.0))
    breakers.get("a").record_failure("down")
    loop, _ = tries(StubUpstream(StubResponse(401, b'{"error":{"message":"bad key"}}')), "a",
                    breakers=breakers)
    loop.run(take_it)
    assert breakers.snapshot()["a"]["state"] == "closed"


# -- usage seen on a failed try is not the answer's usage (mutant f1) ------------------------------
def test_usage_a_deployment_reported_before_it_failed_is_not_on_the_answers_row():
    start_with_usage = b'event: message_start\ndata: {"type":"message_start","message":' \
                       b'{"model":"m1","usage":{"input_tokens":7,"cache_creation_input_tokens":3}}}\n\n'
    upstream = StubUpstream(StubStream(start_with_usage, then=UpstreamBroken("cut")),
                            StubStream(START, DELTA, STOP))
    status, body, row = relay_through(upstream, "a", "b")
    assert (status, body, row.deployment) == ("200 OK", START + DELTA + STOP, "b")
    assert (row.input_tokens, row.cache_write_tokens) == (None, None)
    assert json.loads(row.attempt_log)["failed"][0]["input_tokens"] == 7  # a's, in its own entry


# -- formats: the cases the tables leave out (mutants x3, x4, x8, x9) ----------------------------
def test_an_upstream_status_without_an_error_type_is_typed_by_its_status():
    """After the commit an upstream error answer becomes a terminal event; when its body
    named no type, the status says which (Anthropic: 529 is overloaded; OpenAI: 5xx,
    500 included, is the server's)."""
    anthropic, chat = formats.ANTHROPIC, formats.OPENAI_CHAT
    assert anthropic.error_type(UpstreamHTTPError(529, "x")) == "overloaded_error"
    assert anthropic.error_type(UpstreamHTTPError(500, "x")) == "api_error"
    assert chat.error_type(UpstreamHTTPError(500, "x")) == "server_error"
    assert chat.error_type(UpstreamHTTPError(499, "x")) == "invalid_request_error"


def test_a_chat_chunk_that_opens_a_tool_call_is_content_not_preamble():
    """A tool call's first chunk often carries the role too: it is the answer (it ends the
    first-token wait and a silent switch is no longer possible)."""
    chunk = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": None, "tool_calls": [
        {"index": 0, "id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": ""}}]}, "finish_reason": None}]}
    assert formats.OPENAI_CHAT.stream_view().classify(None, chunk) is EventKind.CONTENT


def test_a_chat_stream_is_whole_without_done_only_once_a_choice_finished():
    view = formats.OPENAI_CHAT.stream_view()
    assert not view.complete_without_end_marker()  # nothing at all is not an answer
    view.classify(None, {"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]})
    assert not view.complete_without_end_marker()
    view.classify(None, {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    assert view.complete_without_end_marker()


def test_a_responses_stream_that_ends_incomplete_ends_in_its_own_words():
    """`response.incomplete` (max_output_tokens reached) is the protocol's end of an answer,
    like `response.completed`: nothing is appended after it (mutant x11)."""
    view = formats.OPENAI_RESPONSES.stream_view()
    assert view.classify("response.incomplete", {"type": "response.incomplete"}) is EventKind.DONE


def test_a_wrong_method_on_an_admin_endpoint_is_405_in_the_clients_shape(app):
    """(mutant m3)"""
    answer = Client(app).post("/health", headers={"anthropic-version": "2023-06-01"})
    assert answer.status_code == 405
    assert answer.json["error"]["type"] == "invalid_request_error"
    assert "accepts GET only" in answer.json["error"]["message"]


def test_every_breaker_busy_with_its_probe_still_says_retry_after_at_least_1():
    """Half-open circuits whose single probe another request holds: nothing to wait for on
    the clock, but `Retry-After: 0` would have SDKs retry at once in a loop (mutant a5)."""
    breakers = Breakers(BreakerPolicy(failure_threshold=1, cooldown=0.0))
    for name in ("a", "b"):
        breakers.get(name).record_failure("down")
        assert breakers.get(name).allow()  # another request takes the probe
    loop, _ = tries(StubUpstream(), "a", "b", breakers=breakers)
    outcome = loop.run(take_it)
    assert isinstance(outcome.error, AllDeploymentsUnavailable) and not loop.deps.upstream.sent
    assert outcome.error.retry_after == "1"


def test_a_deployment_that_names_its_own_model_gets_a_body_with_it():
    """(mutant q4)"""
    built = UpstreamRequests(PROVIDERS).build(
        "req_m", "/v1/messages", [], b'{"model":"alias","max_tokens":5}',
        {"model": "alias", "max_tokens": 5}, Deployment("a", "a", "claude-real-1"))
    assert json.loads(built.body) == {"model": "claude-real-1", "max_tokens": 5}
    assert built.url == "http://a.test/v1/messages"


def test_a_flush_asked_of_a_degraded_store_does_not_wait(tmp_path):
    """`/health?flush=1` while the store refuses rows answers at once: anyone may call it,
    and each wait would hold a worker thread for seconds (mutant m4)."""
    from proxy.admin import AdminApp, AdminDeps
    from proxy.limits import MemoryBudget

    class DegradedTracker:
        flushes = 0

        def stats(self):
            return {"state": "degraded"}

        def flush(self, timeout):
            DegradedTracker.flushes += 1
            return False

    tracker = DegradedTracker()
    admin = AdminApp(AdminDeps(db_path=str(tmp_path / "u.db"), started_tracker=lambda: tracker,
                               tracker=lambda: tracker, shutting_down=lambda: False,
                               live_streams=lambda: 0, breakers=Breakers(BreakerPolicy()),
                               budget=MemoryBudget(1 << 20)))
    answer = Client(admin).get("/health?flush=1")
    assert (answer.status_code, answer.json["status"]) == (200, "degraded")
    assert DegradedTracker.flushes == 0


def test_a_part_priced_answer_says_unpriced_and_never_a_partial_cost():
    """A continued answer with a call the price table does not know keeps the known calls'
    sum in cost_usd but is not priced (finalize): that sum would understate what it cost,
    so the header says "unpriced" and the comment null.  A priced cost keeps its digits."""
    from proxy.pipeline.replies import cost_comment, cost_headers
    from proxy.usage import UsageRecord

    part = UsageRecord(request_id="r4", cost_usd=0.125, priced=False, input_tokens=10,
                       output_tokens=5)
    assert dict(cost_headers(part))["x-llm-proxy-cost-usd"] == "unpriced"
    told = json.loads(cost_comment(part)[len(b": llm-proxy-usage "):])
    assert told["cost_usd"] is None and told["priced"] is False
    small = UsageRecord(request_id="r5", cost_usd=0.0001234567, priced=True, input_tokens=10)
    assert dict(cost_headers(small))["x-llm-proxy-cost-usd"] == "0.0001234567"


def dashboard_admin(tmp_path, token: str | None = "the-admin-token"):
    """The admin app with an admin token, and a client key (keys mode) for `sk-client`."""
    from proxy.admin import AdminApp, AdminDeps
    from proxy.keys.policy import ClientKey
    from proxy.limits import MemoryBudget

    key = ClientKey("k1", "alice", "digest", "ient")
    return AdminApp(AdminDeps(
        db_path=str(tmp_path / "u.db"), started_tracker=lambda: None, tracker=lambda: None,
        shutting_down=lambda: False, live_streams=lambda: 0,
        breakers=Breakers(BreakerPolicy()), budget=MemoryBudget(1 << 20),
        admin_token=lambda: token,
        client_key=lambda headers: key if headers.get("x-api-key") == "sk-client" else None))


def test_the_dashboard_opens_with_the_admin_token_or_its_own_session_cookie_only(tmp_path):
    """With an admin token, the dashboard's page and data need it, or the cookie its login
    form sets (an expiry and its HMAC under the token, for /dashboard only, HttpOnly,
    never sent by another site).  Another cookie and a client key get the login page (the
    data: 401 and 403)."""
    from proxy.admin.app import DASHBOARD_COOKIE, DASHBOARD_POLICY, dashboard_session

    client = Client(dashboard_admin(tmp_path), use_cookies=False)
    assert client.get("/dashboard/data").status_code == 401
    forged = {"Cookie": f"{DASHBOARD_COOKIE}=0123abcd"}
    assert client.get("/dashboard/data", headers=forged).status_code == 401
    for headers in (forged, {"x-api-key": "sk-client"}):
        page = client.get("/dashboard", headers=headers)
        assert page.status_code == 401 and b'name="token"' in page.data
    assert client.get("/dashboard/data", headers={"x-api-key": "sk-client"}).status_code == 403

    login = client.post("/dashboard/login", data={"token": "the-admin-token"})
    assert login.status_code == 303 and login.headers["Location"] == "/dashboard"
    parts = [p.strip() for p in login.headers["Set-Cookie"].split(";")]
    name, _, session = parts[0].partition("=")
    expires = int(session.partition(".")[0])
    assert name == DASHBOARD_COOKIE and session == dashboard_session("the-admin-token", expires)
    assert "the-admin-token" not in parts[0]
    assert {"Path=/dashboard", "HttpOnly", "SameSite=Strict"} <= set(parts)
    cookie = {"Cookie": f"{DASHBOARD_COOKIE}={session}"}
    page = client.get("/dashboard", headers=cookie)
    assert page.status_code == 200 and b"<script" in page.data
    assert page.headers["Content-Security-Policy"] == DASHBOARD_POLICY
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    data = client.get("/dashboard/data", headers=cookie)
    assert data.status_code == 200 and data.json["period"] == "24h"


def test_the_login_form_escapes_the_path_it_posts_to(tmp_path):
    """The form's action is built from the script root (a mount prefix, or what a front
    server sets): it is escaped, so it cannot end the attribute and add markup."""
    page = Client(dashboard_admin(tmp_path)).get(
        "/dashboard", environ_overrides={"SCRIPT_NAME": '/p"><img src=x onerror=alert(1)>'})
    assert page.status_code == 401
    assert b"<img" not in page.data
    assert b'action="/p&quot;&gt;&lt;img src=x onerror=alert(1)&gt;/dashboard/login"' in page.data
