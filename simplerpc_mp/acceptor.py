"""The acceptor: listening sockets, client connections, framing, answer order and routing.

Runs in the main server process, inside the loop of ``server.Server``. It never parses JSON:
per RPC it only finds line ends, so its cost per RPC stays a few microseconds.

Theory of operation:

1. Each read is cut into complete lines by a ``FrameDecoder``. The lines of one read that go to
   serial ops form one *job* (``Job``), which keeps the client's bytes as they are; a line of a
   concurrent op is a job of its own, so several workers can run them at once.
2. Every RPC of a connection has a sequence number (``seq``) in arrival order. A job covers the
   seqs ``first .. first+count-1``. Answers come back from workers keyed by seq and are written
   only in seq order (``write_seq``), so a client sees them in the order it sent the RPCs.
3. A connection's jobs wait in ``conn.queue`` until they may run: a serial job when nothing else
   of the connection runs, a concurrent job when no serial one does. Runnable jobs go to the
   ``Scheduler`` (``scheduler.py``), which hands them to workers in fair turns across connections.
4. Every accepted RPC gets exactly one answer: from a worker, or from here (``FrameTooLarge``),
   or from the supervisor (``WorkerCrashed``, ``Timeout``, ``ShuttingDown``).
5. Two budgets bound what all connections together make the acceptor hold (as Redis's
   ``maxmemory-clients`` and NATS's pending limits do). Request bytes (job payloads from arrival
   until the job is done, plus partial lines) past ``max_total_request_bytes``: connections holding
   more than an equal share are not read until the total drains under 3/4 of it, or they hold
   nothing; a connection holding little is read throughout (a read then takes at most its share). Output (``wbuf`` plus answers waiting
   for their turn) past ``max_total_output_bytes``: the connections holding the most are closed,
   largest first, until it is under. Both totals are kept up to date per read and write, not scanned.
6. Room membership is the acceptor's (``self.rooms``, a ``rooms.Rooms``). Workers send joins,
   leaves and room pushes as actions among their pushes; ``on_reply`` applies them in order before
   the answer. A room push is one frame, encoded by the worker, appended to every member's output.
   Pushes, broadcasts and rooms live in ``fanout.py``. A connection leaves every room as it closes, before ``on_disconnect`` is queued.
7. With TLS or authentication on, a new connection is first *gated* (``gate.py``): it finishes its
   TLS handshake and authenticates before it joins ``conns`` and may run a handler. Over TLS the
   socket is a ``tls.TLSStream`` with the plain socket's contract, so everything above is the same.
"""

from __future__ import annotations

import errno
import logging
import selectors
import socket
from collections import deque

from . import ipc
from .counters import Counters, OpStats
from . import auth
from .errors import FrameTooLarge, ShuttingDown, TooManyConnections
from .logs import RateLimitedLog
from .protocol import FrameDecoder, encode_fail, split_lines
from .rooms import Rooms
from .scheduler import Scheduler

log = logging.getLogger("simplerpc_mp.acceptor")

__all__ = ["Acceptor", "Connection", "Job", "Listener"]

READ, WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
# One recv per readiness event. 64 KiB: CPython allocates the full size on every recv, and from
# 128 KiB up glibc serves that with mmap, which made each call several times dearer (bench/).
RECV_BYTES = 64 * 1024
SMALL_RECV_BYTES = 4096  # a read past max_total_request_bytes (see on_read)
# Errors that mean "out of descriptors or kernel memory" on accept(): pause, don't spin.
_ACCEPT_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
ACCEPT_PAUSE_S = 0.5
# A serial backlog grows one job up to this size, then starts the next. Each growth copies the
# job, each time slice a worker gives back copies its rest and sends it to a worker again: a
# backlog of 1 MiB RPCs merged into one 50 MiB job kept the acceptor busy copying (4 such
# clients: 10 s of CPU in 15 s, 80 RPCs answered; with the cap 2.4 s and all 512). 1 MiB still
# holds thousands of small RPCs, enough for batching.
MAX_JOB_BYTES = 1024 * 1024

OPEN, EOF, CLOSED = range(3)
_SCAN_WHOLE_CHUNK_BYTES = 4096  # see Acceptor._has_concurrent

_FRAME_TOO_LARGE = FrameTooLarge.__name__
_SHUTTING_DOWN = ShuttingDown.__name__
_AUTH = ipc.AUTH


class Listener:
    __slots__ = ("sock",)

    def __init__(self, sock: socket.socket):
        self.sock = sock


