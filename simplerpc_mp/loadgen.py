"""A lean load generator for simplerpc servers: pipelined RPCs on many connections, every answer checked.

Runs in its own process (``bench/run.py`` and ``simplerpc-mp bench`` start it so), on one
``selectors`` loop with no threads and no asyncio: the generator must cost far less per RPC than
the server it measures, so it

- encodes each request from a pre-encoded template (``op{"seq":N,...}``: one ``%`` per RPC, no
  JSON encoding), and sends the requests a connection may add in one ``send``;
- splits answers with ``bytes.split`` and matches each to the oldest request of its connection
  (the protocol answers in order), comparing bytes where it can instead of decoding JSON.

Every request carries a per-connection sequence number (``"seq"``) as its first field, so an
answer given to the wrong request is caught by ``check``. ``check_echo`` is the check for echo
handlers: it first compares the answer's bytes with the request's (no decode), and decodes only
when they differ, so an equivalent encoding still passes.

Also here: ``run_fanout`` (one RPC that pushes to many connections, timed until every one has
its push) and ``open_idle`` (many connected, silent clients).
"""

from __future__ import annotations

import json
import selectors
import socket
import ssl
import time
from collections import deque
from dataclasses import dataclass, field

__all__ = ["LoadResult", "run_load", "check_echo", "run_fanout", "FanoutResult", "open_idle", "close_all"]

# Reason names for answers that never came or were unreadable; real FAIL reasons are class names.
NO_ANSWER = "<no answer>"
CONNECTION_LOST = "<connection lost>"
UNREADABLE = "<unreadable answer>"
# After the measured run, outstanding answers get this long to arrive.
DRAIN_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 10.0
# Below glibc's mmap threshold (128 KiB): a recv(256 KiB) costs ~25 us more per call, since
# CPython allocates the full size (mmap + page faults + munmap) before shrinking the bytes.
RECV_BYTES = 64 * 1024
PROGRESS_EVERY_S = 1.0

_NEVER = 1 << 62
_dumps = json.JSONEncoder(separators=(",", ":")).encode
_NL = b"\n"
_OKAY = b"OKAY"
_FAIL = b"FAIL"


@dataclass
class LoadResult:
    sent: int = 0
    answered: int = 0
    okay: int = 0
    fails: dict = field(default_factory=dict)  # FAIL count by reason (and <no answer> etc.)
    order_errors: int = 0  # answers that did not match the request they should answer
    latencies: list = field(default_factory=list)  # seconds, one per answered RPC
    elapsed: float = 0.0  # seconds of the measured run, drain included
    pushes: int = 0  # pushes received

    def rate(self) -> float:
        return self.answered / self.elapsed if self.elapsed > 0 else 0.0

    def percentile(self, p: float) -> float:
        """Latency percentile in seconds (nearest rank), p in [0, 100]; 0.0 with no samples."""
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        index = min(len(ordered) - 1, max(0, int(round(p / 100.0 * (len(ordered) - 1)))))
        return ordered[index]

    @property
    def failed(self) -> int:
        return sum(self.fails.values())


def check_echo(request: dict, answer: dict) -> bool:
    """The check for echo handlers: the answer is the request. ``run_load`` compares bytes first."""
    return answer == request


class _Conn:
    __slots__ = ("sock", "seq", "pending", "partial", "closed", "measured_from", "recv", "send", "tls_pending")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        # Over TLS, the C-level SSL object's methods: SSLSocket.recv/send add two Python calls
        # each, and the generator must cost far less per RPC than the server it measures.
        sslobj = getattr(sock, "_sslobj", None)
        self.recv = sslobj.read if sslobj is not None else sock.recv
        self.send = sslobj.write if sslobj is not None else sock.send
        self.tls_pending = sslobj.pending if sslobj is not None else None
        self.seq = 0
        # (seq, sent_at, request line), oldest first; for check_echo the expected answer line
        self.pending: deque = deque()
        self.partial: list[bytes] = []  # pieces of an incomplete answer line
        self.closed = False
        self.measured_from = _NEVER  # first seq of the measured run (set when it starts)


# A TLS socket's "not now": SSLSocket raises these instead of BlockingIOError.
_NOT_NOW = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


