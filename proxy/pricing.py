"""Prices per model and the cost of a request, in USD.

A cost is only ever computed from a known price: an unknown model costs ``None`` ("unpriced"),
never 0.0, so reports can say how much spend they could not see instead of hiding it.

Built-in prices (USD per million tokens), checked on 2026-11-21:

- Anthropic: the model pricing table at https://platform.claude.com/docs/en/about-claude/pricing
  (base input, 5-minute cache write, cache hit, output) and the per-model overview pages for
  Claude Sonnet 5. ``cache_write`` is the 5-minute rate, the API default; 1-hour cache writes
  cost more (2x input) and are under-priced by this table. Sonnet 5.5's cache-hit price is
  $0.10 as reported from 2026-10-07 by third-party changelogs; the overview copy we could read
  still said $0.20. Claude Haiku 5.5 is priced by prompt length (two bands), which one flat
  price cannot express, so it is left out: add a ``[prices]`` entry for the band you use.
- OpenAI: list prices as published on https://developers.openai.com/api/docs/pricing, taken
  from copies of that page dated 2026-03 to 2026-11 (we could not read the page itself, so
  treat them as "as listed on 2026-11-21"). OpenAI bills no separate cache-write fee, so
  ``cache_write`` equals ``input``; models with no cached-input discount have
  ``cache_read == input``.

Anything missing or changed can be set in the config:
``[prices."model-name"] input = .. output = .. cache_read = .. cache_write = ..``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

PRICE_FIELDS = ("input", "output", "cache_read", "cache_write")
_PER_TOKEN = 1_000_000.0

# A dated snapshot or moving alias after a base name: claude-sonnet-4-5-20250929,
# gpt-4o-2024-08-06, claude-3-7-sonnet-latest. Only these suffixes are stripped, so an unknown
# newer model (claude-opus-4-9) is unpriced rather than priced as claude-opus-4.
_SNAPSHOT_SUFFIX = re.compile(r"(\d{8}|\d{4}-\d{2}-\d{2}|latest)")


@dataclass(frozen=True)
class Price:
    """USD per million tokens for each kind of token."""

    input: float
    output: float
    cache_read: float
    cache_write: float


def _anthropic(input: float, output: float) -> Price:
    """Anthropic's published multipliers: cache hit 0.1x input, 5-minute write 1.25x input."""
    return Price(input, output, round(input * 0.1, 6), round(input * 1.25, 6))


def _openai(input: float, output: float, cached: float | None = None) -> Price:
    """OpenAI: cached input at its own rate (or full price), cache writes at the input rate."""
    return Price(input, output, input if cached is None else cached, input)


BUILTIN_PRICES: dict[str, Price] = {
    # Anthropic (current and legacy names; snapshots such as -20250929 match by suffix).
    "claude-opus-5": _anthropic(5.0, 25.0),
    "claude-opus-4-8": _anthropic(5.0, 25.0),
    "claude-opus-4-7": _anthropic(5.0, 25.0),
    "claude-opus-4-6": _anthropic(5.0, 25.0),
    "claude-opus-4-5": _anthropic(5.0, 25.0),
    "claude-opus-4-1": _anthropic(15.0, 75.0),
    "claude-opus-4": _anthropic(15.0, 75.0),
    "claude-opus-4-0": _anthropic(15.0, 75.0),
    "claude-sonnet-5-5": Price(2.0, 10.0, 0.10, 2.50),
    "claude-sonnet-5": _anthropic(2.0, 10.0),
    "claude-sonnet-4-6": _anthropic(3.0, 15.0),
    "claude-sonnet-4-5": _anthropic(3.0, 15.0),
    "claude-sonnet-4": _anthropic(3.0, 15.0),
    "claude-sonnet-4-0": _anthropic(3.0, 15.0),
    "claude-haiku-4-5": _anthropic(1.0, 5.0),
    "claude-3-7-sonnet": _anthropic(3.0, 15.0),
    "claude-3-5-sonnet": _anthropic(3.0, 15.0),
    "claude-3-5-haiku": _anthropic(0.80, 4.0),
    "claude-3-opus": _anthropic(15.0, 75.0),
    "claude-3-haiku": Price(0.25, 1.25, 0.03, 0.30),
    # OpenAI.
    "gpt-5.5": _openai(5.0, 30.0, 0.50),
    "gpt-5.4": _openai(2.50, 15.0, 0.25),
    "gpt-5.4-mini": _openai(0.75, 4.50, 0.075),
    "gpt-5.4-nano": _openai(0.20, 1.25, 0.02),
    "gpt-5.2": _openai(1.75, 14.0, 0.175),
    "gpt-5.1": _openai(1.25, 10.0, 0.125),
    "gpt-5": _openai(1.25, 10.0, 0.125),
    "gpt-5-mini": _openai(0.25, 2.0, 0.025),
    "gpt-5-nano": _openai(0.05, 0.40, 0.005),
    "gpt-5-pro": _openai(15.0, 120.0),
    "gpt-4.1": _openai(2.0, 8.0, 0.50),
    "gpt-4.1-mini": _openai(0.40, 1.60, 0.10),
    "gpt-4.1-nano": _openai(0.10, 0.40, 0.025),
    "gpt-4o": _openai(2.50, 10.0, 1.25),
    "gpt-4o-2024-05-13": _openai(5.0, 15.0),  # the first gpt-4o snapshot kept its launch price
    "gpt-4o-mini": _openai(0.15, 0.60, 0.075),
    "o1": _openai(15.0, 60.0, 7.50),
    "o3": _openai(2.0, 8.0, 0.50),
    "o3-mini": _openai(1.10, 4.40, 0.55),
    "o4-mini": _openai(1.10, 4.40, 0.275),
}


