"""Dedup: a request that repeats one already answered, or one still being answered, is
served without a second upstream call (README: "Never pay twice for the same answer").

Between admit and relay.  Admit gives each eligible request its `DedupTicket` (its key and
its route's policy; computing the key is cheap, see dedup/key.py); here the ticket is
checked against, in order:

1. finished answers kept for replay: this worker's LRU, then the usage store (what the
   other workers of the host kept): replayed as the stream it was, byte for byte, or to
   a non-streaming duplicate as the JSON body the upstream would have sent;
2. live streams of this worker (with `join_live`, or orphaned during `orphan_grace`): the
   request joins the call (pipeline/fanout.py) and gets its events so far, then the live
   ones, or, not streaming, the whole answer as JSON once it is complete.

Anything else is a miss: the request goes upstream, its stream may be joined (it becomes
a live call) and its answer kept.  Every row of a replayed or joined request names the
request that paid, costs nothing, and keeps the paid tokens for the report.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping

from ..dedup.answers import AnswerCache, PendingAnswer, StoredAnswer, StoredAnswers
from ..dedup.key import OPT_OUT_HEADER, DedupKey, opted_out, request_key
from ..errors import ClientGone, UpstreamBroken
from ..formats.assemble import NotAssembled, assemble_stream
from ..formats.base import compact_json
from ..routing import DedupPolicy, Route
from ..usage import EndReason
from ..writer import LockedWriter
from .commit import Phase
from .fanout import LiveCall, LiveCalls, Member
from .finalize import RequestRecord
from .replies import (SSE_CONTENT_TYPE, StartResponse, committed_stream_headers, error_response,
                      proxy_headers, reason_phrase, stream_headers)
from .request import ProxyRequest
from .relay import render_refusal

log = logging.getLogger("proxy.dedup")

DEDUP_HEADER = OPT_OUT_HEADER  # the response says what happened: miss, replay, joined, off
DEDUPED_ENDPOINTS = frozenset({"anthropic", "openai-chat", "openai-responses"})
# Request headers that change an answer (features, API version, whose account): part of the
# key, like the query string (`?beta=true`).
OUTPUT_HEADERS = ("anthropic-version", "anthropic-beta", "openai-beta", "openai-organization",
                  "openai-project")


@dataclass
class DedupTicket:
    """What dedup knows of one eligible request."""

    key: DedupKey
    policy: DedupPolicy
    pending: PendingAnswer | None  # the answer to keep if it completes (replay on)
    shares: bool  # its stream becomes a live call others may join
    history_limit: int  # bytes of events a live call keeps for late joiners
    verdict: str = "miss"


class DedupTickets:
    """Admit's part: is a request eligible, and its key (no lookups here)."""

    def __init__(self, default: DedupPolicy, cache_bytes: int, anonymous: bool) -> None:
        self.default = default
        self.answer_limit = cache_bytes // 4  # an answer larger than this is never kept
        self.anonymous = anonymous

    def ticket(self, endpoint: str, path: str, payload: dict, body: bytes, keeps_payload: bool,
               stream: bool, stream_options: Any, route: Route, key_ids: tuple[str, ...],
               headers: Mapping[str, str], mask: Callable[[bytes], bytes],
               fmt_name: str) -> DedupTicket | None:
        policy = route.dedup or self.default
        if endpoint not in DEDUPED_ENDPOINTS or not policy.active or opted_out(headers):
            return None
        if not key_ids and not self.anonymous:
            return None  # requests without a key are never shared unless configured
        key = request_key(scope_of(key_ids, path, headers), endpoint, payload, body, keeps_payload,
                          stream, stream_options)
        pending = PendingAnswer(key, fmt_name, policy.replay_window, self.answer_limit, mask,
                                stream) if policy.replay_window > 0 else None
        return DedupTicket(key, policy, pending, stream and policy.shares_live, self.answer_limit)


def scope_of(key_ids: tuple[str, ...], path: str, headers: Mapping[str, str]) -> str:
    """Whose request it is (every credential it carries: `x-api-key` and `Authorization`
    both, since either may be the one that counts) and what besides its body changes its
    answer."""
    told = [f"{name}={headers.get(name)}" for name in OUTPUT_HEADERS if headers.get(name)]
    return "\x1f".join([",".join(sorted(key_ids)) or "anonymous", path, *told])


