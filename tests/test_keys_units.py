"""Client keys piece by piece: the rules (`keys/policy.py`), the shared ledger in a real
SQLite file (`keys/store.py`, including admissions from several processes at once), a
worker's copy of the keys and its settlements (`keys/ledger.py`), and the gate's pure
parts (worst-case cost, model lists, settling a hold, who counts as loopback)."""

from __future__ import annotations

import calendar
import json
import multiprocessing
import threading
import time

import pytest

from proxy.admin.app import from_loopback
from proxy.errors import BudgetExhausted, Forbidden, RateLimited
from proxy.keys import ledger as ledger_module
from proxy.keys.ledger import KeyBook, Ledger
from proxy.keys.policy import (ClientKey, Standing, hint_of, input_estimate, key_digest,
                               new_secret, parse_models, period_end, period_start, refusal,
                               seconds_until_below, worst_case_cost)
from proxy.keys.pgstore import PgKeyStore
from support.postgres import wait_for_a_lock_wait
from proxy.keys.store import STALE_HOLDER, KeyStore
from proxy.pipeline.gate import Gate, GateDeps, Hold, allowed_models_body
from proxy.pipeline.request import ProxyRequest
from proxy.pricing import Price, PriceTable
from proxy.routing import Deployment, Route
from proxy.store import StoreFault
from proxy.usage import UsageRecord

pytestmark = pytest.mark.timeout(60)

SECRET = b"s" * 64
THURSDAY = calendar.timegm((2026, 12, 3, 15, 30, 0))  # Thursday 3 December 2026, 15:30 UTC


def key(**limits) -> ClientKey:
    return ClientKey(id=limits.pop("id", "lk_1"), name=limits.pop("name", "alice"),
                     digest=limits.pop("digest", "d"), hint="h", **limits)


# ---------------------------------------------------------------------------------------------
# Rules


def test_periods_start_at_utc_midnight_monday_and_the_first_of_the_month():
    assert period_start("day", THURSDAY) == calendar.timegm((2026, 12, 3, 0, 0, 0))
    assert period_start("week", THURSDAY) == calendar.timegm((2026, 11, 30, 0, 0, 0))
    assert period_start("month", THURSDAY) == calendar.timegm((2026, 12, 1, 0, 0, 0))
    assert period_start("total", THURSDAY) == 0.0
    assert period_end("month", THURSDAY) == calendar.timegm((2027, 1, 1, 0, 0, 0))
    assert period_end("week", THURSDAY) == calendar.timegm((2026, 12, 7, 0, 0, 0))
    assert period_end("total", THURSDAY) is None
    with pytest.raises(ValueError):
        period_start("fortnight", THURSDAY)


def test_the_worst_case_is_the_dearest_deployment_with_input_sent_once_per_call():
    cheap, dear = Price(1.0, 2.0, 0.1, 1.25), Price(3.0, 15.0, 0.3, 3.75)
    # 1,000 input tokens at the dearest input-side rate (cache writes, 3.75) + 100 output at 15.
    assert worst_case_cost(1000, 100, [cheap, dear]) == pytest.approx((3750 + 1500) / 1e6)
    assert worst_case_cost(1000, 100, [dear], calls=3) == pytest.approx(3 * (3750 + 1500) / 1e6)
    assert worst_case_cost(1000, 100, [cheap, None]) is None  # a deployment without a price
    assert input_estimate(10) == 4  # a generous bytes-per-token, rounded up


def test_a_key_refuses_in_order_state_parallel_rpm_tpm_budget():
    now = 1000.0
    busy = Standing(spent_usd=9.0, held_usd=0.5, holds=3, window=[(990, 10, 500)])
    limited = key(max_parallel=3, rpm=10, tpm=500, budget_usd=10.0)
    assert isinstance(refusal(key(revoked_at=1.0, max_parallel=3), busy, 0, now), Forbidden)
    assert isinstance(refusal(key(expires_at=now, rpm=1), Standing(), 0, now), Forbidden)
    parallel = refusal(limited, busy, 0.1, now)
    assert isinstance(parallel, RateLimited) and parallel.retry_after == "1"
    rpm = refusal(key(rpm=10), busy, 0, now)
    assert "10 requests per minute" in rpm.message and rpm.retry_after == "50"
    assert "500 tokens per minute" in refusal(key(tpm=500), busy, 0, now).message
    assert refusal(key(tpm=501), busy, 0, now) is None
    assert refusal(key(budget_usd=10.0), busy, 0.5, now) is None  # exactly what is left
    over = refusal(key(budget_usd=10.0, period="day"), busy, 0.5001, now)
    assert isinstance(over, BudgetExhausted) and over.should_retry is False
    assert "$0.5000 left of its $10.00 daily budget" in over.message


