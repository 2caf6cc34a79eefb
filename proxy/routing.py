"""Model routes, retry policy and circuit breakers: which upstream to try next, and when.

A route maps a model name (or a glob pattern) to an ordered list of deployments.  Each
request gets an `AttemptPlan` that walks that list: transient failures are retried on the
same deployment with backoff (honouring Retry-After up to a cap), a deployment that never
answers is left at once, client errors fail fast, and a deployment whose breaker is open
is skipped.  Nothing here does I/O; the handler drives the plan.
"""

from __future__ import annotations

import functools
import email.utils
import enum
import fnmatch
import json
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import NoUsableDeployment

TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504, 529})
CONTEXT_LENGTH_MARKERS = ("context_length_exceeded", "context length", "context window",
                          "prompt is too long", "maximum context", "too many tokens")


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 2  # per deployment, first try included
    backoff_base: float = 0.5
    backoff_max: float = 8.0
    retry_after_max: float = 30.0  # a longer Retry-After moves on instead of waiting


@dataclass(frozen=True)
class DedupPolicy:
    """When a request may share an answer instead of paying for its own (README: "Never
    pay twice"): a finished answer for `replay_window` seconds after it ended; a live one
    when `join_live`; one whose clients all left for `orphan_grace` seconds."""

    replay_window: float = 10.0
    join_live: bool = False
    orphan_grace: float = 0.0

    @property
    def active(self) -> bool:
        return self.replay_window > 0 or self.join_live or self.orphan_grace > 0

    @property
    def shares_live(self) -> bool:
        """Does a live call of this route take joiners (always, or once orphaned)?"""
        return self.join_live or self.orphan_grace > 0


@dataclass(frozen=True)
class BreakerPolicy:
    failure_threshold: int = 5  # failures within `window` that open the breaker
    failure_ratio: float = 0.5  # ...or this share of failures
    min_requests: int = 10  # ...once at least this many attempts were seen in the window
    window: float = 60.0
    cooldown: float = 30.0  # open for this long, then one probe is let through


@dataclass(frozen=True)
class Deployment:
    """One concrete upstream for a model: provider, upstream model name, parameter edits."""

    name: str
    provider: str
    model: str | None  # None: keep the client's model name
    params: dict = field(default_factory=dict, hash=False, compare=False)
    drop: tuple[str, ...] = ()
    larger_context: bool = False
    continuation: bool | None = None  # None: as its provider says
    prefill_params: dict | None = field(default=None, hash=False, compare=False)

    def rewrite(self, payload: dict) -> dict:
        """The request body for this deployment: its model name, pinned and dropped params."""
        body = dict(payload)
        if self.model:
            body["model"] = self.model
        body.update(self.params)
        for key in self.drop:
            body.pop(key, None)
        return body

    @property
    def edits_body(self) -> bool:
        return bool(self.model or self.params or self.drop)


@dataclass(frozen=True)
class Route:
    pattern: str
    deployments: tuple[Deployment, ...]
    first_token_timeout: float | None = None
    retry: RetryPolicy = RetryPolicy()
    routed: bool = True  # False for the pass-through default: no breakers, no retries
    dedup: DedupPolicy | None = None  # None: the global [dedup] settings

    def matches(self, model: str) -> bool:
        return self.pattern == model or fnmatch.fnmatchcase(model, self.pattern)


class Decision(enum.Enum):
    RETRY = "retry"  # same deployment again, after a delay
    NEXT = "next"  # move to the next deployment
    LARGER_CONTEXT = "larger_context"  # move to the next deployment marked larger_context
    FAIL = "fail"  # the client gets this answer


def decide_status(status: int, body: bytes) -> Decision:
    """What a non-200 answer means for the request (before anything reached the client)."""
    if status in TRANSIENT_STATUSES:
        return Decision.RETRY
    if status == 400 and is_context_length_error(body):
        return Decision.LARGER_CONTEXT
    return Decision.FAIL


