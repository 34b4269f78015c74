"""Parsing and printing of byte sizes as users type them: ``64M``, ``10G``, ``4096``, ``1.5G``."""

from __future__ import annotations

import re

from replicator.errors import UsageError

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
# ASCII only: a Unicode \d takes Arabic-Indic or fullwidth digits (and int() converts them),
# and a Unicode IGNORECASE lets the Kelvin sign U+212A pass for K.
_SIZE_RE = re.compile(
    r"(?P<num>[0-9]+(?:\.[0-9]+)?)[ \t]*(?P<unit>[KMGTP]?)(?:I?B)?", re.IGNORECASE | re.ASCII
)
_BLANKS = " \t\n\r"

#: Largest size accepted anywhere (1 PiB); a filesystem may refuse less, with its own error.
MAX_SIZE = 1 << 50


def parse_size(text: str, *, what: str = "size") -> int:
    """Parse a positive byte count with an optional binary unit (K=1024).

    Accepts ``4096``, ``64M``, ``64MiB``, ``10g``, ``1.5G``; refuses zero, negatives, fractions of
    a byte, digits other than ASCII 0-9, and anything else, with a one-line
    :class:`UsageError` naming ``what``.
    """
    raw = text.strip(_BLANKS)
    m = _SIZE_RE.fullmatch(raw)
    if m is None:
        if raw.startswith("-"):
            raise UsageError(f"{what} {text!r} is negative; give a positive size like 64M")
        raise UsageError(f"{what} {text!r} is not a size; use a number with K, M, G, T or P")
    num, unit = str(m.group("num")), str(m.group("unit")).upper()
    mult = _UNITS[unit]
    if "." in num:
        whole, frac = num.split(".")
        value_num = int(whole + frac) * mult
        value_den: int = 10 ** len(frac)
        if value_num % value_den:
            raise UsageError(f"{what} {text!r} is not a whole number of bytes")
        value = value_num // value_den
    else:
        value = int(num) * mult
    if value <= 0:
        raise UsageError(f"{what} {text!r} is zero; give a positive size like 64M")
    if value > MAX_SIZE:
        raise UsageError(f"{what} {text!r} is larger than the maximum of 1P")
    return value


def format_size(n: int) -> str:
    """Render bytes for humans: exact binary units when they divide, else one decimal."""
    for unit in ("P", "T", "G", "M", "K"):
        mult = _UNITS[unit]
        if n >= mult and n % mult == 0:
            return f"{n // mult}{unit}"
    for unit in ("P", "T", "G", "M", "K"):
        mult = _UNITS[unit]
        if n >= mult:
            return f"{n / mult:.1f}{unit}"
    return f"{n}B"
