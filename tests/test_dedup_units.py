"""Dedup's parts without a server: request keys, kept answers (the LRU, the usage store's
table, the tracker's queue), the usage rows of replayed and joined requests, and the fan-out
of one live call to several clients (real writers, exchanges, commit rules and heartbeat).

The end-to-end behaviour is in test_dedup_e2e.py; these pin down what it cannot reach
(eviction order, expiry at the boundary, a joiner's wake-up before the call is decided, an
orphan's grace ending with nobody back) or reaches only by chance (a shape that matches
and a body that does not)."""

from __future__ import annotations

import io
import json
import sqlite3
import threading
import time

import pytest
import urllib3

import proxy.tracker as tracker_module
from proxy import formats
from proxy.dedup.answers import AnswerCache, PendingAnswer, StoredAnswer, StoredAnswers
from proxy.dedup.key import DedupKey, opted_out, request_key
from proxy.errors import ClientGone, ClientTooSlow, UpstreamBroken
from proxy.heartbeat import Exchange, Heartbeat
from proxy.pipeline.attempt import Outcome
from proxy.pipeline.commit import CommitRule
from proxy.pipeline.dedup import Dedup, DedupDeps, DedupTicket, with_hidden
from proxy.pipeline.fanout import LiveCall, LiveCalls, Member
from proxy.pipeline.finalize import RequestRecord
from proxy.pipeline.request import ProxyRequest
from proxy.pricing import PriceTable
from proxy.redact import Redactor
from proxy.routing import DedupPolicy
from proxy.store import open_store
from proxy.tracker import Tracker
from proxy.upstream import AbortHandle, UpstreamResponse
from proxy.usage import EndReason, UsageRecord
from proxy.writer import LockedWriter

SECRET = "sk-ant-dedup-unit-secret-0001"
NOW = 1_800_000_000.0


def payload(text: str = "question", **extra) -> dict:
    return {"model": "claude-d", "max_tokens": 64,
            "messages": [{"role": "user", "content": text}], **extra}


def twin(mark: str, **extra) -> dict:
    """Requests that differ only in one character in the middle of an earlier turn: their
    shapes match (a shape reads little of a body), their digests do not."""
    first = "x" * 300 + mark + "x" * 300
    return payload(**extra) | {"messages": [{"role": "user", "content": first},
                                            {"role": "assistant", "content": "ok"},
                                            {"role": "user", "content": "and then?"}]}


def key_of(body: dict, scope: str = "key-1", endpoint: str = "anthropic",
           stream: bool | None = None) -> DedupKey:
    stream = bool(body.get("stream")) if stream is None else stream
    raw = json.dumps(body).encode()
    return request_key(scope, endpoint, body, raw, False, stream, body.get("stream_options"))


def answer(key: DedupKey, body: bytes = b"data: x\n\n", stream: bool = True,
           expires_at: float = NOW + 10, ended_at: float = NOW, paid_by: str = "req_paid",
           fmt: str = "anthropic") -> StoredAnswer:
    return StoredAnswer(key, stream, fmt, "text/event-stream" if stream else "application/json",
                        200, body, paid_by, ended_at=ended_at, expires_at=expires_at)


class Sink:
    """A row sink that keeps what it is given (the tracker's queue, without a database)."""

    def __init__(self, on_record=None) -> None:
        self.rows: list[UsageRecord] = []
        self._on_record = on_record

    def record(self, rec: UsageRecord) -> None:
        if self._on_record is not None:
            self._on_record(rec)
        self.rows.append(rec)


def new_record(request_id: str = "req_u", sink: Sink | None = None) -> RequestRecord:
    return RequestRecord(sink or Sink(), PriceTable({}), request_id=request_id,
                         endpoint="anthropic", client_key_id="key-1", bytes_in=10)


# -- request keys ----------------------------------------------------------------------------
def test_delivery_fields_change_only_the_variant_never_the_digest():
    body = payload()
    plain = key_of(body)
    streamed = key_of(dict(body, stream=True))
    with_usage = key_of(dict(body, stream=True, stream_options={"include_usage": True}))
    assert plain.shape == streamed.shape == with_usage.shape
    assert plain.digest() == streamed.digest() == with_usage.digest()
    assert (plain.variant, streamed.variant) == ("", "")
    assert with_usage.variant == '{"include_usage":true}'
    assert key_of(dict(body, temperature=0.5)).digest() != plain.digest()


