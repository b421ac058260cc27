"""Handing jobs to workers and routing what they send back: the job side of the worker pool.

Runs in the main server process, as part of ``supervisor.Pool`` (``Dispatch`` is its base
class; the process side, spawning, reaping, recycling and reloading, stays in supervisor.py).
Which runnable job goes next is the scheduler's choice (``scheduler.py``); this module sends the
batches (``dispatch``, ``send_batch``), takes back work a worker has not started while its RPC
runs long (``balance``, ``take_back``), tells workers when to cut a long job at a time slice
(``_set_yield_flags``), and routes each reply to its connection (``_apply_replies``): every job
handed out is answered exactly once, in order.
"""

from __future__ import annotations

import logging
import selectors
import time
from typing import TYPE_CHECKING

from . import ipc
from .acceptor import Job, nth_line_end
from .scheduler import MAX_JOBS_PER_BATCH

if TYPE_CHECKING:
    from .supervisor import WorkerHandle

log = logging.getLogger("simplerpc_mp.supervisor")

__all__ = ["Dispatch"]

READ, WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
# At most this many batches sent to a worker and not yet fully answered. Two keep a worker fed
# (it finds the next batch waiting when it finishes one) while letting batches grow under load,
# since each pipe write wakes a worker and is the acceptor's largest per-batch cost.
MAX_BATCHES_PER_WORKER = 2
RECV_BYTES = 64 * 1024  # as in acceptor.py; larger replies arrive in several reads
# A worker with a batch still running is sent another only if its current RPC started less
# than this long ago: work must not queue behind a long (or hung) RPC while a worker frees up.
# 2 ms still lets batches of fast RPCs pipeline (an echo takes ~20 us); a worker on a slower
# RPC gets its next batch when it has answered, one round trip (~0.1 ms) later.
PREFETCH_MAX_AGE_NS = 2_000_000
# Jobs a worker holds and has not started are taken back for an idle worker once the worker's
# current RPC has run this long (see Pool.balance); with no worker idle, only once it has run
# HUNG_AGE_NS (a hung handler with --timeout 0 must not keep them forever, and moving work from
# one busy worker to another sooner only makes it bounce between them).
TAKE_BACK_AGE_NS = 2_000_000
HUNG_AGE_NS = 1_000_000_000
# While a worker's RPC has run longer than HOLDBACK_NS, the answers it finished before that RPC
# are taken from its journal every JOURNAL_SWEEP_S, instead of waiting for the slow one to end.
HOLDBACK_NS = 2_000_000
JOURNAL_SWEEP_S = 0.005
# BOARD_REVOKED of a worker that must start nothing more (job ids never get near it).
REVOKE_ALL = 2**62


