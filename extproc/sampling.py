"""The mirror decision (DESIGN.md, normative).

``u = MurmurHash3_x64_128(salt + b"\\x00" + key, seed=0)``, first 64-bit word,
unsigned; a request is mirrored iff ``u * denominator < numerator * 2**64``.
Everything is exact integer arithmetic so any language can reproduce it bit for
bit. Pure: no I/O, no configuration, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass

import mmh3

TWO_64 = 1 << 64


@dataclass(frozen=True, slots=True)
class Fraction:
    """GEP-3171 fraction; ``percent: N`` is ``Fraction(N, 100)``."""

    numerator: int
    denominator: int = 100

    def __post_init__(self) -> None:
        # Validation with field paths happens in config; this guards the core.
        if self.denominator < 1 or not 0 <= self.numerator <= self.denominator:
            raise ValueError(f"invalid fraction {self.numerator}/{self.denominator}")

    @property
    def threshold(self) -> int:
        """Smallest u that is *not* mirrored, in [0, 2**64].

        For integer u, ``u * d < n * 2**64`` iff ``u < ceil(n * 2**64 / d)``, so
        one comparison per request replaces a multiplication; this is the number
        an inline (Lua) rendering compares against too.
        """
        return -(-self.numerator * TWO_64 // self.denominator)

    def __str__(self) -> str:
        return f"{self.numerator}/{self.denominator}"


def key_hash(salt: bytes, key: bytes) -> int:
    """u for (salt, key): unsigned first word of MurmurHash3_x64_128, seed 0."""
    return mmh3.hash64(salt + b"\x00" + key, seed=0, x64arch=True, signed=False)[0]


def is_sampled(u: int, fraction: Fraction) -> bool:
    """The defining inequality, kept literal so tests can compare against it."""
    return u * fraction.denominator < fraction.numerator * TWO_64


def decide(salt: bytes, key: bytes, fraction: Fraction) -> bool:
    return key_hash(salt, key) < fraction.threshold
