"""The worker pool and its supervision: spawn, dispatch, reap, time out, recycle, reload.

Runs in the main server process, driven by the loop in ``server.Server``; no threads. Worker
pipes and process sentinels are file descriptors in the same selector as the client sockets,
and deadlines live in the loop's timer heap.

The promise it keeps: every job it hands out is answered exactly once. It knows which worker
holds which job (``WorkerHandle.jobs``, in the order the worker runs them) and, from the
worker's progress board in shared memory, which RPC each worker is running. When a worker
dies, the RPC it was running (and any it finished but had not yet sent) gets ``WorkerCrashed``
or ``Timeout``; the RPCs it had not started go back in line for another worker.

Which runnable job goes to which worker, and how much, is the scheduler's choice
(``scheduler.py``); handing the batches out, taking back work a worker has not started, and
routing replies is ``dispatch.py`` (``Pool``'s base class). This module is the process side: it
spawns, reaps, times out, recycles and reloads workers, and keeps ``spare_workers`` booted
workers in reserve that replace a lost or retiring worker at once (``manage``).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import random
import selectors
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import deque

from . import ipc
from .acceptor import Acceptor, Job
from .dispatch import Dispatch
from .errors import Timeout, WorkerCrashed
from .worker import worker_main

log = logging.getLogger("simplerpc_mp.supervisor")

__all__ = ["Pool", "WorkerHandle", "FatalError", "UnguardedMainError", "EXIT_UNGUARDED_MAIN"]

READ, WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
# After SIGUSR1 (stack dump) a timed-out worker gets this long before SIGKILL.
DUMP_GRACE_S = 0.2
# Crash-loop protection for workers that die before they finish booting, or this soon after.
EARLY_DEATH_S = 1.0
BOOT_FAILURES_FATAL = 5
BOOT_BACKOFF_FIRST_S = 0.1
BOOT_BACKOFF_MAX_S = 5.0
MEMORY_CHECK_INTERVAL_S = 1.0
# A worker asked to stop (recycling, reload, scale-down, shutdown) that is still there after this
# long is killed.
STOP_WAIT_S = 10.0
# Descriptors the pool keeps open (on /dev/null) and lets go just before it spawns a worker: when
# client connections have taken every other one (EMFILE), a lost worker can still be replaced,
# and the connections waiting for it get their answers. A spawn needs about 10 at its peak (the
# socketpair, the spawn and exec-error pipes, shared-memory arenas) and keeps 5.
SPAWN_RESERVE_FDS = 16
# A worker process that finds itself re-running the user's script (a script that starts its
# Server without the ``if __name__ == "__main__":`` guard; spawned workers import it again)
# exits with this code, before it binds or spawns anything (see ``server.Server``).
EXIT_UNGUARDED_MAIN = 85


_WORKER_IGNORED_SIGNALS = {signal.SIGINT, signal.SIGTERM}


class FatalError(Exception):
    """The pool cannot serve (handlers won't load, workers keep dying); ``exit_code`` says which."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class UnguardedMainError(FatalError):
    """The workers re-run the user's script, which starts a server: it lacks the main guard."""


class Sentinel:
    """Selector data for a worker's process sentinel (readable once the process has exited)."""

    __slots__ = ("worker",)

    def __init__(self, worker: "WorkerHandle"):
        self.worker = worker


class WorkerHandle:
    __slots__ = (
        "worker_id", "process", "pid", "sock", "board", "journal", "reader", "wbuf", "jobs", "batches", "load",
        "booted", "accepting", "stopping", "dead", "lines_sent", "max_lines", "generation",
        "check_timer", "sweep_timer", "timed_out", "boot_error", "retire_reason", "kill_timer", "booted_at",
        "claim_lock", "spare", "yield_flag", "last_done_ns", "overdue", "sessions",
        "boot_timer", "killed_for", "room_sets", "served", "restart_kind", "spawned_at",
    )

    def __init__(self, worker_id: int, process, sock: socket.socket, board, journal, generation: int, max_lines: int,
                 claim_lock=None, spare: bool = False):
        self.worker_id = worker_id
        self.process = process
        self.pid = process.pid
        self.sock = sock
        self.board = board
        self.journal = journal
        self.reader = ipc.RecordReader()
        self.wbuf = bytearray()
        self.jobs: deque[Job] = deque()  # sent and not fully answered, in the order it runs them
        self.batches: deque[int] = deque()  # job_id of the last job of each unanswered batch
        self.load = 0  # lines sent and not answered
        self.booted = False
        self.accepting = True  # takes new jobs (False once retiring)
        self.stopping = False  # STOP sent
        self.dead = False
        self.lines_sent = 0
        self.max_lines = max_lines
        self.generation = generation
        self.check_timer = None
        self.sweep_timer = None
        self.timed_out: tuple[int, int] | None = None  # (job_id, line) that hit its timeout
        self.boot_error = ""
        self.retire_reason = ""
        self.kill_timer = None
        self.booted_at = 0.0
        self.claim_lock = claim_lock  # see ipc's docstring: taking jobs back
        self.spare = spare  # booted (or booting) in reserve: takes no jobs until promoted
        self.yield_flag = 0  # what we last wrote to its board's BOARD_YIELD
        self.last_done_ns = 0  # when its last job finished (the scheduler's cost measurements)
        self.overdue: tuple | None = None  # the board as first seen past its deadline (check_deadline)
        self.sessions = ipc.SessionCache()  # which connections' sessions it holds (see ipc)
        self.room_sets = ipc.SessionCache()  # and which connections' rooms, the same way
        self.boot_timer = None  # boot_timeout
        self.killed_for = ""  # why the supervisor killed it, if it did: its exit is no crash
        self.served = 0  # lines answered (stats)
        self.restart_kind = ""  # why it leaves, as counted in stats' restarts (counters.RESTART_REASONS)
        self.spawned_at = time.monotonic()


class Pool(Dispatch):
    def __init__(self, settings, handlers_spec, selector: selectors.BaseSelector, timers, acceptor: Acceptor,
                 on_first_boot, on_all_booted):
        self.settings = settings
        self.handlers_spec = handlers_spec
        self.selector = selector
        self.timers = timers
        self.acceptor = acceptor
        self.on_first_boot = on_first_boot  # start accepting: one worker can serve
        self.on_all_booted = on_all_booted  # announce readiness: the whole pool is up
        self.announced = False
        self.ctx = multiprocessing.get_context("spawn")
        self.workers: list[WorkerHandle] = []
        self.target = settings.worker_count
        self.generation = 0
        self.next_worker_id = 1
        self.next_job_id = 1
        self.ever_booted = False
        self.boot_failures = 0  # in a row
        self.respawn_after = 0.0
        self.respawn_timer = None
        self.shutting_down = False
        self.min_timeout_s = settings.timeout
        self.crashes = 0
        self.timeouts = 0
        self.taken_back = 0  # jobs taken back from a worker that had not started them
        self.given_back = 0  # job rests a worker gave back at a time slice
        self._memory_timer = None
        self._wake_timer = None  # wakes the loop when a take-back may become due
        self._contended = -1  # what the workers' BOARD_YIELD says (-1: to be written again)
        self._managing = False
        self._fd_reserve: list[int] = []  # see SPAWN_RESERVE_FDS
        self._stack_dir = ""  # json logs: where workers' faulthandler dumps go (see _log_stack)

    # -- spawning ----------------------------------------------------------------------------

    def spawn(self, spare: bool = False) -> WorkerHandle | None:
        """Start one worker; None (logged, and retried with back-off) if the OS refused."""
        self._free_fd_reserve()
        try:
            return self._spawn(spare)
        except OSError as exc:  # out of descriptors, processes or memory: try again later
            if not self.ever_booted:
                raise FatalError(f"cannot start a worker process: {exc}", 4) from None
            # A shortage passes (clients close, memory frees): keep the connections and retry,
            # however long it lasts; it says nothing about the handler code.
            self._count_start_failure(f"cannot start a worker process: {exc}", may_give_up=False)
            return None
        finally:
            self._hold_fd_reserve()

    def _hold_fd_reserve(self) -> None:
        reserve = self._fd_reserve
        while len(reserve) < SPAWN_RESERVE_FDS:
            try:
                reserve.append(os.open(os.devnull, os.O_RDONLY))  # (not inherited by workers: PEP 446)
            except OSError:
                return  # out of descriptors: hold what there is, take more at the next spawn

    def _free_fd_reserve(self) -> None:
        for fd in self._fd_reserve:
            os.close(fd)
        self._fd_reserve.clear()

    def _spawn(self, spare: bool) -> WorkerHandle:
        settings = self.settings
        board = self.ctx.RawArray("q", ipc.BOARD_SLOTS)
        journal = self.ctx.RawArray("c", ipc.JOURNAL_BYTES)
        claim_lock = self.ctx.Lock()
        ours, theirs = socket.socketpair()
        worker_id = self.next_worker_id
        self.next_worker_id += 1
        log_settings = {
            "log_level": settings.log_level,
            "log_format": settings.log_format,
            "log_file": settings.log_file,
            "access_log": settings.access_log,
        }
        if settings.log_format == "json":
            log_settings["stack_file"] = self._stack_file(worker_id)
        limits = {
            "timeout": settings.timeout,
            "max_answer_bytes": settings.max_answer_bytes,
            "max_session_bytes": settings.max_session_bytes,
            "max_rooms_per_connection": settings.max_rooms_per_connection,
        }
        process = self.ctx.Process(
            target=worker_main,
            args=(theirs, board, journal, claim_lock, self.handlers_spec, dict(settings.handler_options), limits,
                  worker_id, log_settings, os.getpid()),
            name=f"simplerpc-mp-worker-{worker_id}",
            daemon=True,  # multiprocessing's atexit then ends it too, whatever happens to us
        )
        # The child inherits a blocked SIGINT/SIGTERM, so a Ctrl-C while it boots can't put a
        # KeyboardInterrupt traceback on the terminal; the worker ignores both, then unblocks.
        ours.setblocking(False)
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _WORKER_IGNORED_SIGNALS)
        try:
            process.start()
        except OSError:
            ours.close()  # (closing it before setblocking() made the error EBADF, not EMFILE)
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            theirs.close()  # the child has its own copy now (or there is no child)
        max_lines = 0
        if settings.max_requests:
            max_lines = settings.max_requests + random.randint(0, settings.max_requests_jitter)
        worker = WorkerHandle(worker_id, process, ours, ipc.board_view(board), journal, self.generation, max_lines,
                              claim_lock, spare)
        self.workers.append(worker)
        self._contended = -1  # its board's BOARD_YIELD is still to be written
        self.selector.register(ours, READ, worker)
        self.selector.register(process.sentinel, READ, Sentinel(worker))
        if settings.boot_timeout > 0:
            worker.boot_timer = self.timers.call_later(settings.boot_timeout, self._boot_timed_out, worker)
        log.debug("spawned worker %s (pid %s)", worker_id, process.pid)
        return worker

    def start(self) -> None:
        for _ in range(self.target):
            self.spawn()
        for _ in range(self.settings.spare_workers):
            self.spawn(spare=True)
        if self.settings.max_worker_memory:
            self._memory_timer = self.timers.call_later(MEMORY_CHECK_INTERVAL_S, self.check_memory)

    def manage(self) -> None:
        """Bring the serving workers to the target and the spares to ``spare_workers``
        (gunicorn's manage_workers). A serving worker that is missing is replaced by a spare at
        once (a booted one first); spares are then made up in the background."""
        if self.shutting_down or self._managing:
            return  # (retire() calls manage(): the outer call's counts already hold that worker)
        self._managing = True
        try:
            self._manage()
        finally:
            self._managing = False

    def _manage(self) -> None:
        current = [w for w in self.workers if w.accepting and w.generation == self.generation]
        serving = [w for w in current if not w.spare]
        spares = sorted((w for w in current if w.spare), key=lambda w: not w.booted)
        missing = self.target - len(serving)
        while missing > 0 and spares:
            self._promote(spares.pop(0))
            missing -= 1
        if missing < 0:
            # Retire the newest first: the oldest have warm caches.
            for worker in sorted(serving, key=lambda w: -w.worker_id)[:-missing]:
                self.retire(worker, "scaling down", kind="scaled")
            missing = 0
        for worker in spares[self.settings.spare_workers:]:
            self.retire(worker, "more spare workers than spare_workers", kind="scaled")
        wanted = [False] * missing + [True] * max(0, self.settings.spare_workers - len(spares))
        if wanted:
            now = time.monotonic()
            if now < self.respawn_after:
                if self.respawn_timer is None:
                    self.respawn_timer = self.timers.call_at(self.respawn_after, self._respawn_due)
                return
            for spare in wanted:
                if self.spawn(spare) is None:
                    break  # refused: the back-off timer tries again

    def _promote(self, worker: WorkerHandle) -> None:
        worker.spare = False
        log.info("worker %s (pid %s): spare %s now serving", worker.worker_id, worker.pid,
                 "booted," if worker.booted else "(booting)")

    def _respawn_due(self) -> None:
        self.respawn_timer = None
        self.manage()

    # -- dispatching -------------------------------------------------------------------------

    # -- what workers send -------------------------------------------------------------------

    def _on_hello(self, worker: WorkerHandle, info: dict) -> None:
        if worker.killed_for:
            # Condemned by boot_timeout (or superseded) before its HELLO came: it gets no jobs,
            # and its kill, already on its way, counts as the boot failure it is.
            return
        worker.booted = True
        worker.booted_at = time.monotonic()
        if worker.boot_timer is not None:
            worker.boot_timer.cancel()
            worker.boot_timer = None
        self.timers.call_later(EARLY_DEATH_S, self._survived_start, worker)
        self.acceptor.set_handler_info(info)
        timeouts = [t for t in info["timeouts"].values() if t > 0]
        if self.settings.timeout > 0:
            timeouts.append(self.settings.timeout)
        self.min_timeout_s = min(timeouts) if timeouts else 0.0
        if worker.spare and worker.accepting:
            # A spare that boots before a serving worker of its generation takes that one's
            # place: capacity comes first, the other becomes the spare once it boots.
            for other in self.workers:
                if (not other.spare and not other.booted and other.accepting
                        and other.generation == worker.generation):
                    other.spare, worker.spare = True, False
                    break
        log.info("worker %s booted (pid %s)%s", worker.worker_id, worker.pid, " as a spare" if worker.spare else "",
                 extra=_fields(worker))
        self._hand_over()
        if not self.ever_booted:
            self.ever_booted = True
            self.on_first_boot()
        if not self.announced and sum(w.booted and not w.spare for w in self.workers) >= self.target:
            self._announce()

    def _announce(self) -> None:
        self.announced = True
        self.on_all_booted()

    def _survived_start(self, worker: WorkerHandle) -> None:
        if not worker.dead:
            self.boot_failures = 0

    def _hand_over(self) -> None:
        """Retire the workers of an older generation (a reload) as booted new ones replace them.

        Capacity never drops: an outgoing worker keeps serving until a booted worker of the
        current generation takes its place.
        """
        accepting = [w for w in self.workers if w.accepting]
        incoming = [w for w in accepting if w.booted and w.generation == self.generation and not w.spare]
        outgoing = [w for w in accepting if w.generation < self.generation]
        for worker in [w for w in outgoing if not w.booted or (w.spare and incoming)]:
            self.retire(worker, "superseded before it booted" if not worker.booted else "spare of the old code", kind="reload")
        outgoing = [w for w in outgoing if w.booted and not w.spare]
        for worker in outgoing[: max(0, len(incoming) + len(outgoing) - self.target)]:
            self.retire(worker, worker.retire_reason or "replaced by reload", kind=worker.restart_kind or "reload")

    def recycle(self, worker: WorkerHandle, reason: str, level: int = logging.INFO) -> None:
        """Retire a worker at its limit (max_requests, max_worker_memory): it takes nothing more,
        finishes what it holds and leaves. A spare takes its place at once; without spares a
        replacement starts now and capacity dips until it has booted (gunicorn's semantics)."""
        self.retire(worker, reason, level, kind="recycled")

    # -- stopping and losing workers --------------------------------------------------------

    def retire(self, worker: WorkerHandle, reason: str, level: int = logging.INFO, kind: str = "") -> None:
        """Take no new jobs, finish the ones held, then exit; a replacement starts now.
        ``kind``: what its exit counts as in stats' restarts (recycled, reload, scaled)."""
        if not worker.accepting:
            return
        worker.accepting = False
        worker.retire_reason = reason
        worker.restart_kind = kind
        log.log(level, "worker %s (pid %s) retiring: %s", worker.worker_id, worker.pid, reason,
                extra=_fields(worker, reason=kind or None))
        if not worker.jobs:
            self._send_stop(worker)
        self.manage()

    def _send_stop(self, worker: WorkerHandle) -> None:
        worker.stopping = True
        self._write(worker, ipc.frame_record(ipc.pack((ipc.STOP,))))
        worker.kill_timer = self.timers.call_later(STOP_WAIT_S, self._kill, worker, "did not stop in time")

    def _kill(self, worker: WorkerHandle, why: str = "") -> None:
        """Timer: SIGKILL a worker still there (``why`` is logged; a timeout was logged already)."""
        if worker.process.exitcode is None:
            if why:
                worker.killed_for = why
                log.warning("worker %s (pid %s) killed: %s", worker.worker_id, worker.pid, why)
            worker.process.kill()

    def on_exit(self, worker: WorkerHandle) -> None:
        """The worker process has exited: collect what it sent, answer or requeue its jobs."""
        if worker not in self.workers:
            return  # already reaped by kill_all/stop_all in this loop iteration
        if not worker.dead:
            self._drain(worker)
            self.selector.unregister(worker.sock)
        # What it finished but had not sent yet (pipe records come first: they are older).
        self._apply_replies(worker, ipc.read_journal(worker.journal, worker.board))
        worker.dead = True
        self.selector.unregister(worker.process.sentinel)
        worker.sock.close()
        worker.process.join()
        self._cancel_timers(worker)
        self.workers.remove(worker)
        code = worker.process.exitcode
        how = _describe_exit(code)
        self._count_restart(worker)
        self._log_stack(worker)
        if _failed_boot(worker):
            self._on_boot_failure(worker, how)
        elif worker.stopping and code == 0:
            log.info("worker %s (pid %s) exited (%s)", worker.worker_id, worker.pid, worker.retire_reason or "stopped",
                     extra=_fields(worker, reason=worker.restart_kind or None))
        elif worker.timed_out is not None:
            log.info("worker %s (pid %s) killed after its timeout (%s)", worker.worker_id, worker.pid, how,
                     extra=_fields(worker, reason="timeout"))
        elif worker.killed_for:  # the supervisor's own decision: what it was, not a crash
            log.info("worker %s (pid %s) gone (%s): %s", worker.worker_id, worker.pid, how, worker.killed_for)
        elif not self.shutting_down or worker.jobs:
            self.crashes += 1
            running = self._describe_running(worker)
            hint = " (perhaps out of memory?)" if code == -signal.SIGKILL and worker.timed_out is None else ""
            log.error("worker %s (pid %s) died: %s%s%s", worker.worker_id, worker.pid, how, hint, running,
                      extra=_fields(worker, reason="crashed", **self._running_fields(worker)))
            # Dying idle right after booting is a start-up failure (a crash loop), not an RPC's doing.
            if not worker.jobs and time.monotonic() - worker.booted_at < EARLY_DEATH_S:
                self._recover_jobs(worker, how)
                self._release(worker)
                self._count_start_failure(
                    f"worker {worker.worker_id} failed to start: died right after booting ({how})"
                )
                self.manage()
                return
        self._recover_jobs(worker, how)
        self._release(worker)
        self.manage()

    def _count_restart(self, worker: WorkerHandle) -> None:
        """Count the exit in stats' restarts by reason (counters.RESTART_REASONS); an exit the
        server asked for to stop is none."""
        if _failed_boot(worker):
            kind = "boot_failed"
        elif worker.timed_out is not None:
            kind = "timeout"
        elif worker.restart_kind:
            kind = worker.restart_kind
        elif worker.killed_for or worker.stopping or self.shutting_down:
            return  # (a kill of the supervisor's own with no kind: stopping now, out of step)
        else:
            kind = "crashed"
        self.acceptor.counters.restarted(kind, worker.worker_id, worker.pid, time.time())

    def _stack_file(self, worker_id: int) -> str:
        if not self._stack_dir:
            self._stack_dir = tempfile.mkdtemp(prefix="simplerpc-mp-stacks-")
        return os.path.join(self._stack_dir, f"worker-{worker_id}.txt")

    def _log_stack(self, worker: WorkerHandle) -> None:
        """With json logs, a worker's faulthandler dump (SIGUSR1, before a timeout or boot_timeout
        kill) went to a file of its own: log it as one record, the stack in its ``stack`` field."""
        if not self._stack_dir:
            return
        path = os.path.join(self._stack_dir, f"worker-{worker.worker_id}.txt")
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                stack = f.read()
            os.unlink(path)
        except FileNotFoundError:
            return
        if not stack.strip():
            return
        op = net_id = None
        if worker.timed_out is not None:
            job_id, line = worker.timed_out
            job = next((j for j in worker.jobs if j.job_id == job_id), None)
            if job is not None:
                op, net_id = job.op_of(line), job.conn.net_id
        reason = "timeout" if worker.timed_out is not None else "boot_timeout" if worker.killed_for else "stack dump"
        log.error("worker %s (pid %s): stack at its kill (%s)", worker.worker_id, worker.pid, reason,
                  extra={"worker_id": worker.worker_id, "worker_pid": worker.pid, "op": op, "net_id": net_id,
                         "reason": reason, "stack": stack})

    def _remove_stack_dir(self) -> None:
        if self._stack_dir:
            shutil.rmtree(self._stack_dir, ignore_errors=True)
            self._stack_dir = ""

    @staticmethod
    def _cancel_timers(worker: WorkerHandle) -> None:
        for timer in (worker.check_timer, worker.kill_timer, worker.sweep_timer, worker.boot_timer):
            if timer is not None:
                timer.cancel()

    @staticmethod
    def _release(worker: WorkerHandle) -> None:
        """Free the dead worker's descriptors now (its sentinel, its shared-memory arenas)."""
        worker.process.close()
        worker.board = worker.journal = None

    @staticmethod
    def _running_fields(worker: WorkerHandle) -> dict:
        """``op`` and ``net_id`` of the RPC on the worker's board, for structured logs."""
        if not worker.jobs or worker.board is None:
            return {}
        job_id, line = worker.board[ipc.BOARD_JOB], worker.board[ipc.BOARD_LINE]
        for job in worker.jobs:
            if job.job_id == job_id:
                return {"op": job.op_of(line), "net_id": job.conn.net_id}
        return {}

    def _describe_running(self, worker: WorkerHandle) -> str:
        if not worker.jobs:
            return ""
        job_id, line = worker.board[ipc.BOARD_JOB], worker.board[ipc.BOARD_LINE]
        for job in worker.jobs:
            if job.job_id == job_id:
                return f" while running op {job.op_of(line)!r} for net_id {job.conn.net_id}"
        return ""

    def _recover_jobs(self, worker: WorkerHandle, how: str) -> None:
        """Answer exactly once every RPC the dead worker held: FAIL what ran, requeue the rest.

        The worker sends each answer before it starts its next RPC, so after draining its pipe,
        the RPC on its progress board is the one it died in; every later one never started.
        """
        if not worker.jobs:
            return
        acceptor = self.acceptor
        running_id, running_line = worker.board[ipc.BOARD_JOB], worker.board[ipc.BOARD_LINE]
        crashed = f"worker process died ({how}) while running it"
        reached = False  # past the job on the board: nothing from here on has started
        for job in worker.jobs:
            if reached or job.job_id != running_id:
                if reached or not any(j.job_id == running_id for j in worker.jobs):
                    acceptor.requeue(job, job.answered)
                else:  # before the running job: finished, and its answers were lost (rare)
                    acceptor.fail_lines(job, job.answered, job.count, WorkerCrashed.__name__, crashed)
                continue
            reached = True
            if job.count == 0:
                continue  # a connect/disconnect hook died: nothing to answer, not re-run
            if running_line < job.answered:
                # The line on the board finished (its reply was in the journal); the worker died
                # before it started the next one, so nothing of this job was running.
                acceptor.requeue(job, job.answered)
                continue
            stuck = min(running_line, job.count - 1)
            acceptor.fail_lines(job, job.answered, stuck, WorkerCrashed.__name__, crashed)
            if worker.timed_out == (job.job_id, running_line):
                acceptor.fail_lines(job, stuck, stuck + 1, Timeout.__name__, "RPC ran longer than its timeout; worker replaced")
            else:
                acceptor.fail_lines(job, stuck, stuck + 1, WorkerCrashed.__name__, crashed)
            acceptor.requeue(job, stuck + 1)
        jobs = list(worker.jobs)
        worker.jobs.clear()
        for job in jobs:
            acceptor.job_done(job)

    def _on_boot_failure(self, worker: WorkerHandle, how: str) -> None:
        if worker.process.exitcode == EXIT_UNGUARDED_MAIN:
            raise UnguardedMainError(_unguarded_main_message(), 3)
        message = worker.boot_error or worker.killed_for or f"worker exited during start-up ({how})"
        if worker.generation > self.generation:
            return  # a worker of a reload that was already given up
        if worker.generation == self.generation and self._has_old_generation():
            # A reload with broken code: the old workers keep serving, the new ones go.
            log.error("reload failed, old workers keep serving: %s", message)
            self.generation -= 1
            for other in self.workers:
                if other.generation > self.generation:
                    other.accepting = False
                    other.killed_for = "its reload failed"
                    other.restart_kind = "reload"
                    other.process.kill()
            return
        if worker.boot_error and not self.ever_booted:
            raise FatalError(message, 3)
        self._count_start_failure(f"worker {worker.worker_id} failed to start: {message}")

    def _count_start_failure(self, message: str, may_give_up: bool = True) -> None:
        """Back off before the next spawn, and arm it; give up when failures repeat and nothing
        serves (``may_give_up``: not when the OS refused a process, which is no code's fault)."""
        self.boot_failures += 1
        if self.ever_booted and not self.announced:
            self._announce()  # serving with fewer workers than asked for: say so, don't hang
        now = time.monotonic()
        serving = any(w.booted and w.accepting and now - w.booted_at >= EARLY_DEATH_S for w in self.workers)
        if may_give_up and self.boot_failures >= BOOT_FAILURES_FATAL and not serving:
            raise FatalError(f"workers keep failing to start ({self.boot_failures} in a row): {message}", 4)
        # While healthy workers still serve (say after a bad deploy), keep them and keep trying.
        delay = min(BOOT_BACKOFF_FIRST_S * 2 ** min(self.boot_failures - 1, 16), BOOT_BACKOFF_MAX_S)
        log.error("%s; next try in %.1fs", message, delay)
        self.respawn_after = now + delay
        # Armed here, always: a spawn refused inside manage() has nothing else that would call
        # manage() again (no exit, no signal), and the pool stayed short for good.
        if self.respawn_timer is not None:
            self.respawn_timer.cancel()
        self.respawn_timer = self.timers.call_at(self.respawn_after, self._respawn_due)

    def _boot_timed_out(self, worker: WorkerHandle) -> None:
        """Timer: a worker still loading the handlers (import or on_start) after boot_timeout."""
        worker.boot_timer = None
        if worker.booted or worker.dead or not worker.accepting:
            return  # (a retired one is killed by its stop timer, and that is no boot failure)
        timeout = self.settings.boot_timeout
        spec = _describe_spec(self.handlers_spec)
        worker.killed_for = f"did not boot within boot_timeout ({timeout:g}s) loading handlers {spec}"
        log.error(
            "worker %s (pid %s) has not booted after boot_timeout (%gs): loading handlers %s hangs "
            "(at import or in on_start); dumping its stack and killing it",
            worker.worker_id, worker.pid, timeout, spec,
        )
        try:
            os.kill(worker.pid, signal.SIGUSR1)  # faulthandler in the worker prints where it hangs
        except ProcessLookupError:
            return
        worker.kill_timer = self.timers.call_later(DUMP_GRACE_S, self._kill, worker)

    def _has_old_generation(self) -> bool:
        return any(w.generation < self.generation for w in self.workers)

    # -- deadlines ---------------------------------------------------------------------------

    def check_deadline(self, worker: WorkerHandle) -> None:
        """Timer: is the RPC this worker runs past its timeout? (reads the progress board)"""
        worker.check_timer = None
        if worker.dead or not worker.jobs or worker.timed_out is not None:
            return
        board = worker.board
        job_id, line, start_ns, timeout_ms = (
            board[ipc.BOARD_JOB], board[ipc.BOARD_LINE], board[ipc.BOARD_START_NS], board[ipc.BOARD_TIMEOUT_MS],
        )
        now_ns = time.monotonic_ns()
        running = job_id and any(job.job_id == job_id for job in worker.jobs)
        if running and timeout_ms > 0 and now_ns - start_ns >= timeout_ms * 1_000_000:
            # The slots are read without a lock: on a weakly ordered CPU (ARM64) one read may
            # pair a new RPC with the old one's start. A worker that really is stuck shows the
            # same board a millisecond later; one that moved on does not.
            seen = (job_id, line, start_ns, timeout_ms)
            if worker.overdue == seen:
                self._time_out(worker, job_id, line, timeout_ms)
                return
            worker.overdue = seen
            worker.check_timer = self.timers.call_later(0.001, self.check_deadline, worker)
            return
        worker.overdue = None
        if running and timeout_ms > 0:
            delay = (start_ns + timeout_ms * 1_000_000 - now_ns) / 1e9
        else:
            delay = self.min_timeout_s
        if delay > 0 or running:
            worker.check_timer = self.timers.call_later(max(delay, 0.001), self.check_deadline, worker)

    def _time_out(self, worker: WorkerHandle, job_id: int, line: int, timeout_ms: int) -> None:
        job = next(job for job in worker.jobs if job.job_id == job_id)
        self.timeouts += 1
        worker.timed_out = (job_id, line)
        worker.accepting = False
        log.error(
            "worker %s (pid %s): op %r for net_id %s ran past its %.3gs timeout; "
            "dumping its stack and replacing the worker",
            worker.worker_id, worker.pid, job.op_of(line), job.conn.net_id, timeout_ms / 1000,
            extra=_fields(worker, reason="timeout", op=job.op_of(line), net_id=job.conn.net_id),
        )
        try:
            os.kill(worker.pid, signal.SIGUSR1)  # faulthandler in the worker prints the stack
        except ProcessLookupError:
            return
        worker.kill_timer = self.timers.call_later(DUMP_GRACE_S, self._kill, worker)
        self._condemn(worker)
        self.manage()

    def _condemn(self, worker: WorkerHandle) -> None:
        """A worker about to be killed starts nothing more: whatever it has not started goes to
        other workers (the rest of a serial job too, given back at its next line), so only the
        RPC that timed out fails. Retried each millisecond while its claim lock is busy."""
        if worker.dead or worker.board is None:
            return
        worker.board[ipc.BOARD_YIELD] = 1  # (_set_yield_flags leaves a timed-out worker's alone)
        worker.yield_flag = 1
        if self.take_back(worker, revoke_all=True) is None:
            self.timers.call_later(0.001, self._condemn, worker)

    # -- memory ------------------------------------------------------------------------------

    def check_memory(self) -> None:
        import psutil

        limit = self.settings.max_worker_memory * 1024 * 1024
        for worker in list(self.workers):
            if not worker.accepting or worker.dead:
                continue
            try:
                rss = psutil.Process(worker.pid).memory_info().rss
            except psutil.Error:
                continue
            if rss > limit:
                self.recycle(
                    worker,
                    f"RSS {rss / 1048576:.1f} MiB over max_worker_memory ({self.settings.max_worker_memory} MiB)",
                    logging.WARNING,
                )
        self._memory_timer = None
        if not self.shutting_down and self.settings.max_worker_memory:
            self._memory_timer = self.timers.call_later(MEMORY_CHECK_INTERVAL_S, self.check_memory)

    # -- signals: reload and scaling --------------------------------------------------------

    def apply_settings(self, settings) -> None:
        """Settings of a reload: new workers get them; the memory check follows the new limit."""
        self.settings = settings
        self.target = settings.worker_count
        if settings.max_worker_memory and self._memory_timer is None:
            self._memory_timer = self.timers.call_later(MEMORY_CHECK_INTERVAL_S, self.check_memory)

    def reload(self) -> None:
        """New workers import the handlers afresh; each old one retires once a new one booted.

        A HUP during a reload restarts it, the newest code wins: workers still booting (they
        may hold the code of before, and have no job) are killed and reaped at once, and one
        new set starts, so a burst of HUPs never stacks generations of workers.
        """
        self.generation += 1
        log.info("reloading: starting %d workers of generation %d", self.target, self.generation)
        booting = [w for w in self.workers if not w.booted and not w.dead]
        for worker in booting:
            worker.accepting = False
            worker.killed_for = "superseded by a newer reload before it booted"
            worker.restart_kind = "reload"
            worker.process.kill()
        self.respawn_after = 0.0  # new code gets its try now, whatever back-off the old one earned
        for worker in booting:
            worker.process.join()  # killed: at once
        for worker in booting:
            self.on_exit(worker)  # (once all are gone: its manage() starts the new ones)
        self.manage()  # the new generation: target workers and the spares

    def scale(self, delta: int) -> None:
        self.target = max(1, self.target + delta)
        log.info("worker target now %d", self.target)
        self.manage()

    # -- shutdown ----------------------------------------------------------------------------

    def busy(self) -> bool:
        return any(w.jobs for w in self.workers)

    def stop_all(self, timeout: float) -> None:
        """Ask every worker to stop, wait for them up to ``timeout``, then kill the rest."""
        self.shutting_down = True
        for worker in self.workers:
            if worker.jobs:
                worker.process.kill()  # whatever it runs has already been answered ShuttingDown
            elif not worker.stopping:
                worker.accepting = False
                self._send_stop(worker)  # its kill timer is cancelled below: we join it here
        deadline = time.monotonic() + timeout
        for worker in list(self.workers):
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.exitcode is None:
                log.warning("worker %s (pid %s) did not stop; killing it", worker.worker_id, worker.pid)
                worker.process.kill()
                worker.process.join()
            self._forget(worker)
        self.workers.clear()
        self._free_fd_reserve()
        self._remove_stack_dir()

    def kill_all(self) -> None:
        self.shutting_down = True
        for worker in self.workers:
            if worker.process.exitcode is None:
                worker.killed_for = "server stopping now"
                worker.process.kill()
        for worker in self.workers:
            worker.process.join()
            self._forget(worker)
        self.workers.clear()
        self._free_fd_reserve()
        self._remove_stack_dir()

    def _forget(self, worker: WorkerHandle) -> None:
        """A worker reaped at shutdown: events about it later in this loop pass are ignored."""
        worker.dead = True
        self._cancel_timers(worker)
        for fileobj in (worker.sock, worker.process.sentinel):
            try:
                self.selector.unregister(fileobj)
            except (KeyError, ValueError):
                pass  # its pipe was unregistered already at EOF
        worker.sock.close()
        self._release(worker)


def _fields(worker: WorkerHandle, **more) -> dict:
    """Structured fields of a log line about a worker (json logs: logs.FIELDS)."""
    return {"worker_id": worker.worker_id, "worker_pid": worker.pid, **more}


def _failed_boot(worker: WorkerHandle) -> bool:
    """Did the worker die of its own start-up, or hang in it past boot_timeout? One the
    supervisor killed after retiring it (superseded by a reload, a reload given up) did not."""
    if worker.boot_error:
        return True
    return not worker.booted and (worker.accepting or not worker.killed_for)


def _describe_spec(spec) -> str:
    if isinstance(spec, str):
        return repr(spec)
    modules = sorted({getattr(op.fn, "__module__", "?") for op in spec.ops.values()})
    return f"of module {', '.join(modules)}" if modules else "(a Handlers object)"


def _unguarded_main_message() -> str:
    script = getattr(sys.modules.get("__main__"), "__file__", None) or "the script"
    return (
        f"{script} starts the server when it is imported, and each worker process imports it again: "
        'put the code that starts the server under `if __name__ == "__main__":`'
    )


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