class PriceTable:
    """Built-in prices with config overrides on top; looks models up and prices usage."""

    def __init__(self, overrides: Mapping[str, Any] | None = None) -> None:
        self._prices = {name.lower(): price for name, price in BUILTIN_PRICES.items()}
        self._prices.update(parse_overrides(overrides))

    def price_for(self, model: str | None) -> Price | None:
        """Exact name first, then the longest known name followed by a snapshot suffix."""
        if not model:
            return None
        name = model.strip().lower()
        if name in self._prices:
            return self._prices[name]
        return self._prices.get(_base_of_snapshot(name, self._prices))

    def known_name(self, model: str | None) -> str | None:
        """The table's own name for `model` (a snapshot's base, lower case), or None: a
        bounded label for a name a client chose."""
        if not model:
            return None
        name = model.strip().lower()
        return name if name in self._prices else _base_of_snapshot(name, self._prices)

    def cost(self, usage_like: Any, model: str | None = None) -> float | None:
        """USD for one request's tokens; None when the model or every count is unknown.

        ``usage_like`` is a ``Usage`` or ``UsageRecord`` (anything with the four token
        attributes). The model is ``model``, else ``usage_like.model``, else its
        ``upstream_model``. Reasoning tokens are already inside output and are not added.
        """
        price = self.price_for(model or _model_of(usage_like))
        counts = [getattr(usage_like, f"{kind}_tokens", None) for kind in _TOKEN_KINDS]
        if price is None or all(c is None for c in counts):
            return None
        rates = (price.input, price.output, price.cache_read, price.cache_write)
        return sum((c or 0) * r for c, r in zip(counts, rates)) / _PER_TOKEN

    def price_record(self, record: Any) -> None:
        """Fill ``cost_usd`` and ``priced`` on a ``UsageRecord`` from its upstream model."""
        model = getattr(record, "upstream_model", None) or getattr(record, "model_requested", None)
        record.cost_usd = self.cost(record, model=model)
        record.priced = record.cost_usd is not None


_TOKEN_KINDS = ("input", "output", "cache_read", "cache_write")


def _model_of(usage_like: Any) -> str | None:
    return getattr(usage_like, "model", None) or getattr(usage_like, "upstream_model", None)


def _base_of_snapshot(name: str, known: Mapping[str, Price]) -> str | None:
    """The longest known name that ``name`` extends by ``-<snapshot>``, if any."""
    best = None
    for base in known:
        if not name.startswith(base + "-"):
            continue
        if _SNAPSHOT_SUFFIX.fullmatch(name[len(base) + 1:]) and len(base) > len(best or ""):
            best = base
    return best


def parse_overrides(overrides: Mapping[str, Any] | None) -> dict[str, Price]:
    """Validate ``[prices."model"]`` tables from the config into ``Price`` values.

    ``input`` and ``output`` are required; ``cache_read`` and ``cache_write`` default to the
    input price (the safe side: a missing discount over-states cost, it never hides it).
    Errors raise ``ValueError`` naming the offending key.
    """
    if not overrides:
        return {}
    if not isinstance(overrides, Mapping):
        raise ValueError("prices: expected a table of model names")
    return {_model_key(name): _parse_price(name, fields) for name, fields in overrides.items()}


def _model_key(name: Any) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"prices.{name!r}: the model name must be a non-empty string")
    return name.strip().lower()


def _parse_price(model: str, fields: Any) -> Price:
    where = f'prices."{model}"'
    if not isinstance(fields, Mapping):
        raise ValueError(f"{where}: expected a table with input and output prices")
    for key in fields:
        if key not in PRICE_FIELDS:
            raise ValueError(f"{where}.{key}: unknown field (expected {', '.join(PRICE_FIELDS)})")
    for key in ("input", "output"):
        if key not in fields:
            raise ValueError(f"{where}.{key}: missing (USD per million tokens)")
    values = {key: _price_value(f"{where}.{key}", value) for key, value in fields.items()}
    values.setdefault("cache_read", values["input"])
    values.setdefault("cache_write", values["input"])
    return Price(**values)


def _price_value(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: expected a number of USD per million tokens, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{where}: must be a finite number >= 0, got {value!r}")
    return float(value)
