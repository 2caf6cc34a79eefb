"""Facts about the processes of this host that several parts need."""

from __future__ import annotations

import os


def process_alive(pid: int) -> bool:
    """Is `pid` a running process?  (A pid that someone else's process holds now counts as
    alive: better to keep a dead worker's leftovers a while than to take a live one's.)"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
