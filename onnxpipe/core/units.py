"""Numbers for people: counts with SI prefixes and byte sizes, formatted one way everywhere.

Bytes use decimal (SI) units, 1 kB = 1000 B, labelled ``B``, ``kB``, ``MB``, ``GB``, ``TB``
(never a 1024 divisor behind an "MB" label; binary sizes, where a figure is a power of two such
as a memory cap, are written ``MiB`` / ``GiB`` explicitly).

Example:
    >>> human_bytes(15_360), human_bytes(999), human_count(2680, " parameters")
    ('15.4 kB', '999 B', '2.68 K parameters')
"""

from __future__ import annotations

_PREFIXES = ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K"))


def human_count(n: float, unit: str = "") -> str:
    """``1234567 -> '1.23 M'``, ``(4.5e9, 'FLOPs') -> '4.5 GFLOPs'``: three significant digits."""
    for div, prefix in _PREFIXES:
        if abs(n) >= div:
            return f"{n / div:.3g} {prefix}{unit}"
    return f"{n:g} {unit}".rstrip()


def human_bytes(n: float) -> str:
    """A byte size in decimal units with three significant digits: ``'512 B'``, ``'15.4 kB'``, ``'1.23 MB'``."""
    for div, prefix in _PREFIXES:
        if abs(n) >= div:
            return f"{n / div:.3g} {'k' if prefix == 'K' else prefix}B"
    return f"{n:.0f} B"