def _connect(host: str, port: int, count: int, deadline: float, ssl_context=None, token=None) -> list[socket.socket]:
    """``count`` connections; with ``ssl_context`` over TLS (handshake done), with ``token``
    authenticated (``ConnectionError`` if refused)."""
    socks = []
    auth_frame = b'auth{"token":' + _dumps(token).encode() + b"}\n" if token is not None else b""
    try:
        for _ in range(count):
            sock = socket.create_connection((host, port), timeout=max(0.1, deadline - time.monotonic()))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                if ssl_context is not None:
                    sock = ssl_context.wrap_socket(sock, server_hostname=host)
                if auth_frame:
                    _authenticate(sock, auth_frame)
            except BaseException:
                sock.close()
                raise
            sock.setblocking(False)
            socks.append(sock)
    except BaseException:
        close_all(socks)
        raise
    return socks


def _authenticate(sock: socket.socket, auth_frame: bytes) -> None:
    """Send the auth frame and read its answer (blocking): ``ConnectionError`` if refused."""
    sock.sendall(auth_frame)
    answer = b""
    while not answer.endswith(_NL):
        more = sock.recv(RECV_BYTES)
        if not more:
            raise ConnectionError("the server closed the connection during authentication")
        answer += more
    if not answer.startswith(_OKAY):
        raise ConnectionError(f"authentication refused: {_fail_reason(answer[4:])}")


def close_all(socks) -> None:
    for sock in socks:
        try:
            sock.close()
        except OSError:
            pass


def run_load(host: str, port: int, *, conns: int = 16, depth: int = 8, duration: float = 10.0,
             op: str = "echo", data: dict | None = None, check=None, warmup: float = 0.0,
             progress=None, ssl_context=None, token=None) -> LoadResult:
    """Keep ``depth`` RPCs in flight on each of ``conns`` connections for ``duration`` seconds.

    After ``warmup`` seconds (whose answers are checked but not counted) the measured run starts;
    when ``duration`` has passed no more requests are sent and the outstanding answers are
    drained (up to ``DRAIN_TIMEOUT_S``; ``elapsed`` includes the drain). ``check(request,
    answer)`` verifies each OKAY, a failure counting as an order error. ``progress(result)`` is
    called about once a second.
    """
    if conns < 1 or depth < 1 or duration <= 0:
        raise ValueError("conns and depth must be >= 1 and duration > 0")
    body = _dumps(dict(data or {}))
    if "seq" in (data or {}):
        raise ValueError("data must not have a 'seq' key: the generator puts one in every request")
    # op{"seq":N<rest of data>}\n, built with one % per request
    rest = (b"," + body[1:].encode()) if body != "{}" else b"}"
    template = op.encode() + b'{"seq":%d' + rest.replace(b"%", b"%%") + b"\n"
    # what an echo handler answers, for the byte comparison of check_echo
    echo_template = b'OKAY{"seq":%d' + rest.replace(b"%", b"%%")
    op_len = len(op.encode())
    fast_echo = check is check_echo
    result = LoadResult()
    measuring = warmup <= 0
    clock = time.perf_counter
    deadline_connect = time.monotonic() + CONNECT_TIMEOUT_S
    socks = _connect(host, port, conns, deadline_connect, ssl_context, token)
    tls = ssl_context is not None
    selector = selectors.DefaultSelector()
    connections = [_Conn(sock) for sock in socks]
    for conn in connections:
        selector.register(conn.sock, selectors.EVENT_READ, conn)
        if measuring:
            conn.measured_from = 0
    latencies = result.latencies
    fails = result.fails

    def fill(conn: _Conn, now: float, count: int) -> None:
        if count <= 0 or conn.closed:
            return
        seq = conn.seq
        lines = [template % n for n in range(seq, seq + count)]
        pending = conn.pending
        if fast_echo:
            for n in range(seq, seq + count):
                pending.append((n, now, echo_template % n))
        else:
            for n, line in enumerate(lines, seq):
                pending.append((n, now, line))
        conn.seq = seq + count
        _send_all(conn.sock, b"".join(lines), conn.send)
        if measuring:
            result.sent += count

    def lost(conn: _Conn, reason: str) -> None:
        if conn.closed:
            return
        conn.closed = True
        counted = sum(1 for n, _, _ in conn.pending if n >= conn.measured_from)
        if counted:
            fails[reason] = fails.get(reason, 0) + counted
        conn.pending.clear()
        try:
            selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass

    def on_lines(conn: _Conn, lines: list, now: float) -> int:
        """Handle complete answer lines; returns how many answers (not pushes) there were."""
        answers = 0
        pending = conn.pending
        for line in lines:
            head = line[:4]
            if head != _OKAY and head != _FAIL:
                result.pushes += 1
                continue
            answers += 1
            if not pending:
                result.order_errors += 1  # an answer nobody asked for
                continue
            seq, sent_at, request = pending.popleft()
            if seq < conn.measured_from:
                continue  # a warm-up RPC
            result.answered += 1
            latencies.append(now - sent_at)
            if head == _OKAY:
                result.okay += 1
                if check is not None:
                    if fast_echo:
                        if line == request:  # request holds the expected answer line
                            continue
                        request = request[4:]
                    else:
                        request = request[op_len:-1]
                    if not _checked(check, request, line[4:]):
                        result.order_errors += 1
            else:
                reason = _fail_reason(line[4:])
                fails[reason] = fails.get(reason, 0) + 1
        return answers

    def read(conn: _Conn, refill: bool) -> None:
        try:
            chunk = conn.recv(RECV_BYTES)
            if tls and chunk:
                while conn.tls_pending():  # decrypted already: no selector event would announce it
                    chunk += conn.recv(RECV_BYTES)
        except _NOT_NOW:
            return
        except OSError:
            chunk = b""
        now = clock()
        if not chunk:
            lost(conn, CONNECTION_LOST)
            return
        if chunk.rfind(_NL) < 0:
            conn.partial.append(chunk)
            return
        if conn.partial:
            conn.partial.append(chunk)
            chunk = b"".join(conn.partial)
            conn.partial = []
        lines = chunk.split(_NL)
        tail = lines.pop()
        if tail:
            conn.partial.append(tail)
        answered = on_lines(conn, lines, now)
        if refill:
            fill(conn, clock(), answered)

    start = clock()
    measure_start = start + warmup
    end = measure_start + duration
    next_progress = start + PROGRESS_EVERY_S
    try:
        for conn in connections:
            fill(conn, clock(), depth)
        # The run: every answer makes room for one more request on its connection.
        while True:
            now = clock()
            if now >= end:
                break
            if not measuring and now >= measure_start:
                measuring = True
                for conn in connections:
                    conn.measured_from = conn.seq
            for key, _ in selector.select(min(end - now, 0.5)):
                read(key.data, True)
            if progress is not None and now >= next_progress:
                next_progress = now + PROGRESS_EVERY_S
                result.elapsed = now - measure_start if measuring else 0.0
                progress(result)
        if not measuring:  # the warm-up outlasted the run (duration tiny): count from here
            for conn in connections:
                conn.measured_from = conn.seq
        # The drain: no new requests; wait for what is outstanding.
        drain_deadline = clock() + DRAIN_TIMEOUT_S
        while any(c.pending and not c.closed for c in connections):
            remaining = drain_deadline - clock()
            if remaining <= 0:
                break
            for key, _ in selector.select(min(remaining, 0.5)):
                read(key.data, False)
        result.elapsed = clock() - measure_start
        for conn in connections:
            lost(conn, NO_ANSWER)
    finally:
        selector.close()
        close_all(socks)
    if progress is not None:
        progress(result)
    return result