def test_retry_after_is_when_enough_of_the_window_has_gone():
    window = [(100, 5, 0), (130, 5, 0), (135, 1, 0)]
    assert seconds_until_below(window, 10, 1, now=140.0) == 20  # the bucket of 100 leaves at 160
    assert seconds_until_below(window, 2, 1, now=140.0) == 50  # ...then 130 at 190
    assert seconds_until_below(window, 1, 1, now=194.5) == 1  # never less than a second


def test_allowlists_are_globs_on_the_name_sent():
    globbed = key(models=parse_models(" claude-sonnet-* , gpt-5*"))
    assert globbed.models == ("claude-sonnet-*", "gpt-5*")
    assert globbed.allows("claude-sonnet-4-5") and globbed.allows("gpt-5-mini")
    assert not globbed.allows("claude-opus-4") and not globbed.allows(None)
    assert not globbed.allows("Claude-Sonnet-4")  # as sent: no case folding
    assert parse_models("*") == () and key().allows("anything")


def test_secrets_are_long_random_and_stored_only_as_keyed_hashes():
    a, b = new_secret(), new_secret()
    assert a != b and a.startswith("sk-llmp-") and len(a) == 51
    assert key_digest(a, SECRET) != key_digest(a, b"t" * 64)  # keyed: useless without it
    assert a not in key_digest(a, SECRET) and hint_of(a) == "sk-llmp-..." + a[-4:]


# ---------------------------------------------------------------------------------------------
# The ledger in SQLite


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path):
    """The keys on SQLite (one host), then on PostgreSQL (every host): the same rules."""
    keys = _store_on(request.param, request, tmp_path)
    yield keys
    keys.close()


def _store_on(kind: str, request, tmp_path) -> KeyStore:
    if kind == "sqlite":
        return KeyStore(str(tmp_path / "keys.db"))
    return PgKeyStore(request.getfixturevalue("postgres").database())


def test_admission_reserves_and_settlement_counts_once(store):
    store.add(key(budget_usd=2.0, period="day", rpm=100))
    now = time.time()
    assert store.admit("lk_1", "req_a", 1.5, "h", now) == (store.find("lk_1"), None)
    held = store.standing(store.find("alice"), now)
    assert (held.held_usd, held.holds, held.requests_in_window()) == (1.5, 1, 1)
    _, refused = store.admit("lk_1", "req_b", 1.0, "h", now)
    assert isinstance(refused, BudgetExhausted)  # 1.5 held + 1.0 > 2.0
    assert store.settle("req_a", 0.25, 70, now) is True
    assert store.settle("req_a", 0.25, 70, now) is False  # a second settlement changes nothing
    after = store.standing(store.find("alice"), now)
    assert (after.spent_usd, after.held_usd, after.holds) == (0.25, 0.0, 0)
    assert after.tokens_in_window() == 70
    assert store.admit("lk_1", "req_b", 1.0, "h", now)[1] is None
    assert store.admit("lk_missing", "req_c", 0.0, "h", now) == (None, None)


def test_a_period_that_ends_starts_the_budget_afresh(store):
    store.add(key(budget_usd=1.0, period="day"))
    store.admit("lk_1", "req_a", 1.0, "h", THURSDAY)
    store.settle("req_a", 1.0, 10, THURSDAY)
    assert isinstance(store.admit("lk_1", "req_b", 0.1, "h", THURSDAY)[1], BudgetExhausted)
    assert store.admit("lk_1", "req_b", 0.1, "h", THURSDAY + 86400)[1] is None


def test_names_belong_to_one_live_key_and_revocation_is_seen_at_once(store):
    store.add(key())
    with pytest.raises(ValueError):
        store.add(key(id="lk_2", digest="d2"))
    version = store.version()
    store.revoke("lk_1", time.time())
    assert store.version() > version
    assert isinstance(store.admit("lk_1", "req", 0.0, "h", time.time())[1], Forbidden)
    store.add(key(id="lk_2", digest="d2"))  # the name is free again
    assert store.find("alice").id == "lk_2"
    store.update("lk_2", rpm=5, models=("a*",))
    assert (store.find("lk_2").rpm, store.find("lk_2").models) == (5, ("a*",))
    with pytest.raises(ValueError):
        store.update("lk_2", digest="stolen")


