"""Client keys and what they may spend, without I/O: the key, its secret and hash, the
model allowlist, budget periods, the worst-case cost a request reserves, and the decision
whether a key's counters admit one more request.

The store (`keys/store.py`) reads a key's counters and writes its reservation in one
transaction; this module only decides, so every rule here is testable on plain values.
"""

from __future__ import annotations

import calendar
import fnmatch
import hashlib
import hmac
import math
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Iterable

from ..errors import BudgetExhausted, Forbidden, ProxyError, RateLimited
from ..pricing import Price

KEY_PREFIX = "sk-llmp-"
PERIODS = ("day", "week", "month", "total")
WINDOW = 60  # seconds that RPM and TPM count over (a sliding window of one-second buckets)


@dataclass(frozen=True)
class ClientKey:
    """A proxy key as stored: never the secret, only its keyed hash (`digest`) and a hint
    an operator can recognise (its last four characters)."""

    id: str
    name: str
    digest: str
    hint: str
    models: tuple[str, ...] = ()  # globs on the model the client names; empty: any model
    budget_usd: float | None = None
    period: str = "month"
    rpm: int | None = None
    tpm: int | None = None
    max_parallel: int | None = None
    expires_at: float | None = None
    revoked_at: float | None = None
    created_at: float = 0.0

    @property
    def limited(self) -> bool:
        """Does admitting a request need the key's counters (and a reservation)?"""
        return any(v is not None for v in (self.budget_usd, self.rpm, self.tpm, self.max_parallel))

    def state(self, now: float) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return "active"

    def allows(self, model: str | None) -> bool:
        """The allowlist, on the name the client sent (an alias is checked as sent, never
        as what a route resolves it to)."""
        if not self.models:
            return True
        return bool(model) and any(fnmatch.fnmatchcase(model, glob) for glob in self.models)


def new_secret() -> str:
    """A new key: 256 random bits, URL-safe, recognisable by its prefix."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def new_key_id() -> str:
    return "lk_" + secrets.token_hex(8)


def key_digest(secret: str, installation_secret: bytes) -> str:
    """What is stored of a key: an HMAC under the installation secret.  The keys are long
    and random, so a fast keyed hash is enough (nothing to brute-force), and a leaked
    database without the installation secret cannot even test a guess."""
    return hmac.new(installation_secret, secret.encode("utf-8", "replace"),
                    hashlib.sha256).hexdigest()


def hint_of(secret: str) -> str:
    return KEY_PREFIX + "..." + secret[-4:]


def parse_models(text: str | None) -> tuple[str, ...]:
    """`'claude-*, gpt-5*'` as globs; empty or `*` alone means any model."""
    globs = tuple(g.strip() for g in (text or "").split(",") if g.strip())
    return () if globs in ((), ("*",)) else globs


# -- periods ----------------------------------------------------------------------------------

def period_start(period: str, now: float) -> float:
    """Start (UTC epoch seconds) of the budget period that contains `now`: the day, the
    ISO week (from Monday), the calendar month; `total` never resets."""
    if period == "total":
        return 0.0
    moment = datetime.fromtimestamp(now, timezone.utc)
    day = calendar.timegm((moment.year, moment.month, moment.day, 0, 0, 0))
    if period == "day":
        return float(day)
    if period == "week":
        return float(day - moment.weekday() * 86400)
    if period == "month":
        return float(calendar.timegm((moment.year, moment.month, 1, 0, 0, 0)))
    raise ValueError(f"unknown budget period {period!r} (one of {', '.join(PERIODS)})")


def period_end(period: str, now: float) -> float | None:
    if period == "total":
        return None
    start = period_start(period, now)
    if period == "day":
        return start + 86400
    if period == "week":
        return start + 7 * 86400
    moment = datetime.fromtimestamp(start, timezone.utc)
    year, month = (moment.year + 1, 1) if moment.month == 12 else (moment.year, moment.month + 1)
    return float(calendar.timegm((year, month, 1, 0, 0, 0)))


# -- what a request reserves ------------------------------------------------------------------

BYTES_PER_TOKEN = 3  # generous: English runs about 4 bytes a token, CJK about 3


def input_estimate(body_bytes: int) -> int:
    return -(-body_bytes // BYTES_PER_TOKEN)


def worst_case_cost(input_tokens: int, output_tokens: int, prices: Iterable[Price | None],
                    calls: int = 1) -> float | None:
    """USD a request may cost at most: `calls` calls (a stream that may be continued makes
    one more per continuation, each with the prompt and up to the output cap), each its
    input at the dearest input-side rate plus its output, at the most expensive of the
    route's deployments.  None when a deployment has no price (its cost could not be
    bounded)."""
    worst = 0.0
    for price in prices:
        if price is None:
            return None
        rate_in = max(price.input, price.cache_write, price.cache_read)
        worst = max(worst, calls * (input_tokens * rate_in + output_tokens * price.output))
    return worst / 1_000_000


# -- the decision at admission -----------------------------------------------------------------

@dataclass
class Standing:
    """A key's counters, as the admission transaction reads them."""

    spent_usd: float = 0.0  # settled in the current period
    held_usd: float = 0.0  # reserved by admitted requests of the period not settled yet
    holds: int = 0  # admitted requests not settled yet (any period)
    window: list[tuple[int, int, int]] = field(default_factory=list)  # (second, requests, tokens)

    def requests_in_window(self) -> int:
        return sum(r for _, r, _ in self.window)

    def tokens_in_window(self) -> int:
        return sum(t for _, _, t in self.window)


