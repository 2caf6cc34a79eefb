"""Prices: exact names, dated snapshots, unknown models, config overrides and the cost sum."""

import math

import pytest

from proxy.pricing import BUILTIN_PRICES, Price, PriceTable
from proxy.usage import Usage, UsageRecord

TABLE = PriceTable()


@pytest.mark.parametrize("model, base", [
    ("claude-sonnet-4-5", "claude-sonnet-4-5"),
    ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
    ("claude-opus-4-1-20250805", "claude-opus-4-1"),
    ("claude-opus-4-20250514", "claude-opus-4"),
    ("claude-haiku-4-5-20251001", "claude-haiku-4-5"),
    ("claude-3-7-sonnet-20250219", "claude-3-7-sonnet"),
    ("claude-3-7-sonnet-latest", "claude-3-7-sonnet"),
    ("claude-3-5-haiku-20241022", "claude-3-5-haiku"),
    ("gpt-4o-2024-08-06", "gpt-4o"),
    ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),  # the longer name wins over gpt-4o
    ("gpt-4.1-nano-2025-04-14", "gpt-4.1-nano"),
    ("gpt-4.1-2025-04-14", "gpt-4.1"),
    ("o3-2025-04-16", "o3"),
    ("o4-mini-2025-04-16", "o4-mini"),
    ("gpt-5-2025-08-07", "gpt-5"),
    ("GPT-4o", "gpt-4o"),
])
def test_snapshot_names_find_their_base(model, base):
    assert TABLE.price_for(model) == BUILTIN_PRICES[base]


def test_exact_snapshot_entry_beats_suffix_rule():
    """gpt-4o-2024-05-13 kept its launch price; it must not be priced as today's gpt-4o."""
    assert TABLE.price_for("gpt-4o-2024-05-13") == Price(5.0, 15.0, 5.0, 5.0)
    assert TABLE.price_for("gpt-4o-2024-05-13") != TABLE.price_for("gpt-4o")


@pytest.mark.parametrize("model", [
    None, "", "my-alias", "claude-opus-4-9", "claude-sonnet-4-5-preview", "gpt-4o-audio-preview",
    "gpt-4", "llama-3.1-8b", "claude-sonnet-4-5x", "o3-pro",
])
def test_unknown_models_have_no_price(model):
    """Only a date or -latest is stripped: a new model is unpriced, not priced as its elder."""
    assert TABLE.price_for(model) is None
    assert TABLE.cost(Usage(input_tokens=1000, output_tokens=10), model=model) is None


def test_cost_uses_every_token_kind():
    usage = Usage(input_tokens=1_000_000, output_tokens=2_000_000, cache_read_tokens=3_000_000,
                  cache_write_tokens=4_000_000, reasoning_tokens=1_500_000,
                  model="claude-sonnet-4-5-20250929")
    # 3 + 2*15 + 3*0.30 + 4*3.75; reasoning is inside output and not charged again
    assert TABLE.cost(usage) == pytest.approx(3 + 30 + 0.9 + 15)


def test_cost_of_openai_usage_with_cache():
    usage = Usage(input_tokens=86, output_tokens=300, cache_read_tokens=1920, model="o4-mini")
    expected = (86 * 1.10 + 300 * 4.40 + 1920 * 0.275) / 1e6
    assert TABLE.cost(usage) == pytest.approx(expected)


def test_missing_counts_are_zero_but_no_counts_is_unknown():
    assert TABLE.cost(Usage(input_tokens=1000, model="gpt-4o")) == pytest.approx(0.0025)
    assert TABLE.cost(Usage(input_tokens=0, output_tokens=0, model="gpt-4o")) == 0.0
    assert TABLE.cost(Usage(model="gpt-4o")) is None


def test_explicit_model_wins_and_records_use_upstream_model():
    usage = Usage(input_tokens=1_000_000, model="gpt-4o")
    assert TABLE.cost(usage, model="gpt-4o-mini") == pytest.approx(0.15)
    rec = UsageRecord(upstream_model="gpt-4o-2024-08-06", model_requested="fast",
                      input_tokens=1_000_000)
    assert TABLE.cost(rec) == pytest.approx(2.5)


def test_a_record_is_priced_by_its_model_and_left_unpriced_without_price_or_usage():
    rec = UsageRecord(model_requested="gpt-4.1", input_tokens=2_000_000, output_tokens=0)
    TABLE.price_record(rec)  # no upstream model reported: falls back to the requested one
    assert rec.priced is True and rec.cost_usd == pytest.approx(4.0)
    rec = UsageRecord(upstream_model="mystery-1", input_tokens=5)
    TABLE.price_record(rec)
    assert rec.priced is False and rec.cost_usd is None
    rec = UsageRecord(upstream_model="gpt-4.1")  # rejected before any usage
    TABLE.price_record(rec)
    assert rec.priced is False and rec.cost_usd is None


def test_builtin_prices_are_lowercase_finite_and_cache_read_input_output_ordered():
    for name, price in BUILTIN_PRICES.items():
        assert name == name.lower()
        for value in (price.input, price.output, price.cache_read, price.cache_write):
            assert math.isfinite(value) and value >= 0, name
        assert price.cache_read <= price.input <= price.output, name


# --- overrides -----------------------------------------------------------------------------------


def test_override_adds_a_model_with_cache_defaults():
    table = PriceTable({"my-local-model": {"input": 0.5, "output": 1}})
    assert table.price_for("my-local-model") == Price(0.5, 1.0, 0.5, 0.5)
    assert table.price_for("my-local-model-20260101") == Price(0.5, 1.0, 0.5, 0.5)


def test_override_replaces_a_builtin():
    table = PriceTable({"gpt-4o": {"input": 1, "output": 2, "cache_read": 0.1, "cache_write": 1.5}})
    assert table.price_for("gpt-4o-2024-08-06") == Price(1.0, 2.0, 0.1, 1.5)
    assert TABLE.price_for("gpt-4o") == BUILTIN_PRICES["gpt-4o"]  # other tables unaffected


def test_override_snapshot_is_more_specific_than_base():
    table = PriceTable({"claude-sonnet-4-5-20250929": {"input": 9, "output": 9}})
    assert table.price_for("claude-sonnet-4-5-20250929").input == 9.0
    assert table.price_for("claude-sonnet-4-5-20251231") == BUILTIN_PRICES["claude-sonnet-4-5"]


def test_no_overrides_and_empty_overrides_price_alike():
    assert PriceTable(None).price_for("gpt-4o") == PriceTable({}).price_for("gpt-4o")


@pytest.mark.parametrize("overrides, message", [
    ({"m": {"input": -1, "output": 1}}, 'prices."m".input'),
    ({"m": {"input": "cheap", "output": 1}}, 'prices."m".input'),
    ({"m": {"input": True, "output": 1}}, 'prices."m".input'),
    ({"m": {"input": 1, "output": float("nan")}}, 'prices."m".output'),
    ({"m": {"input": 1, "output": float("inf")}}, 'prices."m".output'),
    ({"m": {"input": 1, "output": 2, "cache_read": None}}, 'prices."m".cache_read'),
    ({"m": {"output": 1}}, 'prices."m".input: missing'),
    ({"m": {"input": 1}}, 'prices."m".output: missing'),
    ({"m": {"input": 1, "output": 2, "inptu": 3}}, 'prices."m".inptu: unknown field'),
    ({"m": 3}, 'prices."m"'),
    ({"": {"input": 1, "output": 2}}, "model name"),
    ([("m", {})], "prices"),
])
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(ValueError) as info:
        PriceTable(overrides)
    assert message in str(info.value)