def test_reservations_of_a_worker_that_died_are_swept(store):
    store.add(key(max_parallel=1))
    now = time.time()
    store.touch("dead", now - STALE_HOLDER - 1)
    store.touch("alive", now)
    store.admit("lk_1", "req_dead", 0.5, "dead", now - STALE_HOLDER - 1)
    assert isinstance(store.admit("lk_1", "req_new", 0.0, "alive", now)[1], RateLimited)
    assert store.sweep(now) == 1
    assert store.admit("lk_1", "req_new", 0.0, "alive", now)[1] is None
    assert store.sweep(now) == 0  # the live holder's reservation stays
    # The dead worker's request may well have been billed: its worst case is spent.
    assert store.standing(store.find("lk_1"), now).spent_usd == 0.5
    assert store.settle("req_dead", 0.1, 10, now) is False  # charged once, not again


def _admit_many(path: str, worker: int, tries: int, results) -> None:
    keys = PgKeyStore(path) if path.startswith("postgresql://") else KeyStore(path)
    admitted = sum(keys.admit("lk_1", f"req_{worker}_{i}", 1.0, f"w{worker}", time.time())[1]
                   is None for i in range(tries))
    results.put(admitted)


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_processes_admitting_at_once_never_overshoot(kind, request, tmp_path):
    """Eight processes (eight workers, or hosts), 40 admissions each, against a budget of
    100 single dollars."""
    keys = _store_on(kind, request, tmp_path)
    path = keys.path
    keys.add(key(budget_usd=100.0, period="total"))
    keys.close()
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    workers = [context.Process(target=_admit_many, args=(path, w, 40, results)) for w in range(8)]
    for process in workers:
        process.start()
    admitted = [results.get(timeout=30) for _ in workers]
    for process in workers:
        process.join(10)
    assert sum(admitted) == 100
    assert keys.standing(key(budget_usd=100.0, period="total"), time.time()).holds == 100
    keys.close()


# ---------------------------------------------------------------------------------------------
# A worker's copy and its settlements


class CountingStore(KeyStore):
    def __init__(self, path):
        super().__init__(path)
        self.version_reads = 0
        self.failing_settlements = 0

    def version(self):
        self.version_reads += 1
        return super().version()

    def settle(self, *args):
        if self.failing_settlements:
            self.failing_settlements -= 1
            raise StoreFault("locked", "database is locked")
        return super().settle(*args)


def test_a_new_key_works_at_once_and_a_flood_of_unknown_keys_costs_bounded_reads(tmp_path):
    store = CountingStore(str(tmp_path / "keys.db"))
    book = KeyBook(store, lambda: SECRET)
    assert book.lookup("sk-llmp-nobody") is None
    secret = new_secret()
    store.add(key(digest=key_digest(secret, SECRET)))
    time.sleep(ledger_module.MISS_REFRESH)  # the bound on how often a miss looks again
    assert book.lookup(secret).name == "alice"  # without waiting for the REFRESH interval
    reads = store.version_reads
    for _ in range(500):
        book.lookup("sk-llmp-nobody")
    assert store.version_reads - reads <= 3  # about one per MISS_REFRESH, not one per miss


def test_a_settlement_the_store_refuses_is_retried_by_the_ledgers_thread(tmp_path, monkeypatch):
    monkeypatch.setattr(ledger_module, "TOUCH_EVERY", 0.05)
    store = CountingStore(str(tmp_path / "keys.db"))
    store.add(key(budget_usd=5.0))
    ledger = Ledger(store)
    assert ledger.admit(store.find("lk_1"), "req_a", 2.0)[1] is None
    store.failing_settlements = 2
    ledger.settle("req_a", 0.5, 40)
    deadline = time.monotonic() + 5
    while store.standing(store.find("lk_1"), time.time()).holds:
        assert time.monotonic() < deadline, "the settlement was never retried"
        time.sleep(0.02)
    assert store.standing(store.find("lk_1"), time.time()).spent_usd == 0.5
    ledger.close()
    assert store._read("SELECT COUNT(*) FROM key_holders", ()) == [(0,)]


# ---------------------------------------------------------------------------------------------
# The gate's pure parts


def _request(body: bytes, deployments=("m-dear", "m-cheap"), stitch=None) -> ProxyRequest:
    route = Route("r", tuple(Deployment(m, "anthropic", m) for m in deployments))
    return ProxyRequest(request_id="req", endpoint="anthropic", fmt=None, route=route,
                        method="POST", path="/v1/messages", headers=[], body=body,
                        model="alias", stitch=stitch)


