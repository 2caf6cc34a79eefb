"""Routing decisions, retry timing and the circuit breaker, without I/O (fake clock)."""

import email.utils
import json
import time

import pytest

from proxy.config import ConfigError, load_config
from proxy.routing import (AttemptPlan, AttemptRecord, BreakerPolicy, Breakers, CircuitBreaker,
                           Decision, Deployment, RetryPolicy, Route, Router, backoff_delay,
                           decide_status, pass_through_route, retry_after_seconds)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.mark.parametrize("status, body, decision", [
    (429, b"", Decision.RETRY), (408, b"", Decision.RETRY), (500, b"", Decision.RETRY),
    (502, b"", Decision.RETRY), (503, b"", Decision.RETRY), (529, b"", Decision.RETRY),
    (400, b'{"error":{"message":"prompt is too long: 210000 tokens > 200000 maximum"}}', Decision.LARGER_CONTEXT),
    (400, b'{"error":{"code":"context_length_exceeded"}}', Decision.LARGER_CONTEXT),
    (400, b'{"error":{"message":"Prompt is too long"}}', Decision.LARGER_CONTEXT),
    (400, b'{"error":{"message":"This model\'s maximum CONTEXT LENGTH is 8192 tokens"}}',
     Decision.LARGER_CONTEXT),
    (400, b'{"error":{"message":"bad"}}', Decision.FAIL),
    (400, b'{"error":{"code":"content_policy_violation"}}', Decision.FAIL),
    (401, b"", Decision.FAIL), (403, b"", Decision.FAIL), (404, b"", Decision.FAIL),
    (413, b"", Decision.FAIL), (422, b"", Decision.FAIL),
])
def test_each_upstream_status_gets_its_decision(status, body, decision):
    assert decide_status(status, body) is decision


def test_retry_after_is_read_in_milliseconds_seconds_and_http_date_forms():
    headers = {"retry-after-ms": "1500", "retry-after": "9"}
    assert retry_after_seconds(headers.get) == 1.5  # the precise one wins
    assert retry_after_seconds({"retry-after": "2.5"}.get) == 2.5
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 28 <= retry_after_seconds({"retry-after": date}.get) <= 31
    assert retry_after_seconds({}.get) is None
    assert retry_after_seconds({"retry-after": "soon"}.get) is None


def test_backoff_doubles_with_jitter_and_a_cap():
    policy = RetryPolicy(backoff_base=0.5, backoff_max=2.0)
    assert backoff_delay(0, policy, rand=lambda: 0.0) == 0.5
    assert backoff_delay(1, policy, rand=lambda: 0.0) == 1.0
    assert backoff_delay(5, policy, rand=lambda: 0.0) == 2.0
    assert backoff_delay(0, policy, rand=lambda: 1.0) == 0.375


def breaker(clock, **kw):
    return CircuitBreaker("d", BreakerPolicy(**{"failure_threshold": 3, "cooldown": 10, **kw}), clock)


def test_breaker_opens_after_threshold_then_half_open_probe_then_closes():
    clock = Clock()
    b = breaker(clock)
    for _ in range(3):
        assert b.allow()
        b.record_failure("503")
    assert b.state == "open" and not b.allow()
    clock.now += 9.9
    assert not b.allow()
    clock.now += 0.2
    assert b.allow() and b.state == "half_open"
    assert not b.allow()  # one probe at a time
    b.record_success()
    assert b.state == "closed" and b.allow()


def test_failed_probe_reopens():
    clock = Clock()
    b = breaker(clock)
    for _ in range(3):
        b.record_failure("x")
    clock.now += 11
    assert b.allow()
    b.record_failure("still down: key sk-secret-1234567890 was refused")
    assert b.state == "open" and not b.allow()
    snapshot = b.snapshot()
    assert snapshot == {"state": "open", "recent_failures": 3, "recent_attempts": 3}
    assert "sk-secret" not in json.dumps(snapshot)  # /health shows states and counts only


def test_an_abandoned_probe_lets_the_next_probe_through():
    """A client that hangs up during the half-open probe says nothing about the deployment:
    the circuit neither closes nor reopens, and the next request may probe."""
    clock = Clock()
    b = breaker(clock)
    for _ in range(3):
        b.record_failure("x")
    clock.now += 11
    assert b.allow() and not b.allow()
    b.abandon()
    assert b.state == "half_open" and b.allow()


def test_failures_outside_the_window_do_not_count():
    clock = Clock()
    b = breaker(clock, window=5)
    b.record_failure("a")
    b.record_failure("b")
    clock.now += 6
    b.record_failure("c")
    assert b.state == "closed"


def test_failure_ratio_opens_with_enough_requests():
    clock = Clock()
    b = breaker(clock, failure_threshold=100, failure_ratio=0.5, min_requests=4)
    b.record_success()
    b.record_failure("x")
    b.record_success()
    assert b.state == "closed"
    b.record_failure("y")
    assert b.state == "open"


