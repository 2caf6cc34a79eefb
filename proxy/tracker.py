"""The usage tracker: request threads enqueue rows, one writer thread hands them to the store.

Design (design.md §5).  Request threads must never wait on a disk or a lock held by another
process, so ``record`` only appends a row to a bounded in-memory queue.  One thread per
process owns the store (``proxy.store``: the database, its connections and its schema): it
takes up to ``batch_size`` rows (waiting at most ``flush_interval`` for more after the
first) and has the store commit each batch in one transaction.

The store may fail at any time (disk full, read-only, locked, deleted directory), and the
proxy must keep serving while it does.  So nothing here ever raises into a request, and a
row is only ever lost when every bound is exhausted, and then it is counted and logged:

- while the database refuses writes, the writer holds its batch and retries it with backoff
  (it is the probe that tells when the fault has cleared); new rows wait in memory;
- when the fault has lasted ``spill_after`` seconds, or the queue is nearly full, queued rows
  move to the spill directory (``spill_dir``, ideally on another filesystem) as JSON lines;
- when a batch commits again, the spill files are replayed, deduplicated on the request id,
  so a replay cut short (or a row spilled by ``close`` while a stuck writer also committed
  it) never stores a row twice;
- a row the database will never take (a bug: text is made storable before it gets here) is
  stored alone, so it cannot take other clients' rows down with it, and if it still fails
  it is moved aside to ``rejected.jsonl`` with a log line instead of being retried forever;
- ``close`` drains the queue before the worker exits; what it cannot store goes to the spill.

The store tells the two failures apart (StoreFault: the database, for now; RowRejected: the
row, for ever), so this module knows nothing of SQLite.  Several processes (gunicorn workers)
share one database and one spill directory; spill files are guarded by ``flock``.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import secrets
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Mapping

from .store import RowRejected, StoreFault, open_store
from .store import default_spill_dir as store_spill_dir
from .store.postgres import redacted_url
from .text import loggable, storable
from .unwritten import UnwrittenCount, report_dead
from .unwritten import directory_for as unwritten_directory
from .usage import DEFAULT_TEXT_LIMIT, RECORD_FIELDS, TEXT_LIMITS, UsageRecord

try:  # POSIX only; elsewhere spill files are guarded within one process.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

log = logging.getLogger(__name__)

_DEFAULT_ROW = UsageRecord().to_row()
_INT_MIN, _INT_MAX = -(2 ** 63), 2 ** 63 - 1  # 64-bit: SQLite INTEGER, PostgreSQL BIGINT
_IDLE_POLL = 1.0  # seconds an idle writer sleeps before looking at the spill directory again
SPILL_CHECK_INTERVAL = 5.0  # other workers may have spilled: look this often when healthy
# A claimed spill file untouched this long is replayed again even if a process with its
# claimer's pid is alive (the pid may have been reused after a crash).
STALE_CLAIM = 15 * 60
REPLAY_CHUNK = 500  # spilled rows inserted per transaction
MAX_BACKOFF = 2.0
ANSWER_QUEUE_BYTES = 64 * 1024 * 1024  # answers waiting for the store; the oldest go first
PRUNE_BATCH = 1000  # old rows deleted per transaction (retention)
PRUNE_PAUSE = 0.2  # seconds between two batches while there are more
PRUNE_EVERY = 60.0  # seconds between looks for old rows once there are none


# ---------------------------------------------------------------------------------------------
# Rows.


def _storable(name: str, value: Any) -> Any:
    """A value every store and JSON take, whatever the record held."""
    if value is None or isinstance(value, float):
        return value
    if isinstance(value, int):  # bool included: stored as 0/1
        return int(value) if _INT_MIN <= value <= _INT_MAX else None
    text = value if isinstance(value, str) else str(value)
    return storable(text, TEXT_LIMITS.get(name, DEFAULT_TEXT_LIMIT))


def to_storage_row(rec: UsageRecord | Mapping[str, Any]) -> dict:
    """A complete row that can always be stored, from a record (or a spilled dict).

    Missing fields are defaulted; text is made storable and capped (text.storable), numbers
    out of a 64-bit integer's range are dropped.  Raises only if `rec` is not a record or a
    mapping."""
    row = rec.to_row() if isinstance(rec, UsageRecord) else dict(rec)
    return {name: _storable(name, row.get(name, _DEFAULT_ROW[name])) for name in RECORD_FIELDS}


def _describe(rec: Any) -> str:
    """A record for the log, whatever it is (its own repr may fail too)."""
    try:
        return loggable(repr(rec), 2000)
    except Exception:
        return object.__repr__(rec)


def _spill_line(row: dict) -> str:
    return json.dumps(row, ensure_ascii=True, default=str) + "\n"


# ---------------------------------------------------------------------------------------------
# The spill directory.


class SpillDir:
    """JSON lines for rows the database could not take (yet), in their own directory.

    ``spill.jsonl`` is appended to under an exclusive ``flock``.  A replay first claims the
    file by renaming it (under the same lock) to ``replay-<pid>-<nonce>.jsonl``, then inserts
    from the claimed file without holding any lock, so appenders never wait for a replay.
    An appender that opened the file just before it was claimed notices (the inode changed)
    and appends to the new live file instead.  Claimed files left by a process that died are
    claimed again.  Lines that can never be stored go to ``rejected.jsonl``.
    """

    LIVE = "spill.jsonl"
    REJECTED = "rejected.jsonl"

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()

    @property
    def live(self) -> str:
        return os.path.join(self.path, self.LIVE)

    def append(self, rows: Iterable[dict]) -> None:
        """Append rows; raises OSError if the disk refuses (nothing half-written stays)."""
        self._append(self.live, "".join(_spill_line(row) for row in rows).encode("ascii"))

    def reject(self, lines: Iterable[str]) -> None:
        data = "".join(line if line.endswith("\n") else line + "\n" for line in lines)
        self._append(os.path.join(self.path, self.REJECTED), data.encode("utf-8", "replace"))

    def _append(self, path: str, data: bytes) -> None:
        with self._lock:
            os.makedirs(self.path, exist_ok=True)
            while True:
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    _flock(fd)
                    if not _still_linked(fd, path):
                        continue  # claimed by a replay meanwhile: append to the new file
                    _write_all_or_nothing(fd, data)
                    return
                finally:
                    os.close(fd)

    def pending(self) -> bool:
        try:
            names = os.listdir(self.path)
        except OSError:
            return False
        return any(_is_spill_name(name) for name in names)

    def claim(self) -> list[str]:
        """Take unfinished claims (ours, or of a process that is gone) and the live file for
        replay, oldest first; returns the claimed paths."""
        claimed = []
        try:
            names = sorted(os.listdir(self.path))
        except OSError:
            names = []
        for name in names:
            if not (name.startswith("replay-") and name.endswith(".jsonl")) \
                    or not _claimable(os.path.join(self.path, name)):
                continue
            path = os.path.join(self.path, name)
            if _claimed_by_us(name):
                claimed.append(path)
                continue
            target = self._claim_name()
            try:
                os.rename(path, target)
            except OSError:
                continue  # another process claimed it first
            claimed.append(target)
        live = self._claim_live()
        return claimed + ([live] if live else [])

    def _claim_live(self) -> str | None:
        try:
            fd = os.open(self.live, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            _flock(fd)
            if not _still_linked(fd, self.live):
                return None
            target = self._claim_name()
            os.rename(self.live, target)
            return target
        finally:
            os.close(fd)

    def _claim_name(self) -> str:
        return os.path.join(self.path, f"replay-{os.getpid()}-{secrets.token_hex(4)}.jsonl")

    def size(self) -> int:
        """Bytes waiting in spill files (for /health)."""
        total = 0
        try:
            for name in os.listdir(self.path):
                if _is_spill_name(name):
                    total += os.stat(os.path.join(self.path, name)).st_size
        except OSError:
            pass
        return total


def _is_spill_name(name: str) -> bool:
    return name == SpillDir.LIVE or (name.startswith("replay-") and name.endswith(".jsonl"))


def _claimable(path: str) -> bool:
    """A claimed file whose replay did not finish: ours (the database failed during it),
    one left by a process that is gone, or one nobody has touched for STALE_CLAIM."""
    try:
        pid = int(os.path.basename(path).split("-")[1])
    except (IndexError, ValueError):
        return True
    if pid == os.getpid():
        return True
    try:
        if time.time() - os.stat(path).st_mtime > STALE_CLAIM:
            return True
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _claimed_by_us(name: str) -> bool:
    return name.startswith(f"replay-{os.getpid()}-")


def _flock(fd: int) -> None:
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released when the descriptor is closed


def _still_linked(fd: int, path: str) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _write_all_or_nothing(fd: int, data: bytes) -> None:
    start = os.lseek(fd, 0, os.SEEK_END)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except OSError:
        try:
            os.ftruncate(fd, start)  # no half line for the replay to trip over
        except OSError:
            pass
        raise


def _read_lines(path: str, chunk: int) -> Iterator[list[str]]:
    with open(path, encoding="utf-8", errors="replace") as f:
        lines: list[str] = []
        for line in f:
            if line.strip():
                lines.append(line)
            if len(lines) >= chunk:
                yield lines
                lines = []
        if lines:
            yield lines


# ---------------------------------------------------------------------------------------------
# The tracker.


class Tracker:
    """Stores ``UsageRecord`` rows in the usage store from one writer thread per process.

    ``record`` never raises and touches no disk while the queue has room.  ``flush`` waits
    for rows already recorded; ``close`` drains everything and stops (call it from
    gunicorn's worker_exit and atexit; it is idempotent).  Start it in each worker process,
    after any fork.
    """

    def __init__(
        self,
        db_path: str,
        spill_dir: str | None = None,
        batch_size: int = 200,
        flush_interval: float = 0.05,
        queue_max: int = 10000,
        busy_timeout_ms: int = 5000,
        spill_after: float = 5.0,
        retention_days: float = 0.0,
        on_count: Callable[[str, int], None] | None = None,
    ) -> None:
        self.db_path = db_path
        self._on_count = on_count  # the writer's counters, as they change (metrics)
        self.db_label = redacted_url(db_path)  # a URL's password never reaches a log line
        self.store = open_store(db_path, busy_timeout_ms)  # owned by the writer once started
        self.spill = SpillDir(spill_dir or default_spill_dir(db_path))
        self.batch_size = max(1, int(batch_size))
        self.flush_interval = flush_interval
        self.queue_max = max(1, int(queue_max))
        self.busy_timeout_ms = busy_timeout_ms
        self.spill_after = spill_after
        self.retention = retention_days * 86400.0  # seconds; 0: keep every row
        self._next_prune = 0.0
        self._rows: collections.deque[UsageRecord] = collections.deque()  # rows in the writer
        self._answers: collections.deque = collections.deque()  # StoredAnswers to keep
        self._answer_bytes = 0
        self._cond = threading.Condition()
        self._state_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._closed = False
        self._writer_done = False
        self._flushing = 0  # flush() calls waiting: the writer stops gathering rows
        self._replayed_at_start = False
        self._give_up_at: float | None = None
        self._held: list[dict] = []  # the batch being retried while the database refuses it
        self._fault: StoreFault | None = None
        self._fault_since = 0.0
        self._next_spill_check = 0.0  # replay at start, then every SPILL_CHECK_INTERVAL
        # Sequence numbers: rows are numbered as they are queued; the writer handles them in
        # that order, so "every row queued before flush() is done" is one comparison.
        self._enqueued = 0
        self._done = 0
        self._unwritten: UnwrittenCount | None = None  # the two, where a killed worker leaves them
        self._failed_ranges: list[tuple[int, int]] = []
        self._counts = dict.fromkeys(
            ("written", "batches", "retries", "spilled", "replayed", "rejected", "dropped",
             "pruned"), 0)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Open and migrate the database and start the writer thread; never raises for a
        database fault (the writer keeps trying, rows wait), only if already closed."""
        with self._state_lock:
            if self._closed:
                raise RuntimeError("usage tracker is closed")
            if self._thread is not None:
                return
            try:
                self.store.open()
            except StoreFault as fault:
                self._note_fault(fault)
            counts = unwritten_directory(self.spill.path)
            report_dead(counts)  # rows a killed worker (of this database) lost
            self._unwritten = UnwrittenCount(counts)
            self._thread = threading.Thread(target=self._run, name="usage-tracker", daemon=True)
            self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Drain the queue, commit, stop the writer and close the database. Idempotent.

        Rows that cannot be stored by ``timeout`` go to the spill directory, not to waste."""
        deadline = time.monotonic() + timeout
        with self._cond:
            if self._closed:
                return
            self._closed = True  # from now on record() spills instead of queueing
            # Leave the last try time to finish (a locked database waits busy_timeout).
            margin = self.busy_timeout_ms / 1000.0 + 0.5
            self._give_up_at = max(deadline - margin, time.monotonic())
            self._closing.set()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(max(deadline - time.monotonic(), 0.0))
            if self._thread.is_alive():
                log.error("usage writer did not stop in time; its rows go to %s", self.spill.path)
                # Safe even if the writer commits them after all: replays skip stored ids.
                self._spill_rows(list(self._held), "writer stuck at shutdown")
        self._spill_rows(self._take_all(count=True), "tracker closed before they were stored")
        if self._unwritten is not None:
            self._unwritten.remove()
        log.info("usage writer stopped: %s", self.stats())

    # -- request side ---------------------------------------------------------------------------

    def record(self, rec: UsageRecord) -> None:
        """Queue one row for storage; never raises.  Only when the queue is full (the store
        has refused rows for a while) or the tracker is closed does the caller append the
        row to the spill file itself: one short write, the last resort before dropping.
        The record becomes a row in the writer thread (`_rows_of`), off the request's path."""
        with self._cond:
            if not self._closed and len(self._rows) < self.queue_max:
                self._rows.append(rec)
                self._enqueued += 1
                if self._unwritten is not None:
                    self._unwritten.set(self._enqueued, self._done)
                queued = len(self._rows)
                if queued == 1 or queued >= self.batch_size:
                    self._cond.notify_all()
                return
            reason = "tracker closed" if self._closed else "queue full"
        self._spill_rows(self._rows_of([rec]), reason)

    def _rows_of(self, records: list) -> list[dict]:
        """Storable rows of queued records; one that cannot be stored is logged and
        counted as dropped (it is a bug, and must never stop the others)."""
        rows = []
        for rec in records:
            try:
                rows.append(to_storage_row(rec))
            except Exception:
                log.exception("unusable usage record dropped: %s", _describe(rec))
                self._count("dropped", 1)
        return rows

    def keep_answer(self, answer) -> None:
        """Queue a finished answer for the store, where every worker of the host finds it
        (proxy/dedup).  A cache, not a record: bounded, written before the rows queued
        after it, and dropped (never spilled) when the store refuses it."""
        with self._cond:
            if self._closed:
                return
            size = answer.size  # as counted now (it shrinks once the digest is computed)
            self._answers.append((answer, size))
            self._answer_bytes += size
            while self._answer_bytes > ANSWER_QUEUE_BYTES and len(self._answers) > 1:
                self._answer_bytes -= self._answers.popleft()[1]
            self._cond.notify_all()

    def flush(self, timeout: float = 5.0) -> bool:
        """True once every row recorded before this call is committed to the database.

        False on timeout, if the writer is not running, or if some of those rows had to be
        spilled (they are safe on disk, not yet in the database)."""
        with self._cond:
            target, before = self._enqueued, self._done
            if self._thread is not None and not self._writer_done:
                self._flushing += 1
                self._cond.notify_all()
                try:
                    self._cond.wait_for(lambda: self._writer_done or (
                        self._done >= target and self._replayed_at_start), timeout)
                finally:
                    self._flushing -= 1
            return self._done >= target and not self._failed_since(before, target)

    def _failed_since(self, after: int, upto: int) -> bool:
        return any(lo <= upto and hi > after for lo, hi in self._failed_ranges)

    def stats(self) -> dict:
        """State and counters for /health: queued, written, spilled, dropped and more."""
        with self._cond:
            stats = {"state": self._state(), "queued": len(self._rows) + len(self._held),
                     **self._counts}
            if self._fault is not None:
                stats["fault"] = self._fault.kind
                stats["fault_for_s"] = round(time.monotonic() - self._fault_since, 1)
        stats["spill_bytes"] = self.spill.size()
        return stats

    def _state(self) -> str:
        if self._closed:
            return "closed"
        return "degraded" if self._fault is not None else "ok"

    # -- writer thread --------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            if self._fault is None:
                self._carry_on(self._replay_spills)  # what earlier runs left, before new rows
            with self._cond:
                self._replayed_at_start = True  # flush() waits for this too
                self._cond.notify_all()
            while not self._carry_on(self._work):
                pass
        finally:
            self.store.close()
            with self._cond:
                self._writer_done = True
                self._cond.notify_all()

    def _work(self) -> bool:
        """One round: a batch, then (now and then) the spill directory; True to stop."""
        batch, dropped, stop = self._next_batch()
        self._keep_answers()  # queued before the batch's rows: stored before them
        if batch:
            self._store(batch, dropped)
        elif dropped:
            with self._cond:
                self._mark_done(dropped, ok=True)
        if time.monotonic() >= self._next_spill_check:
            # Healthy: other workers may have spilled.  Degraded: the spilled rows are the
            # probe; the first chunk that commits ends the fault.
            self._replay_spills()
        if self.retention and not batch and self._fault is None \
                and time.monotonic() >= self._next_prune:
            self._prune()
        return stop

    def _prune(self) -> None:
        """Retention, when the writer has nothing else to do: one batch of PRUNE_BATCH old
        rows, again soon while there are more, else in PRUNE_EVERY seconds.  Small batches
        keep each transaction short, so the rows of requests are never held up long."""
        try:
            deleted = self.store.prune(time.time() - self.retention, PRUNE_BATCH)
        except StoreFault as fault:
            log.warning("old usage rows could not be deleted (%s); retention tries again later",
                        fault.kind)
            deleted = 0
        self._count("pruned", deleted)
        self._next_prune = time.monotonic() + (PRUNE_PAUSE if deleted == PRUNE_BATCH
                                               else PRUNE_EVERY)

    def _carry_on(self, step) -> bool:
        """Run a step of the writer; a failure nobody foresaw (a bug, a spill directory
        that refuses a rename) is logged and the writer goes on: a writer that died would
        leave every later row queued until the next restart."""
        try:
            return step()
        except Exception:
            log.exception("usage writer: unexpected failure; it carries on")
            held, self._held = self._held, []
            if held:  # the batch in hand goes to disk rather than nowhere
                self._spill_rows(held, "writer failure")
                with self._cond:
                    self._mark_done(len(held), ok=False)
            self._closing.wait(MAX_BACKOFF)
            return False

    def _next_batch(self) -> tuple[list[dict], int, bool]:
        """Up to batch_size rows: wait for the first, then at most flush_interval for more
        (less when a batch is full, someone is flushing, or the tracker is closing)."""
        with self._cond:
            self._cond.wait_for(lambda: self._rows or self._answers or self._closing.is_set(),
                                _IDLE_POLL)
            if not self._rows:
                return [], 0, self._closing.is_set()
            if not self._in_a_hurry():
                self._cond.wait_for(self._in_a_hurry, self.flush_interval)
            count = min(len(self._rows), self.batch_size)
            records = [self._rows.popleft() for _ in range(count)]
        batch = self._rows_of(records)
        # The ones dropped (logged and counted) are done when the batch is, in queue order.
        return batch, len(records) - len(batch), False

    def _keep_answers(self) -> None:
        with self._cond:
            answers = list(self._answers)
            self._answers.clear()
            self._answer_bytes = 0
        if not answers or self._fault is not None:
            return  # a faulty store would make the rows wait twice as long: answers go
        try:
            self.store.put_answers([a.to_row() for a, _ in answers], time.time())
        except StoreFault as fault:  # the rows' own retries will tell about the fault
            log.debug("kept answers dropped: the store refused them (%s)", fault.kind)
        except Exception:  # a cache: a bug here must not stall the rows
            log.exception("kept answers dropped")

    def _in_a_hurry(self) -> bool:
        return len(self._rows) >= self.batch_size or self._flushing > 0 or self._closing.is_set()

    def _store(self, batch: list[dict], dropped: int = 0) -> None:
        """Commit the batch (`dropped`: records of it that could not become rows).  While the database refuses it, hold it and retry with backoff;
        once the fault has lasted `spill_after` (or at shutdown), it goes to the spill
        directory with everything queued behind it, and the spilled rows become the probe
        (see _run) that finds out when the database takes writes again."""
        self._held = batch
        tries = 0
        ok = False
        while True:
            try:
                stored = self._insert(batch, only_new=tries > 0)
            except StoreFault as fault:
                tries += 1
                self._count("retries", 1)
                self._note_fault(fault)
                if self._giving_up() or self._fault_is_lasting():
                    self._spill_rows(batch, "the database refuses writes")
                    break
                self._closing.wait(_backoff(tries))  # the bounded queue holds what comes
                continue
            self._note_recovered()
            self._mark_stored(stored)
            ok = True
            break
        with self._cond:
            self._held = []
            self._mark_done(len(batch) + dropped, ok)
        if not ok:
            self._relieve_memory()  # after the held batch: rows are marked done in order

    def _fault_is_lasting(self) -> bool:
        return self._fault is not None and time.monotonic() - self._fault_since >= self.spill_after

    def _insert(self, rows: list[dict], only_new: bool = False) -> int:
        """Insert rows in one transaction and return how many were stored.

        A row the database will never take is stored alone, so it cannot fail the others,
        and moved aside if it fails alone too.  Raises StoreFault when the database refuses
        writes for now.  `only_new` skips rows whose request id is stored already (replays,
        and retries after a batch that was stored row by row)."""
        try:
            return self.store.insert_rows(rows, only_new)
        except RowRejected:  # this row, not the database: it must not fail the others
            if len(rows) == 1:
                self._reject_rows(rows)
                return 0
        return sum(self._insert([row], only_new=True) for row in rows)

    def _giving_up(self) -> bool:
        return self._give_up_at is not None and time.monotonic() >= self._give_up_at

    def _note_fault(self, fault: StoreFault) -> None:
        with self._cond:
            first = self._fault is None
            if first:
                self._fault_since = time.monotonic()
            self._fault = fault
        if first:
            log.error("usage database %s refuses writes (%s): %s; requests go on, rows wait in "
                      "memory for %g s, then go to %s", self.db_label, fault.kind, fault.detail,
                      self.spill_after, self.spill.path)

    def _note_recovered(self) -> None:
        with self._cond:
            if self._fault is None:
                return
            lasted = time.monotonic() - self._fault_since
            self._fault = None
        log.warning("usage database %s takes writes again after %.1f s", self.db_label, lasted)
        self._next_spill_check = 0.0  # replay what was spilled meanwhile, now

    def _relieve_memory(self) -> None:
        """A lasting fault: queued rows move to disk, where a crash cannot take them."""
        with self._cond:
            if not self._rows or not (self._fault_is_lasting() or self._giving_up()):
                return
        self._spill_rows(self._take_all(count=True), "database unavailable")

    def _take_all(self, count: bool = False) -> list[dict]:
        with self._cond:
            records = list(self._rows)
            self._rows.clear()
            if count and records:
                self._mark_done(len(records), ok=False)
        return self._rows_of(records)

    def _mark_stored(self, count: int) -> None:
        self._count("written", count)
        self._count("batches", 1)

    def _mark_done(self, count: int, ok: bool) -> None:
        """Called with self._cond held."""
        first = self._done + 1
        self._done += count
        if self._unwritten is not None:
            self._unwritten.set(self._enqueued, self._done)
        if not ok:
            self._failed_ranges = self._failed_ranges[-99:] + [(first, self._done)]
        self._cond.notify_all()

    # -- spill files ------------------------------------------------------------------------------

    def _replay_spills(self) -> None:
        """Store what this and other workers spilled, if the database takes writes."""
        interval = SPILL_CHECK_INTERVAL if self._fault is None else MAX_BACKOFF
        self._next_spill_check = time.monotonic() + interval
        if not self.spill.pending():
            return
        try:
            claimed = self.spill.claim()
        except OSError as exc:  # a read-only or locked spill directory: try again later
            log.error("cannot claim spilled usage rows in %s: %s", self.spill.path, loggable(exc))
            return
        for path in claimed:
            try:
                count = self._replay_file(path)
            except StoreFault as fault:
                self._note_fault(fault)
                return  # the claimed file stays; it is claimed again once this process is gone
            except OSError as exc:
                log.error("cannot read spilled usage rows in %s: %s", path, loggable(exc))
                continue
            if count:
                log.info("replayed %d spilled usage rows from %s", count, path)

    def _replay_file(self, path: str) -> int:
        total = 0
        for lines in _read_lines(path, REPLAY_CHUNK):
            rows, bad = _parse_spill_lines(lines, path)
            if bad:
                self._reject_lines(bad, "unreadable spill line")
            if rows:
                self._insert(rows, only_new=True)
                self._note_recovered()
                total += len(rows)
                self._count("replayed", len(rows))
        os.remove(path)
        return total

    def _reject_rows(self, rows: list[dict]) -> None:
        self._reject_lines([_spill_line(row) for row in rows], "the database refused the row")

    def _reject_lines(self, lines: list[str], why: str) -> None:
        try:
            self.spill.reject(lines)
        except OSError as exc:
            log.error("%d usage rows lost (%s; %s failed: %s)", len(lines), why,
                      self.spill.REJECTED, loggable(exc))
            self._count("dropped", len(lines))
            return
        log.error("%d usage rows moved aside to %s (%s)", len(lines),
                  os.path.join(self.spill.path, self.spill.REJECTED), why)
        self._count("rejected", len(lines))

    def _spill_rows(self, rows: list[dict], reason: str) -> None:
        if not rows:
            return
        try:
            self.spill.append(rows)
        except Exception as exc:
            # Every bound is exhausted: say so, with the rows themselves, so the log keeps them.
            for row in rows:
                log.error("usage row lost (%s; spill to %s failed: %s): %s", reason,
                          self.spill.path, loggable(exc, 200), _spill_line(row).strip())
            self._count("dropped", len(rows))
            return
        self._count("spilled", len(rows))

    def _count(self, name: str, n: int) -> None:
        with self._cond:
            self._counts[name] += n
            self._cond.notify_all()  # for wait_for_count
        if self._on_count is not None:
            self._on_count(name, n)

    def wait_for_count(self, name: str, at_least: int, timeout: float) -> bool:
        """Wait until one of the writer's counters (`stats()`' names: written, pruned, ...)
        reaches `at_least`; False after `timeout`.  Background work such as retention has
        no row to flush for: a test or an embedding application waits on it here."""
        with self._cond:
            return self._cond.wait_for(lambda: self._counts[name] >= at_least, timeout)

    def queued(self) -> int:
        """Rows waiting for the writer (the batch being retried included)."""
        with self._cond:
            return len(self._rows) + len(self._held)


def _parse_spill_lines(lines: list[str], path: str) -> tuple[list[dict], list[str]]:
    rows, bad = [], []
    for line in lines:
        try:
            rows.append(to_storage_row(json.loads(line)))
        except (ValueError, TypeError, AttributeError):
            bad.append(line)
    return rows, bad


def _backoff(attempt: int) -> float:
    """50 ms doubling to 2 s: long enough for another worker's batch to commit."""
    return min(0.05 * 2 ** (attempt - 1), MAX_BACKOFF)


def default_spill_dir(db_path: str) -> str:
    """One directory per database (see store.default_spill_dir); point `tracker.spill_dir`
    at another filesystem to survive a full disk."""
    from .config import default_db_path
    return store_spill_dir(db_path, os.path.dirname(default_db_path()))


class NullTracker:
    """Same interface as ``Tracker`` for "tracker off": records go nowhere."""

    db_path = None

    def start(self) -> None:
        pass

    def record(self, rec: UsageRecord) -> None:
        pass

    def keep_answer(self, answer) -> None:
        pass

    def flush(self, timeout: float = 5.0) -> bool:
        return True

    def close(self, timeout: float = 10.0) -> None:
        pass

    def wait_for_count(self, name: str, at_least: int, timeout: float) -> bool:
        """Every counter stays 0: nothing to wait for."""
        return at_least <= 0

    def queued(self) -> int:
        return 0

    def stats(self) -> dict:
        return {"state": "off", "queued": 0, "written": 0, "batches": 0, "retries": 0,
                "spilled": 0, "replayed": 0, "rejected": 0, "dropped": 0, "pruned": 0,
                "spill_bytes": 0}