def test_the_shape_tells_client_keys_and_endpoints_apart():
    """The digest covers only the body: the key id and the endpoint are in the shape, which
    every match must equal.  The same body sent to Chat must never get an Anthropic answer."""
    body = payload()
    mine = key_of(body)
    assert key_of(body, scope="key-2").shape != mine.shape
    assert key_of(body, endpoint="openai-chat").shape != mine.shape
    assert key_of(body).shape == mine.shape


@pytest.mark.parametrize("headers", [{"cache-control": "no-cache"}, {"cache-control": "No-Store"},
                                     {"cache-control": "private, no-store, max-age=0"},
                                     {"pragma": "no-cache"},
                                     {"x-llm-proxy-dedup": "off"}, {"x-llm-proxy-dedup": " OFF "},
                                     {"x-llm-proxy-dedup": "false"}, {"x-llm-proxy-dedup": "0"}])
def test_a_client_opts_out_with_cache_control_or_the_dedup_header(headers):
    assert opted_out(headers)


@pytest.mark.parametrize("headers", [{}, {"cache-control": "max-age=60"},
                                     {"x-llm-proxy-dedup": "on"}])
def test_anything_else_does_not_opt_out(headers):
    assert not opted_out(headers)


# -- which kept answer serves which request ----------------------------------------------------
def test_an_answer_serves_until_its_window_ends_and_not_at_the_end():
    key = key_of(dict(payload(), stream=True))
    kept = answer(key, expires_at=NOW + 10)
    assert kept.serves(key_of(dict(payload(), stream=True)), NOW + 9.999)
    assert not kept.serves(key_of(dict(payload(), stream=True)), NOW + 10)
    assert not kept.serves(key_of(dict(payload(), stream=True)), NOW + 11)


def test_a_stream_needs_a_streamed_answer_with_the_same_stream_options():
    body = payload()
    json_answer = answer(key_of(body), body=b'{"content":[]}', stream=False)
    plain_stream = answer(key_of(dict(body, stream=True)))
    usage_stream = answer(key_of(dict(body, stream=True, stream_options={"include_usage": True})))
    stream_key = key_of(dict(body, stream=True))
    assert not json_answer.serves(stream_key, NOW)  # a JSON body is no event stream
    assert plain_stream.serves(stream_key, NOW)
    assert not usage_stream.serves(stream_key, NOW)  # its events differ (a usage chunk)
    assert not plain_stream.serves(
        key_of(dict(body, stream=True, stream_options={"include_usage": True})), NOW)
    for kept in (json_answer, plain_stream, usage_stream):  # JSON takes any of them
        assert kept.serves(key_of(body), NOW)


def test_an_equal_shape_is_not_enough_the_bodies_must_match():
    """Same keys, same number of turns, a last turn of the same size: the shape matches,
    the digest decides."""
    kept = answer(key_of(twin("A")))
    other = key_of(twin("B"))
    assert other.shape == kept.key.shape
    assert not kept.serves(other, NOW)
    assert kept.serves(key_of(twin("A")), NOW)


# -- the answer being relayed ------------------------------------------------------------------
def test_a_pending_answer_is_kept_masked_with_its_paying_row():
    mask = Redactor([SECRET]).data
    pending = PendingAnswer(key_of(payload()), "openai-chat", 10.0, 1 << 20, mask)
    echoed = b'data: {"echo":"' + SECRET.encode() + b'"}\n\n'
    pending.add(echoed)
    pending.add(b"data: [DONE]\n\n")
    pending.add_hidden(b'data: {"usage":{},"key":"' + SECRET.encode() + b'"}\n\n')
    record = new_record("req_paid")
    record.row.output_tokens, record.row.cost_usd, record.row.priced = 7, 0.25, True
    kept = pending.settle(record.row)
    assert SECRET.encode() not in kept.body and SECRET.encode() not in kept.hidden
    assert kept.body.endswith(b"data: [DONE]\n\n") and b'"usage"' in kept.hidden
    assert kept.body == Redactor([SECRET]).data(echoed) + b"data: [DONE]\n\n"
    assert kept.paid_by == "req_paid" and kept.status == 200
    assert (kept.usage["output_tokens"], kept.usage["cost_usd"], kept.usage["priced"]) == (7, 0.25, True)
    assert kept.expires_at == pytest.approx(kept.ended_at + 10.0)


def test_an_answer_past_the_limit_is_not_kept():
    pending = PendingAnswer(key_of(payload()), "anthropic", 10.0, 100, lambda data: data)
    pending.add(b"x" * 60)
    pending.add(b"y" * 40)  # 100: still within
    assert pending.settle(new_record().row) is not None
    pending.add(b"z")
    pending.add_hidden(b"u")
    assert pending.settle(new_record().row) is None


