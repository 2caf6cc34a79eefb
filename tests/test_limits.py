"""The parse-cost cap on what upstreams send, without a server."""

import pytest

from proxy.limits import MAX_UPSTREAM_PARSE_COST, TooComplex, json_parse_cost, parse_upstream_json


@pytest.mark.parametrize("as_text", [False, True], ids=["bytes", "str"])
def test_json_that_would_cost_more_than_the_cap_is_refused_unparsed(as_text):
    bomb = b"[" + b"0," * 4_000_000 + b"0]"  # 8 MB: a list of 4 M numbers, ~300 MB parsed
    assert json_parse_cost(bomb) > MAX_UPSTREAM_PARSE_COST
    with pytest.raises(TooComplex):
        parse_upstream_json(bomb.decode() if as_text else bomb)


@pytest.mark.parametrize("as_text", [False, True], ids=["bytes", "str"])
def test_json_within_the_cap_parses_small_or_large(as_text):
    large = b'{"text": "' + b"x" * 8_000_000 + b'"}'  # long, but one string: cheap to parse
    for doc in (b'{"a": [1, 2]}', large):
        assert parse_upstream_json(doc.decode() if as_text else doc) is not None


def test_json_nested_too_deeply_is_too_complex():
    with pytest.raises(TooComplex):
        parse_upstream_json("[" * 100_000 + "]" * 100_000)
