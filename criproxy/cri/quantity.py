"""Kubernetes quantities (`500m`, `2Gi`, `1.5`, `1e3`), parsed exactly (fractions, no floats).

Written here rather than taken from a library: the Kubernetes Python client has one
(kubernetes.utils.parse_quantity, exact Decimals), but it comes with a whole API client as a
dependency for a grammar this small; and a Fraction stays exact through the arithmetic the
resources interceptor does with it (CPUs x period in µs, CPU time per period compared as ratios).
Suffixes: binary Ki Mi Gi Ti Pi Ei; decimal n u m k M G T P E; or a decimal exponent e<N>/E<N>.
"""

from __future__ import annotations

import functools
import re
from fractions import Fraction

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"n": Fraction(1, 10**9), "u": Fraction(1, 10**6), "m": Fraction(1, 1000), "": Fraction(1),
            "k": Fraction(10**3), "M": Fraction(10**6), "G": Fraction(10**9), "T": Fraction(10**12),
            "P": Fraction(10**15), "E": Fraction(10**18)}
_QUANTITY = re.compile(r"([+-]?)([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?[0-9]{1,3})?")
MAX_LENGTH = 64


class QuantityError(ValueError):
    """Not a Kubernetes quantity; the message quotes the value."""


#: Parsed quantities kept for reuse: a node's pods repeat the same few annotation values on every
#: intercepted call, and parsing one (regex, Fractions) costs more than the rest of its decision.
#: Fractions are immutable, so sharing them is safe; values that fail to parse are not kept.
PARSED_CACHE_SIZE = 4096


@functools.lru_cache(maxsize=PARSED_CACHE_SIZE)
def parse_quantity(text: str) -> Fraction:
    """The exact value of a Kubernetes quantity string."""
    if len(text) > MAX_LENGTH:
        raise QuantityError(f"{text[:MAX_LENGTH]!r}... is too long for a quantity")
    match = _QUANTITY.fullmatch(text)
    if match is None:
        raise QuantityError(f"{text!r} is not a Kubernetes quantity (e.g. 500m, 2, 1.5, 512Mi, 2Gi, 1e3)")
    sign, number, suffix = match.group(1), match.group(2), match.group(3) or ""
    value = Fraction(number)
    if suffix in _BINARY:
        value *= _BINARY[suffix]
    elif suffix in _DECIMAL:  # 'E' alone is exa; 'E3' is an exponent
        value *= _DECIMAL[suffix]
    else:
        value *= Fraction(10) ** int(suffix[1:])
    return -value if sign == "-" else value


def parse_bytes(text: str) -> int:
    """A quantity that must be a whole, non-negative number of bytes."""
    value = parse_quantity(text)
    if value < 0 or value.denominator != 1:
        raise QuantityError(f"{text!r} is not a whole, non-negative number of bytes")
    return int(value)
