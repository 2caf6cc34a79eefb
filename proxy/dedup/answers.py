"""Finished answers kept for replay: what one is, this worker's LRU of them, and the
lookup in the usage store that the other workers of the host write theirs to.

Only a complete answer is ever kept (its protocol's own end, status 2xx), with the bytes
its client received (keys masked), the usage its paying request recorded and when it
expires.  A streamed answer is kept as its events (replayed byte for byte, or assembled
into the JSON body for a non-streaming duplicate); a JSON answer as its body.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..store import StoreFault, UsageStore
from ..text import loggable
from .key import DedupKey

log = logging.getLogger("proxy.dedup")

RETRY_AFTER_FAULT = 5.0  # seconds lookups skip a store that failed (a locked or lost file)
READ_BUSY_TIMEOUT_MS = 100  # a lookup waits this long at most for the database

# The paying row's fields a replayed or joined row copies (its tokens are kept for the
# report's "saved" sums; its cost becomes what was saved).
USAGE_FIELDS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens",
                "reasoning_tokens", "cost_usd", "priced", "usage_complete", "stop_reason",
                "upstream_model", "deployment")


@dataclass
class StoredAnswer:
    """One complete answer and what it cost the request that paid for it."""

    key: DedupKey
    stream: bool  # kept as events (else as a JSON body)
    fmt: str  # the client format's name (the events' protocol)
    content_type: str
    status: int
    body: bytes  # as the client received it (keys masked)
    paid_by: str
    hidden: bytes = b""  # a usage chunk the client did not ask for (for an assembled body)
    usage: dict = field(default_factory=dict)  # USAGE_FIELDS of the paying row
    ended_at: float = 0.0
    expires_at: float = 0.0

    @property
    def size(self) -> int:
        """Bytes it holds: the answer, and the request until its digest is computed."""
        return len(self.body) + len(self.hidden) + self.key.held_bytes + 512

    def serves(self, key: DedupKey, now: float) -> bool:
        """May this answer answer a request with `key` (same shape already)?  A stream
        needs a streamed answer with the same stream options; JSON takes either."""
        if now >= self.expires_at or key.shape != self.key.shape:
            return False
        if key.stream and (not self.stream or key.variant != self.key.variant):
            return False
        return key.digest() == self.key.digest()

    def to_row(self) -> dict:
        """The store's row (computes the digest: the writer thread calls this)."""
        return {"shape": self.key.shape, "digest": self.key.digest(), "stream": int(self.stream),
                "variant": self.key.variant, "fmt": self.fmt, "content_type": self.content_type,
                "status": self.status, "body": self.body, "hidden": self.hidden,
                "paid_by": self.paid_by, "usage": json.dumps(self.usage),
                "ended_at": self.ended_at, "expires_at": self.expires_at}

    @classmethod
    def from_row(cls, row: dict) -> "StoredAnswer":
        stream = bool(row["stream"])
        usage = json.loads(row["usage"] or "{}")
        return cls(DedupKey.known(row["shape"], row["digest"], stream, row["variant"] or ""),
                   stream, row["fmt"], row["content_type"], int(row["status"]),
                   bytes(row["body"] or b""), row["paid_by"], bytes(row["hidden"] or b""),
                   usage if isinstance(usage, dict) else {}, row["ended_at"], row["expires_at"])


class PendingAnswer:
    """An answer being relayed that will be kept if it completes: the frames as the
    client gets them (the list grows while it is relayed), up to `limit` bytes."""

    def __init__(self, key: DedupKey, fmt: str, window: float, limit: int,
                 mask: Callable[[bytes], bytes], stream: bool = True,
                 content_type: str = "text/event-stream; charset=utf-8") -> None:
        self.key, self.fmt, self.window, self.limit, self.mask = key, fmt, window, limit, mask
        self.stream, self.content_type = stream, content_type
        self.frames: list[bytes] | None = []
        self.hidden: list[bytes] = []
        self.status = 200
        self._size = 0

    def add(self, frame: bytes) -> None:
        """One more frame the client got; past the limit the answer is not kept."""
        if self.frames is not None:
            self._size += len(frame)
            if self._size > self.limit:
                self.frames = None
            else:
                self.frames.append(frame)

    def add_hidden(self, frame: bytes) -> None:
        """An event the client did not get but a JSON body of the answer needs (usage)."""
        if self.frames is not None:
            self.hidden.append(frame)

    def settle(self, row: Any) -> StoredAnswer | None:
        """The answer to keep, now that its request completed with `row`."""
        if self.frames is None:
            return None
        self.key.settle()
        ended, expires = expiry(self.window)
        return StoredAnswer(self.key, self.stream, self.fmt, self.content_type, self.status,
                            self.mask(b"".join(self.frames)), row.request_id,
                            self.mask(b"".join(self.hidden)), usage_of(row), ended, expires)


