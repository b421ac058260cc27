"""The worker process: receive a batch of jobs, run the handlers, send back answers and pushes.

Runs in each worker process, started with the ``spawn`` method by the supervisor, so it holds
no client socket and imports the handler module afresh (which is what makes HUP a reload).
It talks to the acceptor over one blocking socketpair (see ``ipc``), and leaves supervision to it:
it ignores SIGINT and SIGTERM, dumps its stack on SIGUSR1 (sent before a timeout kill), and dies
with the acceptor (PR_SET_PDEATHSIG, and EOF on its pipe). Once it has answered what it holds
(STOP) it exits at once, whatever threads its handlers left running.

What a handler does wrong fails its RPC, never the worker: an exception (``Unknown``, or its
own reason, always a string), a result or session that can't be encoded (``Unknown``), an
answer over ``max_answer_bytes`` (``AnswerTooLarge``), a session over ``max_session_bytes``
(``SessionTooLarge``; the change is discarded). A push over ``max_answer_bytes`` is dropped.
"""

from __future__ import annotations

import atexit
import faulthandler
import logging
import os
import pickle
import signal
import sys
import socket
import time

from . import ipc
from .errors import (
    UNKNOWN_MESSAGE, UNKNOWN_REASON, AnswerTooLarge, SessionTooLarge, SimpleRPCException, UnknownOpcode,
)
from .handlers import DEFAULT_MAX_ROOMS, Conn, Handlers, HandlerLoadError, PushLimit, load_handlers
from .logs import RateLimitedLog, configure_logging, tag_records
from .protocol import decode_frame, encode_fail, encode_okay, split_lines
from .scheduler import SLICE_NS

log = logging.getLogger("simplerpc_mp.worker")

_SESSION_PROTOCOL = pickle.HIGHEST_PROTOCOL
# Replies wait at most this long for company before they are sent (see Worker.finished).
FLUSH_AFTER_NS = 2_000_000
# 64 KiB reads: larger ones make CPython allocate (and mmap) the whole size on every call.
RECV_BYTES = 64 * 1024
# config.py's defaults of max_answer_bytes and max_session_bytes (the server passes its values).
DEFAULT_MAX_ANSWER_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_SESSION_BYTES = 4 * 1024 * 1024
_UNKNOWN_ANSWER = encode_fail(UNKNOWN_REASON, UNKNOWN_MESSAGE)
# An identity from on_auth goes back through the acceptor, which decodes it and pickles it into
# every job of the connection, deeper in its stack than here: a value nested near the recursion
# limit that this worker could encode ended the acceptor with a RecursionError.
MAX_IDENTITY_DEPTH = 100


def worker_main(sock, board, journal, claim_lock, handlers_spec, options: dict, limits: dict, worker_id: int,
                log_settings: dict, parent_pid: int) -> None:
    """Entry point of a worker process (called in the child).

    ``limits``: the settings ``timeout``, ``max_answer_bytes``, ``max_session_bytes`` and
    ``max_rooms_per_connection``.
    """
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the acceptor decides when workers stop
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})  # blocked while we booted
    log_stream = configure_logging(**log_settings)
    tag_records(worker_id=worker_id, worker_pid=os.getpid())  # json logs: every line names its worker
    # The stack dump before a timeout kill goes where the logs go (the log file, if any); with
    # json logs, to a file of its own that the acceptor logs as one record (supervisor.py).
    stack_file = log_settings.get("stack_file")
    if stack_file:
        log_stream = open(stack_file, "w")  # (kept open: faulthandler writes to its descriptor)
    faulthandler.register(signal.SIGUSR1, file=log_stream or sys.stderr, all_threads=True)
    _set_title(f"simplerpc-mp worker {worker_id}")
    sock.setblocking(True)
    try:
        handlers = handlers_spec if isinstance(handlers_spec, Handlers) else load_handlers(handlers_spec)
        for fn in handlers.start_fns:
            fn(options)
    except HandlerLoadError as exc:
        _boot_failed(sock, str(exc))
    except Exception as exc:  # an on_start function failed: same outcome as a broken import
        _boot_failed(sock, f"on_start function failed: {type(exc).__name__}: {exc}")
    sock.sendall(ipc.frame_record(ipc.pack((ipc.HELLO, os.getpid(), handlers.describe()))))
    board = ipc.board_view(board)
    journal_writer = ipc.Journal(journal, board)
    Worker(
        sock, board, journal_writer, handlers, limits["timeout"], log_settings.get("access_log", False), claim_lock,
        max_answer_bytes=limits["max_answer_bytes"], max_session_bytes=limits["max_session_bytes"],
        max_rooms=limits.get("max_rooms_per_connection", DEFAULT_MAX_ROOMS),
    ).run()
    _exit_now(0)


