"""Client keys piece by piece: the rules (`keys/policy.py`), the shared ledger in a real
SQLite file (`keys/store.py`, including admissions from several processes at once), a
worker's copy of the keys and its settlements (`keys/ledger.py`), and the gate's pure
parts (worst-case cost, model lists, settling a hold, who counts as loopback)."""

from __future__ import annotations

import calendar
import json
import multiprocessing
import time

import pytest

from proxy.admin.app import from_loopback
from proxy.errors import BudgetExhausted, Forbidden, RateLimited
from proxy.keys import ledger as ledger_module
from proxy.keys.ledger import KeyBook, Ledger
from proxy.keys.policy import (ClientKey, Standing, hint_of, input_estimate, key_digest,
                               new_secret, parse_models, period_end, period_start, refusal,
                               seconds_until_below, worst_case_cost)
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
    assert worst_case_cost(1000, 100, [dear], calls=3) == pytest.approx((3 * 3750 + 1500) / 1e6)
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


@pytest.fixture
def store(tmp_path):
    keys = KeyStore(str(tmp_path / "keys.db"))
    yield keys
    keys.close()


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
    store.admit("lk_1", "req_dead", 0.0, "dead", now - STALE_HOLDER - 1)
    assert isinstance(store.admit("lk_1", "req_new", 0.0, "alive", now)[1], RateLimited)
    assert store.sweep(now) == 1
    assert store.admit("lk_1", "req_new", 0.0, "alive", now)[1] is None
    assert store.sweep(now) == 0  # the live holder's reservation stays


def _admit_many(path: str, worker: int, tries: int, results) -> None:
    keys = KeyStore(path)
    admitted = sum(keys.admit("lk_1", f"req_{worker}_{i}", 1.0, f"w{worker}", time.time())[1]
                   is None for i in range(tries))
    results.put(admitted)


def test_processes_admitting_at_once_never_overshoot(tmp_path):
    """Eight processes, 40 admissions each, against a budget of 100 single dollars."""
    path = str(tmp_path / "keys.db")
    keys = KeyStore(path)
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
    assert KeyStore(path).standing(key(budget_usd=100.0, period="total"), time.time()).holds == 100


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
    assert gate._worst_case(budget, _request(body), {"max_tokens": 500}) == pytest.approx(
        (100 * 1.0 + 500 * 10.0) / 1e6)
    assert gate._worst_case(budget, _request(body), {"max_tokens": 10**9}) == pytest.approx(
        (100 + 1000 * 10.0) / 1e6)  # capped
    assert gate._worst_case(budget, _request(body), {}) == pytest.approx((100 + 10000) / 1e6)
    assert gate._worst_case(budget, _request(body, stitch=object()), {"max_tokens": 500}) \
        == pytest.approx((3 * 100 + 5000) / 1e6)
    with pytest.raises(Forbidden, match="no price"):
        gate._worst_case(budget, _request(body, ("m-dear", "m-unknown")), {})


def test_a_hold_settles_the_real_cost_or_the_reservation_when_unpriced():
    settled = []

    class Recorder:
        def settle(self, *args):
            settled.append(args)

    hold = Hold(Recorder(), "req", 0.75)
    hold.settle(UsageRecord(input_tokens=10, output_tokens=5, cache_read_tokens=2,
                            cost_usd=0.01, priced=True))
    hold.settle(UsageRecord(input_tokens=10, output_tokens=5))  # used tokens, no known price
    hold.settle(UsageRecord())  # refused upstream: nothing used
    hold.settle(UsageRecord(input_tokens=10, output_tokens=5, cost_usd=0.0, priced=True,
                            paid_by="req_first"))  # a replay: another request paid
    assert settled == [("req", 0.01, 17), ("req", 0.75, 15), ("req", 0.0, 0), ("req", 0.0, 0)]


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
    ({"REMOTE_ADDR": "::ffff:127.0.0.5"}, True), ({"REMOTE_ADDR": ""}, True),
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