# -- this worker's LRU -------------------------------------------------------------------------
def sized(text: str, size: int = 1000, **kwargs) -> StoredAnswer:
    """An answer of `size` bytes as the cache counts them (body + 512: its digest is
    computed, so its key holds no request any longer)."""
    key = key_of(payload(text))
    key.digest()
    return answer(key, body=b"b" * (size - 512), **kwargs)


def test_the_cache_evicts_the_least_recently_used_answer():
    cache = AnswerCache(4000)  # four answers of 1000 bytes
    kept = {name: sized(name) for name in "abcde"}
    for name in "abcd":
        cache.put(kept[name])
    assert cache.find(key_of(payload("a")), NOW) is kept["a"]  # a is the most recent now
    cache.put(kept["e"])
    assert cache.find(key_of(payload("b")), NOW) is None  # b was the least recent
    for name in "acde":
        assert cache.find(key_of(payload(name)), NOW) is kept[name], name
    assert cache.stats() == {"kept_answers": 4, "kept_bytes": 4000, "max_bytes": 4000}


def test_an_evicted_answer_leaves_nothing_behind_in_the_index():
    cache = AnswerCache(4000)
    cache.put(sized("gone"))
    for name in ("x1", "x2", "x3", "x4"):
        cache.put(sized(name))
    assert cache.find(key_of(payload("gone")), NOW) is None
    assert cache.stats()["kept_answers"] == 4


def test_the_cache_keeps_no_answer_larger_than_a_quarter_of_it():
    cache = AnswerCache(4000)
    assert cache.admits(1000) and not cache.admits(1001)
    cache.put(sized("big", size=1001))
    assert cache.find(key_of(payload("big")), NOW) is None
    assert cache.stats()["kept_answers"] == 0


def test_an_expired_answer_is_dropped_when_it_is_looked_up():
    cache = AnswerCache(4000)
    cache.put(sized("old", expires_at=NOW + 1))
    assert cache.find(key_of(payload("old")), NOW + 1) is None
    assert cache.stats()["kept_answers"] == 0 and cache.stats()["kept_bytes"] == 0


def test_the_newest_of_two_answers_to_one_request_is_found():
    cache = AnswerCache(1 << 20)
    key = key_of(payload("twice"))
    older, newer = answer(key, body=b"older", ended_at=NOW), answer(key, body=b"newer", ended_at=NOW + 1,
                                                                    expires_at=NOW + 11)
    cache.put(older)
    cache.put(newer)
    assert cache.find(key_of(payload("twice")), NOW + 2) is newer


# -- the usage store's table (the other workers' answers) ----------------------------------------
def stored_row(key: DedupKey, body: bytes = b"data: x\n\n", ended_at: float = NOW,
               expires_at: float = NOW + 10, paid_by: str = "req_paid") -> dict:
    return answer(key, body=body, ended_at=ended_at, expires_at=expires_at,
                  paid_by=paid_by).to_row()


def test_the_store_finds_answers_until_they_expire_and_then_forgets_them(tmp_path):
    path = str(tmp_path / "usage.db")
    store = open_store(path)
    key = key_of(payload("kept"))
    store.put_answers([stored_row(key, expires_at=NOW + 10)], NOW)
    try:
        [found] = store.find_answers(key.shape, NOW + 9)
        assert found["digest"] == key.digest()
        assert store.answer(found["id"])["paid_by"] == "req_paid"
        assert store.find_answers(key.shape, NOW + 10) == []
        assert store.find_answers(key.shape, NOW + 11) == []
        store.put_answers([], NOW + 11)  # each write forgets what expired before it
        with sqlite3.connect(path) as db:
            assert db.execute("SELECT COUNT(*) FROM dedup_answers").fetchone() == (0,)
    finally:
        store.close()


def test_the_store_lists_the_newest_candidates_first(tmp_path):
    store = open_store(str(tmp_path / "usage.db"))
    key = key_of(payload("often"))
    rows = [stored_row(key, ended_at=NOW + i, paid_by=f"req_{i}") for i in range(80)]
    store.put_answers(rows[::2] + rows[1::2], NOW)  # not in order
    try:
        found = store.find_answers(key.shape, NOW + 0.5)
        paid = [store.answer(r["id"])["paid_by"] for r in found]
        assert paid[:3] == ["req_79", "req_78", "req_77"]
        assert paid == [f"req_{i}" for i in range(79, 79 - len(paid), -1)]
    finally:
        store.close()


