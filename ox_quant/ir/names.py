"""Fresh names for values, initializers and nodes added to a graph."""

from __future__ import annotations


def fresh_name(used: set[str], base: str) -> str:
    """``base``, or ``base_1``, ``base_2``...: the first not in ``used`` (which it joins)."""
    name, i = base, 1
    while name in used:
        name, i = f"{base}_{i}", i + 1
    used.add(name)
    return name