def _send_all(sock: socket.socket, data: bytes, send=None) -> None:
    """Send it all before going on, so requests leave in order. Only big payloads ever wait here;
    the server keeps reading while we do (it reads a connection until ``max_inflight``)."""
    view = memoryview(data)
    deadline = 0.0
    send = send or sock.send
    while view:
        try:
            sent = send(view)
        except _NOT_NOW:
            sent = 0
        except OSError:
            return  # the read side will see the connection go
        view = view[sent:]
        if view:
            now = time.monotonic()
            if not deadline:
                deadline = now + DRAIN_TIMEOUT_S
            elif now > deadline:
                raise TimeoutError("the server stopped reading requests for %gs" % DRAIN_TIMEOUT_S)
            _wait_writable(sock, deadline - now)


def _wait_writable(sock: socket.socket, timeout: float) -> None:
    with selectors.DefaultSelector() as waiter:
        waiter.register(sock, selectors.EVENT_WRITE)
        waiter.select(max(0.0, timeout))


def _checked(check, request_json: bytes, answer_json: bytes) -> bool:
    try:
        return bool(check(json.loads(request_json), json.loads(answer_json)))
    except ValueError:
        return False


def _fail_reason(payload: bytes) -> str:
    try:
        reason = json.loads(payload).get("reason")
    except (ValueError, AttributeError):
        return UNREADABLE
    return reason if isinstance(reason, str) else UNREADABLE