def test_an_answer_read_from_the_store_serves_only_its_own_request(tmp_path):
    path = str(tmp_path / "usage.db")
    store = open_store(path)
    mine, theirs = key_of(twin("A")), key_of(twin("B"))
    assert mine.shape == theirs.shape
    store.put_answers([stored_row(mine, body=b"mine", ended_at=NOW, paid_by="req_a"),
                       stored_row(theirs, body=b"theirs", ended_at=NOW + 1, paid_by="req_b")], NOW)
    store.close()
    stored = StoredAnswers(lambda: open_store(path))
    try:
        found = stored.find(key_of(twin("A")), NOW + 2)
        assert (found.paid_by, found.body) == ("req_a", b"mine")
        assert stored.find(key_of(twin("C")), NOW + 2) is None
        assert stored.find(key_of(twin("A")), NOW + 10) is None
    finally:
        stored.close()


# -- the tracker's queue of answers ----------------------------------------------------------------
def test_kept_answers_are_stored_before_the_rows_queued_after_them(tmp_path, monkeypatch):
    """A duplicate looks for the answer once the paying row is stored: the answer must be
    in the store by then."""
    path = str(tmp_path / "usage.db")
    tracker = Tracker(path)
    order = []
    put_answers, insert_rows = tracker.store.put_answers, tracker.store.insert_rows
    monkeypatch.setattr(tracker.store, "put_answers",
                        lambda *a, **k: (order.append("answers"), put_answers(*a, **k))[1])
    monkeypatch.setattr(tracker.store, "insert_rows",
                        lambda *a, **k: (order.append("rows"), insert_rows(*a, **k))[1])
    key = key_of(payload("paid"))
    tracker.keep_answer(answer(key, expires_at=9e12))
    tracker.record(UsageRecord(request_id="req_paid"))
    tracker.start()  # the writer finds both queued: one round takes them
    try:
        assert tracker.flush()
        reader = open_store(path)
        assert [reader.answer(r["id"])["paid_by"] for r in reader.find_answers(key.shape, NOW)] \
            == ["req_paid"]
        reader.close()
    finally:
        tracker.close()
    assert order == ["answers", "rows"]


def test_the_tracker_queue_of_answers_is_bounded_and_drops_the_oldest(tmp_path, monkeypatch):
    monkeypatch.setattr(tracker_module, "ANSWER_QUEUE_BYTES", 2500)
    path = str(tmp_path / "usage.db")
    tracker = Tracker(path)
    for name in ("first", "second", "third"):  # 1000 bytes each, queued while nothing runs
        tracker.keep_answer(sized(name, expires_at=9e12, paid_by=f"req_{name}"))
    tracker.start()
    tracker.record(UsageRecord(request_id="req_row"))
    assert tracker.flush()
    tracker.close()
    with sqlite3.connect(path) as db:
        kept = {paid for (paid,) in db.execute("SELECT paid_by FROM dedup_answers")}
    assert kept == {"req_second", "req_third"}


# -- the rows of a paying, a replayed and a joined request -----------------------------------------
def pending_for(request: str = "q") -> PendingAnswer:
    pending = PendingAnswer(key_of(payload(request)), "anthropic", 10.0, 1 << 20, lambda d: d)
    pending.add(b"data: x\n\n")
    return pending


def test_only_a_complete_2xx_answer_is_kept():
    kept = []
    record = new_record()
    record.keep_answer(pending_for(), kept.append)
    record.complete(200, 9)
    assert [a.paid_by for a in kept] == ["req_u"]
    for end in (lambda r: r.complete(302, 0), lambda r: r.complete(304, 0),
                lambda r: r.upstream_error(200, "overloaded", 9),
                lambda r: r.upstream_error(500, "boom"),
                lambda r: r.failed(200, UpstreamBroken("cut"), 9),
                lambda r: r.failed(499, ClientGone("gone"), 9)):
        kept.clear()
        record = new_record()
        record.keep_answer(pending_for(), kept.append)
        end(record)
        assert kept == [], record.row.end_reason


def test_the_answer_is_kept_before_the_row_is_queued():
    kept = []
    seen_when_recorded = []
    sink = Sink(on_record=lambda rec: seen_when_recorded.append(len(kept)))
    record = new_record(sink=sink)
    record.keep_answer(pending_for(), kept.append)
    record.complete(200, 9)
    assert seen_when_recorded == [1]


PAID_USAGE = {"input_tokens": 40, "output_tokens": 15, "cache_read_tokens": 5,
              "cache_write_tokens": 3, "reasoning_tokens": None, "cost_usd": 0.0123,
              "priced": True, "usage_complete": True, "stop_reason": "end_turn",
              "upstream_model": "claude-d-1", "deployment": "dep-a"}


