"""The attempt loop: send the request to each deployment the plan offers until one answers.

Shared by streaming and plain requests.  For each try it builds the deployment's request
(its URL, credentials and body edits), sends it under a fresh abort handle and deadline,
and turns what came back into a decision for the plan: retry here, move on, or give the
client this answer.  What "answered" means is the caller's business (`use_response`): for
a stream it is the first content event, so a stall or cut before content moves on too.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

from .errors import (AllDeploymentsUnavailable, FirstTokenTimeout, ProxyError, UpstreamBroken,
                     UpstreamHTTPError, UpstreamTimeout)
from .routing import (Attempt, AttemptPlan, AttemptRecord, Decision, decide_status,
                      retry_after_seconds)
from .limits import parse_upstream_json
from .text import loggable
from .upstream import UpstreamResponse

log = logging.getLogger("proxy.attempts")

DEPLOYMENT_HEADER = "x-llm-proxy-deployment"
ERROR_BODY_LIMIT = 1 << 20


@dataclass
class ErrorReply:
    """An upstream's error answer, read whole so the plan could decide on it."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    deployment: str

    @classmethod
    def read(cls, resp: UpstreamResponse, deployment: str) -> "ErrorReply":
        body = resp.read_limited(ERROR_BODY_LIMIT)
        resp.close()
        # The body was decoded, so its framing headers no longer apply.
        headers = [(k, v) for k, v in resp.headers
                   if k.lower() not in ("content-length", "content-encoding")]
        return cls(resp.status, resp.reason, headers, body, deployment)

    def _parsed(self):
        try:
            return parse_upstream_json(self.body)
        except ValueError:  # not JSON, nested too deeply, too complex: no message to quote
            return None

    def message(self, fmt) -> str:
        return fmt.upstream_error_message(self._parsed()) or f"the upstream answered HTTP {self.status}"

    def as_error(self, fmt) -> UpstreamHTTPError:
        """The same failure as one terminal event, for a stream that has already committed."""
        parsed = self._parsed()
        kind = None
        if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
            kind = parsed["error"].get("type")
        return UpstreamHTTPError(self.status, self.message(fmt), kind if isinstance(kind, str) else None)


@dataclass
class Final:
    """How the attempt loop ended: answered, an upstream error answer, or a proxy error."""

    answered: bool = False
    reply: ErrorReply | None = None
    error: ProxyError | None = None


@dataclass
class _ClientAnswer:
    """An error answer the plan does not retry (a 4xx): it goes to the client as it is."""

    reply: ErrorReply


@dataclass
class _ClientFault:
    """The request cannot be sent as the client wrote it: a 4xx, and no deployment blamed."""

    error: ProxyError


@dataclass
class AnsweredThenFailed:
    """The deployment answered (content reached the client) and then broke: nothing can be
    retried, but its breaker hears about it."""

    error: ProxyError


# use_response(resp, attempt) -> None when the response was taken (the request is answered),
# or the error that made this try fail before anything reached the client.
UseResponse = Callable[[UpstreamResponse, Attempt], "ProxyError | AnsweredThenFailed | None"]


