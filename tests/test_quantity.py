"""Kubernetes quantities are parsed exactly, and every rejected value is quoted in the error."""

from __future__ import annotations

from fractions import Fraction

import pytest

from criproxy.cri.quantity import MAX_LENGTH, QuantityError, parse_bytes, parse_quantity

NOT_A_QUANTITY = "is not a Kubernetes quantity (e.g. 500m, 2, 1.5, 512Mi, 2Gi, 1e3)"


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("500m", Fraction(1, 2)),
        ("2", Fraction(2)),
        ("1.5", Fraction(3, 2)),
        ("512Mi", Fraction(512 * 2**20)),
        ("2Gi", Fraction(2 * 2**30)),
        ("1Ki", Fraction(1024)),
        ("1Ti", Fraction(2**40)),
        ("1Pi", Fraction(2**50)),
        ("1Ei", Fraction(2**60)),
        ("1e3", Fraction(1000)),
        ("1E3", Fraction(1000)),
        ("1E-3", Fraction(1, 1000)),
        ("2e+2", Fraction(200)),
        ("100k", Fraction(100_000)),
        ("3M", Fraction(3_000_000)),
        ("1G", Fraction(10**9)),
        ("1T", Fraction(10**12)),
        ("1P", Fraction(10**15)),
        ("5n", Fraction(5, 10**9)),
        ("7u", Fraction(7, 10**6)),
        ("+1", Fraction(1)),
        ("-1", Fraction(-1)),
        ("-500m", Fraction(-1, 2)),
        (".5", Fraction(1, 2)),
        ("1.", Fraction(1)),
        ("0", Fraction(0)),
        ("0.1", Fraction(1, 10)),
        ("1.5Gi", Fraction(3 * 2**29)),
        ("1" * MAX_LENGTH, Fraction(int("1" * MAX_LENGTH))),
    ],
    ids=lambda v: repr(v) if isinstance(v, str) else None,
)
def test_parse_quantity_is_exact(text: str, value: Fraction) -> None:
    got = parse_quantity(text)
    assert isinstance(got, Fraction)
    assert got == value


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("abc", f"'abc' {NOT_A_QUANTITY}"),
        ("", f"'' {NOT_A_QUANTITY}"),
        ("1.2.3", f"'1.2.3' {NOT_A_QUANTITY}"),
        ("5 Mi", f"'5 Mi' {NOT_A_QUANTITY}"),
        ("1Zi", f"'1Zi' {NOT_A_QUANTITY}"),
        ("1ki", f"'1ki' {NOT_A_QUANTITY}"),
        ("1K", f"'1K' {NOT_A_QUANTITY}"),
        ("1e", f"'1e' {NOT_A_QUANTITY}"),
        ("1e1000", f"'1e1000' {NOT_A_QUANTITY}"),
        ("Mi", f"'Mi' {NOT_A_QUANTITY}"),
        (".", f"'.' {NOT_A_QUANTITY}"),
        ("--1", f"'--1' {NOT_A_QUANTITY}"),
        (" 1", f"' 1' {NOT_A_QUANTITY}"),
        ("1MiB", f"'1MiB' {NOT_A_QUANTITY}"),
        ("\u0661", f"'\u0661' {NOT_A_QUANTITY}"),
        ("1" * (MAX_LENGTH + 1), f"'{'1' * MAX_LENGTH}'... is too long for a quantity"),
    ],
    ids=["word", "empty", "two-dots", "space-before-suffix", "unknown-binary-suffix", "lower-binary-suffix",
         "upper-k", "exponent-without-digits", "exponent-four-digits", "suffix-only", "dot-only", "double-sign",
         "leading-space", "trailing-B", "arabic-digit", "over-long"],
)
def test_parse_quantity_errors(text: str, message: str) -> None:
    with pytest.raises(QuantityError) as err:
        parse_quantity(text)
    assert str(err.value) == message
    assert isinstance(err.value, ValueError)


def test_trailing_newline_is_not_a_quantity() -> None:
    with pytest.raises(QuantityError) as err:
        parse_quantity("1\n")
    assert str(err.value) == f"'1\\n' {NOT_A_QUANTITY}"


@pytest.mark.parametrize(("text", "value"), [("1E", Fraction(10**18)), ("2E", Fraction(2 * 10**18))], ids=["1E", "2E"])
def test_exa_suffix(text: str, value: Fraction) -> None:
    assert parse_quantity(text) == value


@pytest.mark.parametrize(
    ("text", "value"),
    [("1.5Gi", 3 * 2**29), ("512Mi", 512 * 2**20), ("0", 0), ("1k", 1000), ("2000m", 2), ("1e3", 1000),
     ("4096", 4096)],
    ids=["1.5Gi", "512Mi", "zero", "1k", "2000m", "1e3", "plain"],
)
def test_parse_bytes(text: str, value: int) -> None:
    got = parse_bytes(text)
    assert type(got) is int
    assert got == value


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0.1", "'0.1' is not a whole, non-negative number of bytes"),
        ("-1", "'-1' is not a whole, non-negative number of bytes"),
        ("-1Gi", "'-1Gi' is not a whole, non-negative number of bytes"),
        ("1m", "'1m' is not a whole, non-negative number of bytes"),
        ("1500m", "'1500m' is not a whole, non-negative number of bytes"),
        ("lots", f"'lots' {NOT_A_QUANTITY}"),
    ],
    ids=["fraction", "negative", "negative-Gi", "milli", "1500m", "not-a-quantity"],
)
def test_parse_bytes_errors(text: str, message: str) -> None:
    with pytest.raises(QuantityError) as err:
        parse_bytes(text)
    assert str(err.value) == message