def test_a_reservation_caps_output_and_counts_continuations(tmp_path):
    prices = PriceTable({"m-dear": {"input": 1.0, "output": 10.0},
                         "m-cheap": {"input": 0.1, "output": 1.0}})
    gate = Gate(GateDeps(True, None, None, prices, reserve_output_tokens=1000,
                         max_continuations=2))
    body = b"x" * 300  # 100 tokens by the estimate
    budget = key(budget_usd=1.0)
    worst = lambda request, payload: gate._worst_case(budget, request, payload)[0]  # noqa
    assert worst(_request(body), {"max_tokens": 500}) == pytest.approx((100 + 500 * 10.0) / 1e6)
    assert worst(_request(body), {"max_tokens": 10**9}) == pytest.approx(
        (100 + 1000 * 10.0) / 1e6)  # capped
    assert worst(_request(body), {}) == pytest.approx((100 + 10000) / 1e6)
    # A stream that may be continued twice: three calls, each the prompt and the output cap.
    assert gate._worst_case(budget, _request(body, stitch=object()), {"max_tokens": 500}) \
        == pytest.approx((3 * (100 + 5000) / 1e6, 100 / 1e6, 100))
    with pytest.raises(Forbidden, match="no price"):
        gate._worst_case(budget, _request(body, ("m-dear", "m-unknown")), {})


def test_a_hold_settles_what_is_known_and_never_less_than_a_begun_prompt():
    settled = []

    class Recorder:
        def settle(self, *args):
            settled.append(args)

    hold = Hold(Recorder(), "req", 0.75, prompt_usd=0.02, prompt_tokens=400)
    hold.settle(UsageRecord(input_tokens=10, output_tokens=5, cache_read_tokens=2,
                            cost_usd=0.01, priced=True, ttft_ms=5.0))
    hold.settle(UsageRecord(input_tokens=10, output_tokens=5))  # used tokens, no known price
    hold.settle(UsageRecord())  # refused upstream: nothing used
    hold.settle(UsageRecord(input_tokens=10, output_tokens=5, cost_usd=0.0, priced=True,
                            paid_by="req_first"))  # a replay: another request paid
    # Cut short after content began, before the provider told the input (OpenAI tells it
    # last): the delivered output the row estimated, plus the prompt's estimate.
    hold.settle(UsageRecord(output_tokens=30, cost_usd=0.0003, priced=True, ttft_ms=5.0))
    assert settled == [("req", 0.01, 17), ("req", 0.75, 15), ("req", 0.0, 0), ("req", 0.0, 0),
                       ("req", pytest.approx(0.0203), 430)]


def test_model_lists_keep_only_the_allowed_models():
    allowed = key(models=("claude-*",))
    openai_list = {"object": "list", "data": [{"id": "gpt-4o"}, {"id": "claude-x"}]}
    assert json.loads(allowed_models_body(json.dumps(openai_list).encode(), allowed)) == {
        "object": "list", "data": [{"id": "claude-x"}]}
    anthropic_list = {"data": [{"id": "claude-a"}, {"id": "gpt"}, {"id": "claude-b"}],
                      "first_id": "claude-a", "last_id": "gpt", "has_more": False}
    filtered = json.loads(allowed_models_body(json.dumps(anthropic_list).encode(), allowed))
    assert (filtered["first_id"], filtered["last_id"]) == ("claude-a", "claude-b")
    assert json.loads(allowed_models_body(b"<html>", allowed)) == {"data": []}


@pytest.mark.parametrize("environ, local", [
    ({"REMOTE_ADDR": "127.0.0.1"}, True), ({"REMOTE_ADDR": "::1"}, True),
    ({"REMOTE_ADDR": "::ffff:127.0.0.5"}, True), ({"REMOTE_ADDR": ""}, False), ({}, True),
    ({"REMOTE_ADDR": "10.0.0.1"}, False), ({"REMOTE_ADDR": "garbage"}, False),
    ({"REMOTE_ADDR": "127.0.0.1", "HTTP_X_FORWARDED_FOR": "203.0.113.9"}, False),
    ({"REMOTE_ADDR": "127.0.0.1", "HTTP_FORWARDED": "for=203.0.113.9"}, False),
    ({"REMOTE_ADDR": "127.0.0.1", "HTTP_X_REAL_IP": "203.0.113.9"}, False),
])
def test_loopback_means_this_host_directly(environ, local):
    assert from_loopback(environ) is local


def test_keys_that_cannot_be_read_at_all_are_a_503_not_a_401(tmp_path):
    """A keys file that is not a database: no key can be told from an unknown one."""
    from proxy.errors import LimitsUnavailable

    (tmp_path / "keys.db").write_bytes(b"not a database" * 100)
    store = KeyStore(str(tmp_path / "keys.db"))
    gate = Gate(GateDeps(True, KeyBook(store, lambda: SECRET), None, PriceTable(), 1000, 0))
    with pytest.raises(LimitsUnavailable) as refused:
        gate.identify({"x-api-key": new_secret()})
    assert refused.value.status == 503 and refused.value.retry_after == "1"