class AttemptRunner:
    def __init__(self, ctx, preq, acct, exchange) -> None:
        self.ctx, self.preq, self.acct, self.exchange = ctx, preq, acct, exchange
        self.plan: AttemptPlan = ctx.router.plan(preq.route)

    def run(self, use_response: UseResponse) -> Final:
        last: ErrorReply | ProxyError | None = None
        while (attempt := self.plan.next_attempt()) is not None:
            if attempt.delay and self.exchange.ended.wait(attempt.delay) \
                    or self.exchange.end_error is not None:
                self.plan.abandoned(attempt, answered=False)  # a half-open breaker may probe again
                break
            try:
                outcome = self._try(attempt, use_response)
            except BaseException:
                self.plan.abandoned(attempt, answered=False)
                raise
            if outcome is None:
                return self._finish(Final(answered=True))
            if isinstance(outcome, _ClientAnswer):
                return self._finish(Final(reply=outcome.reply))  # fail fast: the client gets it
            if isinstance(outcome, _ClientFault):
                return self._finish(Final(error=outcome.error))
            last = outcome
        return self._finish(self._exhausted(last))

    def _try(self, attempt: Attempt, use_response: UseResponse):
        """One upstream try: None when answered, else why not (see `run`)."""
        self.acct.begin_attempt(attempt.deployment.name)
        try:
            resp = self._send(attempt)
        except ProxyError as err:
            if err.client_fault:
                self.plan.abandoned(attempt, answered=False)
                return _ClientFault(err)
            err = self._explain(err)
            self._failed(attempt, Decision.NEXT if _is_silence(err) else Decision.RETRY,
                         AttemptRecord(attempt.deployment.name, err.end_reason, error=err.message))
            return err
        self.acct.first_byte()
        if resp.status < 300:
            return self._take_answer(resp, attempt, use_response)
        if resp.status < 400:
            return self._broken(resp, attempt, UpstreamBroken(
                f"the upstream answered HTTP {resp.status} (a redirect) where an answer was expected"))
        return self._take_error_reply(resp, attempt)

    def _send(self, attempt: Attempt) -> UpstreamResponse:
        """Send the try, with its own abort handle and first-token deadline."""
        # first_token_timeout watches streams only: a JSON answer says nothing until done.
        timeout = self.preq.route.first_token_timeout if self.preq.stream else None
        handle = self.exchange.new_attempt(time.monotonic() + timeout if timeout else None)
        url, headers, body = self.ctx.upstream_request(self.preq, attempt.deployment)
        read_timeout = None if self.preq.stream else self.ctx.config.plain_timeout
        return self.ctx.upstream.send(self.preq.method, url, headers, body, handle, read_timeout)

    def _take_answer(self, resp: UpstreamResponse, attempt: Attempt, use_response: UseResponse):
        """A 2xx: the caller relays it (a stream may still fail before its first content)."""
        unexpected = self._unexpected_body(resp)
        if unexpected is not None:
            return self._broken(resp, attempt, unexpected)
        self._note_progress(attempt)  # a stream may finish its record inside use_response
        failure = use_response(resp, attempt)
        if failure is None:
            if self.exchange.end_error is not None:
                self.plan.abandoned(attempt)  # client gone or shutdown: no verdict
            else:
                self.plan.succeeded(attempt)
            return None
        if isinstance(failure, AnsweredThenFailed):
            self.plan.answered_then_failed(attempt, failure.error.message)
            return None
        failure = self._explain(failure)
        self._failed(attempt, Decision.NEXT, AttemptRecord(
            attempt.deployment.name, failure.end_reason, status=resp.status,
            error=failure.message, input_tokens=self.acct.attempt_input_tokens()))
        return failure

    def _broken(self, resp: UpstreamResponse, attempt: Attempt, err: ProxyError) -> ProxyError:
        resp.close()
        self._failed(attempt, Decision.NEXT, AttemptRecord(
            attempt.deployment.name, err.end_reason, status=resp.status, error=err.message))
        return err

    def _take_error_reply(self, resp: UpstreamResponse, attempt: Attempt):
        """A 4xx/5xx, read whole: retried, moved on, or given to the client as it is."""
        try:
            reply = ErrorReply.read(resp, attempt.deployment.name)
        except ProxyError as err:  # the error body itself broke off
            err = self._explain(err)
            self._failed(attempt, Decision.RETRY, AttemptRecord(
                attempt.deployment.name, err.end_reason, status=resp.status, error=err.message))
            return err
        decision = decide_status(reply.status, reply.body)
        if decision is Decision.FAIL:
            self.plan.client_error(attempt)
            return _ClientAnswer(reply)
        self._failed(attempt, decision,
                     AttemptRecord(attempt.deployment.name, "status", status=reply.status,
                                   error=reply.message(self.preq.fmt)),
                     retry_after=retry_after_seconds(lambda name: _header(reply.headers, name)))
        return reply

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
        log.info("request %s: attempt %d on %s failed (%s%s); %s", self.preq.request_id,
                 attempt.number, attempt.deployment.name, record.outcome,
                 f" {record.status}" if record.status else "", what_next)

    def _note_progress(self, attempt: Attempt) -> None:
        rec = self.acct.record
        rec.attempts, rec.fallbacks = self.plan.progress(attempt)
        self.acct.set_attempt_log(self.plan)

    def _explain(self, err: ProxyError) -> ProxyError:
        """A try cut off by its deadline or by the client/shutdown says so, not 'broken'."""
        if self.exchange.end_error is not None:
            return self.exchange.end_error
        if self.exchange.deadline_hit:
            return FirstTokenTimeout(
                f"no content within {self.preq.route.first_token_timeout:g} s (first_token_timeout)")
        return err

    def _exhausted(self, last) -> Final:
        if self.exchange.end_error is not None:
            return Final(error=self.exchange.end_error)
        if isinstance(last, ErrorReply):
            return Final(reply=last)
        if isinstance(last, ProxyError):
            return Final(error=last)
        wait = min((self.ctx.router.breakers.get(name).seconds_until_probe()
                    for name in self.plan.skipped_open), default=0.0)
        return Final(error=AllDeploymentsUnavailable(
            "every deployment for this model is failing (circuit open); retry later",
            retry_after=str(max(1, round(wait)))))

    def _finish(self, final: Final) -> Final:
        rec = self.acct.record
        rec.attempts = max(1, self.plan.attempts)
        rec.fallbacks = self.plan.fallbacks
        if self.plan.answered_by is not None:
            rec.deployment = self.plan.answered_by.name
        self.acct.set_attempt_log(self.plan)
        return final


def _is_silence(err: ProxyError) -> bool:
    """A deployment that never answers is not tried again: its timeout moves the request on."""
    return isinstance(err, (UpstreamTimeout, FirstTokenTimeout))


def _header(headers: list[tuple[str, str]], name: str) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            return value
    return None