def is_context_length_error(body: bytes) -> bool:
    text = body[:8192].decode("utf-8", "replace").lower()
    return any(marker in text for marker in CONTEXT_LENGTH_MARKERS)


def retry_after_seconds(header: Callable[[str], str | None], now: float | None = None) -> float | None:
    """Retry-After as seconds: `retry-after-ms`, then `retry-after` (seconds or HTTP date)."""
    millis = header("retry-after-ms")
    if millis:
        try:
            return max(0.0, float(millis) / 1000.0)
        except ValueError:
            pass
    value = header("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def backoff_delay(retry_number: int, policy: RetryPolicy, rand: Callable[[], float] = random.random) -> float:
    """Exponential backoff with jitter, as the official SDKs do it (protocols.md section 6)."""
    base = min(policy.backoff_base * (2 ** retry_number), policy.backoff_max)
    return base * (1 - 0.25 * rand())


class CircuitBreaker:
    """closed -> open after too many failures -> half-open probe after the cool-down -> closed."""

    CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"

    def __init__(self, name: str, policy: BreakerPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.policy = policy
        self._clock = clock
        self._lock = threading.Lock()
        self._events: list[tuple[float, bool]] = []  # (time, failed)
        self.state = self.CLOSED
        self._opened_at = 0.0
        self._probe_in_flight = False

    PROBE = "probe"  # what allow() returns to the one try a half-open circuit lets through

    def allow(self) -> bool | str:
        """True in a closed circuit, PROBE for a half-open circuit's single probe (truthy
        too: its owner must hand it back, see abandon), False otherwise."""
        with self._lock:
            if self.state == self.CLOSED:
                return True
            if self.state == self.OPEN and self._clock() - self._opened_at >= self.policy.cooldown:
                self.state = self.HALF_OPEN
                self._probe_in_flight = False
            if self.state == self.HALF_OPEN and not self._probe_in_flight:
                self._probe_in_flight = True
                return self.PROBE
            return False

    def abandon(self) -> None:
        """The probe ended for reasons outside the deployment (client gone, shutdown): no
        verdict, but the half-open circuit may send its probe again (only the probe's owner
        calls this, or two probes could run at once)."""
        with self._lock:
            self._probe_in_flight = False

    def seconds_until_probe(self) -> float:
        with self._lock:
            if self.state != self.OPEN:
                return 0.0
            return max(0.0, self.policy.cooldown - (self._clock() - self._opened_at))

    def record_success(self) -> None:
        with self._lock:
            if self.state != self.CLOSED:
                self.state = self.CLOSED
                self._events.clear()
                self._probe_in_flight = False
            self._add(False)

    def record_failure(self, reason: str) -> None:
        with self._lock:
            if self.state == self.HALF_OPEN:
                self._open()
                return
            self._add(True)
            if self.state == self.CLOSED and self._should_open():
                self._open()

    def snapshot(self) -> dict:
        """State and counts only: failure texts quote upstreams (and so, perhaps, keys)."""
        with self._lock:
            self._trim()
            failures = sum(1 for _, failed in self._events if failed)
            return {"state": self.state, "recent_failures": failures,
                    "recent_attempts": len(self._events)}

    def _add(self, failed: bool) -> None:
        self._events.append((self._clock(), failed))
        self._trim()

    def _trim(self) -> None:
        horizon = self._clock() - self.policy.window
        while self._events and self._events[0][0] < horizon:
            self._events.pop(0)

    def _should_open(self) -> bool:
        failures = sum(1 for _, failed in self._events if failed)
        if failures >= self.policy.failure_threshold:
            return True
        total = len(self._events)
        return total >= self.policy.min_requests and failures / total >= self.policy.failure_ratio

    def _open(self) -> None:
        self.state = self.OPEN
        self._opened_at = self._clock()
        self._probe_in_flight = False


class Breakers:
    """One breaker per deployment name, per process (design.md section 8)."""

    def __init__(self, policy: BreakerPolicy) -> None:
        self.policy = policy
        self._lock = threading.Lock()
        self._by_name: dict[str, CircuitBreaker] = {}

    def get(self, name: str) -> CircuitBreaker:
        with self._lock:
            breaker = self._by_name.get(name)
            if breaker is None:
                breaker = self._by_name[name] = CircuitBreaker(name, self.policy)
            return breaker

    def snapshot(self) -> dict:
        with self._lock:
            breakers = list(self._by_name.values())
        return {b.name: b.snapshot() for b in breakers}


@dataclass
class Attempt:
    deployment: Deployment
    number: int  # 1-based, over the whole request
    retry_of_deployment: int  # 0 for the first try on this deployment
    delay: float = 0.0  # wait this long before sending
    hold_preamble: bool = False  # another option remains: keep preamble back for a silent switch
    probe: bool = False  # this try is its half-open circuit's single probe


@dataclass
class AttemptRecord:
    deployment: str
    outcome: str
    status: int | None = None
    error: str | None = None
    input_tokens: int | None = None
    continued: bool | None = None  # it broke mid-answer, and the answer was continued

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


class AttemptPlan:
    """Walks a route's deployments for one request; the handler reports each outcome."""

    def __init__(self, route: Route, breakers: Breakers | None, rand: Callable[[], float] = random.random) -> None:
        self.route = route
        self.breakers = breakers
        self._rand = rand
        self._index = 0
        self._tries_here = 0
        self._pending_delay = 0.0
        self._want_larger = False
        self.history: list[AttemptRecord] = []
        self.skipped_open: list[str] = []
        self.answered_by: Deployment | None = None

    @property
    def attempts(self) -> int:
        return len(self.history) + (1 if self.answered_by else 0)

    @property
    def fallbacks(self) -> int:
        names = [r.deployment for r in self.history]
        if self.answered_by:
            names.append(self.answered_by.name)
        return max(0, len(dict.fromkeys(names)) - 1)

    def next_attempt(self) -> Attempt | None:
        """The next try, or None when every option is used up."""
        while self._index < len(self.route.deployments):
            deployment = self.route.deployments[self._index]
            if self._want_larger and not deployment.larger_context:
                self._advance()
                continue
            allowed = self.breakers.get(deployment.name).allow() if self.breakers else True
            if not allowed:
                # Open (perhaps by this very request's failures): retries stop here too.
                self.skipped_open.append(deployment.name)
                self._advance()
                continue
            attempt = Attempt(deployment, len(self.history) + 1, self._tries_here,
                              delay=self._pending_delay, hold_preamble=self._has_more_options(),
                              probe=allowed == CircuitBreaker.PROBE)
            self._pending_delay = 0.0
            return attempt
        return None

    def succeeded(self, attempt: Attempt) -> None:
        self.answered_by = attempt.deployment
        if self.breakers is not None:
            self.breakers.get(attempt.deployment.name).record_success()

    def answered_then_failed(self, attempt: Attempt, reason: str) -> None:
        """Content went out, then the stream broke: the request is over, the deployment is suspect."""
        self.answered_by = attempt.deployment
        if self.breakers is not None:
            self.breakers.get(attempt.deployment.name).record_failure(reason)

    def abandoned(self, attempt: Attempt, record: AttemptRecord | None = None,
                  answered: bool = True) -> None:
        """The try was cut off by the client or a shutdown, or the request could not be sent
        as the client wrote it: nothing is known about the deployment, its breaker stays
        (a half-open one may send its probe again).  `record` keeps a try that failed on
        the way in the history; `answered` says whether the deployment had answered."""
        if record is not None:
            self.history.append(record)
        elif answered:
            self.answered_by = attempt.deployment
        if self.breakers is not None and attempt.probe:
            self.breakers.get(attempt.deployment.name).abandon()

    def pass_over(self, attempt: Attempt) -> None:
        """The request cannot go to this deployment as it now is (a continuation it would
        not continue): on to the next, with no verdict on the deployment."""
        if self.breakers is not None and attempt.probe:
            self.breakers.get(attempt.deployment.name).abandon()
        self._advance()

    def client_error(self, attempt: Attempt) -> None:
        """A 4xx the client gets: the deployment worked, the request did not."""
        self.answered_by = attempt.deployment
        if self.breakers is not None:
            self.breakers.get(attempt.deployment.name).record_success()

    def failed(self, attempt: Attempt, decision: Decision, record: AttemptRecord,
               retry_after: float | None = None) -> str:
        """Record a failed try and position the plan for the next one; says what comes next."""
        self.history.append(record)
        if self.breakers is not None:
            breaker = self.breakers.get(attempt.deployment.name)
            if decision is Decision.LARGER_CONTEXT:  # it answered; the prompt was too long
                breaker.record_success()
            else:
                breaker.record_failure(record.error or record.outcome)
        self._tries_here += 1
        policy = self.route.retry
        if decision is Decision.RETRY and self._tries_here < policy.max_attempts:
            if retry_after is not None and retry_after > policy.retry_after_max:
                self._advance()  # waiting that long helps nobody: try the next deployment
                return f"Retry-After {retry_after:g} s is over the cap; {self._what_next()}"
            self._pending_delay = retry_after if retry_after is not None else backoff_delay(
                self._tries_here - 1, policy, self._rand)
            return f"retrying in {self._pending_delay:.2f} s"
        if decision is Decision.LARGER_CONTEXT:
            self._want_larger = True
            self._advance()
            return self._what_next("next larger-context deployment")
        self._advance()
        return self._what_next()

    def progress(self, attempt: Attempt) -> tuple[int, int]:
        """(attempts, fallbacks) if `attempt` turns out to be the one that answers."""
        names = list(dict.fromkeys([r.deployment for r in self.history] + [attempt.deployment.name]))
        return len(self.history) + 1, len(names) - 1

    def _what_next(self, next_one: str = "next deployment") -> str:
        """For the attempt log line: is there anywhere left to go?"""
        if self._index < len(self.route.deployments):
            return next_one
        return "no deployment left"

    def _advance(self) -> None:
        self._index += 1
        self._tries_here = 0

    def _has_more_options(self) -> bool:
        if self._tries_here + 1 < self.route.retry.max_attempts:
            return True
        return self._index + 1 < len(self.route.deployments)


class Router:
    """Resolves a requested model to a route; unrouted models pass through unchanged."""

    def __init__(self, routes: list[Route], breakers: Breakers) -> None:
        self.routes = routes
        self.breakers = breakers

    def route_for(self, model: str | None, default_provider: str, provider_ok: Callable[[str], bool]) -> Route:
        for route in self.routes:
            if model is not None and route.matches(model):
                usable = tuple(d for d in route.deployments if provider_ok(d.provider))
                if not usable:
                    raise NoUsableDeployment(
                        f"model {model!r} is routed only to providers that do not speak this API")
                return Route(route.pattern, usable, route.first_token_timeout, route.retry,
                             dedup=route.dedup)
        return pass_through_route(default_provider)

    def plan(self, route: Route) -> AttemptPlan:
        return AttemptPlan(route, self.breakers if route.routed else None)


@functools.lru_cache(maxsize=64)
def pass_through_route(provider: str) -> Route:
    """Unrouted models: one try at the endpoint's provider; the client's SDK does the retrying.
    (Frozen, so one per provider serves every request.)"""
    return Route("*", (Deployment(provider, provider, None),), None, RetryPolicy(max_attempts=1),
                 routed=False)


def attempt_log_json(plan: AttemptPlan) -> str | None:
    if not plan.history and not plan.skipped_open:
        return None
    data: dict[str, Any] = {"failed": [r.as_dict() for r in plan.history]}
    if plan.skipped_open:
        data["skipped_open"] = plan.skipped_open
    return json.dumps(data, separators=(",", ":"))
