"""Token buckets for rate limits. Pure: time is passed in.

A bucket holds up to ``rate * burst_s`` tokens and refills at ``rate`` per
second; each message or request takes one. An empty bucket answers how long
until a token is back (the ``Retry-After``).
"""

from __future__ import annotations

from collections import OrderedDict

__all__ = ["Buckets", "TokenBucket"]


class TokenBucket:
    __slots__ = ("capacity", "rate", "tokens", "updated")

    def __init__(self, rate: float, burst_s: float, now: float) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate * burst_s)
        self.tokens = self.capacity
        self.updated = now

    def take(self, now: float) -> float:
        """Take a token: 0.0 when granted, else the seconds until one is back."""
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class Buckets:
    """One bucket per key (a user), the least recently used dropped past ``max_keys``."""

    def __init__(self, rate: float, burst_s: float, max_keys: int = 100_000) -> None:
        self.rate = rate
        self.burst_s = burst_s
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def take(self, key: str, now: float) -> float:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst_s, now)
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket.take(now)
