"""One worker's side of the key counters: its copy of the keys, its reservations, and the
thread that keeps them honest.

- `KeyBook`: the keys by hash, reloaded when any process changed one (checked at most every
  `REFRESH` seconds, on use), so a key without limits costs no I/O per request and a
  revoked one is refused by every worker within a second.  Keys with limits are re-read
  in their admission transaction anyway.
- `Ledger`: admits (reserves) and settles through the store, under this worker's holder
  name.  A settlement the store cannot take now is kept and retried by the ledger's thread
  (the reservation stays meanwhile: the budget errs on the safe side).  The thread also
  shows the worker alive (`touch`), sweeps reservations of workers that died, and
  checkpoints the keys database's WAL (off the requests' commits).
"""

from __future__ import annotations

import logging
import os
import socket
import secrets
import threading
import time
from typing import Callable

from ..store import StoreFault
from .policy import ClientKey, key_digest
from .store import KeyStore

log = logging.getLogger("proxy.keys")

REFRESH = 0.25  # seconds between checks of the keys' version
MAX_AGE = 0.5  # seconds after which a lookup waits for the reload rather than use the copy
MISS_REFRESH = 0.02  # ...after an unknown key (one made a moment ago): sooner, but bounded
STALE_COPY = 10.0  # seconds the keys may go unread (a database fault) before none is accepted
WAIT_FOR_RELOAD = 2.0  # seconds an unknown key waits for another thread's reload at most
TOUCH_EVERY = 2.0  # seconds between heartbeats of a worker's holder row
SWEEP_EVERY = 10.0  # seconds between sweeps of dead workers' reservations


class KeyBook:
    """This process's copy of every key, by digest."""

    def __init__(self, store: KeyStore, installation_secret: Callable[[], bytes],
                 refresh: float = REFRESH) -> None:
        self._store = store
        self._secret = installation_secret
        self._refresh = refresh
        self._lock = threading.Lock()
        self._by_digest: dict[str, ClientKey] = {}
        self._version: int | None = None
        self._checked = 0.0
        self._good = 0.0  # when the copy was last known to be current
        self._failing = False  # the last reload failed

    def lookup(self, secret: str) -> ClientKey | None:
        """The key this secret opens, as of at most `refresh` seconds ago; a key unknown
        here is looked for again if the last check is `MISS_REFRESH` old (a key created a
        moment ago works at once, and a flood of unknown keys costs one read per interval).
        Raises StoreFault while no copy could be read at all."""
        self._fresh(self._refresh, wait=False)
        digest = key_digest(secret, self._secret())
        key = self._by_digest.get(digest)
        if key is None:
            self._fresh(MISS_REFRESH, wait=True)
            key = self._by_digest.get(digest)
        return key

    def _fresh(self, interval: float, wait: bool) -> None:
        """Reload if `interval` has passed.  Raises StoreFault when there is no copy to go
        on with: none read yet, or none for STALE_COPY seconds while reloads fail (a
        revoked key must not keep working for as long as the database cannot be read)."""
        if self._failing:  # recover as soon as the database does
            interval = min(interval, MISS_REFRESH)
        age = time.monotonic() - self._checked
        if age >= interval:
            # Past MAX_AGE nobody goes on with the copy while another thread reloads it:
            # "revoked within a second" holds for every request, however many arrive.
            self._reload(interval, wait or age >= MAX_AGE)
        if self._version is None or (
                self._failing and time.monotonic() - self._good > STALE_COPY):
            raise StoreFault("unreadable", "the client keys cannot be read")

    def _reload(self, interval: float, wait: bool) -> None:
        """One thread reloads; a key found in a copy younger than MAX_AGE goes on with it
        meanwhile (a slow disk delays nobody), others (`wait`) wait for the reload, at most
        WAIT_FOR_RELOAD seconds.  Never raises: a failure is logged and remembered
        (`_failing`)."""
        if not self._lock.acquire(timeout=WAIT_FOR_RELOAD if wait or self._version is None
                                  else 0):
            return  # another thread is at it
        try:
            if time.monotonic() - self._checked < interval:
                return
            try:
                version = self._store.version()
                if version != self._version:
                    self._by_digest = {k.digest: k for k in self._store.all_keys()}
                    self._version = version
                self._good, self._failing = time.monotonic(), False
            except StoreFault as fault:  # the last good copy serves a while
                log.error("client keys could not be reloaded (%s): %s", fault.kind, fault.detail)
                self._failing = True
            finally:
                self._checked = time.monotonic()
        finally:
            self._lock.release()


class Ledger:
    """Reservations and settlements of this worker, and the thread that looks after them."""

    def __init__(self, store: KeyStore) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._unsettled: dict[str, tuple[float, int, float]] = {}  # retried by the thread
        self._pid: int | None = None
        self._holder = ""
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def holder(self) -> str:
        """This worker's name on its reservations; its thread starts with the first use."""
        if self._pid != os.getpid():
            with self._lock:
                if self._pid != os.getpid():
                    self._holder = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
                    self._unsettled = {}
                    self._stopped.clear()
                    self._touch(time.time())
                    self._thread = threading.Thread(target=self._run, name="key-ledger",
                                                    daemon=True)
                    self._thread.start()
                    self._pid = os.getpid()
        return self._holder

    def admit(self, key: ClientKey, request_id: str, amount: float):
        """(key now, refusal or None); raises StoreFault."""
        return self.store.admit(key.id, request_id, amount, self.holder, time.time())

    def settle(self, request_id: str, cost_usd: float, tokens: int) -> None:
        """Never raises: a settlement the store refuses now is retried by the thread."""
        now = time.time()
        try:
            self.store.settle(request_id, cost_usd, tokens, now)
        except StoreFault as fault:
            log.warning("request %s: its key's spend will be settled later (%s)", request_id,
                        fault.kind)
            with self._lock:
                self._unsettled[request_id] = (cost_usd, tokens, now)
            self._wake.set()

    def close(self) -> None:
        """At worker exit (after the last rows): settle what is left, leave no holder."""
        if self._pid != os.getpid():
            return
        self._stopped.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5.0)
        self._retry_unsettled()
        try:
            self.store.forget_holder(self._holder)
        except StoreFault:
            pass  # its row ages out like a dead worker's; nothing of it is held any more
        self.store.close()

    def _run(self) -> None:
        last_sweep = 0.0
        while not self._stopped.is_set():
            self._wake.wait(TOUCH_EVERY)
            self._wake.clear()
            now = time.time()
            self._touch(now)
            self._retry_unsettled()
            self._checkpoint()
            if now - last_sweep >= SWEEP_EVERY:
                last_sweep = now
                try:
                    dropped = self.store.sweep(now)
                    if dropped:
                        log.warning("dropped %d reservations of workers that stopped without "
                                    "settling them", dropped)
                except StoreFault as fault:
                    log.warning("key reservations could not be swept (%s)", fault.kind)

    def _checkpoint(self) -> None:
        if self.store.checkpoints_apart:
            try:
                self.store.checkpoint()
            except StoreFault as fault:
                log.warning("keys database checkpoint failed (%s)", fault.kind)

    def _touch(self, now: float) -> None:
        try:
            self.store.touch(self._holder, now)
        except StoreFault as fault:
            log.warning("key ledger heartbeat failed (%s)", fault.kind)

    def _retry_unsettled(self) -> None:
        with self._lock:
            pending, self._unsettled = self._unsettled, {}
        for request_id, (cost, tokens, at) in pending.items():
            try:
                self.store.settle(request_id, cost, tokens, at)
            except StoreFault:
                with self._lock:
                    self._unsettled.setdefault(request_id, (cost, tokens, at))