def test_a_replayed_row_names_who_paid_costs_nothing_and_keeps_what_it_saved():
    sink = Sink()
    record = new_record("req_dup", sink)
    record.deduped(EndReason.REPLAY, "req_paid", PAID_USAGE, 200, 321)
    [row] = sink.rows
    assert (row.end_reason, row.status, row.bytes_out) == (EndReason.REPLAY, 200, 321)
    assert (row.paid_by, row.cost_usd, row.priced, row.attempts) == ("req_paid", 0.0, True, 0)
    assert row.saved_cost_usd == pytest.approx(0.0123)
    assert (row.input_tokens, row.output_tokens, row.cache_read_tokens, row.cache_write_tokens) \
        == (40, 15, 5, 3)
    assert (row.deployment, row.upstream_model, row.usage_complete) == ("dep-a", "claude-d-1", True)


def test_an_unpriced_paying_row_saves_no_known_cost():
    sink = Sink()
    record = new_record("req_dup", sink)
    record.deduped(EndReason.JOINED, "req_paid", dict(PAID_USAGE, priced=False, cost_usd=0.0), 200, 1)
    assert sink.rows[0].saved_cost_usd is None and sink.rows[0].paid_by == "req_paid"


def test_a_json_answer_translated_from_another_format_is_kept_as_its_client_got_it():
    """A JSON answer from a deployment of another format is read whole and rewritten: the
    rewritten body (keys masked) is the answer kept, and a duplicate gets it as JSON."""
    from proxy.pipeline.dedup import json_body
    from proxy.pipeline.relay import TranslatedBody
    key = key_of(payload("translated"))
    redactor = Redactor([SECRET])
    pending = PendingAnswer(key, "anthropic", 10.0, 1 << 20, redactor.data, stream=False)
    preq = ProxyRequest(request_id="req_x", endpoint="anthropic", fmt=formats.ANTHROPIC,
                        route=None, method="POST", path="/v1/messages", headers=[], body=b"{}",
                        redactor=redactor,
                        dedup=DedupTicket(key, DedupPolicy(), pending, False, 1 << 20))
    kept = []
    record = new_record("req_x")
    record.keep_answer(pending, kept.append)
    body = json.dumps({"type": "message", "content": [{"type": "text", "text": SECRET}]}).encode()
    served = list(TranslatedBody(body, 200, "dep-x").respond(preq, record,
                                                            lambda status, headers: None))
    [answer] = kept
    assert answer.body == served[0] == redactor.data(body) and SECRET.encode() not in answer.body
    assert (answer.stream, answer.content_type, answer.status, answer.paid_by) \
        == (False, "application/json", 200, "req_x")
    assert json_body(answer) == (answer.body, "application/json")


# -- replaying a streamed answer as JSON ----------------------------------------------------------
def test_the_hidden_usage_chunk_goes_back_before_the_end_marker():
    body = b'data: {"a":1}\n\ndata: [DONE]\n\n'
    assert with_hidden(body, b'data: {"u":1}\n\n') == b'data: {"a":1}\n\ndata: {"u":1}\n\ndata: [DONE]\n\n'
    assert with_hidden(b'data: {"a":1}\n\n', b'data: {"u":1}\n\n') == b'data: {"a":1}\n\ndata: {"u":1}\n\n'
    assert with_hidden(body, b"") == body


# -- the fan-out of one live call ---------------------------------------------------------------
@pytest.fixture
def heartbeat():
    """A real heartbeat, ticking every 10 ms (an orphan's grace ends on its pass); its
    keepalives would come after 30 s of silence, never within a test."""
    beat = Heartbeat(30.0, 0.01)
    yield beat
    beat.stop()


TERMINAL = formats.ANTHROPIC.stream_view().terminal_error


class Call:
    """A live call as StreamRelay builds it: its commit rule, the paying request's record,
    the upstream's exchange (no client of its own, visited by the heartbeat), in a
    LiveCalls."""

    def __init__(self, heartbeat: Heartbeat, grace: float = 0.0, history_limit: int = 1 << 20,
                 body: dict | None = None) -> None:
        self.commit = CommitRule()
        self.source = new_record("req_src")
        self.upstream_ended: list = []
        self.upstream = Exchange(None, None, on_end=self.upstream_ended.append)
        heartbeat.register(self.upstream)
        self.calls = LiveCalls()
        self.call = LiveCall(key_of(body or dict(payload(), stream=True)), "req_src", self.commit,
                             self.source, self.upstream, heartbeat, grace, history_limit,
                             on_close=self.calls.remove, terminal=TERMINAL)
        self.calls.add(self.call)

    def member(self, request_id: str = "req_m", record: RequestRecord | None = None,
               stream: bool = True, max_buffered: int | None = None) -> Member:
        writer = None
        if stream:
            writer = LockedWriter()
            if max_buffered is not None:
                writer.max_buffered = max_buffered
        return Member(request_id, record, writer, None, TERMINAL)


