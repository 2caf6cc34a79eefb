"""The heartbeat: one thread per process that visits every live exchange.

It sends keepalives after `heartbeat_interval` without a write, probes the client sockets so
a hang-up during a silent phase shuts the upstream down at once, cuts tries that stay silent
past their first-token deadline, and on shutdown ends the streams that outlive the grace
period with a terminal error.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import logging
import math
import select
import socket
import threading
import time
from functools import partial
from typing import Callable

from .errors import ClientGone, ProxyError
from .flag import Flag
from .upstream import AbortHandle
from .writer import LockedWriter

log = logging.getLogger("proxy.heartbeat")


def client_has_hung_up(sock: socket.socket | None) -> bool:
    """Peek at the client socket without blocking: EOF or a reset means the client left.

    The peek reads below TLS (a TLS socket refuses recv flags, and its records are not
    ours to consume), which is all it needs: the bytes are only looked at, never taken."""
    if sock is None:
        return False
    try:
        return socket.socket.recv(sock, 1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError, TimeoutError):  # quiet (a timeout socket waits)
        return False
    except OSError as exc:
        return exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK)
    except ValueError:  # the socket was closed under us: the response is over anyway
        return True


_RDHUP = getattr(select, "POLLRDHUP", 0)  # the peer's FIN; Linux only
_POLL_GONE = select.POLLHUP | select.POLLERR | select.POLLNVAL | _RDHUP


class ClientWatch:
    """The client sockets of the live exchanges, registered once in one `poll` object, so
    a probe of thousands of silent streams is one system call that reports only the
    clients that left.  (Every system call hands the GIL away, and on a busy machine
    getting it back costs a switch interval or more: a peek per socket made one heartbeat
    pass over a hundred streams take seconds.)

    POLLRDHUP (Linux) reports the client's FIN even when unread bytes sit before it (a TLS
    close_notify alert, a pipelined request), which a peek would see first; only where it
    does not exist are readable sockets peeked.  Sockets are known by descriptor; a socket
    closed under us is reported as POLLNVAL, or, once its descriptor serves another
    socket, found out by `fileno()`."""

    def __init__(self) -> None:
        self._poller = select.poll()
        self._by_fd: dict[int, Exchange] = {}

    def add(self, exchange: "Exchange") -> None:
        sock = exchange.client_socket
        fd = sock.fileno() if sock is not None else -1
        if fd < 0:
            return
        try:
            self._poller.register(fd, select.POLLIN | _POLL_GONE)
        except (OSError, ValueError):
            return
        self._by_fd[fd] = exchange
        exchange.watched_fd = fd

    def remove(self, exchange: "Exchange") -> None:
        fd = exchange.watched_fd
        if fd is None:
            return
        exchange.watched_fd = None
        if self._by_fd.get(fd) is exchange:
            del self._by_fd[fd]
            try:
                self._poller.unregister(fd)
            except (KeyError, OSError, ValueError):
                pass

    def gone(self) -> list["Exchange"]:
        """The exchanges whose client has left (or whose socket was closed under us)."""
        if not self._by_fd:
            return []
        left = []
        for fd, events in self._poller.poll(0):
            exchange = self._by_fd.get(fd)
            if exchange is None:
                continue
            sock = exchange.client_socket
            if sock is None or sock.fileno() != fd or events & _POLL_GONE \
                    or (not _RDHUP and client_has_hung_up(sock)):
                left.append(exchange)
        return left


class Exchange:
    """One client request and its upstream attempts, as seen by the heartbeat thread."""

    def __init__(self, client_socket: socket.socket | None, writer: LockedWriter | None,
                 on_end: Callable[[ProxyError], None]) -> None:
        self.client_socket = client_socket
        self.writer = writer
        self.handle = AbortHandle()
        self._on_end = on_end
        self._lock = threading.Lock()
        self.end_error: ProxyError | None = None
        self.ended = Flag()  # lets a backoff wait end early
        self._deadline: float | None = None
        self.deadline_hit = False
        self._end_at: tuple[float, Callable[[], None]] | None = None
        self._commit_at: tuple[float, Callable[[], None]] | None = None
        self.visit_by: Callable[[float], None] | None = None  # set by the heartbeat
        self.watched_fd: int | None = None  # its client socket, in the heartbeat's ClientWatch
        self.serial = 0  # set by the heartbeat: its entries in the visit queue
        self.next_at = math.inf  # when its one pending visit is due (the heartbeat's lock)

    def new_attempt(self, deadline: float | None) -> AbortHandle:
        """A fresh handle for the next upstream try; `deadline` bounds its wait for content."""
        with self._lock:
            self.handle = AbortHandle()
            self._deadline = deadline
            self.deadline_hit = False
            if self.end_error is not None:
                self.handle.abort()
            handle = self.handle
        self._visit_by(deadline)
        return handle

    def _visit_by(self, when: float | None) -> None:
        """The heartbeat must look at this exchange by `when` (a new deadline)."""
        visit_by = self.visit_by
        if when is not None and visit_by is not None:
            visit_by(when)

    def next_visit(self, now: float, interval: float) -> float:
        """When the heartbeat must look at this exchange next: its earliest deadline, or
        when its writer will have been idle for `interval`; at the latest in `interval`."""
        with self._lock:
            times = [t for t in (self._deadline, self._end_at and self._end_at[0],
                                 self._commit_at and self._commit_at[0]) if t]
        writer = self.writer
        if writer is not None and writer.keepalive and not writer.closed:
            times.append(writer.last_write + interval)
        return min(times, default=now + interval)

    def content_arrived(self) -> None:
        with self._lock:
            self._deadline = None

    def end_at(self, when: float | None, expire: Callable[[], None] | None = None) -> None:
        """Call `expire()` from the heartbeat at `when` (monotonic), unless called again
        first (None cancels): an upstream call whose clients all left waits for a retry."""
        with self._lock:
            self._end_at = None if when is None else (when, expire)
        self._visit_by(when)

    def commit_at(self, when: float, commit: Callable[[], None]) -> None:
        """Call `commit()` from the heartbeat at `when`: a stream the server thread reads
        itself gets its status line from here when no deployment answered in time."""
        with self._lock:
            self._commit_at = (when, commit)
        self._visit_by(when)

    def check_deadline(self, now: float) -> None:
        """Called by the heartbeat: a stream past its commit time is committed, a try that
        is silent past its deadline is cut off; an exchange past its `end_at` ends."""
        with self._lock:
            committing = self._commit_at if self._commit_at is not None \
                and now >= self._commit_at[0] else None
            if committing is not None:
                self._commit_at = None
            ending = self._end_at if self._end_at is not None and now >= self._end_at[0] else None
            if ending is not None:
                self._end_at = None
            if self._deadline is None or now < self._deadline:
                handle = None
            else:
                self._deadline = None
                self.deadline_hit = True
                handle = self.handle
        if committing is not None:
            committing[1]()
        if ending is not None:
            ending[1]()
        elif handle is not None:
            handle.abort()

    def end(self, err: ProxyError, abort: bool = True) -> bool:
        """Stop the exchange for a reason outside the stream (client gone, shutdown).

        With `abort=False` the upstream connection is left for `abort_upstream`: shutdown
        first queues every stream's terminal error, then shuts the sockets."""
        with self._lock:
            if self.end_error is not None:
                return False
            self.end_error = err
        self.ended.set()
        self._on_end(err)
        if abort:
            self.abort_upstream()
        return True

    def abort_upstream(self) -> None:
        with self._lock:
            handle = self.handle
        handle.abort()


