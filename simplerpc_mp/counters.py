"""What the acceptor counts for ``stats``, ``top`` and ``/metrics``: per op, per reason. Pure.

Runs in the acceptor process; no I/O, no locks (one loop owns it). The acceptor calls ``reply``
once per reply a worker sends (one reply answers one or many lines of a job, so the cost is per
reply, not per line) and ``fail`` for answers it gives itself; readers (``stats.py``,
``metrics.py``) read the fields at snapshot or scrape time. Nothing here is per-RPC Python work
beyond a few additions: a job's op is found once per job (a C-speed ``bytes.count`` tells
whether all its lines call the same op, the common case), and a FAIL in a reply is found by a
C-speed substring search before anything is parsed.

Durations go to fixed log-scale buckets (``BOUNDS``: 10 per decade from 10 us to 100 s) per op,
from which ``percentile`` reads p50/p99 and ``/metrics`` exports a 1-2.5-5 subset as a
Prometheus histogram. A duration runs from the arrival of the job's first line (a backlog that
grew while it waited counts from its first line) to the answer entering the connection's output.

The ``op`` key holds registered ops only (``set_ops``): every other name a client sends counts
under ``OTHER``, so no client can grow these tables by inventing op names. FAIL reasons come from
server code (exception class names), and are capped per op all the same (``MAX_REASONS``).
"""

from __future__ import annotations

import json
from bisect import bisect_left
from collections import deque

__all__ = ["Counters", "OpStats", "OTHER", "BOUNDS", "EXPORTED", "RESTART_REASONS", "percentile"]

OTHER = "<other>"
_MANTISSAS = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0)
# Upper bounds (seconds, inclusive) of the buckets; the last bucket holds everything above 100 s.
BOUNDS: tuple[float, ...] = tuple(round(m * 10.0**e, 12) for e in range(-5, 2) for m in _MANTISSAS) + (100.0,)
RESTART_REASONS = ("crashed", "timeout", "recycled", "reload", "scaled", "boot_failed")
# Reasons a connection is closed for that are always shown (others appear once they happen).
CLOSED_REASONS = ("output_hard_limit", "output_soft_limit", "idle_timeout", "max_connections", "max_total_output_bytes",
                  "client_closed")
MAX_REASONS = 32  # distinct FAIL reasons kept per op; more count as OTHER
RECENT_RESTARTS = 20  # kept for ``top``


def _exported() -> tuple[int, ...]:
    keep = []
    for index, bound in enumerate(BOUNDS):
        mantissa = bound
        while mantissa >= 10.0 - 1e-9:
            mantissa /= 10.0
        while mantissa < 1.0 - 1e-9:
            mantissa *= 10.0
        if any(abs(mantissa - m) < 1e-6 for m in (1.0, 2.5, 5.0)):
            keep.append(index)
    return tuple(keep)


# Indices of the bounds exported to Prometheus (1, 2.5, 5 per decade: 22 buckets and +Inf).
EXPORTED = _exported()


class OpStats:
    """Counts of one op: answers, FAILs by reason, and the duration histogram."""

    __slots__ = ("count", "fails", "buckets", "sum_s")

    def __init__(self) -> None:
        self.count = 0  # answers, OKAY and FAIL
        self.fails: dict[str, int] = {}
        self.buckets = [0] * (len(BOUNDS) + 1)
        self.sum_s = 0.0

    @property
    def fail(self) -> int:
        return sum(self.fails.values())

    def add_fail(self, reason: str, n: int = 1) -> None:
        fails = self.fails
        if reason not in fails and len(fails) >= MAX_REASONS:
            reason = OTHER
        fails[reason] = fails.get(reason, 0) + n


def percentile(stats: OpStats, q: float) -> float | None:
    """The ``q`` quantile (0..1) of the durations, in seconds, interpolated in its bucket; None
    when there are none."""
    total = sum(stats.buckets)
    if not total:
        return None
    rank = q * total
    seen = 0
    for index, n in enumerate(stats.buckets):
        if n and seen + n >= rank:
            if index >= len(BOUNDS):
                return BOUNDS[-1]
            low = BOUNDS[index - 1] if index else 0.0
            return low + (BOUNDS[index] - low) * max(0.0, rank - seen) / n
        seen += n
    return BOUNDS[-1]


_MIXED = object()