@dataclass(frozen=True)
class DedupDeps:
    cache: AnswerCache  # this worker's finished answers
    stored: StoredAnswers  # every worker's, in the usage store
    calls: LiveCalls  # this worker's live calls
    keep: Callable[[StoredAnswer], None]  # queues an answer for the store


class Dedup:
    """The lookups, and the answers to a replayed or joined request."""

    def __init__(self, deps: DedupDeps) -> None:
        self.deps = deps

    def keep(self, answer: StoredAnswer | None) -> None:
        """A finished answer: kept here at once, and in the store for the other workers."""
        if answer is None:
            return
        self.deps.cache.put(answer)
        self.deps.keep(answer)

    def serve(self, preq: ProxyRequest, record: RequestRecord,
              start_response: StartResponse) -> Iterable[bytes] | None:
        """The answer to a duplicate, or None (a miss: the request goes upstream)."""
        ticket = preq.dedup
        if ticket is None:
            return None
        if ticket.pending is not None:
            record.keep_answer(ticket.pending, self.keep)
            now = time.time()
            answer = self.deps.cache.find(ticket.key, now) or self.deps.stored.find(ticket.key, now)
            if answer is not None:
                served = self._replay(preq, record, answer, start_response)
                if served is not None:
                    return served
        if ticket.policy.shares_live:
            for call in self.deps.calls.matching(ticket.key):
                served = self._join(preq, record, call, start_response)
                if served is not None:
                    return served
        return None

    # -- replay --------------------------------------------------------------------------
    def _replay(self, preq: ProxyRequest, record: RequestRecord, answer: StoredAnswer,
                start_response: StartResponse) -> list[bytes] | None:
        if preq.stream:
            body, content_type = answer.body, answer.content_type
            headers = stream_headers([("Content-Type", content_type)], preq.request_id,
                                     answer.usage.get("deployment"))
        else:
            try:
                body, content_type = json_body(answer)
            except NotAssembled:  # its text may quote the answer: not for the log
                log.info("request %s: a kept answer cannot be replayed as JSON; it goes upstream",
                         preq.request_id)
                return None
            headers = [("Content-Type", content_type)] + proxy_headers(
                preq.request_id, answer.usage.get("deployment"))
        preq.dedup.verdict = "replay"
        record.deduped(EndReason.REPLAY, answer.paid_by, answer.usage, answer.status, len(body))
        log.info("request %s: replayed the answer of %s", preq.request_id, answer.paid_by)
        start_response(f"{answer.status} {reason_phrase(answer.status)}",
                       headers + [("Content-Length", str(len(body)))])
        return [body]

    # -- joining a live call ------------------------------------------------------------------
    def _join(self, preq: ProxyRequest, record: RequestRecord, call: LiveCall,
              start_response: StartResponse) -> Iterable[bytes] | None:
        writer = LockedWriter(keepalive=preq.keepalive, redactor=preq.redactor) if preq.stream \
            else None
        # The call's own view: a terminal error goes on where the shared events stopped
        # (a Responses client's sequence numbers).
        member = Member(preq.request_id, record, writer, preq.client_socket, call.terminal)
        if not call.add(member, orphans_only=not preq.dedup.policy.join_live):
            return None
        preq.dedup.verdict = "joined"
        record.keep_answer(None, None)  # the request that paid keeps the answer
        log.info("request %s: joined the live call of %s", preq.request_id, call.request_id)
        if preq.stream:
            return self._joined_stream(preq, record, call, member, start_response)
        return self._joined_json(preq, record, call, member, start_response)

    def _joined_stream(self, preq: ProxyRequest, record: RequestRecord, call: LiveCall,
                       member: Member, start_response: StartResponse) -> Iterable[bytes] | None:
        member.wake.wait()  # the call's status is decided, or this client left
        if member.exchange.end_error is not None:
            return self._left(preq, record, member, start_response)
        phase = call.commit.phase
        if phase is Phase.REFUSED:
            call.drop(member)
            return render_refusal(preq, record, call.commit.refusal, start_response)
        answer = call.commit.answer
        if not call.streamed:  # a JSON body (read once), or closed undecided: ask for our own
            return self._on_its_own(preq, record, call, member)
        if phase is Phase.ANSWERING:
            upstream = [SSE_CONTENT_TYPE] if answer.translated else \
                preq.redactor.headers(answer.response.headers)
            headers = stream_headers(upstream, preq.request_id, answer.deployment)
        else:
            headers = committed_stream_headers(preq.request_id)
        start_response("200 OK", headers)
        return _member_frames(member)

    def _joined_json(self, preq: ProxyRequest, record: RequestRecord, call: LiveCall,
                     member: Member, start_response: StartResponse) -> list[bytes]:
        member.done.wait()  # the call ended, or this client left
        if member.exchange.end_error is not None:
            return self._left(preq, record, member, start_response)
        if call.commit.phase is Phase.REFUSED:
            return render_refusal(preq, record, call.commit.refusal, start_response)
        if not call.streamed:
            return self._on_its_own(preq, record, call, member)
        if call.complete:
            try:
                body = compact_json(assemble_stream(preq.fmt.name, with_hidden(
                    b"".join(call.frames()), b"".join(call.hidden))))
            except NotAssembled:  # its text may quote the answer: not for the log or the row
                err = UpstreamBroken("the shared answer could not be turned into a JSON body")
                record.failed(preq.fmt.status_of(err), err)
                return error_response(preq.fmt, err, preq.request_id, start_response, preq.redactor)
            body = preq.redactor.data(body)
            call.settle_joined(record, 200, len(body), complete=True)
            start_response("200 OK", [("Content-Type", "application/json"),
                                      ("Content-Length", str(len(body)))]
                           + proxy_headers(preq.request_id, call.source.row.deployment))
            return [body]
        err = UpstreamBroken(call.source.row.error or "the shared upstream call failed")
        body = error_response(preq.fmt, err, preq.request_id, start_response, preq.redactor)
        call.settle_joined(record, preq.fmt.status_of(err), len(body[0]), complete=False)
        return body

    def _on_its_own(self, preq: ProxyRequest, record: RequestRecord, call: LiveCall,
                    member: Member) -> None:
        """The call's answer cannot be shared (a JSON body is read once; a call closed
        before it decided): the request makes its own call after all."""
        call.drop(member)
        preq.dedup.verdict = "miss"
        record.keep_answer(preq.dedup.pending, self.keep)
        log.info("request %s: the live call of %s cannot be shared; it goes upstream itself",
                 preq.request_id, call.request_id)
        return None

    @staticmethod
    def _left(preq: ProxyRequest, record: RequestRecord, member: Member,
              start_response: StartResponse) -> list[bytes]:
        """The client hung up while it waited: recorded (once); the answer goes nowhere."""
        err = member.exchange.end_error
        record.failed(499 if isinstance(err, ClientGone) else preq.fmt.status_of(err), err)
        return error_response(preq.fmt, err, preq.request_id, start_response, preq.redactor)


def _member_frames(member: Member) -> Iterator[bytes]:
    """A joined client's body: one yield per frame; a client that stops reading leaves."""
    drained = False
    try:
        yield b""
        yield from member.writer.frames()
        drained = True
    finally:
        if not drained:
            member.exchange.end(ClientGone("the client went away while the stream was written"))


def json_body(answer: StoredAnswer) -> tuple[bytes, str]:
    """A kept answer as a non-streaming client gets it: (body, content type)."""
    if not answer.stream:
        return answer.body, answer.content_type
    return compact_json(assemble_stream(answer.fmt, with_hidden(answer.body, answer.hidden))), \
        "application/json"


def with_hidden(body: bytes, hidden: bytes) -> bytes:
    """The events with those kept from the client (a Chat usage chunk) put back where they
    came: before the closing `[DONE]`."""
    if not hidden:
        return body
    end = body.rfind(b"data: [DONE]")
    return body + hidden if end < 0 else body[:end] + hidden + body[end:]
