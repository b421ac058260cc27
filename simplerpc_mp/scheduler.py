"""Which runnable job goes next: fair turns across connections, and how much one worker is given.

Runs in the acceptor process. The acceptor decides *when* a job of a connection may run (its
serial/concurrent order rules, ``Acceptor.advance``); this module decides *which* of the runnable
jobs of all connections a free worker gets, so that one client's backlog can't hold everyone
else's work up. It never looks inside a job: its cost is per decision, not per line.

Theory of operation:

1. Each connection keeps its runnable jobs in ``conn.runnable``, in seq order. A connection with
   runnable jobs is in one of two rings (FQ-CoDel's new/old flow lists, RFC 8290 section 4.1):
   ``new`` holds connections that had nothing on a worker when their job became runnable (a light
   client sending one RPC, a ping-pong client), ``old`` holds connections that keep work queued
   (a pipelining client). ``take`` serves ``new`` first, then ``old`` round robin, one job per
   turn; a connection that still has runnable jobs after its turn goes to the back of ``old``.
   So a light client's RPC runs next whatever number of heavy clients are queued, and heavy
   clients share the rest in turn. A client can't game it by pipelining: the more it queues,
   the more of its work waits in ``old``.
2. A worker is given about ``BATCH_BUDGET_NS`` of estimated work per batch (at least one job),
   from each connection's measured cost per line (an exponentially weighted mean of its finished
   jobs), so a worker holds little that others could be waiting for, while fast RPCs still go in
   batches. A connection not measured yet is assumed slow: its first job goes alone.
3. Jobs taken back from a worker that had not started them (``Pool.take_back``) return to the
   front of their connection's queue, and a connection that had nothing else runnable to the
   front of its ring (``new`` if nothing more of it is queued): they have waited already. The rest of a long serial backlog that a worker
   gave back at ``SLICE_NS`` (``Pool._on_give_back``) has just had its turn: it queues like any
   job of a busy connection, at the back of ``old``.
"""

from __future__ import annotations

from collections import deque

__all__ = ["Scheduler", "SLICE_NS", "BATCH_BUDGET_NS"]

# A batch holds about this much estimated work: fast RPCs still travel in batches of dozens (an
# echo costs ~20 us), a 2 ms RPC goes alone, so a worker never holds much that others wait for.
BATCH_BUDGET_NS = 2_000_000
# A worker that has run one job's lines for longer than this gives the rest back when others
# wait (see worker.py): a long serial backlog holds a worker for a few milliseconds at a time.
SLICE_NS = 5_000_000
# Weight of the newest measurement in a mean: about the last eight jobs count.
EWMA_WEIGHT = 0.125
# Most jobs in one batch, whatever their estimate: bounds one pickle and one pipe write.
MAX_JOBS_PER_BATCH = 256


class Scheduler:
    __slots__ = ("new", "old", "count")

    def __init__(self) -> None:
        self.new: deque = deque()  # connections (see the module docstring)
        self.old: deque = deque()
        self.count = 0  # runnable jobs in all

    def __bool__(self) -> bool:
        return self.count > 0

    def __len__(self) -> int:
        return self.count

    def push(self, job) -> None:
        """A job of ``job.conn`` may run now (appended after its connection's other runnable jobs)."""
        conn = job.conn
        conn.runnable.append(job)
        self.count += 1
        if not conn.scheduled:
            conn.scheduled = True
            # Nothing of it on a worker and nothing queued behind: a sparse flow, served first.
            # (A pipelining serial client has one job runnable at a time, and the rest queued.)
            sparse = conn.running == len(conn.runnable) and not conn.queue
            (self.new if sparse else self.old).append(conn)

    def push_taken_back(self, jobs: list) -> None:
        """Jobs that were on a worker and come back unstarted, first in their connection's queue
        (in seq order); a connection with nothing else runnable goes first of its ring: of
        ``new`` when nothing more of it is queued (a light client's RPC), else of ``old``."""
        for job in sorted(jobs, key=_by_seq, reverse=True):
            conn = job.conn
            runnable = conn.runnable
            index = 0
            while index < len(runnable) and runnable[index].first < job.first:
                index += 1
            runnable.insert(index, job)
            self.count += 1
            if not conn.scheduled:
                conn.scheduled = True
                (self.old if conn.queue else self.new).appendleft(conn)

    def push_given_back(self, job) -> None:
        """The unstarted rest of a serial job cut at a time slice: it has had its turn."""
        conn = job.conn
        conn.runnable.appendleft(job)  # nothing else of a serial connection can be runnable
        self.count += 1
        if not conn.scheduled:
            conn.scheduled = True
            self.old.append(conn)

    def take_batch(self, limit_jobs: int, max_lines: int = 0) -> list:
        """Up to ``limit_jobs`` jobs, about ``BATCH_BUDGET_NS`` of estimated work, in fair turns.

        ``max_lines`` > 0 caps the lines (a worker due for recycling); a job longer than what is
        left is split, and its rest stays first in line.
        """
        batch: list = []
        budget = BATCH_BUDGET_NS
        new, old = self.new, self.old
        lines = 0
        while self.count and len(batch) < limit_jobs:
            ring = new if new else old
            conn = ring[0]
            job = conn.runnable[0]
            if max_lines:
                room = max_lines - lines
                if room <= 0:
                    break
            ring.popleft()
            conn.runnable.popleft()
            self.count -= 1
            if max_lines and job.count > room:
                # A serial backlog longer than the worker may still run: its first lines go, the
                # rest waits in the connection's queue until they are answered (serial order).
                rest, job = job, job.split(room)
                conn.queue.appendleft(rest)
            batch.append(job)
            lines += job.count
            if conn.runnable:
                old.append(conn)
            else:
                conn.scheduled = False
            per_line = conn.ns_per_line
            budget -= per_line * (job.count or 1) if per_line else BATCH_BUDGET_NS
            if budget <= 0:
                break
        return batch

    def measured(self, jobs: list, per_line: float) -> None:
        """``jobs`` finished on a worker, at ``per_line`` ns for each of their lines."""
        for job in jobs:
            if job.count:
                conn = job.conn
                if conn.ns_per_line:
                    conn.ns_per_line += (per_line - conn.ns_per_line) * EWMA_WEIGHT
                else:
                    conn.ns_per_line = per_line or 1.0

    def clear(self) -> None:
        for ring in (self.new, self.old):
            for conn in ring:
                conn.runnable.clear()
                conn.scheduled = False
            ring.clear()
        self.count = 0


def _by_seq(job) -> int:
    return job.first