class Counters:
    """The acceptor's counters (one instance, ``Acceptor.counters``)."""

    def __init__(self) -> None:
        self.ops: dict[bytes, OpStats] = {}  # registered ops, by the bytes clients send
        self._needles: dict[bytes, bytes] = {}  # op -> b"\nop{", a later line calling it
        self.other = OpStats()
        self.restarts = dict.fromkeys(RESTART_REASONS, 0)
        self.recent_restarts: deque = deque(maxlen=RECENT_RESTARTS)  # (time.time(), worker_id, pid, reason)
        self.closed: dict[str, int] = dict.fromkeys(CLOSED_REASONS, 0)
        self.accepted = 0
        self.pushes = 0

    def set_ops(self, names) -> None:
        """The registered ops (from a worker's HELLO); counts of ops already known are kept."""
        for name in names:
            key = name.encode("utf-8")
            if key not in self.ops:
                self.ops[key] = OpStats()
                self._needles[key] = b"\n" + key + b"{"

    def by_name(self) -> dict[str, OpStats]:
        named = {key.decode("utf-8"): stats for key, stats in self.ops.items()}
        named[OTHER] = self.other
        return named

    def _line_stats(self, job):
        """The OpStats of the job's lines (one object when they all call one op, else a list
        per line), found once per job and kept on it. The op of the first line is what comes
        before its first brace (a line without one gets no registered op: the slice then holds
        an LF); the other lines call it too iff the job holds count-1 more "LF op {"."""
        payload = job.payload
        op = payload[:payload.find(b"{")]
        count = job.count
        if count <= 1 or payload.count(self._needles.get(op) or b"\n" + op + b"{") == count - 1:
            found = self.ops.get(op) or self.other
        else:
            ops, other = self.ops, self.other
            found = [ops.get(line.partition(b"{")[0]) or other for line in payload.split(b"\n")[:-1]]
        job.op_stats = found
        return found

    def reply(self, job, first: int, count: int, answers: bytes, now: float) -> None:
        """``count`` answers (lines ``first ..`` of ``job``) from a worker, at ``now``.

        A few hundred nanoseconds per reply (a reply answers one or many lines): the op found
        once per job, one bisect, and a memchr for "F" before any search for a FAIL line.
        """
        found = job.op_stats
        if found is None:
            found = self._line_stats(job)
        elapsed = now - job.arrived
        index = bisect_left(BOUNDS, elapsed)
        # A FAIL line starts with F; an answer without any F has none (memchr, ~70 ns).
        has_fail = answers.find(b"F") >= 0 and (answers.startswith(b"FAIL{") or b"\nFAIL{" in answers)
        if type(found) is OpStats:
            found.count += count
            found.buckets[index] += count
            found.sum_s += elapsed * count
            if has_fail:
                for line in answers.split(b"\n"):
                    if line.startswith(b"FAIL{"):
                        found.add_fail(_reason(line))
            return
        lines = answers.split(b"\n") if has_fail else ()
        for offset in range(count):
            stats = found[first + offset]
            stats.count += 1
            stats.buckets[index] += 1
            stats.sum_s += elapsed
            if has_fail and lines[offset].startswith(b"FAIL{"):
                stats.add_fail(_reason(lines[offset]))

    def fail(self, job, start: int, end: int, reason: str, now: float) -> None:
        """Lines ``start .. end-1`` of ``job`` answered FAIL ``reason`` by the server itself."""
        if end <= start or not job.count:
            return
        found = job.op_stats if job.op_stats is not None else self._line_stats(job)
        elapsed = now - job.arrived
        index = bisect_left(BOUNDS, elapsed)
        for line in range(start, end):
            stats = found if type(found) is OpStats else found[line]
            stats.count += 1
            stats.buckets[index] += 1
            stats.sum_s += elapsed
            stats.add_fail(reason)

    def fail_other(self, reason: str) -> None:
        """An answer for a line that has no op we could count it under (FrameTooLarge)."""
        self.other.count += 1
        self.other.buckets[0] += 1
        self.other.add_fail(reason)

    def closed_one(self, reason: str) -> None:
        self.closed[reason] = self.closed.get(reason, 0) + 1

    def restarted(self, reason: str, worker_id: int, pid: int, when: float) -> None:
        self.restarts[reason] = self.restarts.get(reason, 0) + 1
        self.recent_restarts.append((when, worker_id, pid, reason))


def _reason(line: bytes) -> str:
    try:
        reason = json.loads(line[4:])["reason"]
    except (ValueError, KeyError, TypeError):
        return "Unknown"
    return reason if isinstance(reason, str) else "Unknown"
