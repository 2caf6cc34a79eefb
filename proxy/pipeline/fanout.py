"""Fan-out: one upstream call shared by every client of the same request (README: "Never
pay twice").

A `LiveCall` stands where a streamed request's locked writer stood: the stream thread
writes each event into it once, it keeps the events so far, and hands each to every
`Member` (a client) through that client's own bounded writer.  A member that joins later
gets the events so far, then the live ones; a member that falls `max_buffered` bytes behind
is ended with a terminal error instead of holding the others up.

The upstream call belongs to no client: its exchange (first-token deadline, shutdown, the
upstream socket) has no client socket, and each member has an exchange of its own (its
socket probed for a hang-up, its keepalives).  When the last member leaves, the upstream
is ended at once, or after `orphan_grace` seconds during which a retry can still join.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from ..dedup.answers import usage_of
from ..dedup.key import DedupKey
from ..errors import ClientGone, ClientTooSlow, ProxyError, UpstreamBroken
from ..heartbeat import Exchange, Heartbeat
from ..usage import EndReason
from ..writer import LockedWriter
from .commit import CommitRule, Phase
from .finalize import RequestRecord

log = logging.getLogger("proxy.fanout")


class Member:
    """One client of a shared call: its own writer (None for a client that waits for the
    whole answer as JSON), exchange and, for a joined request, its own usage record."""

    def __init__(self, request_id: str, record: RequestRecord | None, writer: LockedWriter | None,
                 client_socket, terminal: Callable[[ProxyError], bytes]) -> None:
        self.request_id, self.record, self.writer = request_id, record, writer
        self.terminal = terminal  # the client's terminal error event for a failure
        self.exchange = Exchange(client_socket, writer, on_end=self._ended)
        self.wake = threading.Event()  # the call decided its status, ended, or this client left
        self.done = threading.Event()  # the call ended, or this client left
        self.call: LiveCall | None = None

    def _ended(self, err: ProxyError) -> None:
        """This client hung up, fell behind, or the proxy is shutting down."""
        if self.call is not None:
            self.call.leave(self, err)


class LiveCall:
    """A streamed request's upstream call and the clients that share it (see module)."""

    def __init__(self, key: DedupKey, request_id: str, commit: CommitRule, source: RequestRecord,
                 upstream: Exchange, heartbeat: Heartbeat, orphan_grace: float,
                 history_limit: int, on_close: Callable[["LiveCall"], None],
                 terminal: Callable[[ProxyError], bytes]) -> None:
        self.key, self.request_id, self.commit, self.source = key, request_id, commit, source
        self.upstream, self.heartbeat, self.orphan_grace = upstream, heartbeat, orphan_grace
        self.history_limit = history_limit
        self._on_close = on_close
        self.terminal = terminal  # the stream's terminal error event, in the client's protocol
        self._lock = threading.Lock()
        self._members: list[Member] = []
        self._history: list[tuple[bytes, bool, bool]] | None = []  # (frame, has_id, last)
        self._history_bytes = 0
        self.hidden: list[bytes] = []
        self._closed = False
        self._ending = False  # the upstream is being ended for want of clients: no joins
        self._orphan_until: float | None = None  # every client left; a retry may join until
        self.final_frame: bytes | None = None
        self.bytes_out = 0
        self.joined = 0  # members that joined after the first
        commit.when_settled(self._wake_all)

    # -- the stream thread's writer ----------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    def write_event(self, frame: bytes, has_id: bool = False, last: bool = False) -> bool:
        """Keep the event and hand it to every member; False once the call is closed."""
        with self._lock:
            if self._closed:
                return False
            self._keep(frame, has_id, last)
            self.bytes_out += len(frame)
            members = [m for m in self._members if m.writer is not None]
        if len(members) == 1 and len(self._members) == 1:
            # Alone, a client holds the upstream back as an unshared stream's does (a
            # joiner's `add` does not wait for this: the lock is not held).
            members[0].writer.write_event(frame, has_id, last)
            return True
        for member in members:
            self._offer(member, frame, has_id, last)
        return True

    def close(self, final_frame: bytes | None = None) -> bool:
        """The call is over (its answer ended, failed, or it was ended from outside): every
        member gets the final frame, its row (a joined request), and the end."""
        with self._lock:
            if self._closed:
                return False
            self._closed = True
            self.final_frame = final_frame
            members = list(self._members)
        self._on_close(self)
        for member in members:
            self._finish(member)
        return True

    # -- members -----------------------------------------------------------------------
    def add(self, member: Member, orphans_only: bool = False) -> bool:
        """Join: the events so far, then the live ones.  False when the call can no longer
        be joined (closed, its events no longer all kept, or not orphaned when only an
        orphan may be joined); the request then makes its own call."""
        with self._lock:
            if self._closed or self._ending or self._history is None \
                    or (orphans_only and self._members):
                return False
            if member.writer is not None and self._history_bytes > member.writer.max_buffered:
                return False  # it would start out further behind than any client may fall
            self.joined += member.record is not None
            member.call = self
            self._members.append(member)
            if member.writer is not None:
                for frame, has_id, last in self._history:
                    member.writer.offer_event(frame, has_id, last)
            self._orphan_until = None  # a retry came back in time: no longer orphaned
            # Registered before close() can run (it unregisters every member it finds).
            self.heartbeat.register(member.exchange)
        if self.commit.phase is not Phase.WAITING:
            member.wake.set()
        return True

    @property
    def streamed(self) -> bool:
        """Did the answer go out as an event stream (not refused, not a JSON body)?"""
        phase, answer = self.commit.phase, self.commit.answer
        return phase is Phase.COMMITTED or (
            phase is Phase.ANSWERING and answer is not None and answer.response.is_event_stream)

    @property
    def shareable(self) -> bool:
        """May the answer still go to clients (not refused, not a JSON body read once)?"""
        phase, answer = self.commit.phase, self.commit.answer
        return phase is not Phase.REFUSED and not (
            phase is Phase.ANSWERING and answer is not None and not answer.response.is_event_stream)

    @property
    def orphaned(self) -> bool:
        with self._lock:
            return not self._members and not self._closed

    def leave(self, member: Member, err: ProxyError) -> None:
        """A member is gone (hung up, too slow, shutdown): its stream ends, its row says why,
        and the last one to leave ends the upstream call (now, or after the grace)."""
        # A shutdown ends the upstream itself (every exchange is ended in one pass).
        with self._lock:
            if member not in self._members:
                return
            self._members.remove(member)
            end_now = self._orphan_if_last(isinstance(err, (ClientGone, ClientTooSlow)))
        self.heartbeat.unregister(member.exchange)
        if member.writer is not None:
            member.writer.close(None if isinstance(err, ClientGone) else member.terminal(err))
        if member.record is not None and member.writer is not None:
            status = 499 if isinstance(err, ClientGone) else 200
            member.record.failed(status, err, member.writer.bytes_out)
        member.wake.set()
        member.done.set()
        if end_now:
            self.upstream.end(ClientGone("every client of this answer hung up"))
        elif self._members:
            log.info("request %s: its client left (%s); the shared upstream call goes on for "
                     "the others", member.request_id, err.end_reason)

    def _orphan_if_last(self, hung_up: bool) -> bool:
        """Under the lock, as a member leaves: True when the upstream must end now (the
        caller ends it, outside the lock; no one can join from here on).  With a grace, the
        call is orphaned until `orphan_until`, unless a retry joins first."""
        if self._members or self._closed or not hung_up or not self.shareable:
            return False
        if self.orphan_grace <= 0:
            self._ending = True
            return True
        self._orphan_until = time.monotonic() + self.orphan_grace
        self.upstream.end_at(self._orphan_until, self._orphan_expired)
        log.info("request %s: every client left; the upstream call goes on for %.1f s for a "
                 "retry to join", self.request_id, self.orphan_grace)
        return False

    def _orphan_expired(self) -> None:
        """The heartbeat, at the end of the grace: ends the upstream unless a retry joined
        (checked under the lock, so a join either comes first or is refused)."""
        with self._lock:
            if self._members or self._closed or self._orphan_until is None \
                    or time.monotonic() < self._orphan_until:
                return
            self._ending = True
        self.upstream.end(ClientGone("every client of this answer hung up, and no retry "
                                     "joined within the orphan grace"))

    # -- internals ---------------------------------------------------------------------
    def _keep(self, frame: bytes, has_id: bool, last: bool) -> None:
        if self._history is None:
            return
        self._history_bytes += len(frame)
        if self._history_bytes > self.history_limit:
            self._history = None  # too large to hand to a late joiner: no more joins
        else:
            self._history.append((frame, has_id, last))

    def _offer(self, member: Member, frame: bytes, has_id: bool, last: bool) -> None:
        if not member.writer.offer_event(frame, has_id, last) and not member.writer.closed:
            member.exchange.end(ClientTooSlow(
                "this client fell too far behind the stream it shares with other requests"))

    def drop(self, member: Member) -> None:
        """A member that will not take this call's answer after all (it was refused, or it
        is not a stream): gone without a word; its request answers for itself."""
        with self._lock:
            if member in self._members:
                self._members.remove(member)
            end_now = self._orphan_if_last(hung_up=True)
        self.heartbeat.unregister(member.exchange)
        if end_now:
            self.upstream.end(ClientGone("every client of this answer hung up"))

    def add_hidden(self, frame: bytes) -> None:
        """An event no client got that a JSON body of the answer needs (a usage chunk)."""
        with self._lock:
            if self._history is not None:
                self.hidden.append(frame)

    def _finish(self, member: Member) -> None:
        """The call ended: a joined member's row first (before its last byte), then its end.
        A refused call's members answer the refusal themselves."""
        self.heartbeat.unregister(member.exchange)
        final = self.final_frame
        if member.writer is not None:
            if self.streamed:
                if member.record is not None:
                    sent = member.writer.bytes_out + len(final or b"")
                    self.settle_joined(member.record, 200, sent, complete=final is None)
                member.writer.close(final)
            else:  # never answered as a stream: the member's own thread answers
                member.writer.close()
        member.wake.set()
        member.done.set()

    def settle_joined(self, record: RequestRecord, status: int, bytes_out: int,
                      complete: bool) -> None:
        """A joined request's row: the paying request's usage when the answer completed,
        else the way the shared call ended (its row's end, or why it was ended from
        outside: the paying row may be written just after its stream closed)."""
        row = self.source.row
        if self.source.ended:
            if complete and row.end_reason == EndReason.COMPLETE:
                record.deduped(EndReason.JOINED, self.request_id, usage_of(row), status, bytes_out)
            else:
                record.shared_failure(row, status, bytes_out)
            return
        err = self.upstream.end_error or UpstreamBroken(
            "the shared upstream call ended before its answer was complete")
        record.failed(status, err, bytes_out)

    def frames(self) -> list[bytes]:
        """The events the call has sent (for a client that waits for the whole answer)."""
        with self._lock:
            return [frame for frame, _, _ in self._history or ()]

    @property
    def complete(self) -> bool:
        """Did the call end with its answer complete?"""
        return self._closed and self.final_frame is None and self.source.ended \
            and self.source.row.end_reason == EndReason.COMPLETE

    def _wake_all(self) -> None:
        with self._lock:
            members = list(self._members)
        for member in members:
            member.wake.set()


class LiveCalls:
    """This worker's shared calls by shape (a shape is cheap; digests only on a match)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_shape: dict[str, list[LiveCall]] = {}

    def add(self, call: LiveCall) -> None:
        with self._lock:
            self._by_shape.setdefault(call.key.shape, []).append(call)

    def remove(self, call: LiveCall) -> None:
        with self._lock:
            calls = self._by_shape.get(call.key.shape, [])
            if call in calls:
                calls.remove(call)
            if not calls:
                self._by_shape.pop(call.key.shape, None)

    def matching(self, key: DedupKey) -> list[LiveCall]:
        """The live calls whose request is identical to `key`'s (a stream needs the same
        stream options)."""
        with self._lock:
            calls = list(self._by_shape.get(key.shape, ()))
        return [c for c in calls if (not key.stream or c.key.variant == key.variant)
                and c.key.digest() == key.digest()]

    def __len__(self) -> int:
        with self._lock:
            return sum(len(calls) for calls in self._by_shape.values())