def frames_of(member: Member) -> list[bytes]:
    return list(member.writer.frames())


def test_when_the_last_client_leaves_without_a_grace_the_upstream_ends_at_once(heartbeat):
    live = Call(heartbeat)
    first, second = live.member("req_a"), live.member("req_b", new_record("req_b"))
    assert live.call.add(first) and live.call.add(second)
    first.exchange.end(ClientGone("a hung up"))
    assert live.upstream_ended == [] and not live.call.orphaned
    second.exchange.end(ClientGone("b hung up"))
    assert [type(e) for e in live.upstream_ended] == [ClientGone]


GRACE = 0.2


def test_an_orphan_nobody_joins_ends_when_its_grace_is_over(heartbeat):
    live = Call(heartbeat, grace=GRACE)
    first = live.member("req_a")
    assert live.call.add(first)
    left_at = time.monotonic()
    first.exchange.end(ClientGone("hung up"))
    assert live.call.orphaned and live.upstream_ended == []
    assert live.upstream.ended.wait(10), "the orphan was never ended"
    assert time.monotonic() - left_at >= GRACE, "the upstream was ended before its grace"
    assert [type(e) for e in live.upstream_ended] == [ClientGone]
    assert not live.call.add(live.member("req_late", new_record("req_late")), orphans_only=True)


def test_a_retry_that_joins_an_orphan_in_time_keeps_the_upstream_going(heartbeat):
    live = Call(heartbeat, grace=GRACE)
    first = live.member("req_a")
    live.call.add(first)
    first.exchange.end(ClientGone("hung up"))
    retry = live.member("req_retry", new_record("req_retry"), stream=False)
    assert live.call.add(retry, orphans_only=True)
    assert not live.call.orphaned
    assert not live.upstream.ended.wait(GRACE + 0.3), "the joined call was ended at the orphan's deadline"
    assert live.upstream_ended == []


def test_an_orphan_only_call_takes_no_joiner_while_a_client_is_on_it(heartbeat):
    live = Call(heartbeat, grace=5.0)
    first = live.member("req_a")
    assert live.call.add(first)
    assert not live.call.add(live.member("req_b", new_record("req_b")), orphans_only=True)
    assert live.call.add(live.member("req_c", new_record("req_c")))  # join_live would


def test_a_joiner_of_an_undecided_call_is_woken_when_it_is_decided(heartbeat):
    committed = Call(heartbeat)
    member = committed.member("req_w", new_record("req_w"))
    assert committed.call.add(member)
    assert not member.wake.is_set()
    committed.commit.wait(0)  # the server thread's delay ran out: 200 before any answer
    assert member.wake.wait(1.0)
    refused = Call(heartbeat)
    member = refused.member("req_r", new_record("req_r"))
    refused.call.add(member)
    refused.commit.refuse(Outcome.failed(UpstreamBroken("nobody answered")))
    assert member.wake.wait(1.0)


def test_a_joiner_of_a_decided_call_is_awake_at_once(heartbeat):
    live = Call(heartbeat)
    live.commit.wait(0)
    member = live.member("req_w", new_record("req_w"))
    assert live.call.add(member)
    assert member.wake.is_set()


def test_a_callback_on_a_settled_commit_runs_at_once():
    commit = CommitRule()
    commit.wait(0)
    called = []
    commit.when_settled(lambda: called.append(1))
    assert called == [1]


def test_a_late_joiner_gets_the_events_so_far_then_the_live_ones(heartbeat):
    live = Call(heartbeat)
    live.commit.wait(0)
    first = live.member("req_a")
    live.call.add(first)
    live.call.write_event(b"data: 1\n\n")
    late = live.member("req_b", new_record("req_b"))
    live.call.add(late)
    live.call.write_event(b"data: 2\n\n")
    live.call.add_hidden(b"data: usage\n\n")
    live.source.complete(200, 18)
    live.call.close()
    assert frames_of(first) == frames_of(late) == [b"data: 1\n\n", b"data: 2\n\n"]
    assert live.call.frames() == [b"data: 1\n\n", b"data: 2\n\n"]
    assert live.call.hidden == [b"data: usage\n\n"] and live.call.complete
    row = late.record.row
    assert (row.end_reason, row.paid_by, row.bytes_out) == (EndReason.JOINED, "req_src", 18)
    assert len(live.calls) == 0, "a closed call can still be found"