# -- push fan-out ---------------------------------------------------------------------------


@dataclass
class FanoutResult:
    listeners: int = 0
    rounds: int = 0
    pushes: int = 0  # pushes received, all listeners and rounds
    missing: int = 0  # pushes that did not arrive within the round's timeout
    answer_errors: int = 0  # trigger RPCs not answered OKAY
    latencies: list = field(default_factory=list)  # seconds from trigger sent to last push received
    elapsed: float = 0.0

    def rate(self) -> float:
        """Pushes delivered per second."""
        return self.pushes / self.elapsed if self.elapsed > 0 else 0.0

    def percentile(self, p: float) -> float:
        return LoadResult.percentile(self, p)  # type: ignore[arg-type]


def run_fanout(host: str, port: int, *, listeners: int = 1000, rounds: int = 20, duration: float = 10.0,
               op: str = "fanout", data: dict | None = None, round_timeout: float = 10.0,
               barrier_op: str = "echo") -> FanoutResult:
    """Connect ``listeners`` clients; then, ``rounds`` times (or until ``duration`` has passed),
    send one ``op`` RPC on the first and time until every client (the sender included) has
    received one push. Expects the op to push one frame to every connected client.

    Before the first round every client sends one ``barrier_op{}`` RPC and waits for its answer:
    a connection the server has not accepted yet would miss the push (connect() returns once
    the kernel has queued the connection, before the server's accept)."""
    trigger = op.encode() + _dumps(dict(data or {})).encode() + b"\n"
    result = FanoutResult(listeners=listeners)
    socks = _connect(host, port, listeners, time.monotonic() + CONNECT_TIMEOUT_S)
    selector = selectors.DefaultSelector()
    partial: dict[int, bytes] = {}
    try:
        for index, sock in enumerate(socks):
            selector.register(sock, selectors.EVENT_READ, index)
        _barrier(socks, selector, barrier_op.encode() + b"{}\n", round_timeout)
        clock = time.perf_counter
        start = clock()
        stop_at = start + duration
        sender = socks[0]
        for _ in range(rounds):
            if clock() >= stop_at:
                break
            waiting = set(range(listeners))
            answered = False
            sent_at = clock()
            _send_all(sender, trigger)
            round_deadline = sent_at + round_timeout
            last = sent_at
            while (waiting or not answered) and clock() < round_deadline:
                for key, _ in selector.select(max(0.0, round_deadline - clock())):
                    index = key.data
                    try:
                        chunk = key.fileobj.recv(RECV_BYTES)
                    except BlockingIOError:
                        continue
                    if not chunk:
                        raise ConnectionError("server closed a fan-out listener")
                    chunk = partial.pop(index, b"") + chunk
                    lines = chunk.split(_NL)
                    tail = lines.pop()
                    if tail:
                        partial[index] = tail
                    for line in lines:
                        head = line[:4]
                        if head == _OKAY or head == _FAIL:
                            answered = True
                            if head != _OKAY:
                                result.answer_errors += 1
                        elif index in waiting:
                            waiting.discard(index)
                            result.pushes += 1
                            last = clock()
                        else:
                            result.pushes += 1
            result.rounds += 1
            result.missing += len(waiting)
            if not answered:
                result.answer_errors += 1
            result.latencies.append(last - sent_at)
        result.elapsed = clock() - start
    finally:
        selector.close()
        close_all(socks)
    return result


def _barrier(socks: list, selector, request: bytes, timeout: float) -> None:
    """Send ``request`` on every socket and wait until each has an answer (OKAY or FAIL)."""
    for sock in socks:
        _send_all(sock, request)
    waiting = set(range(len(socks)))
    deadline = time.monotonic() + timeout
    while waiting:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"{len(waiting)} of {len(socks)} connections unanswered after {timeout:g}s")
        for key, _ in selector.select(remaining):
            try:
                chunk = key.fileobj.recv(RECV_BYTES)
            except BlockingIOError:
                continue
            if not chunk:
                raise ConnectionError("server closed a connection during the barrier")
            if chunk.startswith((_OKAY, _FAIL)) and chunk.endswith(_NL):
                waiting.discard(key.data)


# -- idle clients ---------------------------------------------------------------------------


def open_idle(host: str, port: int, count: int) -> list[socket.socket]:
    """``count`` connected clients that send nothing; close them with ``close_all``."""
    return _connect(host, port, count, time.monotonic() + CONNECT_TIMEOUT_S)
