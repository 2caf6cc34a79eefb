"""How much memory request bodies may hold in one worker.

A request body costs its bytes for as long as the request lives (retries resend it), and
far more while it is parsed: `json.loads` of 32 MiB of `{}` objects builds a million dicts
(about 25 bytes of Python objects per byte of JSON, some 900 MB, much of which the
allocator keeps afterwards).  A count of what the proxy must hold, checked before the
work is done, lets a worker refuse a request with 503/529 (or 413 when the request could
never fit) instead of swelling until the kernel kills it with every stream it carries.

Pure bookkeeping: no I/O.
"""

from __future__ import annotations

import json
import threading

# Upper bounds measured with tracemalloc on CPython 3.11 (json.loads): a byte of JSON costs
# at most ~2 bytes as text, and each container, value and key at most ~72 bytes beyond
# that (`{}` objects: 76 per container; `{"a":1}`: 100 per container plus key).
_PER_BYTE = 2
_PER_TOKEN = 72


# Most memory one upstream document (an SSE event, a JSON body) may take to parse: far above
# any real answer (a 16 MiB event of base64 costs ~32 MiB), far below a worker's memory.
MAX_UPSTREAM_PARSE_COST = 256 * 1024 * 1024


# A document shorter than this cannot cost more than the cap, even at 4 bytes a character,
# so the usual event or body (every SSE event passes here) is not even counted.
_ALWAYS_AFFORDABLE = MAX_UPSTREAM_PARSE_COST // (4 * _PER_BYTE + _PER_TOKEN)


class TooComplex(ValueError):
    """JSON that would take more memory to parse than allowed, or nests too deeply."""


def parse_upstream_json(doc: bytes | str) -> object:
    """`json.loads` for what an upstream sends, within MAX_UPSTREAM_PARSE_COST; raises
    ValueError (TooComplex included) for anything that is not JSON it should parse."""
    if len(doc) > _ALWAYS_AFFORDABLE:
        raw = doc.encode("utf-8", "surrogatepass") if isinstance(doc, str) else doc
        if json_parse_cost(raw) > MAX_UPSTREAM_PARSE_COST:
            raise TooComplex(f"{len(raw)} bytes of JSON too complex to parse")
    try:
        return json.loads(doc)
    except RecursionError:
        raise TooComplex("JSON nested too deeply") from None


def json_parse_cost(body: bytes) -> int:
    """An upper bound of the memory `json.loads(body)` takes, without parsing it.

    Structural characters inside strings are counted too, so prose full of commas is
    over-estimated (about 3x); bytes.count is C-fast (~1 ms per MiB per character)."""
    tokens = body.count(b"{") + body.count(b"[") + body.count(b",") + body.count(b":")
    return _PER_BYTE * len(body) + _PER_TOKEN * tokens


class MemoryBudget:
    """A per-process allowance of bytes; `reserve` never waits, it says yes or no."""

    def __init__(self, total: int) -> None:
        self.total = total
        self._used = 0
        self._lock = threading.Lock()

    @property
    def used(self) -> int:
        return self._used

    def reserve(self, amount: int) -> "Reservation | None":
        with self._lock:
            if self._used + amount > self.total:
                return None
            self._used += amount
        return Reservation(self, amount)

    def _give_back(self, amount: int) -> None:
        with self._lock:
            self._used -= amount


class Reservation:
    """Bytes held for one request; `shrink` and `release` give them back (once)."""

    def __init__(self, budget: MemoryBudget, amount: int) -> None:
        self._budget = budget
        self._lock = threading.Lock()
        self.amount = amount

    def shrink(self, to: int) -> None:
        with self._lock:
            if to < self.amount:
                self._budget._give_back(self.amount - to)
                self.amount = to

    def release(self) -> None:
        self.shrink(0)