def test_a_call_whose_history_outgrew_its_limit_takes_no_more_joiners(heartbeat):
    live = Call(heartbeat, history_limit=10)
    live.call.add(live.member("req_a"))
    live.call.write_event(b"0123456789")
    assert live.call.add(live.member("req_b", new_record("req_b")))
    live.call.write_event(b"x")
    assert not live.call.add(live.member("req_c", new_record("req_c")))


def test_joined_rows_of_a_call_that_failed_say_how_it_failed(heartbeat):
    """The upstream's error event reached every client as an event, and the stream then
    ended with no final frame of the proxy's own: the joined row still fails."""
    live = Call(heartbeat)
    live.commit.wait(0)
    joined = live.member("req_j", new_record("req_j"))
    live.call.add(joined)
    live.call.write_event(b"event: error\ndata: {}\n\n")
    live.source.upstream_error(200, "Overloaded", 21)
    live.call.close()
    assert not live.call.complete
    row = joined.record.row
    assert (row.end_reason, row.paid_by, row.error) == (EndReason.UPSTREAM_ERROR, None, "Overloaded")


def test_a_joined_client_too_slow_for_the_shared_stream_is_ended_alone(heartbeat):
    live = Call(heartbeat)
    live.commit.wait(0)
    fast = live.member("req_fast")
    slow = live.member("req_slow", new_record("req_slow"), max_buffered=10)
    live.call.add(fast)
    live.call.add(slow)
    for i in range(3):
        assert live.call.write_event(b"data: %d 0123456789\n\n" % i)
    assert isinstance(slow.exchange.end_error, ClientTooSlow)
    assert live.upstream_ended == [] and fast.exchange.end_error is None
    got = frames_of(slow)
    assert got[-1].startswith(b"event: error") and b"too far behind" in got[-1]
    assert slow.record.row.end_reason == ClientTooSlow("x").end_reason


def test_a_client_alone_on_a_shared_call_holds_the_stream_back_instead_of_being_ended(heartbeat):
    """Nobody else to hold up: a single slow client gets backpressure, as the client of an
    unshared stream does, not the terminal error of a client that fell behind the others."""
    live = Call(heartbeat)
    live.commit.wait(0)
    alone = live.member("req_alone", max_buffered=10)
    live.call.add(alone)
    events = [b"data: %d 0123456789\n\n" % i for i in range(3)]
    stream = threading.Thread(target=lambda: [live.call.write_event(e) for e in events])
    stream.start()
    stream.join(0.3)
    assert stream.is_alive(), "the stream thread never waited for the slow client"
    got = []
    reader = threading.Thread(target=lambda: got.extend(alone.writer.frames()))
    reader.start()
    stream.join(5)
    live.source.complete(200, 0)
    live.call.close()
    reader.join(5)
    assert got == events and alone.exchange.end_error is None


def test_matching_live_calls_need_the_same_body_and_for_a_stream_the_same_options(heartbeat):
    body = twin("A", stream=True)
    live = Call(heartbeat, body=body)
    assert live.calls.matching(key_of(body)) == [live.call]
    assert live.calls.matching(key_of(dict(body, stream=False))) == [live.call]  # JSON waits
    assert live.calls.matching(key_of(dict(body, stream_options={"include_usage": True}))) == []
    other = twin("B", stream=True)
    assert key_of(other).shape == key_of(body).shape
    assert live.calls.matching(key_of(other)) == []


# -- the locked writer as a shared stream uses it -------------------------------------------------
def test_an_offered_event_never_waits_and_is_masked():
    writer = LockedWriter(redactor=Redactor([SECRET]), max_buffered=10)
    assert writer.offer_event(b"data: " + SECRET.encode() + b"\n\n")
    assert not writer.offer_event(b"data: more\n\n")  # more than 10 bytes are queued
    writer.close()
    [frame] = list(writer.frames())
    assert SECRET.encode() not in frame and len(frame) == len(SECRET) + 8