def _exit_now(code: int) -> None:
    """Exit without waiting for the threads handlers started: a non-daemon one would hold the
    process in interpreter shutdown until the supervisor killed it (and counted a crash). What
    the worker held is answered by now; the logs and atexit functions still get their turn."""
    atexit._run_exitfuncs()  # the handler module's own clean-up, as a normal exit would run it
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed, or its reader has gone: nothing to save
            pass
    os._exit(code)


def _boot_failed(sock: socket.socket, message: str) -> None:
    try:
        sock.sendall(ipc.frame_record(ipc.pack((ipc.BOOT_ERROR, message))))
    except OSError:
        pass  # the acceptor is gone; the exit code still tells
    os._exit(ipc.EXIT_BOOT_ERROR)


def _die_with_parent(parent_pid: int) -> None:
    # Linux delivers SIGKILL to us when the acceptor dies, even while a handler runs a long
    # computation and never reads its pipe. Elsewhere, EOF on the pipe is the signal.
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _set_title(title: str) -> None:
    try:
        import setproctitle  # optional extra: shows the role in ps and top
    except ImportError:
        return
    setproctitle.setproctitle(title)


class Worker:
    """Runs batches of jobs; one instance per worker process."""

    def __init__(self, sock: socket.socket, board, journal: ipc.Journal, handlers: Handlers,
                 default_timeout: float, access_log: bool, claim_lock=None, *,
                 max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES, max_session_bytes: int = DEFAULT_MAX_SESSION_BYTES,
                 max_rooms: int = DEFAULT_MAX_ROOMS):
        self.sock = sock
        self.claim_lock = claim_lock  # see ipc's docstring: taking jobs back
        self.log_limit = RateLimitedLog()  # what it held back is logged after the next batch
        self.board = board  # an ipc.board_view
        self.journal = journal
        self.handlers = handlers
        self.ops = handlers.ops
        self.any_fn = handlers.any_fn
        self.default_timeout_ms = int(default_timeout * 1000)
        self.access_log = access_log
        self.pid = os.getpid()
        # Finished, not sent yet (each line also in the journal): [job_id, first, count, [answer, ...],
        # pushes, session]; consecutive lines of a job share one reply (see ipc's docstring).
        self.replies: list[list] = []
        self.last_send_ns = 0
        self.max_answer_bytes = max_answer_bytes
        self.max_session_bytes = max_session_bytes
        self.max_rooms = max_rooms  # max_rooms_per_connection, checked by conn.join
        self.push_limit = PushLimit(max_answer_bytes)  # .dropped counts the pushes dropped
        self.held = ipc.SessionCache()  # the sessions the acceptor may send as HELD (see ipc)
        self.held_rooms = ipc.SessionCache()  # and the connections' rooms, the same way
        # The FAIL of an RPC whose session change session_change refused, for finished() to send
        # in place of its answer; and what ran last, for that refusal's log line.
        self.session_refusal: bytes | None = None
        self.last_op = ""
        self.last_net_id = 0

    def run(self) -> None:
        try:
            self._serve()
        except (BrokenPipeError, ConnectionResetError):
            return  # the acceptor has gone while we answered: nobody is left to tell

    def _serve(self) -> None:
        reader = ipc.RecordReader()
        while True:
            try:
                data = self.sock.recv(RECV_BYTES)
            except ConnectionError:
                data = b""
            if not data:
                return  # the acceptor has gone
            for record in reader.feed(data):
                message = ipc.unpack(record)
                if message[0] == ipc.STOP:
                    self.send_replies()
                    return
                self.run_batch(self.take_sessions(message[1]))
            self.send_replies()
            self.log_limit.flush()

    def send_replies(self) -> None:
        if self.replies:
            replies = [(job_id, first, count, b"".join(answers), pushes, session)
                       for job_id, first, count, answers, pushes, session in self.replies]
            self.sock.sendall(ipc.frame_record(ipc.pack((ipc.REPLY, replies))))
            self.replies = []
        self.journal.clear()  # after the send: what it held is now in the pipe
        self.last_send_ns = time.monotonic_ns()

    def finished(self, job_id: int, line: int, count: int, answer: bytes, pushes, session) -> None:
        """One RPC (or hook) finished: journal its reply, and queue it for the next send.

        Replies are sent when the batch is done, or before the next RPC starts once 2 ms have
        passed since the last send, so a slow RPC holds back other jobs' answers by at most
        that; a worker that dies loses nothing, because the acceptor reads the journal.
        """
        if self.session_refusal is not None:
            if count:
                answer = self.session_refusal  # the RPC's own answer, OKAY or not, is superseded
            self.session_refusal = None
        oversized = False
        if not self.journal.append(job_id, line, count, answer, pushes, session):
            self.send_replies()  # the journal is full: the pipe takes what it held
            oversized = not self.journal.append(job_id, line, count, answer, pushes, session)
        replies = self.replies
        last = replies[-1] if replies else None
        if last is not None and last[0] == job_id and last[1] + last[2] == line and not pushes and session is ipc.UNCHANGED:
            last[2] += count
            last[3].append(answer)
        else:
            replies.append([job_id, line, count, [answer], pushes or (), session])
        if oversized:
            self.send_replies()  # larger than the whole journal: it goes to the pipe at once

    def claim(self, job_id: int) -> bool:
        """May this job start here? False if the acceptor took it back (see ipc's docstring)."""
        lock = self.claim_lock
        if lock is None:
            return True
        board = self.board
        lock.acquire()
        try:
            if job_id <= board[ipc.BOARD_REVOKED]:
                return False
            board[ipc.BOARD_CLAIMED] = job_id
            return True
        finally:
            lock.release()

    def take_sessions(self, jobs: list) -> list:
        """Replace each job's session field by the pickled session it stands for (``HELD``
        included), and its rooms field by the rooms, in order, for every job received: see
        ipc's docstring."""
        held = self.held
        held_rooms = self.held_rooms
        for index, job in enumerate(jobs):
            session, rooms = job[4], job[5]
            disconnect = job[1] == ipc.DISCONNECT
            if session is not None or rooms is not None or disconnect:
                if session is not None or disconnect:
                    session = held.take(job[2], job[1], session)
                if rooms is not None or disconnect:
                    rooms = held_rooms.take(job[2], job[1], rooms)
                jobs[index] = (job[0], job[1], job[2], job[3], session, rooms, job[6])
        return jobs

    def run_batch(self, jobs: list) -> None:
        board = self.board
        clock = time.monotonic_ns
        for job_id, kind, net_id, payload, session_blob, rooms, identity in jobs:
            # Flushes happen while the board still names the RPC that finished (so a death in
            # the send does not count the next one as started), and before its clock starts.
            if self.replies and clock() - self.last_send_ns > FLUSH_AFTER_NS:
                self.send_replies()
            if not self.claim(job_id):
                continue  # taken back: another worker runs it
            board[ipc.BOARD_LINE] = 0
            board[ipc.BOARD_START_NS] = clock()
            board[ipc.BOARD_TIMEOUT_MS] = self.default_timeout_ms
            board[ipc.BOARD_JOB] = job_id
            session = pickle.loads(session_blob) if session_blob else {}
            pushes: list = []
            if kind == ipc.CONNECT or kind == ipc.DISCONNECT:
                self.run_hook(kind, Conn(net_id, session, pushes, push_limit=self.push_limit, rooms=rooms,
                                         max_rooms=self.max_rooms, identity=identity))
                self.finished(job_id, 0, 0, b"", pushes, self.session_change(kind, session, session_blob))
                continue
            if kind == ipc.AUTH:  # pushes of on_auth are dropped: nothing reaches an unauthenticated client
                answer = self.run_auth(Conn(net_id, {}, [], identity=identity), payload)
                self.finished(job_id, 0, 1, answer, (), ipc.UNCHANGED)
                continue
            conn = Conn(net_id, session, pushes, read_only=kind == ipc.CONCURRENT, push_limit=self.push_limit,
                        rooms=rooms, max_rooms=self.max_rooms, identity=identity)
            tracks_session = kind != ipc.CONCURRENT
            lines = split_lines(payload)
            job_start = clock()  # its time slice counts the lines, not the session's unpickling
            for index, line in enumerate(lines):
                if index:
                    now = clock()
                    if now - job_start > SLICE_NS and board[ipc.BOARD_YIELD]:
                        # A long backlog, and others wait: the rest goes back to the acceptor,
                        # in line again after the other connections' turns (in its own order).
                        self.send_replies()
                        self.sock.sendall(ipc.frame_record(ipc.pack((ipc.GIVE_BACK, job_id, index))))
                        break
                    if self.replies and now - self.last_send_ns > FLUSH_AFTER_NS:
                        self.send_replies()
                        now = clock()
                    board[ipc.BOARD_LINE] = index
                    board[ipc.BOARD_START_NS] = now
                answer = self.run_line(conn, line)
                change = ipc.UNCHANGED
                if tracks_session and (session or session_blob):
                    change = self.session_change(kind, session, session_blob)
                    if change is not ipc.UNCHANGED:
                        session_blob = change
                pushes = conn.pushes
                if pushes:
                    conn.pushes = []
                self.finished(job_id, index, 1, answer, pushes, change)
        board[ipc.BOARD_JOB] = 0

    def session_change(self, kind: int, session: dict, old_blob):
        """The new pickled session if a serial job changed it, else ``UNCHANGED``.

        A change that can't be pickled, or pickles past ``max_session_bytes``, is discarded:
        ``session`` is put back as it was, and the RPC's answer becomes a FAIL (``finished``
        sends ``session_refusal`` instead).
        """
        if kind == ipc.CONCURRENT or (not session and not old_blob):
            return ipc.UNCHANGED
        if not session:
            return None
        try:
            new_blob = pickle.dumps(session, _SESSION_PROTOCOL)
        except Exception:  # the values' own pickling code (a lock, a socket, a __reduce__): the handler's bug
            log.exception(
                "op %r left a conn.session that cannot be pickled; the change is discarded (net_id %s, pid %s)",
                self.last_op, self.last_net_id, self.pid,
            )
            return self._refuse_session(session, old_blob, _UNKNOWN_ANSWER)
        if len(new_blob) > self.max_session_bytes:
            log.warning(
                "op %r left a conn.session of %d bytes pickled, over max_session_bytes (%d); the change is "
                "discarded (net_id %s, pid %s)",
                self.last_op, len(new_blob), self.max_session_bytes, self.last_net_id, self.pid,
            )
            return self._refuse_session(session, old_blob, encode_fail(
                SessionTooLarge.__name__,
                f"conn.session would be {len(new_blob)} bytes pickled, over max_session_bytes "
                f"({self.max_session_bytes}); the change was discarded",
            ))
        return ipc.UNCHANGED if new_blob == old_blob else new_blob

    def _refuse_session(self, session: dict, old_blob, answer: bytes):
        session.clear()  # in place: the job's next lines see the session as it was
        if old_blob:
            session.update(pickle.loads(old_blob))
        self.session_refusal = answer
        return ipc.UNCHANGED

    def run_line(self, conn: Conn, line: bytes) -> bytes:
        """Run one RPC and return its encoded answer; never raises."""
        started = time.perf_counter() if self.access_log else 0.0
        op = "?"
        own_timeout = False
        conn.okay_data = None
        try:
            op, data = decode_frame(line)
            entry = self.ops.get(op)
            if entry is not None:
                if entry.timeout is not None:  # tell the acceptor this op's own deadline
                    self.board[ipc.BOARD_TIMEOUT_MS] = int(entry.timeout * 1000)
                    own_timeout = True
                result = entry.fn(conn, data)
            elif self.any_fn is not None:
                result = self.any_fn(conn, op, data)
            else:
                raise UnknownOpcode(f"no handler for op {op!r}")
            if result is None:
                result = conn.okay_data if conn.okay_data is not None else {}
            if type(result) is not dict and not isinstance(result, dict):
                result = {"result": result}
        except SimpleRPCException as exc:
            answer = self.fail_answer(exc, op, conn)
        except Exception:  # the handler boundary: any other error is the handler's bug
            self._log_bug("failed", op, logging.ERROR, "handler for op %r failed (net_id %s, pid %s)",
                          op, conn.net_id, self.pid, exc_info=True)
            answer = _UNKNOWN_ANSWER
        else:
            try:
                answer = encode_okay(result)
            except (TypeError, ValueError, RecursionError) as exc:  # not JSON: an object, NaN, a cycle, too deep
                self._log_bug("unencodable", op, logging.ERROR,
                              "handler for op %r returned data JSON cannot encode (net_id %s, pid %s): %s",
                              op, conn.net_id, self.pid, exc)
                answer = _UNKNOWN_ANSWER
            except Exception:  # the result's own code raised while encoded (a dict subclass's items())
                self._log_bug("encode failed", op, logging.ERROR,
                              "handler for op %r returned data that failed to encode (net_id %s, pid %s)",
                              op, conn.net_id, self.pid, exc_info=True)
                answer = _UNKNOWN_ANSWER
        if len(answer) > self.max_answer_bytes:
            # Decided here, not by the acceptor's output limits: those close a connection, and
            # are for clients that don't read, not for one answer too large to send.
            self._log_bug(
                "too large", op, logging.WARNING,
                "answer to op %r is %d bytes, over max_answer_bytes (%d); sending AnswerTooLarge (net_id %s, pid %s)",
                op, len(answer), self.max_answer_bytes, conn.net_id, self.pid,
            )
            answer = encode_fail(
                AnswerTooLarge.__name__,
                f"the answer is {len(answer)} bytes, over max_answer_bytes ({self.max_answer_bytes})",
            )
        self.last_op = op
        self.last_net_id = conn.net_id
        if own_timeout:
            self.board[ipc.BOARD_TIMEOUT_MS] = self.default_timeout_ms
        if self.access_log:
            status = "OKAY" if answer.startswith(b"OKAY") else "FAIL " + decode_frame(answer[:-1])[1]["reason"]
            log.info(
                "access net_id=%s op=%s answer=%s duration_ms=%.3f pid=%s",
                conn.net_id, op, status, (time.perf_counter() - started) * 1000, self.pid,
                extra={"net_id": conn.net_id, "op": op, "reason": status},
            )
        return answer

    def _log_bug(self, kind: str, op: str, level: int, msg: str, *args, **kwargs) -> None:
        """Log a handler's bug at most about once a second per op and kind: a client calling a
        failing op in a loop must not flood the log with tracebacks. (Ops without a handler of
        their own share one key: their names come from clients.)"""
        kwargs.setdefault("extra", {"op": op[:100]})
        self.log_limit.log(log, (kind, op if op in self.ops else None), level, msg, *args, **kwargs)

    def fail_answer(self, exc: SimpleRPCException, op: str, conn: Conn) -> bytes:
        """The FAIL for a ``SimpleRPCException``; its reason is always a string on the wire."""
        try:
            reason = exc.reason
            message = str(exc)
        except Exception:  # a subclass's own reason or __str__ raised: the handler's bug
            log.exception(
                "handler for op %r raised %s, whose reason or message failed (net_id %s, pid %s)",
                op, type(exc).__name__, conn.net_id, self.pid,
            )
            return _UNKNOWN_ANSWER
        if not isinstance(reason, str):
            log.error(
                "handler for op %r raised %s with a reason of type %s, not str; sent as the class name (net_id %s, pid %s)",
                op, type(exc).__name__, type(reason).__name__, conn.net_id, self.pid,
            )
            reason = type(exc).__name__
        return encode_fail(reason, message)

    def run_auth(self, conn: Conn, line: bytes) -> bytes:
        """Run @handlers.on_auth on an auth frame; the answer is OKAY{"identity": ...} or a FAIL
        (the acceptor closes the connection after a FAIL)."""
        self.last_op = "<on_auth>"
        self.last_net_id = conn.net_id
        try:
            _, data = decode_frame(line[:-1] if line.endswith(b"\n") else line)
            identity = self.handlers.auth_fn(conn, data)
            if _nested_deeper(identity, MAX_IDENTITY_DEPTH):
                raise ValueError(f"on_auth returned an identity nested more than {MAX_IDENTITY_DEPTH} levels deep")
            return encode_okay({"identity": identity})
        except SimpleRPCException as exc:
            return self.fail_answer(exc, "<on_auth>", conn)
        except Exception:  # the handler boundary: on_auth's own bug (or an identity JSON can't encode)
            self._log_bug("failed", "<on_auth>", logging.ERROR, "on_auth handler failed (net_id %s, pid %s)",
                          conn.net_id, self.pid, exc_info=True)
            return _UNKNOWN_ANSWER

    def run_hook(self, kind: int, conn: Conn) -> None:
        self.last_op = "<on_connect>" if kind == ipc.CONNECT else "<on_disconnect>"
        self.last_net_id = conn.net_id
        try:
            if kind == ipc.CONNECT:
                self.handlers.connect_fn(conn)
            else:
                self.handlers.disconnect_fn(conn.net_id)
        except Exception:  # a hook has no answer to carry the error: log it
            name = "on_connect" if kind == ipc.CONNECT else "on_disconnect"
            log.exception("%s handler failed (net_id %s, pid %s)", name, conn.net_id, self.pid)


def _nested_deeper(value, limit: int) -> bool:
    """Are lists, tuples or dicts nested more than ``limit`` levels in ``value``? (No recursion.)"""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, tuple, dict)):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False