class Heartbeat:
    """The per-process thread that visits every live exchange."""

    def __init__(self, heartbeat_interval: float, probe_interval: float,
                 after_pass: Callable[[int, int], None] | None = None) -> None:
        self.heartbeat_interval = heartbeat_interval
        # Told (live exchanges, keepalives sent) after each pass: metrics, off the hot path.
        self._after_pass = after_pass
        self.tick = max(0.001, min(probe_interval, heartbeat_interval / 4))
        self._live: dict[int, Exchange] = {}  # by serial
        # (when, serial): the next time each exchange needs a look (a deadline, a commit, a
        # keepalive due); an exchange is visited when its time comes, never on every pass.
        # Entries hold no exchange: a stream that ended is not kept alive by the queue.
        self._due: list[tuple[float, int]] = []
        self._serials = itertools.count(1)
        self._watch = ClientWatch()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.shutdown_deadline: float | None = None
        self._shutdown_error: Callable[[], ProxyError] | None = None
        self._shutdown_noted = False
        self._stopped = False

    def register(self, exchange: Exchange) -> None:
        """Visit the exchange from now on.  Its deadlines set meanwhile (from now, through
        `visit_by`) and those it had already (`next_visit`) both count."""
        with self._lock:
            exchange.serial = next(self._serials)
            self._live[exchange.serial] = exchange
            self._watch.add(exchange)
            exchange.next_at = math.inf
            exchange.visit_by = partial(self._visit_by, exchange)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="llm-proxy-heartbeat",
                                                daemon=True)
                self._thread.start()
        self._visit_by(exchange, exchange.next_visit(time.monotonic(), self.heartbeat_interval))

    def unregister(self, exchange: Exchange) -> None:
        """The exchange is over: no more visits (its entry in the queue is skipped)."""
        self._forget([exchange])

    def _forget(self, exchanges: list[Exchange]) -> None:
        with self._lock:
            for exchange in exchanges:
                if self._live.get(exchange.serial) is exchange:
                    del self._live[exchange.serial]
                self._watch.remove(exchange)
                exchange.visit_by = None
            if not self._live:
                self._due.clear()

    def watch_client(self, exchange: Exchange, sock) -> None:
        """The exchange has a client socket from now on (probed like any other)."""
        with self._lock:
            self._watch.remove(exchange)
            exchange.client_socket = sock
            if self._live.get(exchange.serial) is exchange:
                self._watch.add(exchange)

    def _visit_by(self, exchange: Exchange, when: float) -> None:
        """A new deadline of the exchange: a visit by then, if none is due sooner."""
        with self._lock:
            if self._live.get(exchange.serial) is exchange:
                self._queue(exchange, when)

    def _queue(self, exchange: Exchange, when: float) -> None:
        """Under the lock: one pending visit per exchange, the soonest (a later entry left
        in the queue no longer matches `next_at` and is skipped)."""
        if when < exchange.next_at:
            exchange.next_at = when
            heapq.heappush(self._due, (when, exchange.serial))

    def live_count(self) -> int:
        with self._lock:
            return len(self._live)

    def begin_shutdown(self, grace: float, make_error: Callable[[], ProxyError]) -> None:
        """From now on, exchanges still live after `grace` seconds end with an error."""
        # Runs in a signal handler: no logging and no locks here.
        self._shutdown_error = make_error
        self.shutdown_deadline = time.monotonic() + grace
        self._wake.set()

    def end_now(self, err: ProxyError) -> int:
        """End every live exchange with `err` at once (a proxy closed without a grace);
        returns how many there were."""
        live = self._snapshot()
        self._forget(live)
        for exchange in live:
            exchange.end(err, abort=False)
        for exchange in live:
            exchange.abort_upstream()
        return len(live)

    def stop(self) -> None:
        """The thread ends after its current pass, for good: the proxy it served is closed
        (an embedding application is done with it; a server's worker just exits)."""
        self._stopped = True
        self._wake.set()

    def _run(self) -> None:
        while not self._stopped:
            self._wake.wait(self.tick)
            self._wake.clear()
            try:
                self.visit_all(time.monotonic())
            except Exception:  # the heartbeat must survive anything one stream does
                log.exception("heartbeat pass failed")

    def visit_all(self, now: float) -> None:
        """One pass: probe clients, cut silent tries past their deadline and keep idle
        streams alive; once the shutdown grace is over, end every stream instead."""
        live = self.live_count()
        if not self._shutdown_due(now, live):
            sent = self._visit_due(now)
            if self._after_pass is not None:
                self._after_pass(live, sent)
            # Checked again: on a loaded machine a pass takes a while, and the grace does
            # not wait for the next one.
            if not self._shutdown_due(time.monotonic(), live):
                return
        self._end_all(self._snapshot())

    def _snapshot(self) -> list[Exchange]:
        with self._lock:
            return list(self._live.values())

    def _visit_due(self, now: float) -> int:
        """Probe every client, then visit the exchanges whose time has come: deadlines,
        commits and keepalives; how many keepalives went out.  Whatever one exchange
        raises costs only its own visit: every exchange of the pass is queued again."""
        with self._lock:
            gone = self._watch.gone()
            due = self._take_due(now)
        sent = 0
        try:
            for exchange in gone:
                self._end_quietly(exchange, ClientGone("the client closed the connection"))
            for exchange in due:
                sent += self._visit(exchange, now)
        finally:
            self._schedule(due, now)
        return sent

    def _end_quietly(self, exchange: Exchange, err: ProxyError) -> None:
        try:
            self._end(exchange, err)
        except Exception:
            log.exception("ending a stream whose client left failed")

    def _visit(self, exchange: Exchange, now: float) -> bool:
        try:
            exchange.check_deadline(now)
            return exchange.writer is not None and \
                exchange.writer.write_keepalive_if_idle(now, self.heartbeat_interval)
        except Exception:
            log.exception("heartbeat visit of a stream failed")
            return False

    def _take_due(self, now: float) -> list[Exchange]:
        """Under the lock: the live exchanges whose time has come, each once."""
        due = []
        heap = self._due
        while heap and heap[0][0] <= now:
            when, serial = heapq.heappop(heap)
            exchange = self._live.get(serial)
            if exchange is not None and exchange.next_at == when:
                exchange.next_at = math.inf  # visited now; `_schedule` queues the next
                due.append(exchange)
        if len(heap) > 2 * len(self._live) + 1024:  # mostly ended streams' entries
            self._due = [(e.next_at, serial) for serial, e in self._live.items()
                         if e.next_at < math.inf]
            heapq.heapify(self._due)
        return due

    def _schedule(self, visited: list[Exchange], now: float) -> None:
        """The next visit of each exchange just visited (a tick from now at the earliest:
        a keepalive that could not go out is tried again next pass, not in a loop)."""
        soonest = now + self.tick
        times = []
        for exchange in visited:
            try:
                times.append(max(exchange.next_visit(now, self.heartbeat_interval), soonest))
            except Exception:  # never left without a visit
                times.append(now + self.heartbeat_interval)
        with self._lock:
            for exchange, when in zip(visited, times):
                if self._live.get(exchange.serial) is exchange:
                    self._queue(exchange, when)

    def _shutdown_due(self, now: float, live: int) -> bool:
        """Has the shutdown grace run out?  (Says once, from this thread, that it started:
        `begin_shutdown` runs in a signal handler, where logging could deadlock.)"""
        deadline = self.shutdown_deadline
        if self._shutdown_error is None or deadline is None:
            return False
        if not self._shutdown_noted:
            self._shutdown_noted = True
            log.info("shutting down: %d live streams get %.1f s to finish", live,
                     max(deadline - now, 0.0))
        return now >= deadline

    def _end_all(self, exchanges: list[Exchange]) -> None:
        """Shutdown: end every stream at once.  One pass queues each terminal error (locks
        only: no system call, so this thread keeps the GIL and no stream waits behind
        hundreds of others for its turn), a second shuts the upstream sockets."""
        assert self._shutdown_error is not None and self.shutdown_deadline is not None
        for exchange in exchanges:
            exchange.end(self._shutdown_error(), abort=False)
        self._forget(exchanges)
        for exchange in exchanges:
            exchange.abort_upstream()
        if exchanges:
            log.info("shutdown grace over: %d streams ended, %.2f s after it ran out",
                     len(exchanges), time.monotonic() - self.shutdown_deadline)

    def _end(self, exchange: Exchange, err: ProxyError) -> None:
        """End an exchange and stop visiting it: there is nothing left to keep alive."""
        exchange.end(err)
        self.unregister(exchange)