# -- Dedup.serve, without a server ----------------------------------------------------------------
def serve_request(live: Call, heartbeat: Heartbeat, tmp_path, policy: DedupPolicy,
                  stream: bool = True, kept: list | None = None):
    """Dedup.serve for a duplicate of `live`'s request: (what it served, its ticket, the
    statuses it started, its record); `kept` collects the answers it keeps."""
    body = dict(payload(), stream=True)
    key = key_of(dict(body, stream=stream))
    pending = PendingAnswer(key, "anthropic", policy.replay_window, 1 << 20, lambda d: d, stream) \
        if policy.replay_window > 0 else None
    ticket = DedupTicket(key, policy, pending, stream and policy.shares_live, 1 << 20)
    preq = ProxyRequest(request_id="req_dup", endpoint="anthropic", fmt=formats.ANTHROPIC,
                        route=None, method="POST", path="/v1/messages", headers=[],
                        body=json.dumps(body).encode(), stream=stream, dedup=ticket)
    keep = (kept if kept is not None else []).append
    dedup = Dedup(DedupDeps(AnswerCache(1 << 20),
                            StoredAnswers(lambda: open_store(str(tmp_path / "none.db"))),
                            live.calls, keep=keep))
    started = []
    record = new_record("req_dup")
    served = dedup.serve(preq, record, lambda status, headers: started.append(status))
    return served, ticket, started, record


def test_on_an_orphan_grace_route_a_duplicate_joins_only_an_orphaned_call(heartbeat, tmp_path):
    live = Call(heartbeat, grace=5.0)
    live.commit.wait(0)
    first = live.member("req_src")
    live.call.add(first)
    policy = DedupPolicy(replay_window=0, join_live=False, orphan_grace=5.0)
    served, ticket, started, _ = serve_request(live, heartbeat, tmp_path, policy)
    assert served is None and ticket.verdict == "miss" and started == []
    first.exchange.end(ClientGone("hung up"))
    served, ticket, started, _ = serve_request(live, heartbeat, tmp_path, policy)
    assert served is not None and ticket.verdict == "joined" and started == ["200 OK"]
    live.source.complete(200, 0)
    live.call.close()


def json_answer() -> UpstreamResponse:
    """An upstream's 200 JSON answer to a streaming request (its body is never read here)."""
    raw = urllib3.HTTPResponse(body=io.BytesIO(b"{}"), headers={"Content-Type": "application/json"},
                               status=200, preload_content=False)
    return UpstreamResponse(raw, AbortHandle(), 1 << 20, 100)


def test_a_streaming_duplicate_of_a_call_answered_with_a_json_body_makes_its_own_call(heartbeat,
                                                                                     tmp_path):
    """A JSON body is read once, by the request that asked: a stream that joined goes on
    upstream itself (a miss), and keeps its own answer."""
    live = Call(heartbeat)
    assert live.commit.answer_with(json_answer(), "dep")
    live.call.add(live.member("req_src"))
    policy = DedupPolicy(replay_window=10, join_live=True)
    kept = []
    served, ticket, started, record = serve_request(live, heartbeat, tmp_path, policy, kept=kept)
    assert served is None and ticket.verdict == "miss" and started == []
    ticket.pending.add(b"data: its own\n\n")
    record.complete(200, 14)  # its own answer, made upstream, is kept
    assert [(a.paid_by, a.body) for a in kept] == [("req_dup", b"data: its own\n\n")]


# -- the report's sums --------------------------------------------------------------------------
def test_the_report_counts_a_replay_as_saved_and_a_part_priced_row_as_unpriced(tmp_path):
    """Spend is what was paid and priced: a replayed row costs nothing and saves what its
    answer cost; a continued answer priced in part (cost_usd holds the known part) is
    unpriced spend, never part of the cost figure."""
    from proxy.report import summarize
    path = str(tmp_path / "usage.db")
    tracker = Tracker(path)
    tracker.start()
    paid = dict(input_tokens=100, output_tokens=50, usage_complete=True)
    for rec in (UsageRecord(request_id="p1", started_at=NOW, cost_usd=0.01, priced=True, **paid),
                UsageRecord(request_id="d1", started_at=NOW + 1, end_reason="replay", paid_by="p1",
                            cost_usd=0.0, priced=True, saved_cost_usd=0.01, attempts=0, **paid),
                UsageRecord(request_id="c1", started_at=NOW + 2, cost_usd=0.002, priced=False,
                            continuations=1, **paid)):
        tracker.record(rec)
    assert tracker.flush()
    tracker.close()
    totals = summarize(path)["totals"]
    assert totals["cost_usd"] == pytest.approx(0.01)
    assert totals["unpriced_requests"] == 1
    assert (totals["input_tokens"], totals["dedup_requests"], totals["dedup_tokens"]) == (200, 1, 150)
    assert totals["dedup_saved_usd"] == pytest.approx(0.01) and totals["failures"] == {}