class AnswerCache:
    """This worker's finished answers, least recently used first out, within `max_bytes`;
    each is dropped when its window ends."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._entries: collections.OrderedDict[int, StoredAnswer] = collections.OrderedDict()
        self._by_shape: dict[str, list[int]] = {}
        self._sizes: dict[int, int] = {}
        self._bytes = 0
        self._next_id = 0

    def admits(self, size: int) -> bool:
        """Is an answer of `size` bytes small enough to keep (a quarter of the cache)?"""
        return size <= self.max_bytes // 4

    def put(self, answer: StoredAnswer) -> None:
        if not self.admits(answer.size):
            return
        size = answer.size  # counted as it is now (it shrinks once the digest is computed)
        with self._lock:
            self._next_id += 1
            self._entries[self._next_id] = answer
            self._sizes[self._next_id] = size
            self._by_shape.setdefault(answer.key.shape, []).append(self._next_id)
            self._bytes += size
            answer.key.on_shrink = lambda freed, entry_id=self._next_id: self._shrunk(entry_id, freed)
            while self._bytes > self.max_bytes and self._entries:
                self._drop(next(iter(self._entries)))

    def find(self, key: DedupKey, now: float) -> StoredAnswer | None:
        with self._lock:
            ids = list(self._by_shape.get(key.shape, ()))
            candidates = []
            for entry_id in reversed(ids):  # newest first
                answer = self._entries[entry_id]
                if now >= answer.expires_at:
                    self._drop(entry_id)
                    continue
                candidates.append((entry_id, answer))
        for entry_id, answer in candidates:  # digests outside the lock: they take a while
            if answer.serves(key, now):
                with self._lock:
                    if entry_id in self._entries:
                        self._entries.move_to_end(entry_id)
                return answer
        return None

    def _shrunk(self, entry_id: int, freed: int) -> None:
        """An answer's digest was computed: the request it held is counted no longer."""
        with self._lock:
            if entry_id in self._sizes:
                self._sizes[entry_id] -= freed
                self._bytes -= freed

    def _drop(self, entry_id: int) -> None:
        answer = self._entries.pop(entry_id)
        self._bytes -= self._sizes.pop(entry_id)
        ids = self._by_shape.get(answer.key.shape, [])
        if entry_id in ids:
            ids.remove(entry_id)
        if not ids:
            self._by_shape.pop(answer.key.shape, None)

    def stats(self) -> dict:
        """For /health: how many answers this worker keeps, and their bytes."""
        with self._lock:
            return {"kept_answers": len(self._entries), "kept_bytes": self._bytes,
                    "max_bytes": self.max_bytes}


class StoredAnswers:
    """Answers the other workers of this host kept, read from the usage store (one read
    connection per worker, one query at a time: a point lookup on an index)."""

    def __init__(self, open_reader: Callable[[], UsageStore]) -> None:
        self._open_reader = open_reader
        self._store: UsageStore | None = None
        self._lock = threading.Lock()
        self._warned = False
        self._resting_until = 0.0  # after a fault, lookups skip the store for a while

    def find(self, key: DedupKey, now: float) -> StoredAnswer | None:
        """A kept answer for `key`: candidates by shape (without their bodies), the digest
        compared, and only a match read whole."""
        for row in self._read(lambda store: store.find_answers(key.shape, now)) or ():
            if (key.stream and (not row["stream"] or (row["variant"] or "") != key.variant)) \
                    or row["digest"] != key.digest():
                continue
            whole = self._read(lambda store: store.answer(row["id"]))
            try:
                answer = StoredAnswer.from_row(whole) if whole else None
            except (KeyError, TypeError, ValueError):  # a row this version cannot read
                continue
            if answer is not None and answer.serves(key, now):
                return answer
        return None

    def _read(self, query: Callable[[UsageStore], Any]) -> Any:
        """One query on this worker's read connection; nothing while the store is faulty
        (it is retried after RETRY_AFTER_FAULT seconds, not by every request)."""
        with self._lock:
            if time.monotonic() < self._resting_until:
                return None
            try:
                if self._store is None:
                    self._store = self._open_reader()
                return query(self._store)
            except (StoreFault, ValueError) as exc:
                self._resting_until = time.monotonic() + RETRY_AFTER_FAULT
                if not self._warned:  # the store's own writer reports faults; once is enough
                    self._warned = True
                    log.warning("kept answers cannot be read from the usage store: %s",
                                loggable(exc, 300))
                if self._store is not None:
                    self._store.close()
                    self._store = None
                return None

    def close(self) -> None:
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None


def expiry(window: float, now: float | None = None) -> tuple[float, float]:
    """(ended_at, expires_at) of an answer that ends now."""
    ended = time.time() if now is None else now
    return ended, ended + window


def usage_of(row: Any) -> dict:
    """The paying row's usage, as a kept answer carries it."""
    return {name: getattr(row, name) for name in USAGE_FIELDS}
