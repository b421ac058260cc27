"""A timer heap for the acceptor's loop: deadlines drive the selector timeout, no polling tick.

Runs in the acceptor process only.
"""

from __future__ import annotations

import heapq
import itertools
import time
from typing import Callable

__all__ = ["Timers", "Timer"]


class Timer:
    __slots__ = ("when", "callback", "args", "cancelled")

    def __init__(self, when: float, callback: Callable, args: tuple):
        self.when = when
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        # The heap keeps the entry until its time comes: don't keep what it refers to alive.
        self.callback = _nothing
        self.args = ()


def _nothing() -> None:
    pass


class Timers:
    def __init__(self) -> None:
        self._heap: list = []
        self._counter = itertools.count()  # ties keep insertion order; Timers never compare

    def call_at(self, when: float, callback: Callable, *args) -> Timer:
        timer = Timer(when, callback, args)
        heapq.heappush(self._heap, (when, next(self._counter), timer))
        return timer

    def call_later(self, delay: float, callback: Callable, *args) -> Timer:
        return self.call_at(time.monotonic() + delay, callback, *args)

    def timeout(self, now: float) -> float | None:
        """Seconds until the next live timer, for ``selector.select``; None when there is none."""
        heap = self._heap
        while heap and heap[0][2].cancelled:
            heapq.heappop(heap)
        if not heap:
            return None
        return max(0.0, heap[0][0] - now)

    def run_due(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            timer = heapq.heappop(heap)[2]
            if not timer.cancelled:
                timer.callback(*timer.args)
