"""Hybrid logical clock stamps: parse, format, compare, and a clock.

A stamp is ``"<wall_ms:13 digits>-<counter:4 digits>-<node>"``. For this
fixed-width form, byte-wise string order is the order ``(wall_ms, counter,
node)``, so stamps compare as plain strings (and in PostgreSQL with
``COLLATE "C"``). The node part makes the order total.

The hub checks stamps (syntax, drift ahead of its own clock); devices write
them with :class:`Clock`. Pure: no I/O; time comes from a function you pass.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["MAX_COUNTER", "Clock", "Stamp", "ahead_ms", "format_stamp", "is_stamp", "parse"]

STAMP_RE = re.compile(r"[0-9]{13}-[0-9]{4}-[A-Za-z0-9_.:-]{1,64}")
NODE_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
MAX_COUNTER = 9999
MAX_WALL_MS = 10**13 - 1


@dataclass(frozen=True, order=True, slots=True)
class Stamp:
    """A parsed stamp; orders like its string form."""

    wall_ms: int
    counter: int
    node: str

    def __str__(self) -> str:
        return format_stamp(self.wall_ms, self.counter, self.node)


def is_stamp(text: object) -> bool:
    """True when ``text`` is a well-formed stamp string."""
    return isinstance(text, str) and STAMP_RE.fullmatch(text) is not None


def parse(text: str) -> Stamp:
    """Parse a stamp string; ``ValueError`` names what is wrong."""
    if not is_stamp(text):
        raise ValueError(f"not an HLC stamp (want <13 digits>-<4 digits>-<node>): {text!r}")
    return Stamp(int(text[:13]), int(text[14:18]), text[19:])


def format_stamp(wall_ms: int, counter: int, node: str) -> str:
    """The string form of a stamp; refuses values that would break the ordering."""
    if not 0 <= wall_ms <= MAX_WALL_MS:
        raise ValueError(f"wall_ms out of range: {wall_ms}")
    if not 0 <= counter <= MAX_COUNTER:
        raise ValueError(f"counter out of range: {counter}")
    if NODE_RE.fullmatch(node) is None:
        raise ValueError(f"bad node: {node!r}")
    return f"{wall_ms:013d}-{counter:04d}-{node}"


def ahead_ms(stamp: str, now_ms: int) -> int:
    """How far the stamp's wall clock is ahead of ``now_ms`` (negative when behind)."""
    return int(stamp[:13]) - now_ms


def wall_ms_now() -> int:
    return time.time_ns() // 1_000_000


class Clock:
    """A device's hybrid logical clock.

    ``now()`` gives a stamp greater than every stamp this clock gave or saw
    (``observe``), staying close to the wall clock. A clock restored with the
    last stamp it gave (``last=``) never goes backwards across restarts.
    """

    def __init__(
        self,
        node: str,
        *,
        last: str | None = None,
        wall: Callable[[], int] = wall_ms_now,
    ) -> None:
        if NODE_RE.fullmatch(node) is None:
            raise ValueError(f"bad node: {node!r}")
        self.node = node
        self._wall = wall
        self._wall_ms = 0
        self._counter = 0
        if last is not None:
            self.observe(last)

    def now(self) -> str:
        wall = self._wall()
        if wall > self._wall_ms:
            self._wall_ms, self._counter = wall, 0
        elif self._counter < MAX_COUNTER:
            self._counter += 1
        else:
            # The counter is spent within one millisecond: borrow the next one.
            self._wall_ms, self._counter = self._wall_ms + 1, 0
        return format_stamp(self._wall_ms, self._counter, self.node)

    def observe(self, stamp: str) -> None:
        """Move past a stamp seen from elsewhere, so the next ``now()`` is greater."""
        seen = parse(stamp)
        if (seen.wall_ms, seen.counter) > (self._wall_ms, self._counter):
            self._wall_ms, self._counter = seen.wall_ms, seen.counter