class Job:
    """Lines of one connection that run together on one worker, and what became of them."""

    __slots__ = ("job_id", "conn", "kind", "first", "count", "payload", "answered", "sent_ns", "arrived", "op_stats")

    def __init__(self, conn: "Connection", kind: int, first: int, count: int, payload: bytes):
        self.job_id = 0  # set when dispatched
        self.conn = conn
        self.kind = kind
        self.first = first  # seq of the first line
        self.count = count  # lines (0 for connect/disconnect hooks)
        self.payload = payload
        self.answered = 0  # lines whose answers have come back
        self.sent_ns = 0  # when it went to a worker (for the scheduler's cost measurements)
        self.arrived = 0.0  # when its first line arrived (the acceptor's loop clock), for durations
        self.op_stats = None  # its lines' counters (counters.Counters._line_stats), found once

    def split(self, lines: int) -> "Job":
        """Cut off and return the first ``lines`` lines as a job of their own (it takes this
        job's place in the connection's counts); this job keeps the rest, to be queued again."""
        end = nth_line_end(self.payload, lines) + 1
        head = Job(self.conn, self.kind, self.first, lines, self.payload[:end])
        head.arrived = self.arrived
        if type(self.op_stats) is OpStats:
            head.op_stats = self.op_stats
        else:
            self.op_stats = None  # (a list per line: found again for what is left)
        self.payload = self.payload[end:]
        self.first += lines
        self.count -= lines
        return head

    def rest(self, from_line: int) -> "Job":
        """A fresh job for this job's lines from ``from_line`` on (they never started), to take
        its place (the caller keeps the connection's running counts right)."""
        payload = self.payload[nth_line_end(self.payload, from_line) + 1 :] if from_line else self.payload
        rest = Job(self.conn, self.kind, self.first + from_line, self.count - from_line, payload)
        rest.arrived = self.arrived
        if type(self.op_stats) is OpStats:
            rest.op_stats = self.op_stats
        return rest

    def line(self, index: int) -> bytes:
        return split_lines(self.payload)[index]

    def op_of(self, index: int) -> str:
        if self.kind == ipc.CONNECT:
            return "<on_connect>"
        if self.kind == ipc.DISCONNECT:
            return "<on_disconnect>"
        return self.line(index).partition(b"{")[0].decode("utf-8", "replace")[:100]


class Connection:
    """Acceptor-side state of one client connection; the selector key's ``data``."""

    __slots__ = (
        "net_id", "sock", "peer", "decoder", "queue", "running", "serial_running",
        "next_seq", "write_seq", "done", "session", "wbuf", "state", "events",
        "last_active", "soft_since", "disconnect_queued", "runnable", "scheduled", "ns_per_line",
        "session_version", "request_bytes", "done_bytes", "paused", "gate", "identity",
    )

    def __init__(self, net_id: int, sock: socket.socket, peer, max_frame_bytes: int, now: float):
        self.net_id = net_id
        self.sock = sock
        self.peer = peer
        self.decoder = FrameDecoder(max_frame_bytes)
        self.queue: deque[Job] = deque()  # jobs that may not run yet, in seq order
        self.runnable: deque[Job] = deque()  # jobs that may run now, waiting for a worker (Scheduler)
        self.scheduled = False  # in one of the Scheduler's rings
        self.ns_per_line = 0.0  # measured cost of its RPCs (Scheduler.measured), 0 = not yet
        self.running = 0  # jobs runnable or on a worker
        self.serial_running = 0  # serial jobs (or parts of one) runnable or on a worker
        self.next_seq = 0  # seq of the next RPC to arrive
        self.write_seq = 0  # seq of the next answer to write
        self.done: dict[int, tuple[bytes, int]] = {}  # answers that arrived ahead of their turn
        self.session = None  # pickled dict, None when empty; only workers unpickle it
        self.session_version = 0  # changes applied to it (what a worker holds: ipc.SessionCache)
        self.wbuf = bytearray()
        self.state = OPEN
        self.events = READ
        self.last_active = now
        self.soft_since = 0.0  # when wbuf went over output_soft_limit, 0 when under
        self.disconnect_queued = False
        self.request_bytes = 0  # payloads of its jobs not done yet, plus the decoder's partial line
        self.done_bytes = 0  # answers in ``done``
        self.paused = False  # not read: it held the most when max_total_request_bytes was passed
        self.gate: auth.Gate | None = None  # until it has authenticated (auth on): see _gate_input
        self.identity = None  # what handlers see as conn.identity

    @property
    def unanswered(self) -> int:
        return self.next_seq - self.write_seq


# The TLS and authentication half of the Acceptor (gate.py) and its pushes and rooms
# (fanout.py) use the names above.
from .fanout import Fanout  # noqa: E402
from .gate import Gatekeeper  # noqa: E402


