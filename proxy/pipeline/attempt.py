"""Try: send the request to each deployment the plan offers until one answers.

Shared by streaming and plain requests.  For each try it builds the deployment's request,
sends it under a fresh abort handle and deadline, and turns what came back into an
`Outcome` for the plan: retry here, move on, or give the client this answer.  What
"answered" means is the relay's business (`take`): for a stream it is the first content
event, so a stall or cut before content moves on too.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

from ..errors import (AllDeploymentsUnavailable, BadRequest, FirstTokenTimeout, NotTranslatable, ProxyError,
                      UpstreamBroken, UpstreamHTTPError, UpstreamTimeout)
from ..formats import Format
from ..formats.translate.bridge import Bridge, Bridges, foreign_error
from ..heartbeat import Exchange
from ..limits import parse_upstream_json
from ..routing import (Attempt, AttemptPlan, AttemptRecord, Decision, Router, attempt_log_json,
                       decide_status, retry_after_seconds)
from ..text import loggable
from ..upstream import UpstreamClient, UpstreamRequests, UpstreamResponse
from ..upstream.request import UpstreamRequest
from .finalize import RequestRecord
from .request import ProxyRequest

log = logging.getLogger("proxy.attempts")

ERROR_BODY_LIMIT = 1 << 20


@dataclass(frozen=True)
class TryDeps:
    """What the try stage needs: where requests go, how they are built, who decides."""

    upstream: UpstreamClient
    requests: UpstreamRequests
    bridges: Bridges
    router: Router
    plain_timeout: float  # read timeout of a JSON answer (a stream has only the idle timeout)


@dataclass
class ErrorReply:
    """An upstream's error answer, read whole so the plan could decide on it; `source` is
    the format it is written in (another than the client's when the try was bridged)."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    deployment: str
    source: Format

    @classmethod
    def read(cls, resp: UpstreamResponse, deployment: str, source: Format) -> "ErrorReply":
        body = resp.read_limited(ERROR_BODY_LIMIT)
        resp.close()
        # The body was decoded, so its framing headers no longer apply.
        headers = [(k, v) for k, v in resp.headers
                   if k.lower() not in ("content-length", "content-encoding")]
        return cls(resp.status, resp.reason, headers, body, deployment, source)

    def _parsed(self):
        try:
            return parse_upstream_json(self.body)
        except ValueError:  # not JSON, nested too deeply, too complex: no message to quote
            return None

    def message(self) -> str:
        return (self.source.upstream_error_message(self._parsed())
                or f"the upstream answered HTTP {self.status}")

    def as_error(self, client: Format) -> UpstreamHTTPError:
        """The same failure in the client's terms: one terminal event for a stream that has
        already committed, or the whole answer when the upstream spoke another format."""
        if self.source is not client:
            return foreign_error(client, self.status, self.message())
        return UpstreamHTTPError(self.status, self.message(), self.source.upstream_error_type(self._parsed()))

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name), None)


@dataclass(frozen=True)
class Outcome:
    """How a try ended, and so how the request ended (the loop returns the last one).

    answered: the deployment's answer was taken; with `error`, it broke after content
    reached the client (nothing can be retried, but its breaker hears about it).
    Otherwise `reply` is an upstream's error answer read whole, or `error` says why no
    answer came; `final` stops the loop (the client's own fault: no deployment is blamed).
    """

    answered: bool = False
    error: ProxyError | None = None
    reply: ErrorReply | None = None
    final: bool = False
    continuation: dict | None = None  # the answer broke mid-way: the request that continues it
    passed_over: bool = False  # the deployment cannot express the request: no try was made

    @classmethod
    def taken(cls, broke: ProxyError | None = None) -> "Outcome":
        return cls(answered=True, error=broke)

    @classmethod
    def failed(cls, err: ProxyError) -> "Outcome":
        return cls(error=err)

    @classmethod
    def continue_with(cls, broke: ProxyError, payload: dict) -> "Outcome":
        """The answer broke mid-way and may be continued: the client's request plus the
        answer so far (in the client's format; each try translates it for its deployment)."""
        return cls(error=broke, continuation=payload)

    def as_error(self, fmt: Format) -> ProxyError:
        """Why no answer came, as the proxy's error (a terminal event, after the commit)."""
        if self.reply is not None:
            return self.reply.as_error(fmt)
        return self.error or UpstreamBroken("no deployment answered")


# take(resp, attempt, bridge): relay the 2xx answer (through the try's bridge, if it crossed
# formats); Outcome.taken() once it is the client's answer, Outcome.failed(err) when it
# failed before anything reached the client.
Take = Callable[[UpstreamResponse, Attempt, "Bridge | None"], Outcome]