class Dispatch:
    """The job-routing half of ``supervisor.Pool`` (a mixin: it uses the pool's ``workers``,
    ``acceptor``, ``selector``, ``timers`` and its ``recycle``, ``check_deadline``, ``_on_hello``
    and ``_send_stop``)."""

    def dispatch(self) -> None:
        """Take back what waits behind a long RPC (``balance``), then hand runnable jobs to
        workers in batches, least-loaded worker first, in the fair order of the scheduler."""
        scheduler = self.acceptor.scheduler
        now_ns = time.monotonic_ns()
        self.balance(now_ns)
        if scheduler:
            targets = [
                w for w in self.workers
                if _takes_jobs(w) and (
                    not w.batches
                    or (len(w.batches) < MAX_BATCHES_PER_WORKER and now_ns - w.board[ipc.BOARD_START_NS] < PREFETCH_MAX_AGE_NS)
                )
            ]
            if len(targets) > 1:
                targets.sort(key=_by_load)
            for index, worker in enumerate(targets):
                if not scheduler:
                    break
                share = -(-len(scheduler) // (len(targets) - index))
                room = 0  # no cap
                if worker.max_lines:
                    room = worker.max_lines - worker.lines_sent
                    if room <= 0:
                        continue  # (send_batch retires a worker at its limit; 0 would mean no cap)
                batch = scheduler.take_batch(min(share, MAX_JOBS_PER_BATCH), room)
                if batch:
                    self.send_batch(worker, batch, now_ns)
        self._set_yield_flags()

    def balance(self, now_ns: int) -> None:
        """Take back the jobs a worker has not started while its current RPC runs long, for an
        idle worker (or from a worker that looks hung). Costs a few slot reads per worker."""
        holding = [w for w in self.workers if len(w.jobs) > 1 and not w.dead and w.booted]
        if not holding:
            return
        idle = sum(1 for w in self.workers if _takes_jobs(w) and not w.batches)
        wake_at = 0
        for worker in holding:
            board = worker.board
            if not board[ipc.BOARD_JOB]:
                continue
            started = board[ipc.BOARD_START_NS]
            due = started + (TAKE_BACK_AGE_NS if idle else HUNG_AGE_NS)
            if now_ns < due:
                wake_at = due if not wake_at else min(wake_at, due)
            else:
                taken = self.take_back(worker)
                if taken is None:
                    wake_at = now_ns + 1_000_000  # its claim lock was busy: try again soon
                elif taken and idle:
                    idle -= 1  # that idle worker gets what was taken back
        if wake_at and (self._wake_timer is None or self._wake_timer.when > wake_at / 1e9):
            if self._wake_timer is not None:
                self._wake_timer.cancel()
            self._wake_timer = self.timers.call_at(wake_at / 1e9, self._wake)

    def _set_yield_flags(self) -> None:
        """Tell every worker whether work waits for a worker (runnable here, or sent to a worker
        behind the RPC it runs): a worker then cuts a long serial job at a time slice."""
        contended = 1 if self.acceptor.scheduler or any(len(w.jobs) > 1 for w in self.workers) else 0
        if contended == self._contended:
            return
        self._contended = contended
        for worker in self.workers:
            # (a timed-out worker keeps its 1: it must give back the rest of its job)
            if worker.yield_flag != contended and not worker.dead and worker.board is not None and worker.timed_out is None:
                worker.board[ipc.BOARD_YIELD] = contended
                worker.yield_flag = contended

    def _wake(self) -> None:
        """Timer: nothing to do but wake the loop, whose pass ends in ``dispatch``."""
        self._wake_timer = None

    def take_back(self, worker: WorkerHandle, revoke_all: bool = False) -> int | None:
        """Take back the jobs the worker has not started (see ipc's docstring): how many, or
        None if its claim lock was busy this instant (the worker was claiming a job).
        ``revoke_all``: it may start no job sent later either (it is about to be killed)."""
        if not worker.claim_lock.acquire(False):
            return None
        try:
            claimed = worker.board[ipc.BOARD_CLAIMED]
            jobs = worker.jobs
            taken = []
            while jobs and jobs[-1].job_id > claimed:
                taken.append(jobs.pop())
            if revoke_all:
                worker.board[ipc.BOARD_REVOKED] = REVOKE_ALL
            elif taken:
                worker.board[ipc.BOARD_REVOKED] = taken[0].job_id
        finally:
            worker.claim_lock.release()
        if not taken:
            return 0
        taken.reverse()
        self.taken_back += len(taken)
        lines = sum(job.count for job in taken)
        worker.load -= lines
        worker.lines_sent -= lines
        last = jobs[-1].job_id if jobs else 0
        batches = worker.batches
        while batches and batches[-1] > last:
            batches.pop()
        if jobs and (not batches or batches[-1] < last):
            batches.append(last)  # its current batch now ends with the job it runs
        log.debug("took %d jobs back from worker %s (pid %s)", len(taken), worker.worker_id, worker.pid)
        self.acceptor.take_back(taken)
        self._stop_if_done(worker)
        return len(taken)

    def send_batch(self, worker: WorkerHandle, batch: list[Job], now_ns: int = 0) -> None:
        items = []
        lines = 0
        job_id = self.next_job_id
        now_ns = now_ns or time.monotonic_ns()
        rooms = self.acceptor.rooms
        in_rooms = rooms.conn_rooms  # (empty while no one is in a room: then one test per job)
        for job in batch:
            job.job_id = job_id
            job.sent_ns = now_ns
            job_id += 1
            lines += job.count
            session = job.conn.session
            if session is not None or job.kind == ipc.DISCONNECT:
                session = self._session_for(worker, job)
            net_id = job.conn.net_id
            room_set = None
            if in_rooms or job.kind == ipc.DISCONNECT:
                room_set = self._rooms_for(worker, job, rooms.shipped(net_id))
            items.append((job.job_id, job.kind, net_id, job.payload, session, room_set,
                          job.conn.identity))
        self.next_job_id = job_id
        worker.jobs.extend(batch)
        worker.batches.append(job_id - 1)
        worker.load += lines
        worker.lines_sent += lines
        self._write(worker, ipc.frame_record(ipc.pack((ipc.BATCH, items))))
        if worker.sweep_timer is None and _may_hold_back(worker):
            worker.sweep_timer = self.timers.call_later(JOURNAL_SWEEP_S, self.sweep_journal, worker)
        if worker.check_timer is None and self.min_timeout_s > 0:
            worker.check_timer = self.timers.call_later(self.min_timeout_s, self.check_deadline, worker)
        if worker.max_lines and worker.lines_sent >= worker.max_lines:
            self.recycle(worker, f"served max_requests ({worker.max_lines})")

    @staticmethod
    def _session_for(worker: WorkerHandle, job: Job):
        """The job's session as this worker is sent it: ``HELD`` if it has the current one."""
        conn = job.conn
        return worker.sessions.ship(conn.net_id, job.kind, conn.session_version, conn.session)

    @staticmethod
    def _rooms_for(worker: WorkerHandle, job: Job, shipped):
        """The job's rooms field: None for none, ``HELD`` if this worker has the current set,
        else the frozenset (kept in step with the worker's copy exactly as sessions are)."""
        if shipped is None:
            if job.kind != ipc.DISCONNECT:
                return None
            shipped = (0, None)
        return worker.room_sets.ship(job.conn.net_id, job.kind, shipped[0], shipped[1])

    def _write(self, worker: WorkerHandle, data: bytes) -> None:
        if worker.wbuf:
            worker.wbuf += data
            return
        try:
            sent = worker.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            return  # the worker died; its sentinel will tell, and its jobs are recovered then
        if sent < len(data):
            worker.wbuf += data[sent:]
            self.selector.modify(worker.sock, READ | WRITE, worker)

    def on_writable(self, worker: WorkerHandle) -> None:
        if worker.dead:
            return
        try:
            sent = worker.sock.send(worker.wbuf)
        except BlockingIOError:
            return
        except OSError:
            sent = len(worker.wbuf)
        del worker.wbuf[:sent]
        if not worker.wbuf:
            self.selector.modify(worker.sock, READ, worker)

    def on_readable(self, worker: WorkerHandle) -> None:
        if worker.dead:
            return
        try:
            data = worker.sock.recv(RECV_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.selector.unregister(worker.sock)  # EOF: the sentinel will report the exit
            worker.dead = True
            return
        self._handle_records(worker, data)

    def _handle_records(self, worker: WorkerHandle, data: bytes) -> None:
        for record in worker.reader.feed(data):
            message = ipc.unpack(record)
            tag = message[0]
            if tag == ipc.REPLY:
                self._apply_replies(worker, message[1])
                self._stop_if_done(worker)
            elif tag == ipc.GIVE_BACK:
                self._on_give_back(worker, message[1], message[2])
                self._stop_if_done(worker)
            elif tag == ipc.HELLO:
                self._on_hello(worker, message[2])
            elif tag == ipc.BOOT_ERROR:
                worker.boot_error = message[1]

    def _apply_replies(self, worker: WorkerHandle, replies: list) -> None:
        """Route replies to their connections; a job whose last answer came is done.

        A worker runs its jobs in order, so the pipe brings each reply for its oldest job, line
        after line. Journal records (read after a death, or from a live worker during a slow RPC)
        may repeat what the pipe brought, or run ahead of pipe data not read yet: only the reply
        that starts at, or spans, the next unanswered line is applied (from that line on); the
        pipe brings the rest later, in order.
        """
        acceptor = self.acceptor
        jobs = worker.jobs
        finished = []
        for job_id, first, count, answers, pushes, session in replies:
            if not jobs or jobs[0].job_id != job_id:
                continue
            job = jobs[0]
            if first != job.answered:
                if not first < job.answered < first + count:
                    continue
                # A pipe reply for several lines whose first ones the journal delivered already:
                # those lines' pushes and session change came with them; take the rest.
                skip = job.answered - first
                answers = answers[nth_line_end(answers, skip) + 1 :]
                first, count, pushes, session = job.answered, count - skip, (), ipc.UNCHANGED
            acceptor.on_reply(job, first, count, answers, pushes, session)
            job.answered += count
            worker.load -= count
            worker.served += count
            if job.answered >= job.count:
                jobs.popleft()
                if worker.batches and worker.batches[0] == job_id:
                    worker.batches.popleft()
                finished.append(job)
                acceptor.job_done(job)
        if finished:
            # The jobs that finished in one reply share its time evenly per line: the worker
            # sends several jobs' answers at once, so a per-job clock would charge the first.
            now_ns = time.monotonic_ns()
            elapsed = now_ns - max(finished[0].sent_ns, worker.last_done_ns)
            worker.last_done_ns = now_ns
            lines = sum(job.count for job in finished)
            if lines:
                acceptor.scheduler.measured(finished, elapsed / lines)

    def _stop_if_done(self, worker: WorkerHandle) -> None:
        """A retiring worker that holds nothing more (answered, given or taken back) is stopped."""
        if not worker.jobs and worker.stopping is False and not worker.accepting and not worker.dead and worker.timed_out is None:
            self._send_stop(worker)

    def _on_give_back(self, worker: WorkerHandle, job_id: int, line: int) -> None:
        """The worker cut a long job at a time slice: lines ``line ..`` go to the next turn."""
        jobs = worker.jobs
        job = jobs[0] if jobs else None
        if job is None or job.job_id != job_id or job.answered != line:
            # Its replies for the lines before come first on the pipe, so this can't happen;
            # if it does, the worker is out of step: replace it (its jobs are recovered then).
            log.error("worker %s (pid %s) gave back line %s of job %s out of turn; replacing it",
                      worker.worker_id, worker.pid, line, job_id)
            worker.accepting = False
            worker.killed_for = "out of step with the acceptor"
            worker.process.kill()
            return
        jobs.popleft()
        if worker.batches and worker.batches[0] == job_id:
            worker.batches.popleft()
        rest = job.count - line
        self.given_back += 1
        worker.load -= rest
        worker.lines_sent -= rest
        worker.last_done_ns = time.monotonic_ns()
        self.acceptor.give_back(job, line)

    def _drain(self, worker: WorkerHandle) -> None:
        while True:
            try:
                data = worker.sock.recv(RECV_BYTES)
            except (BlockingIOError, OSError):
                return
            if not data:
                return
            self._handle_records(worker, data)

    def sweep_journal(self, worker: WorkerHandle) -> None:
        """Timer: deliver answers a busy worker finished but keeps back while a slow RPC runs."""
        worker.sweep_timer = None
        if worker.dead or not _may_hold_back(worker):
            return  # (send_batch arms the timer again when there is something to hold back)
        if time.monotonic_ns() - worker.board[ipc.BOARD_START_NS] > HOLDBACK_NS:
            self._apply_replies(worker, ipc.read_journal(worker.journal, worker.board))
        worker.sweep_timer = self.timers.call_later(JOURNAL_SWEEP_S, self.sweep_journal, worker)


def _may_hold_back(worker: WorkerHandle) -> bool:
    """Could the worker hold a finished answer back behind a slow RPC? Not with one line and
    one job: then the running RPC is all it has (the CPU-heavy case: no sweeps, no wake-ups)."""
    return worker.load > 1 or len(worker.jobs) > 1


def _takes_jobs(worker: WorkerHandle) -> bool:
    """Booted, serving (not a spare, not retiring) and alive: may be handed jobs."""
    return worker.accepting and worker.booted and not worker.spare and not worker.dead


def _by_load(worker: WorkerHandle) -> tuple:
    return (len(worker.batches), worker.load)