class Acceptor(Gatekeeper, Fanout):
    def __init__(self, settings, selector: selectors.BaseSelector, timers):
        self.settings = settings
        self.selector = selector
        self.timers = timers
        self.listeners: list[Listener] = []
        self.conns: dict[int, Connection] = {}  # open connections by net_id, the push routing table
        self.scheduler = Scheduler()  # jobs that may run now, waiting for a worker
        self.dirty: list[Connection] = []  # connections with output to send this loop iteration
        self.next_net_id = 1
        self.now = 0.0
        self.accepting = False
        self.reading = True
        self.accept_paused = False
        self.out_of_descriptors = False
        self.concurrent_ops: frozenset[bytes] = frozenset()
        self.concurrent_heads: tuple[bytes, ...] = ()
        self.concurrent_needles: tuple[bytes, ...] = ()
        self.has_connect = False
        self.has_disconnect = False
        self.pushes_dropped = 0
        self.cluster = None  # cluster.Cluster when the ``cluster`` setting is set: pushes to other nodes
        self.pushes_total = 0  # push frames put in a connection's output
        self.accepted_total = 0
        self.counters = Counters()  # per op, per reason: for stats and /metrics (counters.py)
        # For events a client can repeat at will; what it holds back is logged a second later.
        self.log_limit = RateLimitedLog(on_suppressed=self._arm_log_flush)
        self._log_flush_timer = None
        self.request_bytes = 0  # sum of conn.request_bytes
        self.holders = 0  # connections with request_bytes > 0, for the equal share of the budget
        self.output_bytes = 0  # sum of len(conn.wbuf) + conn.done_bytes
        self.paused: set[Connection] = set()
        self.partial_reader: Connection | None = None  # see _may_read_alone
        # Room membership (rooms.py): joins, leaves and room pushes come as actions with pushes.
        self.rooms = Rooms(settings.max_rooms_per_connection)
        # Connections not admitted yet (TLS handshake or authentication under way): they count
        # against max_connections but are no push target, run no handler and are not idle-swept.
        self.gated: dict[int, Connection] = {}
        # Connections to read without waiting for the selector: bytes already out of their
        # socket (a TLS layer's decrypted bytes, input held while authenticating).
        self.read_ready: list[Connection] = []
        self.tls_context = None  # ssl.SSLContext when certfile is set
        self._tls_connection = None  # tls.TLSConnection, imported only when TLS is on
        self.tokens: auth.Tokens | None = None
        self.has_auth_fn = False  # a worker's @handlers.on_auth
        self.auth_failures = 0
        self.tls_failures = 0  # handshakes failed or timed out
        self._security_logged = False  # _log_security ran
        self.apply_settings(settings)
        self.load_security(settings)

    def apply_settings(self, settings) -> None:
        """Take new limits (at start, and on reload); new connections get the new frame limit."""
        had_idle = self.settings.idle_timeout > 0
        self.settings = settings
        self.max_inflight = settings.max_inflight
        self.hard_limit = settings.output_hard_limit
        self.soft_limit = settings.output_soft_limit
        self.max_total_request = settings.max_total_request_bytes
        self.request_resume_at = settings.max_total_request_bytes * 3 // 4
        self.max_total_output = settings.max_total_output_bytes
        self.rooms.max_per_connection = settings.max_rooms_per_connection
        if self.accepting and settings.idle_timeout > 0 and not had_idle:
            self._schedule_idle_sweep()

    def _arm_log_flush(self) -> None:
        if self._log_flush_timer is None:
            self._log_flush_timer = self.timers.call_later(self.log_limit.interval_s, self._flush_log)

    def _flush_log(self) -> None:
        self._log_flush_timer = None
        if self.log_limit.flush():
            self._arm_log_flush()

    # -- what the workers told us about the handlers ---------------------------------------

    def set_handler_info(self, info: dict) -> None:
        self.concurrent_ops = frozenset(op.encode("utf-8") for op in info["concurrent"])
        # A line calls op X when it starts with b"X{": at the chunk's start, or after an LF.
        self.concurrent_heads = tuple(op + b"{" for op in self.concurrent_ops)
        self.concurrent_needles = tuple(b"\n" + op + b"{" for op in self.concurrent_ops)
        self.has_connect = info["connect"]
        self.has_disconnect = info["disconnect"]
        self.counters.set_ops(info.get("ops", ()))
        self.has_auth_fn = info.get("auth", False)

    # -- listening --------------------------------------------------------------------------

    def listen(self, host: str, port: int, backlog: int = 1024) -> tuple:
        sock = socket.create_server((host, port), family=_family(host), backlog=backlog, reuse_port=False)
        sock.setblocking(False)
        self.listeners.append(Listener(sock))
        return sock.getsockname()[:2]

    def start_accepting(self) -> None:
        if self.accepting:
            return
        self.accepting = True
        self._log_security()
        for listener in self.listeners:
            self.selector.register(listener.sock, READ, listener)
        if self.settings.idle_timeout > 0:
            self._schedule_idle_sweep()

    def stop_accepting(self, close: bool = False) -> None:
        if self.accepting and not self.accept_paused:
            for listener in self.listeners:
                self.selector.unregister(listener.sock)
        self.accepting = False
        if close:
            for listener in self.listeners:
                listener.sock.close()
            self.listeners.clear()

    def on_accept(self, listener: Listener) -> None:
        if not self.accepting or self.accept_paused:
            return  # stopped earlier in this loop pass (a signal came with the connection)
        for _ in range(64):  # bounded, so one busy listener can't starve the rest of the loop
            try:
                sock, peer = listener.sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in _ACCEPT_RESOURCE_ERRORS:
                    self._pause_accepting(exc)
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue  # the client gave up while in the backlog
                # Linux passes network errors of the new connection to accept(): drop that one.
                self.log_limit.log(log, "accept failed", logging.WARNING, "accept failed: %s", exc)
                return
            if self.out_of_descriptors:
                self.out_of_descriptors = False
                log.info("accepting connections again")
            if len(self.conns) + len(self.gated) >= self.settings.max_connections:
                self._refuse(sock, peer)
                continue
            self.add_connection(sock, peer)

    def _refuse(self, sock: socket.socket, peer) -> None:
        self.counters.closed_one("max_connections")
        self.log_limit.log(
            log, "refused", logging.WARNING, "refused connection from %s: max_connections (%d) reached",
            peer, self.settings.max_connections,
        )
        if self.tls_context is None:  # (a TLS client could not read a plain-text FAIL: just close)
            try:
                sock.setblocking(False)
                sock.send(encode_fail(TooManyConnections.__name__, f"server holds max_connections={self.settings.max_connections}"))
            except OSError:
                pass
        sock.close()

    def _pause_accepting(self, exc: OSError) -> None:
        if not self.out_of_descriptors:  # log once per episode, not every pause
            self.out_of_descriptors = True
            log.error("accept failed (%s); pausing accepting for %.1fs at a time until it works", exc.strerror, ACCEPT_PAUSE_S)
        for listener in self.listeners:
            self.selector.unregister(listener.sock)
        self.accept_paused = True
        self.timers.call_later(ACCEPT_PAUSE_S, self._resume_accepting)

    def _resume_accepting(self) -> None:
        self.accept_paused = False
        if self.accepting:
            for listener in self.listeners:
                self.selector.register(listener.sock, READ, listener)

    def add_connection(self, sock: socket.socket, peer) -> Connection | None:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        net_id = self.next_net_id
        self.next_net_id += 1
        self.accepted_total += 1
        if self.tls_context is not None:
            return self._add_tls_connection(net_id, sock, peer)
        conn = Connection(net_id, sock, peer, self.settings.max_frame_bytes, self.now)
        if self.auth_required:
            self.selector.register(sock, READ, conn)
            self._gate(conn)
            return conn
        self.conns[net_id] = conn
        self.selector.register(sock, READ, conn)
        log.debug("net_id %s connected from %s", net_id, peer)
        if self.has_connect:
            conn.queue.append(Job(conn, ipc.CONNECT, 0, 0, b""))
            self.advance(conn)
        return conn

    # -- reading ---------------------------------------------------------------------------

    def on_read(self, conn: Connection) -> None:
        if conn.state != OPEN:
            return
        if conn.gate is not None:  # not authenticated yet: small reads, to the gate, never the decoder
            self._read_gated(conn)
            return
        size = RECV_BYTES
        if self.request_bytes > self.max_total_request:
            # Past the budget a connection reads up to its equal share (one that holds little, a
            # little more), so thousands of connections can't each put a full read on top of it.
            size = min(RECV_BYTES, max(self.max_total_request // self.holders - conn.request_bytes, SMALL_RECV_BYTES))
        try:
            data = conn.sock.recv(size)
        except BlockingIOError:
            return
        except OSError as exc:
            self.close(conn, f"read failed: {exc.strerror or exc}", kind="read failed")
            return
        if not data:
            self.on_eof(conn)
            return
        conn.last_active = self.now
        partial = conn.decoder.buffered
        for chunk in conn.decoder.feed(data):
            if chunk is None:
                self.log_limit.log(
                    log, "frame too large", logging.INFO, "net_id %s: frame longer than max_frame_bytes (%d) discarded",
                    conn.net_id, conn.decoder.max_frame_bytes,
                )
                seq = conn.next_seq
                conn.next_seq += 1
                self.counters.fail_other(_FRAME_TOO_LARGE)
                self.complete(conn, seq, _frame_too_large(conn.decoder.max_frame_bytes), 1)
            elif self.concurrent_ops and self._has_concurrent(chunk):
                self._enqueue_mixed(conn, chunk)
            else:
                self._enqueue(conn, ipc.SERIAL, chunk, chunk.count(b"\n"))
        partial = conn.decoder.buffered - partial
        if partial > 0:
            self._hold(conn, partial)
        elif partial < 0:
            self._release(conn, -partial)
        self.advance(conn)
        if conn.state != OPEN:
            return
        # More than an equal share of the budget: checked per read, so every connection that
        # grows past its share is stopped at once, and one that holds little is never stopped.
        if (self.request_bytes > self.max_total_request and conn.request_bytes * self.holders > self.max_total_request
                and not self._may_read_alone(conn)):
            self._pause(conn)
        elif conn.unanswered >= self.max_inflight:
            self._set_events(conn, conn.events & ~READ)  # TCP back-pressure until answers drain

    def _enqueue(self, conn: Connection, kind: int, payload: bytes, count: int) -> None:
        queue = conn.queue
        tail = queue[-1] if queue else None
        # A waiting serial job grows, so a backlog goes to a worker in one piece; only when the
        # new lines follow it directly (a FrameTooLarge answered here takes a seq in between),
        # and up to MAX_JOB_BYTES.
        if (
            kind == ipc.SERIAL and tail is not None and tail.kind == ipc.SERIAL
            and tail.first + tail.count == conn.next_seq and len(tail.payload) < MAX_JOB_BYTES
        ):
            tail.payload += payload
            tail.count += count
            tail.op_stats = None  # (a remainder may carry its first op's counters: found again for all)
        else:
            job = Job(conn, kind, conn.next_seq, count, payload)
            job.arrived = self.now
            queue.append(job)
        conn.next_seq += count
        self._hold(conn, len(payload))

    def _has_concurrent(self, chunk: bytes) -> bool:
        """Does a line of the chunk call a concurrent op?

        Many short lines: a substring search per op, in C. Long lines: a look at each line's
        start, found with memchr (a substring search over 64 KiB of one line took ~20 us per op).
        """
        heads = self.concurrent_heads
        if chunk.startswith(heads):
            return True
        if len(chunk) <= _SCAN_WHOLE_CHUNK_BYTES:
            for needle in self.concurrent_needles:
                if needle in chunk:
                    return True
            return False
        end = chunk.find(b"\n")
        while 0 <= end < len(chunk) - 1:  # another line starts after this LF
            if chunk.startswith(heads, end + 1):
                return True
            end = chunk.find(b"\n", end + 1)
        return False

    def _enqueue_mixed(self, conn: Connection, chunk: bytes) -> None:
        concurrent_ops = self.concurrent_ops
        serial: list[bytes] = []
        for line in split_lines(chunk):
            if line.partition(b"{")[0] in concurrent_ops:
                if serial:
                    self._enqueue(conn, ipc.SERIAL, b"".join(serial), len(serial))
                    serial = []
                self._enqueue(conn, ipc.CONCURRENT, line + b"\n", 1)
            else:
                serial.append(line + b"\n")
        if serial:
            self._enqueue(conn, ipc.SERIAL, b"".join(serial), len(serial))

    def on_eof(self, conn: Connection) -> None:
        """The client shut down its sending side: answer what it sent, then close."""
        conn.state = EOF
        self._set_events(conn, conn.events & ~READ)
        self._close_if_finished(conn)

    # -- the request budget (max_total_request_bytes) ------------------------------------------

    def _hold(self, conn: Connection, size: int) -> None:
        if size:
            if not conn.request_bytes:
                self.holders += 1
            conn.request_bytes += size
            self.request_bytes += size

    def _release(self, conn: Connection, size: int) -> None:
        if not size:
            return
        conn.request_bytes -= size
        self.request_bytes -= size
        if not conn.request_bytes:
            self.holders -= 1
        if self.paused:
            if self.request_bytes < self.request_resume_at:
                self._resume_all()
            elif conn.paused and not conn.request_bytes:
                # It holds nothing now, so it is the lightest: read it, whatever the others hold.
                self._resume(conn)

    def _may_read_alone(self, conn: Connection) -> bool:
        """May this connection be read past the budget? Yes for one connection at a time whose
        only held bytes are an unfinished line: nothing but reading it can ever release them (no
        job of it is running), so if all paused connections were like it, none would ever be
        read again and their RPCs never answered. Reading one at a time still bounds memory:
        its line is at most max_frame_bytes, and once complete it runs and is released."""
        if conn.running or conn.queue or not conn.request_bytes:
            return False
        reader = self.partial_reader
        if (reader is not None and reader is not conn and reader.state == OPEN and not reader.paused
                and reader.request_bytes and not reader.running and not reader.queue):
            return False  # another one has the turn
        self.partial_reader = conn
        return True

    def _pass_reading_turn(self) -> None:
        """The connection that had the turn of ``_may_read_alone`` completed its line or went:
        give the turn to a paused one holding only an unfinished line, if any (a scan of the
        paused, only when the turn changes hands)."""
        reader = self.partial_reader
        if not self.paused or (reader is not None and reader.state == OPEN and not reader.paused
                               and reader.request_bytes and not reader.running and not reader.queue):
            return
        self.partial_reader = None
        for conn in self.paused:
            if self._may_read_alone(conn):
                self._resume(conn)
                return

    def _pause(self, conn: Connection) -> None:
        if not self.paused:  # (under a steady flood, many times a second)
            self.log_limit.log(
                log, "max_total_request_bytes", logging.INFO,
                "requests held by all connections passed max_total_request_bytes (%d > %d bytes): "
                "not reading those holding the most until under %d",
                self.request_bytes, self.max_total_request, self.request_resume_at,
            )
        log.debug("net_id %s not read: holds %d request bytes", conn.net_id, conn.request_bytes)
        conn.paused = True
        self.paused.add(conn)
        self._set_events(conn, conn.events & ~READ)

    def _resume(self, conn: Connection) -> None:
        conn.paused = False
        self.paused.discard(conn)
        if conn.state == OPEN and not conn.events & READ and self.reading and conn.unanswered < self.max_inflight:
            self._read_again(conn)

    def _resume_all(self) -> None:
        log.debug("requests held by all connections under %d bytes: reading every connection again", self.request_resume_at)
        for conn in list(self.paused):
            self._resume(conn)

    # -- the order RPCs run in -----------------------------------------------------------------

    def advance(self, conn: Connection) -> None:
        """Move the connection's jobs that may run now to the scheduler."""
        queue = conn.queue
        while queue:
            job = queue[0]
            if job.kind == ipc.CONCURRENT:
                if conn.serial_running:
                    break
            elif conn.running:
                break
            else:
                conn.serial_running += 1
            queue.popleft()
            conn.running += 1
            self.scheduler.push(job)
        if conn.state == CLOSED and not queue and not conn.running and self.has_disconnect and not conn.disconnect_queued:
            conn.disconnect_queued = True
            conn.serial_running += 1
            conn.running += 1
            self.scheduler.push(Job(conn, ipc.DISCONNECT, conn.next_seq, 0, b""))

    def job_done(self, job: Job) -> None:
        """A job's last answer has arrived (or been given for it)."""
        conn = job.conn
        self._release(conn, len(job.payload))
        conn.running -= 1
        if job.kind != ipc.CONCURRENT:
            conn.serial_running -= 1
        self.advance(conn)
        if conn.state == EOF:
            self._close_if_finished(conn)
        elif conn.paused and self._may_read_alone(conn):
            self._resume(conn)
        self._pass_reading_turn()

    def requeue(self, job: Job, from_line: int) -> None:
        """Put the lines of a job that never started back in line (its worker died)."""
        conn = job.conn
        if from_line < job.count:
            rest = job.rest(from_line)
            self._hold(conn, len(rest.payload))  # job_done() releases the whole of ``job`` next
            index = 0
            while index < len(conn.queue) and conn.queue[index].first < rest.first:
                index += 1
            conn.queue.insert(index, rest)
        elif job.kind in (ipc.CONNECT, ipc.DISCONNECT) and from_line == 0:
            conn.queue.appendleft(Job(conn, job.kind, job.first, 0, b""))

    def take_back(self, jobs: list) -> None:
        """Jobs that a worker has not started: first in line for another worker.

        Unlike ``requeue`` they stay runnable: the connection's running counts already hold them.
        """
        self.scheduler.push_taken_back(jobs)

    def give_back(self, job: Job, line: int) -> None:
        """A worker cut ``job`` at a time slice: its lines from ``line`` on take its place, in line
        again after the other connections' turns (the connection's running counts hold it)."""
        rest = job.rest(line)
        self._release(job.conn, len(job.payload) - len(rest.payload))  # the lines that ran are done
        self.scheduler.push_given_back(rest)

    # -- answers and pushes ----------------------------------------------------------------

    def on_reply(self, job: Job, first: int, count: int, answers: bytes, pushes: list, session) -> None:
        for action in pushes:  # in the order the handler made them, before its answer
            if len(action) == 2:
                self.push(action[0], action[1])
            else:
                self.room_action(action)
        conn = job.conn
        if session is not ipc.UNCHANGED:
            conn.session = session
            conn.session_version += 1
        if count:
            if job.kind == _AUTH:
                self._auth_answer(conn, answers)
                return
            self.counters.reply(job, first, count, answers, self.now)
            self.complete(conn, job.first + first, answers, count)

    def fail_lines(self, job: Job, start: int, end: int, reason: str, message: str) -> None:
        if end > start:
            if job.kind == ipc.AUTH:
                self._auth_answer(job.conn, encode_fail(reason, message))
                return
            self.counters.fail(job, start, end, reason, self.now)
            self.complete(job.conn, job.first + start, encode_fail(reason, message) * (end - start), end - start)

    def complete(self, conn: Connection, seq: int, answers: bytes, count: int) -> None:
        """Answers for seqs ``seq .. seq+count-1``: write them now, or keep them for their turn."""
        if conn.state == CLOSED:
            return
        self.output_bytes += len(answers)
        if seq != conn.write_seq:
            conn.done[seq] = (answers, count)
            conn.done_bytes += len(answers)
            return
        wbuf = conn.wbuf
        if not wbuf or conn.events & WRITE:
            self.dirty.append(conn)  # (a blocked connection too, so flush() checks its limits)
        wbuf += answers
        seq += count
        done = conn.done
        while done and seq in done:
            answers, count = done.pop(seq)
            conn.done_bytes -= len(answers)
            wbuf += answers
            seq += count
        conn.write_seq = seq
        conn.last_active = self.now  # idle time counts from our answer, not from the request
        if conn.state == OPEN and not conn.events & READ and self.reading and conn.unanswered < self.max_inflight and not conn.paused:
            self._read_again(conn)

    # -- writing ---------------------------------------------------------------------------

    def flush(self) -> None:
        """Send what this loop iteration produced: one send per connection, not per answer."""
        dirty, self.dirty = self.dirty, []
        for conn in dirty:
            if conn.state == CLOSED or not conn.wbuf:
                continue
            if not conn.events & WRITE:
                self._send(conn)
            if conn.state != CLOSED and conn.wbuf:
                self._check_output_limits(conn)
        if self.output_bytes > self.max_total_output:
            self._shed_output(self.max_total_output)

    def on_write(self, conn: Connection) -> None:
        if conn.state == CLOSED:
            return
        self._send(conn)

    def _send(self, conn: Connection) -> None:
        wbuf = conn.wbuf
        try:
            sent = conn.sock.send(wbuf)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self.close(conn, f"write failed: {exc.strerror or exc}", kind="write failed")
            return
        self.output_bytes -= sent
        if sent == len(wbuf):
            wbuf.clear()
            conn.soft_since = 0.0
            if conn.events & WRITE:
                self._set_events(conn, conn.events & ~WRITE)
            if conn.state == EOF:
                self._close_if_finished(conn)
        else:
            del wbuf[:sent]
            if not conn.events & WRITE:
                self._set_events(conn, conn.events | WRITE)

    def _check_output_limits(self, conn: Connection) -> None:
        size = len(conn.wbuf)
        if size > self.hard_limit:
            self.close(
                conn, f"output buffer over output_hard_limit ({size} > {self.hard_limit} bytes)", logging.WARNING,
                kind="output_hard_limit",
            )
        elif size > self.soft_limit:
            if not conn.soft_since:
                conn.soft_since = self.now
                self.timers.call_later(self.settings.output_soft_seconds, self._check_soft_limit, conn, self.now)
        else:
            conn.soft_since = 0.0

    def _shed_output(self, limit: int) -> None:
        """Close the connections holding the most output, largest first, until all together hold
        at most ``limit`` bytes (a sort per call: it runs only past max_total_output_bytes)."""
        for conn in sorted(self.conns.values(), key=_output_size, reverse=True):
            if self.output_bytes <= limit:
                return
            if conn.state == CLOSED:
                continue
            self.close(
                conn,
                f"unsent output of all connections over max_total_output_bytes ({self.output_bytes} > "
                f"{self.max_total_output} bytes); this one held the most ({_output_size(conn)} bytes)",
                logging.WARNING,
                kind="max_total_output_bytes",
            )

    def _check_soft_limit(self, conn: Connection, since: float) -> None:
        if conn.state != CLOSED and conn.soft_since == since and len(conn.wbuf) > self.soft_limit:
            self.close(
                conn,
                f"output buffer over output_soft_limit ({len(conn.wbuf)} > {self.soft_limit} bytes) "
                f"for {self.settings.output_soft_seconds:g}s",
                logging.WARNING,
                kind="output_soft_limit",
            )

    # -- closing ---------------------------------------------------------------------------

    def _close_if_finished(self, conn: Connection) -> None:
        if conn.state == EOF and not conn.queue and not conn.running and not conn.wbuf:
            # A refused authentication ends with its FAIL written and the read side shut.
            refused = conn.gate is not None and conn.gate.refused
            self.close(conn, "client closed its side", counted_as="unauthorized" if refused else "client_closed")

    def close(self, conn: Connection, reason: str, level: int = logging.DEBUG, kind: str = "", counted_as: str = "") -> None:
        """Close the socket now. Jobs already received still run; their answers are dropped.

        With a ``kind``, a reason many connections can share at once: its log line is rate-limited.
        ``counted_as`` (else ``kind``, else "other") is the reason it counts under in stats/metrics.
        """
        if conn.state == CLOSED:
            return
        counted = counted_as or kind.replace(" ", "_") or "other"
        self.counters.closed_one(counted)
        fields = {"net_id": conn.net_id, "reason": counted}
        if kind:
            self.log_limit.log(log, kind, level, "net_id %s closed: %s", conn.net_id, reason, extra=fields)
        else:
            log.log(level, "net_id %s closed: %s", conn.net_id, reason, extra=fields)
        conn.state = CLOSED
        if self.conns.pop(conn.net_id, None) is None and self.gated.pop(conn.net_id, None) is not None:
            self._close_gated(conn)
        self.rooms.leave_all(conn.net_id)  # before on_disconnect runs (queued by advance below)
        try:
            self.selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()
        self.output_bytes -= len(conn.wbuf) + conn.done_bytes
        conn.wbuf = bytearray()
        conn.done.clear()
        conn.done_bytes = 0
        if conn.paused:
            conn.paused = False
            self.paused.discard(conn)
        if conn is self.partial_reader:
            self.partial_reader = None
            self._pass_reading_turn()
        # Its partial line will never be completed; what its jobs hold is released as they finish.
        self._release(conn, conn.decoder.buffered)
        conn.decoder = FrameDecoder(conn.decoder.max_frame_bytes)
        self.advance(conn)

    def _set_events(self, conn: Connection, events: int) -> None:
        if events == conn.events:
            return
        if conn.events and events:
            self.selector.modify(conn.sock, events, conn)
        elif events:
            self.selector.register(conn.sock, events, conn)
        else:
            self.selector.unregister(conn.sock)
        conn.events = events

    def _schedule_idle_sweep(self) -> None:
        period = max(self.settings.idle_timeout / 4, 0.05)
        self.timers.call_later(period, self._sweep_idle)

    def _sweep_idle(self) -> None:
        limit = self.now - self.settings.idle_timeout
        for conn in list(self.conns.values()):
            # A connection waiting for answers is not idle: its client is waiting on us.
            if conn.last_active < limit and not conn.unanswered and not conn.wbuf:
                self.close(conn, f"idle for {self.settings.idle_timeout:g}s (idle_timeout)", logging.INFO, kind="idle_timeout")
        if self.accepting and self.settings.idle_timeout > 0:
            self._schedule_idle_sweep()

    # -- stopping --------------------------------------------------------------------------

    def stop_reading(self) -> None:
        """Take no new RPCs from any connection (graceful stop)."""
        self.reading = False
        # The gated too: an auth frame read now would admit a connection (and run on_connect).
        for conn in [*self.conns.values(), *self.gated.values()]:
            if conn.state == OPEN:
                self._set_events(conn, conn.events & ~READ)

    def is_idle(self) -> bool:
        """Nothing left to run or to send."""
        if self.scheduler:
            return False
        return not any(conn.queue or conn.running or conn.wbuf or conn.unanswered for conn in self.conns.values())

    def answer_unanswered(self, reason: str = _SHUTTING_DOWN, message: str = "server is shutting down") -> int:
        """Give every RPC still without an answer a FAIL; returns how many."""
        count = 0
        fail = encode_fail(reason, message)
        for conn in list(self.conns.values()):
            # complete() at write_seq also writes the answers queued behind it, so each turn
            # fails exactly the oldest RPC that has no answer yet.
            while conn.write_seq < conn.next_seq:
                self.complete(conn, conn.write_seq, fail, 1)
                count += 1
            conn.queue.clear()
        for conn in list(self.gated.values()):
            # An auth frame an AUTH job (on_auth) still decides: it is RPC 0, answered like any other.
            if conn.gate is not None and conn.gate.taken and not conn.gate.refused and conn.write_seq == 0:
                self._write_verdict(conn, fail)
                conn.queue.clear()
                count += 1
        self.scheduler.clear()
        return count

    def close_all(self, reason: str) -> None:
        for conn in [*self.conns.values(), *self.gated.values()]:
            self.close(conn, reason, counted_as="server_stopping")


def nth_line_end(lines: bytes, n: int) -> int:
    """Index of the LF that ends the n-th line (1-based) of ``lines``."""
    end = -1
    for _ in range(n):
        end = lines.index(b"\n", end + 1)
    return end


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _output_size(conn: Connection) -> int:
    return len(conn.wbuf) + conn.done_bytes


def _frame_too_large(limit: int) -> bytes:
    return encode_fail(_FRAME_TOO_LARGE, f"frame longer than max_frame_bytes ({limit} bytes)")
