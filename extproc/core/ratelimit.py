"""The one token bucket (pure): the clock is an argument, never read here.

Used for the per-target mirror cap (``Plan``) and for the HTTP/2 transport's
flood rations (resets, SETTINGS). ``rate`` tokens a second refill a bucket
that holds at most ``capacity``; a bucket starts full.
"""

from __future__ import annotations


class TokenBucket:
    __slots__ = ("rate", "capacity", "tokens", "last")

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self.last = now

    def available(self, now: float) -> float:
        """The tokens at ``now``, taking none (what ``take`` would find)."""
        return min(self.capacity, self.tokens + (now - self.last) * self.rate)

    def take(self, now: float) -> bool:
        """One token if there is one at ``now``. A refused take costs nothing,
        so a caller over the rate gets tokens back at ``rate``, not later."""
        tokens = self.available(now)
        self.last = now
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            return True
        self.tokens = tokens
        return False
