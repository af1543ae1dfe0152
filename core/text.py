"""Small text helpers for messages people read."""

from __future__ import annotations


def quantity(n: float, noun: str, plural: str | None = None) -> str:
    """``1 GPU``, ``2 GPUs``, ``3 processes``, ``1.5 CPUs``: a number with its noun in the right number."""
    return f"{n:g} {noun if n == 1 else plural or noun + 's'}"
