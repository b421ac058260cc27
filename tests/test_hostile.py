"""Hostile and broken input against a running server (issue 4): nothing a client sends may
crash the acceptor or a worker, leak its descriptors or grow its memory without bound.

Each attack goes through real sockets; afterwards ``assert_unharmed`` checks that the server
closed every connection (its descriptor count is back to where it started), that the same
worker processes are alive, that a fresh client's RPC works, and that the acceptor's RSS has
grown by less than ``RSS_GROWTH_BOUND_BYTES``.
"""

from __future__ import annotations

import random
import selectors
import socket
import struct
import time
from collections import deque

import psutil
import pytest

from simplerpc_mp import RemoteError
from simplerpc_mp.protocol import FrameDecoder, decode_frame, encode_frame, split_lines

from .conftest import wait_until

MiB = 1024 * 1024
# The stated bound: after any attack below, the acceptor's RSS is at most this much above what it
# was before it (measured after a warm-up). The attacks send up to tens of MB in total; what the
# acceptor may keep is a few buffers of at most max_frame_bytes each while connections are open.
RSS_GROWTH_BOUND_BYTES = 8 * MiB
ANSWER_TIMEOUT_S = 20.0


# -- a raw client: bytes out, lines in ---------------------------------------------------------


class Raw:
    """A client socket that sends raw bytes and sorts what comes back into answers and pushes."""

    def __init__(self, server, *, rcvbuf: int | None = None, connect: bool = True):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:  # before connect(), so the TCP window starts small
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.decoder = FrameDecoder(256 * MiB)
        self.answers: deque[bytes] = deque()
        self.pushes: list[bytes] = []
        self.eof = False
        self.reset = False
        self.received = 0
        if connect:
            self.sock.connect((server.host, server.port))
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock.setblocking(False)

    # reading

    def _recv(self) -> None:
        try:
            data = self.sock.recv(1024 * 1024)
        except BlockingIOError:
            return
        except ConnectionResetError:
            self.eof = self.reset = True
            return
        if not data:
            self.eof = True
            return
        self.received += len(data)
        for chunk in self.decoder.feed(data):
            assert chunk is not None, "the server sent a line longer than 256 MiB"
            for line in split_lines(chunk):
                if line.startswith((b"OKAY{", b"FAIL{")):
                    self.answers.append(line)
                else:
                    self.pushes.append(line)

    def pump(self, until, timeout: float = ANSWER_TIMEOUT_S, send: bytes = b"") -> None:
        """Send ``send`` while reading, until ``until()`` is true (or fail after ``timeout``)."""
        view = memoryview(send)
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(self.sock, selectors.EVENT_READ)
            while True:
                if view:
                    try:
                        view = view[self.sock.send(view) :]
                    except BlockingIOError:
                        pass
                if not view and until():
                    return
                if self.eof:
                    if until():
                        return
                    raise AssertionError(f"connection closed by the server ({self.received} bytes received)")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"timed out: {len(view)} bytes unsent, {len(self.answers)} answers, {len(self.pushes)} pushes"
                    )
                events = selectors.EVENT_READ | (selectors.EVENT_WRITE if view else 0)
                selector.modify(self.sock, events)
                for _, mask in selector.select(min(remaining, 0.5)):
                    if mask & selectors.EVENT_READ:
                        self._recv()

    def drain(self) -> None:
        """Read whatever has arrived, without waiting."""
        with selectors.DefaultSelector() as selector:
            selector.register(self.sock, selectors.EVENT_READ)
            while not self.eof and selector.select(0):
                self._recv()

    def exchange(self, data: bytes, count: int, timeout: float = ANSWER_TIMEOUT_S) -> list[bytes]:
        """Send ``data`` (reading meanwhile) and return the next ``count`` answers."""
        self.pump(lambda: len(self.answers) >= count, timeout, data)
        return [self.answers.popleft() for _ in range(count)]

    def wait_push(self, op: bytes, timeout: float = ANSWER_TIMEOUT_S) -> bytes:
        self.pump(lambda: any(p.startswith(op + b"{") for p in self.pushes), timeout)
        return next(p for p in self.pushes if p.startswith(op + b"{"))

    def wait_closed(self, timeout: float = ANSWER_TIMEOUT_S) -> None:
        """Read (and keep) everything until the server closes the connection."""
        self.pump(lambda: self.eof, timeout)

    # sending and leaving

    def send_all(self, data: bytes) -> None:
        self.pump(lambda: True, ANSWER_TIMEOUT_S, data)

    def send_bytewise(self, data: bytes) -> None:
        self.sock.setblocking(True)
        for i in range(len(data)):
            self.sock.send(data[i : i + 1])
        self.sock.setblocking(False)

    def abort(self) -> None:
        """Close with SO_LINGER 0: the kernel sends a RST, not a FIN."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Raw":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def parse(answer: bytes) -> tuple[str, dict]:
    return decode_frame(answer)


def reasons(answers) -> list[str]:
    return [parse(a)[1]["reason"] if a.startswith(b"FAIL") else "OKAY" for a in answers]


# -- the server's health ------------------------------------------------------------------------


class Vitals:
    """What an attack must leave unchanged: descriptors, worker pids; and RSS, within a bound."""

    def __init__(self, server):
        self.server = server
        self.proc = psutil.Process(server.pid)
        wait_until(lambda: len(server.workers()) == server_worker_count(server), what="all workers up")
        with server.client() as client:  # warm-up: both workers and the code paths used
            for i in range(50):
                client.call("echo", {"i": i, "pad": "x" * 1000})
        self.fds = self._settled_fds()
        self.worker_pids = sorted(p.pid for p in server.workers())
        self.rss = self.proc.memory_info().rss
        self.peak_growth = 0

    def _settled_fds(self) -> int:
        # The warm-up client's close reaches the server a moment later; wait until it has been seen.
        last = [-1]

        def settled():
            now = self.proc.num_fds()
            same, last[0] = now == last[0], now
            return same

        wait_until(settled, timeout=10, interval=0.05, what="a stable descriptor count")
        return last[0]

    def sample_rss(self) -> int:
        growth = self.proc.memory_info().rss - self.rss
        self.peak_growth = max(self.peak_growth, growth)
        return growth

    def sample_rss_when_closed(self) -> int:
        """The RSS sample once the server has closed every connection of the attack so far: what
        it keeps, without the buffers of connections it has not got round to closing yet (how
        many those are depends on how far behind a loaded machine lets the acceptor fall)."""
        wait_until(lambda: self.proc.num_fds() <= self.fds, timeout=15, what=f"server fds back to {self.fds}")
        return self.sample_rss()

    def assert_unharmed(self, bound: int = RSS_GROWTH_BOUND_BYTES) -> int:
        server = self.server
        assert server.proc.poll() is None, f"server exited; log:\n{server.log()}"
        # Every connection the attack opened is closed on the server side too.
        try:
            wait_until(lambda: self.proc.num_fds() <= self.fds, timeout=15, what=f"server fds back to {self.fds}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {self.proc.num_fds()} open; log:\n{server.log()[-4000:]}") from None
        workers = sorted(p.pid for p in server.workers())
        assert workers == self.worker_pids, f"a worker died or was replaced; log:\n{server.log()[-4000:]}"
        with server.client() as client:
            assert client.call("echo", {"still": "alive"}, timeout=10) == {"still": "alive"}
        growth = self.sample_rss()
        assert self.peak_growth < bound, f"acceptor RSS grew by {self.peak_growth / MiB:.1f} MiB (bound {bound / MiB:.0f})"
        return growth


def server_worker_count(server) -> int:
    args = server.args
    return int(args[args.index("--workers") + 1])


def assert_no_tracebacks(server) -> None:
    log = server.log()
    assert "Traceback" not in log, log
    assert "crashed" not in log and "died" not in log, log


@pytest.fixture
def vitals(basic_server):
    return Vitals(basic_server)


# -- garbage -----------------------------------------------------------------------------------


def test_random_bytes(basic_server, vitals):
    """Random bytes on four connections: each line gets one FAIL, and the connection goes on."""
    rng = random.Random(1234)
    for _ in range(4):
        data = rng.randbytes(256 * 1024) + b"\n"
        lines = split_lines(data)
        with Raw(basic_server) as raw:
            got = raw.exchange(data, len(lines))
            assert set(reasons(got)) <= {"MalformedPayload", "UnknownOpcode"}, set(reasons(got))
            assert raw.exchange(b'echo{"after":"garbage"}\n', 1) == [b'OKAY{"after":"garbage"}']
        vitals.sample_rss()
    vitals.assert_unharmed()
    assert_no_tracebacks(basic_server)


def test_invalid_utf8_gets_malformed_payload_in_order(basic_server, vitals):
    lines = [
        (b'echo{"i":1}', "OKAY"),
        (b'echo{"a":"\xff\xfe"}', "MalformedPayload"),
        (b"\xc3\x28{}", "MalformedPayload"),
        (b'echo{"i":2}', "OKAY"),
        (b'echo{"a":"\xed\xa0\x80"}', "MalformedPayload"),  # an encoded surrogate
        (b'ec\x80ho{"a":1}', "MalformedPayload"),
        (b'echo{"a":"\xf0\x9f\x98"}', "MalformedPayload"),  # truncated 4-byte sequence
        (b'echo{"a":"\xf0\x9f\x98\x80"}', "OKAY"),  # the whole emoji
    ]
    with Raw(basic_server) as raw:
        got = raw.exchange(b"".join(line + b"\n" for line, _ in lines), len(lines))
    assert reasons(got) == [want for _, want in lines]
    assert parse(got[0])[1] == {"i": 1} and parse(got[3])[1] == {"i": 2}
    assert parse(got[7])[1] == {"a": "\U0001F600"}
    assert "UTF-8" in parse(got[1])[1]["message"]
    vitals.assert_unharmed()
    assert_no_tracebacks(basic_server)


def test_deep_nesting(basic_server, vitals):
    """[[[[...]]]] 100k deep (closed, unclosed, objects): MalformedPayload, no worker dies."""
    attacks = [
        b'echo{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}\n",
        b'echo{"a":' + b"[" * 100_000 + b"\n",
        b"echo" + b'{"a":' * 100_000 + b"1" + b"}" * 100_000 + b"\n",
        b'cecho{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}\n",  # on the concurrent path too
    ]
    with Raw(basic_server) as raw:
        for attack in attacks:
            got = raw.exchange(attack + b'echo{"ok":1}\n', 2)
            assert reasons(got) == ["MalformedPayload", "OKAY"], got
            assert "nested too deeply" in parse(got[0])[1]["message"] or "malformed" in parse(got[0])[1]["message"]
    vitals.assert_unharmed()
    assert_no_tracebacks(basic_server)


def test_huge_numbers(basic_server, vitals):
    with Raw(basic_server) as raw:
        # A float past the double range would read as inf, which JSON has no word for: refused
        # as the request's fault, like NaN and Infinity literals, no crash.
        [answer] = raw.exchange(b'echo{"n": 1e999999}\n', 1)
        assert reasons([answer]) == ["MalformedPayload"]
        # Integers longer than Python's 4300-digit limit, up to most of max_frame_bytes.
        for digits in (5000, 900_000):
            got = raw.exchange(b'echo{"n": ' + b"9" * digits + b"}\n", 1)
            assert reasons(got) == ["MalformedPayload"], got
        # A float with a 900k-digit mantissa: parsed, answered, in bounded time.
        started = time.monotonic()
        got = raw.exchange(b'echo{"n": 0.' + b"3" * 900_000 + b"}\n", 1)
        assert reasons(got) == ["OKAY"] and parse(got[0])[1]["n"] == pytest.approx(1 / 3)
        assert time.monotonic() - started < 10
        assert raw.exchange(b'echo{"n": 1e308, "m": -0.0}\n', 1) == [b'OKAY{"n":1e+308,"m":-0.0}']
    vitals.assert_unharmed()
    assert_no_tracebacks(basic_server)


# -- broken transport -----------------------------------------------------------------------------


def test_one_byte_writes(basic_server, vitals):
    frames = b'echo{"x": [1, 2, 3], "s": "\xc3\xa9t\xc3\xa9"}\n' + b'cecho{"y": null}\n' + b"bad\n"
    with Raw(basic_server) as raw:
        raw.send_bytewise(frames)
        got = raw.exchange(b"", 3)
    assert got[0] == encode_frame("OKAY", {"x": [1, 2, 3], "s": "été"})[:-1]
    assert got[1] == b'OKAY{"y":null}'
    assert reasons(got[2:]) == ["MalformedPayload"]
    vitals.assert_unharmed()


def test_half_closed_socket_still_gets_every_answer(basic_server, vitals):
    """The client sends its RPCs, then shuts down its sending side: all answers, in order, then EOF."""
    ops = ["echo", "slow", "cecho", "cslow"]
    count = 200
    data = b"".join(
        encode_frame(ops[i % 4], {"i": i, "s": 0.002} if "slow" in ops[i % 4] else {"i": i}) for i in range(count)
    )
    with Raw(basic_server) as raw:
        raw.send_all(data)
        raw.sock.shutdown(socket.SHUT_WR)
        raw.wait_closed()  # the server closes once everything is answered
        assert not raw.reset
        got = list(raw.answers)
    assert len(got) == count
    assert [parse(a)[1]["i"] for a in got] == list(range(count))
    vitals.assert_unharmed()
    assert_no_tracebacks(basic_server)


def test_resets_in_the_middle_of_a_frame(basic_server, vitals):
    """RST (SO_LINGER 0) after part of a frame, after part of a huge line, with RPCs in flight."""
    partials = [
        b'echo{"x": "abc',
        b"ech",
        b'echo{"big": "' + b"x" * 600_000,  # half of max_frame_bytes buffered, then gone
        b'slow{"s": 0.05}\ncslow{"s": 0.05}\necho{"x":',  # answers that have nowhere to go
        b'echo{"i":1}\n' * 500 + b'echo{"i":',
    ]
    for round_ in range(40):
        for partial in partials:
            raw = Raw(basic_server)
            raw.send_all(partial)
            raw.abort()
        vitals.sample_rss_when_closed()
    vitals.assert_unharmed()
    assert_no_tracebacks(basic_server)


def test_connect_then_vanish_by_the_thousand(basic_server, vitals):
    """1000 connections that connect and leave at once (FIN or RST), 100 at a time."""
    for batch in range(10):
        socks = [Raw(basic_server) for _ in range(100)]
        for i, raw in enumerate(socks):
            if i % 2:
                raw.abort()
            else:
                raw.close()
        vitals.sample_rss()
    vitals.assert_unharmed()
    assert_no_tracebacks(basic_server)


def test_vanish_without_reading_a_flood_of_answers(basic_server, vitals):
    """Pipeline 20k RPCs, read nothing, and reset: the answers are dropped, nothing is kept."""
    for _ in range(3):
        raw = Raw(basic_server)
        raw.sock.settimeout(ANSWER_TIMEOUT_S)
        raw.sock.sendall((b'echo{"pad":"' + b"y" * 200 + b'"}\n') * 20_000)
        raw.abort()
    vitals.assert_unharmed()
    assert_no_tracebacks(basic_server)


# -- results that cannot be encoded ------------------------------------------------------------


@pytest.mark.parametrize("op", ["bad_result", "bad_push", "deep_result"])
def test_unencodable_result_or_push_fails_unknown_and_worker_survives(basic_server, vitals, op):
    with basic_server.client() as client:
        pushes = []
        client.on("x", pushes.append)
        for _ in range(4):  # enough to reach both workers
            with pytest.raises(RemoteError) as info:
                client.call(op, {}, timeout=10)
            assert info.value.reason == "Unknown"
            assert client.call("echo", {"same": "connection"}) == {"same": "connection"}
        assert pushes == []
    # A result is encoded after the handler returned: one clear line. A push is encoded when the
    # handler calls conn.rpc: a handler error, with the traceback pointing at that call.
    expected = "failed" if op == "bad_push" else "returned data JSON cannot encode"
    log = basic_server.wait_log(rf"handler for op '{op}' {expected}")
    assert ("maximum recursion depth" if op == "deep_result" else "is not JSON serializable") in log
    vitals.assert_unharmed()


# -- fuzz ------------------------------------------------------------------------------------------

FUZZ_MAX_FRAME_BYTES = 4096


def _json_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.randint(-(10**12), 10**12)
    if kind == 3:
        return rng.uniform(-1e6, 1e6)
    if kind == 4:
        return "".join(rng.choice("ab \"\\\n\té✓😀") for _ in range(rng.randrange(8)))
    if kind in (5, 6):
        return [_json_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {str(rng.randrange(100)): _json_value(rng, depth + 1) for _ in range(rng.randrange(4))}


def _fuzz_frame(rng: random.Random, overlong: bool) -> tuple[bytes, str | None, dict | None]:
    """One line and what must come back: ("OKAY", data) for an echo, or a FAIL reason."""
    kind = rng.randrange(10)
    if kind == 7 and not overlong:
        kind = 0
    if kind <= 2:
        data = {"k": _json_value(rng)}
        return encode_frame(rng.choice(["echo", "cecho"]), data), "OKAY", data
    if kind == 3:
        return rng.randbytes(rng.randrange(1, 300)).replace(b"\n", b"") + b"\n", None, None
    if kind == 4:
        return b"nope%d{}\n" % rng.randrange(1000), "UnknownOpcode", None
    if kind == 5:
        line = encode_frame("echo", {"k": _json_value(rng)})
        cut = rng.randrange(1, len(line) - 1)
        return line[:cut].replace(b"\n", b"") + b"\n", None, None  # truncated JSON
    if kind == 6:
        # Unclosed nesting, up to the frame limit (800 * 5 bytes) and past it when overlong is on.
        depth = rng.randrange(1, 2000 if overlong else 800)
        line = b"echo" + rng.choice([b"[", b'{"a":', b"{"]) * depth
        return line + b"\n", "FrameTooLarge" if len(line) > FUZZ_MAX_FRAME_BYTES else "MalformedPayload", None
    if kind == 7:
        return b"x" * rng.randrange(FUZZ_MAX_FRAME_BYTES + 1, 3 * FUZZ_MAX_FRAME_BYTES) + b"\n", "FrameTooLarge", None
    if kind == 8:
        return b'echo{"a":"\xff' + rng.randbytes(3).replace(b"\n", b"") + b'"}\n', "MalformedPayload", None
    return b"push_self{}\n", "OKAY", {}


@pytest.mark.parametrize("overlong", [False, True], ids=["no-overlong", "with-overlong"])
def test_fuzz_random_frames_and_abrupt_disconnects(start_server, overlong):
    """Thousands of random frames on well-behaved connections (each answer checked against the
    model, in order) and on connections that vanish mid-stream; then the server is unharmed.
    ``with-overlong`` mixes in lines over max_frame_bytes."""
    server = start_server("--handlers", "tests.handlers.basic", "--max-frame-bytes", str(FUZZ_MAX_FRAME_BYTES))
    vitals = Vitals(server)
    rng = random.Random(20240504)
    deadline = time.monotonic() + 60  # a bound on the whole test, far above its usual few seconds
    frames_sent = 0
    for round_ in range(30):
        assert time.monotonic() < deadline, f"fuzz too slow: {frames_sent} frames after 60s"
        batch = [_fuzz_frame(rng, overlong) for _ in range(100)]
        stream = b"".join(line for line, _, _ in batch)
        if round_ % 3 == 2:  # an abrupt disconnect somewhere in the stream
            raw = Raw(server)
            raw.send_all(stream[: rng.randrange(len(stream))])
            (raw.abort if rng.random() < 0.5 else raw.close)()
            continue
        with Raw(server) as raw:
            got = raw.exchange(stream, len(batch), timeout=5)
        frames_sent += len(batch)
        for (line, want, data), answer in zip(batch, got):
            op, answer_data = parse(answer)
            if want == "OKAY":
                assert op == "OKAY" and answer_data == data, (line[:80], answer[:200])
            elif want is None:
                assert op == "FAIL" and answer_data["reason"] in ("MalformedPayload", "UnknownOpcode"), (line[:80], answer)
            else:
                assert op == "FAIL" and answer_data["reason"] == want, (line[:80], answer)
        vitals.sample_rss()
    assert frames_sent >= 2000
    vitals.assert_unharmed()
    assert_no_tracebacks(server)
