"""The simple-shape fast path for From/Sender agrees with the full two-parser judgement.

:func:`relay.rewrite.simple_address` judges the common From shapes without the standard library's
parsers (which are super-linear on hostile input). It is only sound if, for every value it accepts,
the full judgement (:func:`relay.rewrite.parse_addresses`) gives the same single address.
"""

from __future__ import annotations

import time

from hypothesis import given, settings
from hypothesis import strategies as st

from relay.rewrite import _SIMPLE_VALUE, MAX_ADDRESS_FIELD, from_addresses, parse_addresses, simple_address


@settings(max_examples=150, deadline=None)
@given(st.from_regex(_SIMPLE_VALUE, fullmatch=True))
def test_every_simple_value_parses_the_same_with_both_parsers(value: str) -> None:
    fast = simple_address(value)
    assert fast is not None
    assert parse_addresses(value) == (fast,), value


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from('ab@.<>"\\(),:; =?'), max_size=60))
def test_fast_path_never_accepts_what_the_parsers_read_otherwise(value: str) -> None:
    fast = simple_address(value.strip())
    if fast is not None:
        assert parse_addresses(value.strip()) == (fast,), value


def test_values_over_the_bound_are_not_allowed_and_cost_nothing() -> None:
    for unit in ('"', "a.", "a, ", "(", ":"):
        value = unit * (MAX_ADDRESS_FIELD // len(unit) + 2)
        started = time.perf_counter()
        assert from_addresses(b"From: " + value.encode() + b"\r\n") is None
        assert time.perf_counter() - started < 0.05