def test_retry_after_waits_until_strictly_below_the_limit_and_rounds_up():
    window = [(100, 5, 0), (130, 5, 0)]
    # after the bucket of 100 leaves, 5 are left: still not below a limit of 5
    assert seconds_until_below(window, 5, 1, now=140.0) == 50
    assert seconds_until_below([(100, 1, 0)], 1, 1, now=140.5) == 20  # 19.5 s, rounded up


def test_rpm_and_tpm_each_wait_on_their_own_column():
    # admissions count requests in their second; settlements count tokens in theirs
    window = [(950, 1, 0), (960, 0, 300), (990, 9, 0), (995, 0, 300)]
    assert refusal(key(rpm=10), Standing(window=window), 0, 1000.0).retry_after == "10"
    assert refusal(key(tpm=600), Standing(window=window), 0, 1000.0).retry_after == "20"


def test_a_day_ends_at_the_next_utc_midnight():
    assert period_end("day", THURSDAY) == calendar.timegm((2026, 12, 4, 0, 0, 0))


def test_a_hold_of_the_last_period_keeps_its_slot_but_not_the_new_budget(store):
    store.add(key(budget_usd=1.0, period="day", max_parallel=2))
    assert store.admit("lk_1", "req_a", 1.0, "h", THURSDAY)[1] is None  # still running at midnight
    assert store.admit("lk_1", "req_b", 1.0, "h", THURSDAY + 86400)[1] is None  # a new budget
    assert isinstance(store.admit("lk_1", "req_c", 0.0, "h", THURSDAY + 86400)[1], RateLimited)


def test_a_refused_client_may_come_back_after_retry_after(store):
    store.add(key(rpm=1))
    assert store.admit("lk_1", "req_a", 0.0, "h", 1000.0)[1] is None
    refused = store.admit("lk_1", "req_b", 0.0, "h", 1000.5)[1]
    assert isinstance(refused, RateLimited) and refused.retry_after == "60"
    assert isinstance(store.admit("lk_1", "req_b", 0.0, "h", 1059.9)[1], RateLimited)
    assert store.admit("lk_1", "req_b", 0.0, "h", 1060.0)[1] is None  # its second has left


def test_a_sweep_drops_only_what_is_dead(store):
    store.add(key(max_parallel=1, rpm=1))
    now = time.time()
    store.touch("alive", now - 1)
    store.admit("lk_1", "req_long", 0.0, "alive", now - 10 * STALE_HOLDER)  # a long stream
    assert store.sweep(now) == 0
    assert isinstance(store.admit("lk_1", "req_new", 0.0, "alive", now)[1], RateLimited)
    store.settle("req_long", 0.0, 0, now)
    store.add(key(id="lk_2", name="bob", digest="d2", rpm=1))
    store.admit("lk_2", "req_b1", 0.0, "alive", now - 5)
    store.sweep(now)  # the rate window stays
    assert isinstance(store.admit("lk_2", "req_b2", 0.0, "alive", now)[1], RateLimited)


