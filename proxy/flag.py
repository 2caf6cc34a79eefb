"""A one-way flag for the objects every live request holds several of."""

from __future__ import annotations

import threading


class Flag:
    """`threading.Event`'s set/is_set/wait, without its Condition (a lock and a deque, about
    1 KiB) until a thread actually waits.  A live stream holds several such flags and almost
    none is ever waited on; at thousands of streams per worker that memory counts.

    set() writes the flag before it looks for an event, wait() makes the event before it
    looks at the flag: whichever comes second sees the other's write, so no wake-up is lost."""

    __slots__ = ("_set", "_event")
    _making = threading.Lock()  # one for all flags: making an event is rare

    def __init__(self) -> None:
        self._set = False
        self._event: threading.Event | None = None

    def set(self) -> None:
        self._set = True
        event = self._event
        if event is not None:
            event.set()

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float | None = None) -> bool:
        if self._set:
            return True
        with Flag._making:
            if self._event is None:
                self._event = threading.Event()
        if self._set:
            self._event.set()
        return self._event.wait(timeout)