def route(*names, attempts=2, larger=()):
    deps = tuple(Deployment(n, n, f"m-{n}", larger_context=n in larger) for n in names)
    return Route("m*", deps, None, RetryPolicy(max_attempts=attempts, backoff_base=0.1))


def fail(plan, attempt, decision, retry_after=None):
    plan.failed(attempt, decision, AttemptRecord(attempt.deployment.name, "x"), retry_after)


def test_plan_retries_then_falls_back():
    plan = AttemptPlan(route("a", "b"), None, rand=lambda: 0.0)
    first = plan.next_attempt()
    assert first.deployment.name == "a" and first.delay == 0 and first.hold_preamble
    fail(plan, first, Decision.RETRY)
    second = plan.next_attempt()
    assert second.deployment.name == "a" and second.delay == pytest.approx(0.1)
    fail(plan, second, Decision.RETRY)
    third = plan.next_attempt()
    assert third.deployment.name == "b" and third.hold_preamble  # b can still be retried
    fail(plan, third, Decision.RETRY)
    last = plan.next_attempt()
    assert last.deployment.name == "b" and not last.hold_preamble  # nothing left after it
    fail(plan, last, Decision.RETRY)
    assert plan.next_attempt() is None
    assert plan.attempts == 4


def test_silence_is_not_retried_on_the_same_deployment():
    plan = AttemptPlan(route("a", "b"), None)
    fail(plan, plan.next_attempt(), Decision.NEXT)
    assert plan.next_attempt().deployment.name == "b"


def test_retry_after_is_honoured_up_to_the_cap():
    plan = AttemptPlan(route("a", "b"), None)
    fail(plan, plan.next_attempt(), Decision.RETRY, retry_after=1.5)
    assert plan.next_attempt().delay == 1.5
    plan = AttemptPlan(Route("m", route("a", "b").deployments, None,
                             RetryPolicy(max_attempts=2, retry_after_max=1.0)), None)
    fail(plan, plan.next_attempt(), Decision.RETRY, retry_after=60)
    nxt = plan.next_attempt()
    assert nxt.deployment.name == "b" and nxt.delay == 0  # no waiting a minute


def test_a_retry_after_longer_than_the_backoff_cap_but_within_its_own_cap_is_waited():
    """Two caps, two meanings: `backoff_max` bounds the proxy's own backoff, while an
    upstream's Retry-After is honoured up to `retry_after_max`."""
    policy = RetryPolicy(max_attempts=2, backoff_max=1.0, retry_after_max=30.0)
    plan = AttemptPlan(Route("m", route("a", "b").deployments, None, policy), None)
    first = plan.next_attempt()
    what_next = plan.failed(first, Decision.RETRY, AttemptRecord("a", "status"), 10.0)
    again = plan.next_attempt()
    assert (again.deployment.name, again.delay) == ("a", 10.0), what_next
    assert what_next == "retrying in 10.00 s"


def test_the_attempt_log_says_when_no_deployment_is_left():
    plan = AttemptPlan(route("a", "b", attempts=1), None)
    assert plan.failed(plan.next_attempt(), Decision.NEXT, AttemptRecord("a", "x")) == "next deployment"
    assert plan.failed(plan.next_attempt(), Decision.NEXT, AttemptRecord("b", "x")) == "no deployment left"
    assert plan.next_attempt() is None


def test_context_length_goes_to_the_larger_context_deployment():
    plan = AttemptPlan(route("a", "b", "big", larger=("big",)), None)
    fail(plan, plan.next_attempt(), Decision.LARGER_CONTEXT)
    assert plan.next_attempt().deployment.name == "big"


def test_open_breakers_are_skipped_and_reported():
    breakers = Breakers(BreakerPolicy(failure_threshold=1, cooldown=60))
    breakers.get("a").record_failure("down")
    plan = AttemptPlan(route("a", "b"), breakers)
    assert plan.next_attempt().deployment.name == "b"
    assert plan.skipped_open == ["a"]


def test_fallbacks_count_distinct_deployments():
    plan = AttemptPlan(route("a", "b"), None)
    fail(plan, plan.next_attempt(), Decision.RETRY)
    fail(plan, plan.next_attempt(), Decision.RETRY)
    plan.succeeded(plan.next_attempt())
    assert (plan.attempts, plan.fallbacks, plan.answered_by.name) == (3, 1, "b")


def test_deployment_rewrites_the_body():
    dep = Deployment("d", "p", "upstream-model", {"temperature": 1.0}, ("top_k", "tools"))
    body = dep.rewrite({"model": "alias", "temperature": 0.2, "top_k": 5, "tools": [], "x": 1})
    assert body == {"model": "upstream-model", "temperature": 1.0, "x": 1}