def refusal(key: ClientKey, standing: Standing, amount: float, now: float) -> ProxyError | None:
    """Why `key` may not take one more request that reserves `amount` USD, or None.

    A key revoked or expired is refused first (403), then rate limits (they clear by
    themselves: 429 with the wait), then the budget (it does not before the period ends:
    402)."""
    state = key.state(now)
    if state != "active":
        return Forbidden(f"key {key.name!r} is {state}")
    if key.max_parallel is not None and standing.holds >= key.max_parallel:
        return RateLimited(f"key {key.name!r} has {standing.holds} requests running, its limit "
                           f"is {key.max_parallel}; retry when one has finished", retry_after="1")
    if key.rpm is not None and standing.requests_in_window() >= key.rpm:
        wait = seconds_until_below(standing.window, key.rpm, 1, now)
        return RateLimited(f"key {key.name!r} has used its {key.rpm} requests per minute; "
                           f"retry in {wait} s", retry_after=str(wait))
    if key.tpm is not None and standing.tokens_in_window() >= key.tpm:
        wait = seconds_until_below(standing.window, key.tpm, 2, now)
        return RateLimited(f"key {key.name!r} has used its {key.tpm} tokens per minute; "
                           f"retry in {wait} s", retry_after=str(wait))
    if key.budget_usd is not None:
        left = key.budget_usd - standing.spent_usd - standing.held_usd
        if amount > left:
            return BudgetExhausted(
                f"key {key.name!r} has ${max(left, 0.0):.4f} left of its ${key.budget_usd:.2f} "
                f"{'' if key.period == 'total' else key.period + 'ly '}budget; this request "
                f"may cost up to ${amount:.4f} (set max_tokens lower, or wait for the next "
                "period)".replace("dayly", "daily"))
    return None


def seconds_until_below(window: list[tuple[int, int, int]], limit: int, column: int,
                        now: float) -> int:
    """Whole seconds until the window's sum of `column` drops below `limit` (each bucket
    leaves the window WINDOW seconds after its second began)."""
    total = sum(row[column] for row in window)
    for row in sorted(window):
        total -= row[column]
        if total < limit:
            return max(1, math.ceil(row[0] + WINDOW - now))
    return WINDOW


def now_second(now: float | None = None) -> int:
    return int(now if now is not None else time.time())