class TryLoop:
    """The tries of one request, in the plan's order."""

    def __init__(self, deps: TryDeps, preq: ProxyRequest, record: RequestRecord,
                 exchange: Exchange) -> None:
        self.deps, self.preq, self.record, self.exchange = deps, preq, record, exchange
        self.plan: AttemptPlan = deps.router.plan(preq.route)
        self.continuation: dict | None = None  # set once the answer broke mid-way
        self._new_break: AttemptRecord | None = None  # a break no continuation try has started on

    def run(self, take: Take) -> Outcome:
        last: Outcome | None = None  # the last try's, if one was made
        untranslatable: Outcome | None = None  # the 400 if no deployment can take the request
        while (attempt := self.plan.next_attempt()) is not None:
            if self.continuation is not None and not self.deps.requests.continues(attempt.deployment):
                self.plan.pass_over(attempt)  # it would restart the answer, not continue it
                continue
            if attempt.delay and self.exchange.ended.wait(attempt.delay) \
                    or self.exchange.end_error is not None:
                self.plan.abandoned(attempt, answered=False)  # a half-open breaker may probe again
                break
            try:
                outcome = self._try(attempt, take)
            except BaseException:
                self.plan.abandoned(attempt, answered=False)
                raise
            if outcome.answered or outcome.final:
                return self._done(outcome)
            if outcome.passed_over:
                untranslatable = outcome
                continue
            if outcome.continuation is not None:  # the try that broke is the last in the log
                self.continuation, self._new_break = outcome.continuation, self.plan.history[-1]
            last = outcome
        return self._done(self._exhausted(last or untranslatable))

    def _try(self, attempt: Attempt, take: Take) -> Outcome:
        bridge = self.deps.bridges.between(self.preq.fmt, attempt.deployment.provider)
        try:
            req = self._build(attempt, bridge)
        except NotTranslatable as err:  # no try is made; another deployment may take it
            self.plan.pass_over(attempt)
            return Outcome(error=err, passed_over=True)
        except BadRequest as err:  # the client's fault, whatever the deployment
            self.plan.abandoned(attempt, answered=False)
            return Outcome(error=err, final=True)
        if self._new_break is not None:  # the try that broke is continued now, not only asked to be
            self._new_break.continued = True
        self.record.try_started(attempt.deployment.name, bridge.upstream if bridge else self.preq.fmt,
                                continuation=self.continuation is not None,
                                new_break=self._new_break is not None)
        self._new_break = None
        try:
            resp = self._send(req)
        except ProxyError as err:
            if err.client_fault:
                self.plan.abandoned(attempt, answered=False)
                return Outcome(error=err, final=True)
            err = self._explain(err)
            self._failed(attempt, Decision.NEXT if _is_silence(err) else Decision.RETRY,
                         AttemptRecord(attempt.deployment.name, err.end_reason, error=err.message))
            return Outcome.failed(err)
        self.record.first_byte()
        if resp.status < 300:
            return self._take_answer(resp, attempt, bridge, take)
        if resp.status < 400:
            return self._broken(resp, attempt, UpstreamBroken(
                f"the upstream answered HTTP {resp.status} (a redirect) where an answer was expected"))
        return self._take_error_reply(resp, attempt, bridge.upstream if bridge else self.preq.fmt)

    def _send(self, req: UpstreamRequest) -> UpstreamResponse:
        """Send the try, with its own abort handle and first-token deadline."""
        # first_token_timeout watches streams only: a JSON answer says nothing until done.
        timeout = self.preq.route.first_token_timeout if self.preq.stream else None
        handle = self.exchange.new_attempt(time.monotonic() + timeout if timeout else None)
        preq = self.preq
        read_timeout = None if preq.stream else self.deps.plain_timeout
        return self.deps.upstream.send(preq.method, req.url, req.headers, req.body, handle,
                                       read_timeout)

    def _build(self, attempt: Attempt, bridge: Bridge | None) -> UpstreamRequest:
        """The try's request (raises the client's BadRequest, or NotTranslatable)."""
        preq, continuation = self.preq, self.continuation
        payload = continuation if continuation is not None else preq.payload
        return self.deps.requests.build(preq.request_id, preq.path, preq.headers, preq.body,
                                        payload, attempt.deployment, bridge,
                                        continuation=continuation is not None)

    def _take_answer(self, resp: UpstreamResponse, attempt: Attempt, bridge: Bridge | None,
                     take: Take) -> Outcome:
        """A 2xx: the relay takes it (a stream may still fail before its first content)."""
        unexpected = self._unexpected_body(resp)
        if unexpected is not None:
            return self._broken(resp, attempt, unexpected)
        self._note_progress(attempt)  # a stream may finish its record inside take()
        outcome = take(resp, attempt, bridge)
        if outcome.answered and outcome.error is None:
            if self.exchange.end_error is not None:
                self.plan.abandoned(attempt)  # client gone or shutdown: no verdict
            else:
                self.plan.succeeded(attempt)
            return outcome
        if outcome.answered:
            self.plan.answered_then_failed(attempt, outcome.error.message)
            return outcome
        failure = self._explain(outcome.error)
        if outcome.continuation is not None:  # broke mid-answer: the same or the next one goes on
            self._failed(attempt, Decision.RETRY, AttemptRecord(
                attempt.deployment.name, failure.end_reason, status=resp.status,
                error=failure.message))
            return outcome
        self._failed(attempt, Decision.NEXT, AttemptRecord(
            attempt.deployment.name, failure.end_reason, status=resp.status,
            error=failure.message, input_tokens=self.record.attempt_input_tokens()))
        return Outcome.failed(failure)

    def _broken(self, resp: UpstreamResponse, attempt: Attempt, err: ProxyError) -> Outcome:
        resp.close()
        self._failed(attempt, Decision.NEXT, AttemptRecord(
            attempt.deployment.name, err.end_reason, status=resp.status, error=err.message))
        return Outcome.failed(err)

    def _take_error_reply(self, resp: UpstreamResponse, attempt: Attempt, source: Format) -> Outcome:
        """A 4xx/5xx, read whole: retried, moved on, or given to the client (as it is, or
        in the client's terms when the upstream spoke another format)."""
        try:
            reply = ErrorReply.read(resp, attempt.deployment.name, source)
        except ProxyError as err:  # the error body itself broke off
            err = self._explain(err)
            self._failed(attempt, Decision.RETRY, AttemptRecord(
                attempt.deployment.name, err.end_reason, status=resp.status, error=err.message))
            return Outcome.failed(err)
        decision = decide_status(reply.status, reply.body)
        if decision is Decision.FAIL:  # fail fast: the client gets it as it is
            self.plan.client_error(attempt)
            return Outcome(reply=reply, final=True)
        self._failed(attempt, decision,
                     AttemptRecord(attempt.deployment.name, "status", status=reply.status,
                                   error=reply.message()),
                     retry_after=retry_after_seconds(reply.header))
        return Outcome(reply=reply)

    def _unexpected_body(self, resp: UpstreamResponse) -> ProxyError | None:
        """A 2xx that is not what the request asked for (a captive portal's HTML page, an
        event stream to a client that asked for JSON) is a broken upstream, not an answer
        to relay as a success."""
        if resp.is_json or (self.preq.stream and resp.is_event_stream):
            return None
        kind = loggable(resp.header("content-type") or "no Content-Type", 100)
        expected = "JSON or an event stream" if self.preq.stream else "JSON"
        return UpstreamBroken(f"the upstream answered HTTP {resp.status} with {kind} where "
                              f"{expected} was expected")

    def _failed(self, attempt: Attempt, decision: Decision, record: AttemptRecord,
                retry_after: float | None = None) -> None:
        if self.exchange.end_error is not None:  # cut off by the client or shutdown
            self.plan.abandoned(attempt, record)
            return
        what_next = self.plan.failed(attempt, decision, record, retry_after)
        self._note_counts()  # the row may be sealed from outside before the loop ends
        log.info("request %s: attempt %d on %s failed (%s%s); %s", self.preq.request_id,
                 attempt.number, attempt.deployment.name, record.outcome,
                 f" {record.status}" if record.status else "", what_next)

    def _note_progress(self, attempt: Attempt) -> None:
        """Before the relay takes an answer (a stream may queue its row while relaying)."""
        attempts, fallbacks = self.plan.progress(attempt)
        self.record.tries_so_far(attempts, fallbacks, attempt_log_json(self.plan))

    def _explain(self, err: ProxyError) -> ProxyError:
        """A try cut off by its deadline or by the client/shutdown says so, not 'broken'."""
        if self.exchange.end_error is not None:
            return self.exchange.end_error
        if self.exchange.deadline_hit:
            return FirstTokenTimeout(
                f"no content within {self.preq.route.first_token_timeout:g} s (first_token_timeout)")
        return err

    def _exhausted(self, last: Outcome | None) -> Outcome:
        if self.exchange.end_error is not None:
            return Outcome.failed(self.exchange.end_error)
        if last is not None:
            return last
        breakers = self.deps.router.breakers
        wait = min((breakers.get(name).seconds_until_probe() for name in self.plan.skipped_open),
                   default=0.0)
        return Outcome.failed(AllDeploymentsUnavailable(
            "every deployment for this model is failing (circuit open); retry later",
            retry_after=str(max(1, round(wait)))))

    def _done(self, outcome: Outcome) -> Outcome:
        """The plan's final counts go on the record (sealed already if a stream ended it)."""
        self._note_counts()
        return outcome

    def _note_counts(self) -> None:
        self.record.tries_so_far(max(1, self.plan.attempts), self.plan.fallbacks,
                                 attempt_log_json(self.plan))


def _is_silence(err: ProxyError) -> bool:
    """A deployment that never answers is not tried again: its timeout moves the request on."""
    return isinstance(err, (UpstreamTimeout, FirstTokenTimeout))