def test_a_model_matching_a_pattern_gets_its_route_and_another_passes_through():
    router = Router([route("a")], Breakers(BreakerPolicy()))
    assert router.route_for("m-large", "anthropic", lambda p: True).deployments[0].name == "a"
    unrouted = router.route_for("other", "anthropic", lambda p: True)
    assert unrouted == pass_through_route("anthropic") and not unrouted.routed
    assert router.plan(unrouted).breakers is None


def write(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return str(path)


def test_routes_are_read_from_the_config_file(tmp_path):
    config = load_config(write(tmp_path, '''
[providers.backup]
base_url = "http://127.0.0.1:9"
format = "anthropic"
[routes."claude-*"]
first_token_timeout = 5
max_attempts = 3
deployments = [
  { provider = "anthropic", model = "claude-sonnet-4-5" },
  { provider = "backup", model = "claude-sonnet-4-5", params = { temperature = 1.0 }, drop = ["top_k"] },
]
'''), env={})
    (r,) = config.routes
    assert [d.name for d in r.deployments] == ["anthropic/claude-sonnet-4-5", "backup/claude-sonnet-4-5"]
    assert r.first_token_timeout == 5.0 and r.retry.max_attempts == 3
    assert r.deployments[1].params == {"temperature": 1.0} and r.deployments[1].drop == ("top_k",)


@pytest.mark.parametrize("text, needle", [
    ('[routes."x"]\ndeployments = []\n', "non-empty list"),
    ('[routes."x"]\ndeployments = [{ provider = "nope" }]\n', "must name a configured provider"),
    ('[routes."x"]\ndeployments = [{ provider = "anthropic", bogus = 1 }]\n', "unknown key"),
    ('[routes."x"]\nfirst_token_timeout = 0\ndeployments = [{ provider = "anthropic" }]\n', "first_token_timeout"),
    ('[routes."x"]\ndeployments = [{ provider = "anthropic" }, { provider = "anthropic" }]\n', "unique"),
    ('[breaker]\nfailure_ratio = 2.0\n', "breaker.failure_ratio"),
])
def test_bad_routes_are_named(tmp_path, text, needle):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), env={})
    assert needle in info.value.message


def _route_to(name: str, *more: str) -> Route:
    deployments = tuple(Deployment(n, "p", None, larger_context=n != name) for n in (name, *more))
    return Route("m", deployments, retry=RetryPolicy(max_attempts=1))


def test_only_the_probe_gives_the_probe_back():
    """A try that began while the circuit was closed, abandoned after it went half-open,
    must not free the probe another request holds: two probes would run at once."""
    clock = Clock()
    breakers = Breakers(BreakerPolicy(failure_threshold=1, cooldown=10))
    breakers.get("d")._clock = clock
    early = AttemptPlan(_route_to("d"), breakers)
    early_try = early.next_attempt()
    assert early_try is not None and not early_try.probe
    breakers.get("d").record_failure("down")  # opens
    clock.now += 11
    prober = AttemptPlan(_route_to("d"), breakers)
    probe = prober.next_attempt()
    assert probe is not None and probe.probe
    early.abandoned(early_try, answered=False)
    assert AttemptPlan(_route_to("d"), breakers).next_attempt() is None  # still one probe
    prober.abandoned(probe, answered=False)
    assert AttemptPlan(_route_to("d"), breakers).next_attempt().probe  # given back


def test_a_probe_answered_with_prompt_too_long_closes_the_circuit():
    """The deployment answered (the prompt was too long for it): that is a sign of health,
    and the probe must not stay in flight for ever."""
    clock = Clock()
    breakers = Breakers(BreakerPolicy(failure_threshold=1, cooldown=10))
    breakers.get("d")._clock = clock
    breakers.get("d").record_failure("down")
    clock.now += 11
    plan = AttemptPlan(_route_to("d", "big"), breakers)
    probe = plan.next_attempt()
    assert probe.probe
    plan.failed(probe, Decision.LARGER_CONTEXT, AttemptRecord("d", "status", status=400))
    assert breakers.get("d").state == "closed"


def test_passing_over_a_half_open_deployment_gives_its_probe_back():
    clock = Clock()
    breakers = Breakers(BreakerPolicy(failure_threshold=1, cooldown=10, min_requests=1))
    breaker = breakers.get("a")
    breaker._clock = clock
    breaker.record_failure("x")
    clock.now += 11
    route = Route("m*", (Deployment("a", "a", "m-a"),), None, RetryPolicy(max_attempts=1))
    plan = AttemptPlan(route, breakers)
    attempt = plan.next_attempt()
    assert attempt is not None and attempt.probe
    plan.pass_over(attempt)
    assert plan.next_attempt() is None  # on to the next deployment: there is none
    assert breaker.allow()  # another request may probe
