"""Rows a worker queued but had not stored, counted where they outlive the worker.

A worker killed outright (OOM, SIGKILL) loses the usage rows in its queue: while the
database takes writes, at most what gathers in the writer's flush interval (see
tracker.Tracker); while it refuses them, what waits in memory until `spill_after` moves it
to disk.  So that the operator learns how many, each worker keeps two counters in a 16-byte
file, `unwritten-<pid>-<n>@<host>.count`: rows queued and rows done (stored, spilled or
dropped, each of which is counted or logged by itself).  The files live beside the spill directory, in `<spill>-workers` (the spill
directory holds rows and nothing else).  A file is mapped into memory, so keeping it costs
one store per row and no system call.  A worker that stops cleanly removes its file; the
master (gunicorn's `child_exit`) or else the next worker to start claims the files of dead
processes and logs what they lost.
"""

from __future__ import annotations

import itertools
import logging
import mmap
import os
import re
import socket
import struct
from typing import Callable

from .host import process_alive

log = logging.getLogger("proxy.tracker")

_LAYOUT = struct.Struct("<QQ")  # rows queued, rows done
# unwritten-<pid>-<n>@<host>.count; a name without a host is this host's (an older form)
_NAME = re.compile(r"^unwritten-(\d+)(?:-\d+)?(?:@(.+))?\.count$")
_OWNED: set[str] = set()  # the files of this process's trackers (an embedding may run several)
_SERIALS = itertools.count(1)
MAX_PID = 1 << 22  # Linux's highest


def _host() -> str:
    """This host's name as a file name can hold it: a spill directory on shared storage
    must never make one host's live workers look dead to another."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "host"


def directory_for(spill_path: str) -> str:
    """Where the counters of the workers that write to one database live."""
    return spill_path.rstrip("/\\") + "-workers"


class UnwrittenCount:
    """This process's counters, in its own file; every method is best effort (a full or
    read-only disk must never cost a row)."""

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, f"unwritten-{os.getpid()}-{next(_SERIALS)}"
                                            f"@{_host()}.count")
        self._map: mmap.mmap | None = None
        try:
            os.makedirs(directory, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.ftruncate(fd, _LAYOUT.size)
                self._map = mmap.mmap(fd, _LAYOUT.size)
            finally:
                os.close(fd)
            _OWNED.add(self.path)
        except (OSError, ValueError) as exc:
            log.warning("rows lost by a killed worker will not be counted: %s: %s",
                        self.path, exc.strerror if isinstance(exc, OSError) else exc)

    def set(self, queued: int, done: int) -> None:
        if self._map is not None:
            _LAYOUT.pack_into(self._map, 0, queued, done)

    def remove(self) -> None:
        """A clean stop: nothing was lost."""
        if self._map is None:
            return
        _OWNED.discard(self.path)
        try:
            self._map.close()
            os.unlink(self.path)
        except (OSError, ValueError):
            pass
        self._map = None


def claim_dead(directory: str) -> list[tuple[int, int]]:
    """The (pid, rows lost) of this host's processes that died with rows queued, each
    reported once (a file is claimed by removing it, so two workers starting together never
    both report it).  Files of live processes stay, and so do this process's own; another
    file with this process's pid is a dead predecessor's."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    host, lost = _host(), []
    for name in names:
        match = _NAME.match(name)
        if match is None or (match.group(2) or host) != host:
            continue
        pid = int(match.group(1))
        if not 0 < pid < MAX_PID or (pid != os.getpid() and process_alive(pid)):
            continue
        if os.path.join(directory, name) in _OWNED:
            continue
        path = os.path.join(directory, name)
        try:
            with open(path, "rb") as f:
                data = f.read(_LAYOUT.size)
            os.unlink(path)
        except OSError:
            continue  # another worker claimed it first
        queued, done = _LAYOUT.unpack(data) if len(data) == _LAYOUT.size else (0, 0)
        if queued > done:
            lost.append((pid, queued - done))
    return lost


def report_dead(directory: str, error: Callable[..., None] = log.error) -> int:
    """Log the rows each dead worker lost (with `error`: the master has its own logger);
    how many in all."""
    total = 0
    for pid, count in claim_dead(directory):
        total += count
        error("worker %d ended without storing %d usage rows it had queued (it was killed: "
              "out of memory, SIGKILL, or a crash); those requests have no row", pid, count)
    return total
