"""The simple-shape fast path for From/Sender agrees with the full two-parser judgement.

:func:`relay.intake.rewrite.simple_address` judges the common From shapes without the standard library's
parsers (which are super-linear on hostile input). It is only sound if, for every value it accepts,
the full judgement (:func:`relay.intake.rewrite.parse_addresses`) gives the same single address.
"""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.intake.addresses import (
    _SIMPLE_PATH,
    _SIMPLE_VALUE,
    MAX_ADDRESS_FIELD,
    parse_addresses,
    parse_path,
    simple_address,
)
from relay.intake.rewrite import from_addresses


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


def _reference_path(arg: str) -> tuple[str, str] | None:
    from email._header_value_parser import get_addr_spec, get_angle_addr

    try:
        parse = get_angle_addr if arg.lstrip().startswith("<") else get_addr_spec
        address, rest = parse(arg)
    except Exception:
        return None
    return str(address.addr_spec), str(rest)


@settings(max_examples=150, deadline=None)
@given(st.from_regex(_SIMPLE_PATH, fullmatch=True))
def test_every_simple_path_parses_the_same_as_the_library(arg: str) -> None:
    assert parse_path(arg) == _reference_path(arg), arg


@pytest.mark.parametrize("arg", ["<" + '"' * 4000 + ">", "<" + "(" * 4000 + ">", "(" * 3000, "<" + "a." * 2000 + ">",
                                 '"a' * 2000])
def test_hostile_paths_are_refused_at_once(arg: str) -> None:
    started = time.perf_counter()
    assert parse_path(arg) is None
    assert time.perf_counter() - started < 0.05


@pytest.mark.parametrize("arg", ["<>", "<a@b.example>", "<a@b.example> SIZE=10 BODY=8BITMIME", "a@b.example",
                                 '<"q"@b.example>', "<a@[127.0.0.1]>", "<@x.example:a@b.example>",
                                 "<A.B@C.example>  BODY=8BITMIME"])
def test_ordinary_paths_parse_as_the_library_does(arg: str) -> None:
    assert parse_path(arg) == _reference_path(arg)
