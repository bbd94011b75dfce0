"""The mirror decision (docs/DESIGN.md, normative).

``u = MurmurHash3_x64_128(salt + b"\\x00" + key, seed=0)``, first 64-bit word,
unsigned; a request is mirrored iff ``u * denominator < numerator * 2**64``.
Everything is exact integer arithmetic so any language can reproduce it bit for
bit. Pure: no I/O, no configuration, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import mmh3

TWO_64 = 1 << 64


class FractionError(ValueError):
    """A fraction out of bounds; ``field`` is "numerator", "denominator" or
    "" (the two together), so configuration can name the field it came from."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field} {message}" if field else message)
        self.field = field
        self.message = message


@dataclass(frozen=True, slots=True)
class Fraction:
    """GEP-3171 fraction; ``percent: N`` is ``Fraction(N, 100)``.

    The only place its bounds are checked: configuration turns a
    FractionError into a message naming its variable or manifest field.
    """

    numerator: int
    denominator: int = 100

    # The bound each part must meet, as configuration messages state it.
    BOUNDS: ClassVar[dict[str, str]] = {"numerator": ">= 0", "denominator": ">= 1"}

    def __post_init__(self) -> None:
        for problem in self.problems(self.numerator, self.denominator):
            raise problem

    @staticmethod
    def problems(numerator: int, denominator: int) -> list[FractionError]:
        """Every bound ``numerator/denominator`` breaks (none: a valid fraction)."""
        found = []
        if denominator < 1:
            found.append(FractionError("denominator", f"must be >= 1, got {denominator}"))
        if numerator < 0:
            found.append(FractionError("numerator", f"must be >= 0, got {numerator}"))
        if not found and numerator > denominator:
            found.append(FractionError("", f"numerator must be <= denominator, got {numerator}/{denominator}"))
        return found

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