def test_writes_wait_for_the_hosts_flock(tmp_path):
    store = KeyStore(str(tmp_path / "keys.db"))
    import fcntl
    import os

    store.add(key(rpm=5))
    fd = os.open(store.path + ".lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another worker is writing
    done = threading.Event()
    thread = threading.Thread(target=lambda: (store.admit("lk_1", "r", 0.0, "h", time.time()),
                                              done.set()))
    try:
        thread.start()
        assert not done.wait(0.3), "the admission did not wait for the lock"
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    assert done.wait(5)
    thread.join(5)


def test_the_book_follows_updates_and_rotations(tmp_path):
    store = KeyStore(str(tmp_path / "keys.db"))
    book = KeyBook(store, lambda: SECRET, refresh=0)
    old = new_secret()
    store.add(key(digest=key_digest(old, SECRET)))
    assert book.lookup(old).models == ()
    store.update("lk_1", models=("a*",))
    assert book.lookup(old).models == ("a*",)
    new = new_secret()
    store.rotate("lk_1", key_digest(new, SECRET), hint_of(new))
    assert book.lookup(old) is None and book.lookup(new).name == "alice"
    store.close()


def test_the_ledgers_thread_keeps_its_worker_alive_and_sweeps_dead_ones(tmp_path, monkeypatch):
    monkeypatch.setattr(ledger_module, "TOUCH_EVERY", 0.05)
    store = KeyStore(str(tmp_path / "keys.db"))
    store.add(key(max_parallel=5))
    old = time.time() - STALE_HOLDER - 1
    store.touch("dead", old)
    store.admit("lk_1", "req_dead", 0.0, "dead", old)
    ledger = Ledger(store)
    holder = ledger.holder  # starts the thread
    seen = lambda: store._read("SELECT seen_at FROM key_holders WHERE holder = ?",  # noqa: E731
                               (holder,))[0][0]
    first = seen()
    deadline = time.monotonic() + 5
    try:
        while store.standing(store.find("lk_1"), time.time()).holds:
            assert time.monotonic() < deadline, "the dead worker's reservation was never swept"
            time.sleep(0.02)
        while seen() == first:
            assert time.monotonic() < deadline, "the worker's heartbeat never moved"
            time.sleep(0.02)
    finally:
        ledger.close()


def test_the_gate_finds_a_proxy_key_among_other_credentials_and_only_live_keys_read(tmp_path):
    store = KeyStore(str(tmp_path / "keys.db"))
    live, dead = new_secret(), new_secret()
    store.add(key(digest=key_digest(live, SECRET)))
    store.add(key(id="lk_2", name="bob", digest=key_digest(dead, SECRET), expires_at=1.0))
    gate = Gate(GateDeps(True, KeyBook(store, lambda: SECRET), None, PriceTable({}),
                         reserve_output_tokens=1000, max_continuations=0))
    both = {"x-api-key": "sk-ant-someones-own-key", "authorization": f"Bearer {live}"}
    assert gate.identify(both).name == "alice"
    assert gate.live_key({"x-api-key": live}).name == "alice"
    assert gate.live_key({"x-api-key": dead}) is None  # an expired key reads nothing
    store.close()


def test_only_billed_requests_of_limited_keys_reserve(tmp_path):
    store = KeyStore(str(tmp_path / "keys.db"))
    store.add(key(budget_usd=1.0))
    ledger = Ledger(store)
    prices = PriceTable({"m-dear": {"input": 1.0, "output": 10.0}})
    try:
        unlimited = Gate(GateDeps(True, None, None, prices, 1000, 0))  # no store to touch
        assert unlimited.reserve(key(), _request(b"x" * 300), {}, billed=True) is None
        gate = Gate(GateDeps(True, None, ledger, prices, 1000, 0))
        # count_tokens bills nothing: no reservation, not even for a model without a price
        hold = gate.reserve(store.find("lk_1"), _request(b"x" * 300, ("m-unknown",)), {},
                            billed=False)
        assert hold.amount == 0.0
    finally:
        ledger.close()


def test_a_max_tokens_that_is_not_positive_reserves_the_cap():
    prices = PriceTable({"m-dear": {"input": 1.0, "output": 10.0}})
    gate = Gate(GateDeps(True, None, None, prices, reserve_output_tokens=1000,
                         max_continuations=0))
    for asked in (0, -5, True):
        assert gate._worst_case(key(budget_usd=1.0), _request(b"x" * 300, ("m-dear",)),
                                {"max_tokens": asked})[0] == pytest.approx((100 + 10000) / 1e6)


def test_a_hold_taken_after_its_row_was_finished_is_settled_at_once():
    from proxy.errors import ProxyError
    from proxy.pipeline.finalize import RequestRecord

    class Sink:
        def record(self, rec):
            pass

    class Recorder:
        def settle(self, *args):
            settled.append(args)

    settled = []
    record = RequestRecord(Sink(), PriceTable({}), request_id="req", endpoint="anthropic",
                           client_key_id=None, bytes_in=0)
    record.failed(499, ProxyError("the client went away"))  # another thread finished it
    record.holds(Hold(Recorder(), "req", 0.5))
    assert settled == [("req", 0.0, 0)]


def test_keys_mode_sends_no_client_credential_upstream(monkeypatch):
    from proxy.config import Provider
    from proxy.upstream.request import with_credentials
    monkeypatch.setenv("TEST_UPSTREAM_KEY", "sk-ant-provider")
    headers = [("x-api-key", "sk-llmp-x"), ("authorization", "Bearer sk-llmp-x"),
               ("api-key", "sk-llmp-x"), ("x-goog-api-key", "sk-llmp-x"),
               ("anthropic-version", "2023-06-01")]
    keyed = Provider("anthropic", "http://upstream", "anthropic", api_key_env="TEST_UPSTREAM_KEY")
    keyless = Provider("local", "http://upstream", "anthropic")  # a local server: no key
    assert with_credentials(headers, keyed, keep_client_keys=False) == [
        ("anthropic-version", "2023-06-01"), ("x-api-key", "sk-ant-provider")]
    assert with_credentials(headers, keyless, keep_client_keys=False) == [
        ("anthropic-version", "2023-06-01")]
    assert with_credentials(headers, keyless) == headers  # open mode: the client's key passes


@pytest.mark.parametrize("bind, local", [
    ("127.0.0.1:8080", True), ("[::1]:8080", True), ("localhost:8080", True),
    ("unix:/run/llm-proxy.sock", True), ("0.0.0.0:8080", False), ("[::]:8080", False),
    ("fd://3", False),
    ("10.0.0.5:8080", False), ("proxy.example.com:8080", False),
])
def test_open_mode_with_a_provider_key_starts_on_loopback_or_when_allowed(bind, local):
    from types import SimpleNamespace
    from proxy.gunicorn_conf import _check_auth
    quiet = SimpleNamespace(info=lambda *a: None, warning=lambda *a: None)
    server = SimpleNamespace(cfg=SimpleNamespace(bind=[bind]), log=quiet)
    provider = SimpleNamespace(name="anthropic", api_key_env="K")
    config = lambda allowed: SimpleNamespace(  # noqa: E731
        auth_mode="open", providers={"anthropic": provider}, open_on_network=allowed)
    if local:
        _check_auth(server, config(False))
    else:
        with pytest.raises(SystemExit):
            _check_auth(server, config(False))
    _check_auth(server, config(True))  # the operator said so


def test_a_lock_held_elsewhere_stalls_one_thread_not_the_worker(tmp_path):
    """Another process stopped while it held the lock: one thread of this worker waits
    for it, the next ones get a fault in bounded time, and keys are still read."""
    import fcntl
    import os
    import threading

    store = KeyStore(str(tmp_path / "keys.db"), busy_timeout_ms=200)
    store.add(key(rpm=5))
    fd = os.open(store.path + ".lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    waiting = threading.Thread(target=store.admit, args=("lk_1", "req_a", 0.0, "h", time.time()))
    try:
        waiting.start()
        time.sleep(0.05)  # it is inside, blocked on the flock
        started = time.monotonic()
        with pytest.raises(StoreFault) as fault:
            store.admit("lk_1", "req_b", 0.0, "h", time.time())
        assert fault.value.kind == "locked" and time.monotonic() - started < 1.0
        assert store.find("alice").rpm == 5 and store.version() >= 1  # reads go on
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        waiting.join(5)
    assert store.standing(store.find("lk_1"), time.time()).holds == 1  # it went through


def test_the_keys_files_are_readable_by_their_owner_only(tmp_path, monkeypatch):
    import os
    import stat

    monkeypatch.setattr(os, "umask", os.umask)  # restored whatever happens
    old = os.umask(0o022)
    try:
        store = KeyStore(str(tmp_path / "keys.db"))
        store.add(key())
        assert store.admit("lk_1", "req", 0.0, "h", time.time()) is not None
        names = ["keys.db", "keys.db-wal", "keys.db-shm", "keys.db.lock"]
        modes = {n: stat.S_IMODE(os.stat(tmp_path / n).st_mode) for n in names}
        store.close()
    finally:
        os.umask(old)
    assert modes == dict.fromkeys(names, 0o600)


def test_a_copy_of_the_keys_that_cannot_be_reloaded_is_refused_after_a_while(tmp_path,
                                                                            monkeypatch):
    """A revoked key must not keep working for as long as the keys cannot be read: once a
    reload has failed for STALE_COPY seconds, no lookup is served from the copy, not even
    between reloads."""
    store = CountingStore(str(tmp_path / "keys.db"))
    secret = new_secret()
    store.add(key(digest=key_digest(secret, SECRET)))
    book = KeyBook(store, lambda: SECRET, refresh=60)
    assert book.lookup(secret).name == "alice"

    def broken():
        raise StoreFault("io_error", "disk I/O error")

    monkeypatch.setattr(store, "version", broken)
    time.sleep(ledger_module.MISS_REFRESH)
    assert book.lookup(new_secret()) is None  # a miss reloads: it fails, the copy serves
    assert book.lookup(secret).name == "alice"  # ...a while
    monkeypatch.setattr(ledger_module, "STALE_COPY", 0.0)
    for _ in range(3):  # ...then nothing is served from it, on every lookup
        with pytest.raises(StoreFault):
            book.lookup(secret)
    monkeypatch.setattr(store, "version", lambda: KeyStore.version(store))  # readable again
    time.sleep(ledger_module.MISS_REFRESH)
    assert book.lookup(secret).name == "alice"  # failing, it reloads soon: served again


def test_a_copy_past_its_age_is_not_used_while_another_thread_reloads_it(tmp_path, monkeypatch):
    """Sixteen requests at once, a second after a revocation: the one that reloads must not
    let the others through on the old copy ("revoked within a second", for every one)."""
    import threading

    store = KeyStore(str(tmp_path / "keys.db"))
    secret = new_secret()
    store.add(key(digest=key_digest(secret, SECRET)))
    book = KeyBook(store, lambda: SECRET)
    assert book.lookup(secret).state(time.time()) == "active"
    store.revoke("lk_1", time.time())
    inside, release = threading.Event(), threading.Event()
    real = store.all_keys

    def slow_reload():
        inside.set()
        release.wait(5)
        return real()

    monkeypatch.setattr(store, "all_keys", slow_reload)
    time.sleep(ledger_module.MAX_AGE)  # the copy is past its age
    found = {}
    reloading = threading.Thread(target=lambda: found.setdefault("a", book.lookup(secret)))
    reloading.start()
    assert inside.wait(5)
    other = threading.Thread(target=lambda: found.setdefault("b", book.lookup(secret)))
    other.start()
    other.join(0.2)
    assert "b" not in found, "a lookup went on with a copy past its age"
    release.set()
    reloading.join(5)
    other.join(5)
    assert found["a"].state(time.time()) == found["b"].state(time.time()) == "revoked"
# ---- proposed additions to tests/test_keys_units.py (mutation pass) ----


def _held_elsewhere(url: str, key_id: str):
    """Another host's open transaction holding the key's row."""
    import psycopg

    other_host = psycopg.connect(url, autocommit=False)
    other_host.execute("SELECT 1 FROM client_keys WHERE id = %s FOR UPDATE", (key_id,))
    return other_host


def test_settlements_and_sweeps_take_the_keys_row_first(postgres):
    """Every transaction that changes a key's counters waits for its row (so admissions,
    which read spend then holds in separate statements, never see half a settlement)."""
    url = postgres.database()
    keys = PgKeyStore(url, busy_timeout_ms=300)
    keys.add(key(budget_usd=10.0))
    now = time.time()
    keys.admit("lk_1", "req_a", 1.0, "h", now)
    keys.admit("lk_1", "req_dead", 1.0, "dead", now - STALE_HOLDER - 1)
    other_host = _held_elsewhere(url, "lk_1")
    try:
        for attempt in (lambda: keys.settle("req_a", 0.5, 10, now), lambda: keys.sweep(now)):
            with pytest.raises(StoreFault) as fault:
                attempt()
            assert fault.value.kind == "locked"
    finally:
        other_host.rollback()
        other_host.close()
    assert keys.settle("req_a", 0.5, 10, now) is True and keys.sweep(now) == 1
    keys.close()


def test_a_key_waiting_for_its_lock_does_not_hold_up_the_workers_other_keys(postgres):
    url = postgres.database()
    keys = PgKeyStore(url, busy_timeout_ms=1500)
    for name in ("a", "b"):
        keys.add(key(id=f"lk_{name}", name=name, digest=f"d_{name}"))
    other_host = _held_elsewhere(url, "lk_a")
    waiting = threading.Thread(target=lambda: pytest.raises(
        StoreFault, keys.admit, "lk_a", "req_a", 0.0, "h", time.time()))
    try:
        waiting.start()
        wait_for_a_lock_wait(url)  # one pool connection now waits for lk_a's row
        started = time.monotonic()
        assert keys.admit("lk_b", "req_b", 0.0, "h", time.time())[1] is None
        assert time.monotonic() - started < 0.5
    finally:
        waiting.join(5)
        other_host.rollback()
        other_host.close()
    keys.close()


def _backend_pid(keys, results) -> None:
    results.put(keys._read("SELECT pg_backend_pid()", ())[0][0])
    keys.close()


def test_a_forked_worker_never_uses_its_parents_connections(postgres):
    keys = PgKeyStore(postgres.database())
    keys.add(key())  # the parent's pool is open
    parent = {pid for (pid,) in keys._read(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND "
        "application_name = 'llm-proxy'", ())}
    results = multiprocessing.get_context("fork").Queue()
    child = multiprocessing.get_context("fork").Process(target=_backend_pid, args=(keys, results))
    child.start()
    try:
        assert results.get(timeout=20) not in parent
    finally:
        child.join(10)
    assert keys._read("SELECT pg_backend_pid()", ())[0][0] in parent
    keys.close()


def test_keys_db_keeps_the_keys_in_sqlite_beside_a_postgres_usage_db(tmp_path):
    from proxy.config import load_config
    from proxy.keys.pgstore import open_key_store

    config = load_config(env={"LLM_PROXY_DB": "postgresql://u@db.example/llm",
                              "LLM_PROXY_KEYS_DB": str(tmp_path / "keys.db")})
    keys = open_key_store(config)
    assert type(keys) is KeyStore and keys.path == str(tmp_path / "keys.db")
    shared = open_key_store(load_config(env={"LLM_PROXY_DB": "postgres://u@db.example/llm"}))
    assert isinstance(shared, PgKeyStore) and shared.url == "postgres://u@db.example/llm"
