"""Reading usage out of upstream JSON: the helpers every format's usage parser shares.

Upstreams (and OpenAI-compatible vendors) send odd shapes; none of these raise, because
accounting must never break the relay.  Pure: no I/O, clocks or logging.
"""

from __future__ import annotations

from typing import Any

from ..usage import Usage


def get(obj: Any, *keys: str) -> Any:
    """Nested dict lookup that yields None instead of raising on a missing or odd level."""
    for key in keys:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def count(value: Any) -> int | None:
    """A token count, or None; bools and non-numbers are not counts."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def uncached(total: int | None, *parts: int | None) -> int | None:
    """OpenAI input minus the cached parts it includes, never below zero."""
    if total is None:
        return None
    return max(total - sum(p or 0 for p in parts), 0)


class DeliveredOutput:
    """What reached the client of an answer's output (text, thinking, tool arguments).

    OpenAI streams report usage only at the very end and Anthropic's ``message_start``
    says ``output_tokens: 1``, so a stream that breaks after content would be recorded
    with no output at all, though the client got (and the provider bills) part of an
    answer.  The estimate is the common rule of thumb, a token per 4 characters, and never
    less than one token per content delta; reported counts always win over it.
    """

    def __init__(self) -> None:
        self.chars = 0
        self.deltas = 0

    def add(self, *pieces: Any) -> None:
        counted = False
        for piece in pieces:
            if isinstance(piece, str) and piece:
                self.chars += len(piece)
                counted = True
        self.deltas += counted

    def estimate(self) -> int | None:
        if not self.deltas:
            return None
        return max(self.deltas, -(-self.chars // 4))

    def floor_output(self, usage: Usage) -> Usage:
        """A stream that ended without its final usage: output is at least what was delivered."""
        estimate = self.estimate()
        if not usage.complete and estimate is not None:
            usage.output_tokens = max(usage.output_tokens or 0, estimate)
        return usage
