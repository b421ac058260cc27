"""Fair scheduling, stalls, recycling and crash recovery: simplerpc-mp and asyncio+pool side by side.

    python bench/scheduling.py [--quick] [--json FILE] [--scenarios fairness stall1 ...] [--repeat N]
                               [--variant LABEL=DIR]

Run on demand, never from the tests (``tests/test_scheduling.py`` checks the same scenarios by
counting, without timing). Each server under test runs as a child process (``bench/run.py``'s
``ServerUnderTest``, serving ``bench.handlers``), on 2 workers unless ``--workers`` says otherwise;
this process drives it over raw sockets on one selectors loop. Every request carries a
per-connection ``seq`` that its answer must echo, so every answer is checked for count and order.
The baseline is ``bench/baseline_pool.py`` (asyncio + ProcessPoolExecutor, first come first
served); rows it cannot express (spares, max_requests) show ``-``. The echo, ping-pong and
CPU-heavy rows are ``bench/run.py``'s own measurements, imported. ``--variant`` adds another
checkout of simplerpc-mp as a column (say, the code before a change). Prints one table; see
bench/README.md for what each row means.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import selectors
import signal
import socket
import sys
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import run as suite  # noqa: E402

SCENARIOS = ("fairness", "stall1", "stall2", "stall3", "recycling", "crash", "cpu", "echo", "pingpong")
SERVER_NAMES = {"mp": "simplerpc-mp", "pool": "asyncio+pool", "single": "single-process"}
CONNECT_TIMEOUT_S = 10.0
SEND_TIMEOUT_S = 10.0
RECV_BYTES = 64 * 1024
NS = 1_000_000_000
MS = 1_000_000

# Durations and counts: (quick, full).
WARMUP_S = (0.5, 1.0)
# Fairness: K heavy clients pipeline HEAVY_DEPTH (the default max_inflight) concurrent ops of
# HANDLER_MS each; a light client sends one at a time, LIGHT_PAUSE_S after each answer.
HANDLER_MS = 2.5
HEAVY_COUNTS = (1, 10, 100)
HEAVY_DEPTH = 128
LIGHT_PAUSE_S = 0.002
FAIRNESS_WINDOW_S = (4.0, 8.0)
# The stall rows: PINGERS clients each send one echo at a time, PING_PAUSE_S after each answer
# (a ping, not a flood: the stalls measured are seconds long).
PINGERS = 4
PING_PAUSE_S = 0.005
STALL_S = 1.0  # a ping that took longer than this was stuck
SLEEP_S = 2.0
SLEEP_COUNT = (5, 5)
BLOCK_S = (10.0, 10.0)
BACKLOG_MS = 100
BACKLOG_COUNT = (20, 100)
STALL3_PAUSE_S = 0.037  # not a divisor of BACKLOG_MS: the echoes land at varied points of a line
# Recycling: 4 connections pipeline RECYCLE_RPCS pid RPCs each at once.
MAX_REQUESTS = 50
MAX_REQUESTS_JITTER = 10
RECYCLE_CONNS = 4
RECYCLE_RPCS = (500, 500)
# Crash recovery: CRASH_CONNS x CRASH_DEPTH concurrent spins in flight; a worker killed KILLS times.
CRASH_CONNS = 4
CRASH_DEPTH = 16
CRASH_SPIN_MS = 1.0
KILLS = (3, 5)
# How long a scenario may take at most before it counts as failed (its answers as missing).
SCENARIO_TIMEOUT_S = 120.0
DRAIN_TIMEOUT_S = 30.0
LOG_POLL_S = 0.05
SPARE_BOOT_TIMEOUT_S = 20.0  # a checkout without spare workers never logs one booting
SPARE_BOOTED = re.compile(r"booted \(pid \d+\) as a spare")
DIED = re.compile(r"^(\S+ \S+) \[\d+\] ERROR \S+: worker \d+ \(pid (\d+)\) died")


def pick(pair: tuple, quick: bool):
    return pair[0] if quick else pair[1]


# -- clients --------------------------------------------------------------------------------


class Answer(NamedTuple):
    seq: int
    op: str
    sent_ns: int  # time.monotonic_ns() when the request was sent
    recv_ns: int  # ... when its answer was read
    data: dict  # the OKAY data (the request's data echoed, plus pid, start_ns, ... per op)

    @property
    def latency_ms(self) -> float:
        return (self.recv_ns - self.sent_ns) / MS


class Client:
    """One connection: sends requests carrying a per-connection ``seq`` and matches each answer
    to the oldest request still waiting (answers come in request order); an OKAY whose ``seq``
    is not that request's is an order error. With ``sending`` set, ``refill`` keeps ``depth``
    requests of ``op`` in flight, waiting ``pause_s`` after each answer."""

    def __init__(self, server, op: str = "echo", data: dict | None = None, depth: int = 1, pause_s: float = 0.0):
        self.sock = socket.create_connection((server.host, server.port), timeout=CONNECT_TIMEOUT_S)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Sends block (up to the timeout) so that requests leave whole and in order; reads happen
        # only when the selector says the socket is readable.
        self.sock.settimeout(SEND_TIMEOUT_S)
        self.op, self.data, self.depth = op, dict(data or {}), depth
        self.pause_ns = int(pause_s * NS)
        self.sending = False
        self.next_send_ns = 0
        self.seq = 0
        self.pending: deque = deque()  # (seq, op, sent_ns), oldest first
        self.buf = b""
        self.answers: list[Answer] = []  # OKAY answers that passed the check, in order
        self.fails: Counter = Counter()  # FAIL answers by reason
        self.order_errors = 0
        self.eof = False

    def send(self, op: str, data: dict | None = None, count: int = 1) -> None:
        now = time.monotonic_ns()
        lines = []
        for seq in range(self.seq, self.seq + count):
            lines.append(b"%s%s\n" % (op.encode(), json.dumps({"seq": seq, **(data or {})}).encode()))
            self.pending.append((seq, op, now))
        self.seq += count
        self.sock.sendall(b"".join(lines))

    def refill(self, now_ns: int) -> None:
        room = self.depth - len(self.pending)
        if self.sending and room > 0 and now_ns >= self.next_send_ns and not self.eof:
            self.send(self.op, self.data, room)

    def wants_send_at(self, now_ns: int) -> int:
        """When ``refill`` will next send (0: not waiting on a pause)."""
        if self.sending and len(self.pending) < self.depth and self.next_send_ns > now_ns:
            return self.next_send_ns
        return 0

    def on_readable(self) -> None:
        try:
            chunk = self.sock.recv(RECV_BYTES)
        except (BlockingIOError, TimeoutError):
            return
        except OSError:
            chunk = b""
        now = time.monotonic_ns()
        if not chunk:
            self.eof = True
            return
        *lines, self.buf = (self.buf + chunk).split(b"\n")
        answered = False
        for line in lines:
            head, brace, rest = line.partition(b"{")
            if head not in (b"OKAY", b"FAIL"):
                continue  # a push; none of the ops here sends one
            answered = True
            if not self.pending:
                self.order_errors += 1  # an answer nobody asked for
                continue
            seq, op, sent_ns = self.pending.popleft()
            try:
                data = json.loads(brace + rest)
            except ValueError:
                self.order_errors += 1
                continue
            if head == b"FAIL":
                self.fails[str(data.get("reason"))] += 1
            elif data.get("seq") != seq:
                self.order_errors += 1
            else:
                self.answers.append(Answer(seq, op, sent_ns, now, data))
        if answered and self.pause_ns:
            self.next_send_ns = now + self.pause_ns

    def close(self) -> None:
        self.sock.close()


def drive(clients: list[Client], timeout_s: float, done=None) -> bool:
    """Read and refill every client until ``done()`` holds (True) or ``timeout_s`` has passed
    (False; with ``done`` None the run just lasts that long)."""
    until = time.monotonic_ns() + int(timeout_s * NS)
    with selectors.DefaultSelector() as selector:
        for client in clients:
            if not client.eof:
                selector.register(client.sock, selectors.EVENT_READ, client)
        while True:
            now = time.monotonic_ns()
            for client in clients:
                client.refill(now)
            if done is not None and done():
                return True
            if now >= until:
                return done is None
            # ``done`` may wait on something outside the sockets (a log line): look again soon.
            wake = min(until, now + int(LOG_POLL_S * NS)) if done is not None else until
            for client in clients:
                at = client.wants_send_at(now)
                if at:
                    wake = min(wake, at)
            for key, _ in selector.select(max(0, wake - now) / NS):
                client = key.data
                client.on_readable()
                if client.eof:
                    selector.unregister(client.sock)


def all_answered(clients: list[Client]):
    return lambda: all(not c.pending or c.eof for c in clients)


def stop_sending(clients: list[Client]) -> None:
    for client in clients:
        client.sending = False


def tally(clients: list[Client], cut_off: bool = False, allowed: tuple = ()) -> dict:
    """Answers checked and errors: FAIL answers (but those of a reason in ``allowed``, counted
    apart), order errors, and requests never answered (unless the run was ``cut_off``: then the
    requests still in flight at its end were abandoned, not lost)."""
    checked = sum(len(c.answers) for c in clients)
    fails: Counter = Counter()
    for client in clients:
        fails.update(client.fails)
    allowed_count = sum(n for reason, n in fails.items() if reason in allowed)
    missing = 0 if cut_off else sum(len(c.pending) for c in clients)
    order = sum(c.order_errors for c in clients)
    return {
        "checked": checked,
        "errors": sum(fails.values()) - allowed_count + order + missing,
        "fails": dict(fails),
        "allowed_fails": allowed_count,
        "order_errors": order,
        "missing": missing,
        "abandoned": sum(len(c.pending) for c in clients) if cut_off else 0,
    }


def median(values: list[float]) -> float | None:
    """The lower median (a measured value, not an average of two); None with no values."""
    return sorted(values)[(len(values) - 1) // 2] if values else None


def percentile(values: list[float], p: float) -> float:
    """Nearest rank, as ``simplerpc_mp.loadgen``; 0.0 with no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(p / 100.0 * (len(ordered) - 1)))))]


# -- servers --------------------------------------------------------------------------------


class Setup(NamedTuple):
    workers: int
    quick: bool
    roots: dict  # server kind -> the checkout it runs from (REPO unless a --variant)


@contextlib.contextmanager
def serving(setup: Setup, kind: str, *extra_args: str, kill: bool = False):
    """A server under test for one measurement (``extra_args``: ``serve`` flags, simplerpc-mp
    only). ``kill``: end it with SIGKILL to its process group, for runs cut off with work still
    queued (a graceful stop would first run it all)."""
    server = suite.ServerUnderTest(kind, setup.workers, setup.roots.get(kind, REPO), extra_args)
    try:
        server.wait_ready()
        yield server
    finally:
        if kill:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
        server.stop()


@contextlib.contextmanager
def connected(clients: list[Client]):
    try:
        yield clients
    finally:
        for client in clients:
            client.close()


def log_matches(server, pattern: re.Pattern) -> list[re.Match]:
    with open(server.log.name, encoding="utf-8", errors="replace") as f:
        return [m for m in (pattern.search(line) for line in f) if m]


def log_counter(server, pattern: re.Pattern) -> Callable[[], int]:
    """A callable counting the server's log lines that match, reading the log at most every
    LOG_POLL_S (the log is a file; a scan per loop pass would cost more than the load)."""
    state = {"at": 0.0, "count": 0}

    def count() -> int:
        now = time.monotonic()
        if now - state["at"] >= LOG_POLL_S:
            state["at"] = now
            state["count"] = len(log_matches(server, pattern))
        return state["count"]

    return count


# -- the scenarios: each runs one server once and returns one result dict --------------------


def run_fairness(setup: Setup, kind: str, heavy_count: int) -> dict:
    """K heavy clients keep HEAVY_DEPTH spins in flight; after a warm-up, a light client sends
    one spin at a time for the window. The run is cut off at the window's end (the heavy
    backlog would take seconds to drain) and the server killed."""
    with serving(setup, kind, kill=True) as server:
        heavy = [Client(server, "spin", {"ms": HANDLER_MS}, depth=HEAVY_DEPTH) for _ in range(heavy_count)]
        light = Client(server, "spin", {"ms": HANDLER_MS}, depth=1, pause_s=LIGHT_PAUSE_S)
        with connected(heavy + [light]) as clients:
            for client in heavy:
                client.sending = True
            drive(clients, pick(WARMUP_S, setup.quick))
            light.sending = True
            start = time.monotonic_ns()
            drive(clients, pick(FAIRNESS_WINDOW_S, setup.quick))
            end = time.monotonic_ns()
            stop_sending(clients)
    heavy_answers = sum(1 for c in heavy for a in c.answers if start <= a.recv_ns < end)
    latencies = [a.latency_ms for a in light.answers]
    # From send to the handler's start: the scheduler's part (the rest is running it and the
    # answer's way back, which CPU contention on a loaded machine stretches).
    waits = [(a.data["start_ns"] - a.sent_ns) / MS for a in light.answers]
    # A light RPC still waiting at the end has waited at least this long: a lower bound.
    waiting_ms = (end - light.pending[0][2]) / MS if light.pending else 0.0
    if waiting_ms:
        latencies.append(waiting_ms)
    return {
        "heavy_clients": heavy_count,
        "window_s": (end - start) / NS,
        "heavy_rate": heavy_answers / ((end - start) / NS),
        "light_answered": len(light.answers),
        "light_waiting_ms": waiting_ms,
        "light_p50_ms": percentile(latencies, 50),
        "light_p99_ms": percentile(latencies, 99),
        "light_max_ms": max(latencies, default=0.0),
        "light_wait_p50_ms": percentile(waits, 50) if waits else None,
        "light_wait_p99_ms": percentile(waits, 99) if waits else None,
        **tally(heavy + [light], cut_off=True),
    }


def ping_stats(pingers: list[Client]) -> dict:
    latencies = [a.latency_ms for c in pingers for a in c.answers]
    return {
        "pings": len(latencies),
        "ping_p50_ms": percentile(latencies, 50),
        "ping_p99_ms": percentile(latencies, 99),
        "ping_max_ms": max(latencies, default=0.0),
        "pings_over_1s": sum(1 for ms in latencies if ms > STALL_S * 1e3),
    }


def run_stall_sleep(setup: Setup, kind: str, _param=None) -> dict:
    """Stall 1: one client pipelines SLEEP_COUNT serial ``sleep{"s": 2}``; PINGERS clients ping
    echo one at a time until the sleeps are answered."""
    count = pick(SLEEP_COUNT, setup.quick)
    with serving(setup, kind) as server:
        sleeper = Client(server)
        pingers = [Client(server, "echo", depth=1, pause_s=PING_PAUSE_S) for _ in range(PINGERS)]
        with connected([sleeper] + pingers) as clients:
            sleeper.send("sleep", {"s": SLEEP_S}, count)
            for client in pingers:
                client.sending = True
            drive(clients, count * SLEEP_S + SCENARIO_TIMEOUT_S, all_answered([sleeper]))
            stop_sending(clients)
            drive(clients, DRAIN_TIMEOUT_S, all_answered(clients))
    return {"sleeps": count, **ping_stats(pingers), **tally(clients)}


def run_stall_block(setup: Setup, kind: str, _param=None) -> dict:
    """Stall 2: (``--timeout 0``) one handler blocks for BLOCK_S; PINGERS clients ping echo one
    at a time until it ends. A ping answered after the block's end that waited more than
    STALL_S was stuck behind it."""
    block_s = pick(BLOCK_S, setup.quick)
    with serving(setup, kind, "--timeout", "0") as server:
        blocker = Client(server)
        pingers = [Client(server, "echo", depth=1, pause_s=PING_PAUSE_S) for _ in range(PINGERS)]
        with connected([blocker] + pingers) as clients:
            blocker.send("sleep", {"s": block_s})
            for client in pingers:
                client.sending = True
            drive(clients, block_s + SCENARIO_TIMEOUT_S, all_answered([blocker]))
            stop_sending(clients)
            drive(clients, DRAIN_TIMEOUT_S, all_answered(clients))
    row = {"block_s": block_s, **ping_stats(pingers), **tally(clients)}
    if blocker.answers:
        block = blocker.answers[0].data
        pings = [a for c in pingers for a in c.answers]
        row["stuck"] = sum(1 for a in pings if a.recv_ns >= block["end_ns"] and a.latency_ms > STALL_S * 1e3)
        row["pings_during_block"] = sum(1 for a in pings if block["start_ns"] < a.sent_ns and a.recv_ns < block["end_ns"])
    return row


def run_stall_backlog(setup: Setup, kind: str, _param=None) -> dict:
    """Stall 3: two clients each pipeline BACKLOG_COUNT serial spins of BACKLOG_MS; once the first
    of them is answered (both backlogs are queued by then), a third client sends ``stamp`` (an
    echo that says when it started) one at a time, STALL3_PAUSE_S after each answer, until the
    backlogs are done. Its first RPC is the issue's "single echo"; the later ones arrive at other
    moments of the backlog lines."""
    count = pick(BACKLOG_COUNT, setup.quick)
    with serving(setup, kind) as server:
        heavy = [Client(server) for _ in range(2)]
        light = Client(server, "stamp", depth=1, pause_s=STALL3_PAUSE_S)
        with connected(heavy + [light]) as clients:
            for client in heavy:
                client.send("sspin", {"ms": BACKLOG_MS}, count)
            drive(clients, SCENARIO_TIMEOUT_S, lambda: any(c.answers or c.fails or c.eof for c in heavy))
            light.sending = True
            drive(clients, count * BACKLOG_MS / 1e3 + SCENARIO_TIMEOUT_S, all_answered(heavy))
            stop_sending(clients)
            drive(clients, DRAIN_TIMEOUT_S, all_answered(clients))
    row = {"backlog": count, "echoes": len(light.answers), **tally(clients)}
    if light.answers:
        first = light.answers[0]
        latencies = [a.latency_ms for a in light.answers]
        row.update(
            first_ms=first.latency_ms,
            # Backlog RPCs that started after the first echo was sent and before it started.
            first_started_ahead=sum(
                1 for c in heavy for a in c.answers if first.sent_ns < a.data["start_ns"] < first.data["start_ns"]
            ),
            echo_p50_ms=percentile(latencies, 50),
            echo_max_ms=max(latencies),
        )
    return row


def run_recycling(setup: Setup, kind: str, spares: int) -> dict:
    """``--max-requests 50 --max-requests-jitter 10``: RECYCLE_CONNS connections pipeline
    RECYCLE_RPCS ``pid`` RPCs each; how many RPCs each worker served (bound: 60)."""
    rpcs = pick(RECYCLE_RPCS, setup.quick)
    extra = ("--max-requests", str(MAX_REQUESTS), "--max-requests-jitter", str(MAX_REQUESTS_JITTER),
             "--spare-workers", str(spares))
    with serving(setup, kind, *extra) as server:
        clients = [Client(server) for _ in range(RECYCLE_CONNS)]
        with connected(clients):
            start = time.monotonic_ns()
            for client in clients:
                client.send("pid", {}, rpcs)
            drive(clients, SCENARIO_TIMEOUT_S, all_answered(clients))
            elapsed_s = (time.monotonic_ns() - start) / NS
    served = Counter(a.data["pid"] for c in clients for a in c.answers)
    return {
        "spares": spares,
        "rpcs": RECYCLE_CONNS * rpcs,
        "workers_used": len(served),
        "max_per_worker": max(served.values(), default=0),
        "min_per_worker": min(served.values(), default=0),
        "elapsed_s": elapsed_s,
        "rate": RECYCLE_CONNS * rpcs / elapsed_s,
        **tally(clients),
    }


def _log_time(stamp: str) -> float:
    """A text log line's asctime (local time, cut to the millisecond) as a time.time() value."""
    return datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def run_crash(setup: Setup, kind: str, spares: int) -> dict:
    """Pipelined concurrent spins on CRASH_CONNS connections; a worker (the one that answered
    last) killed with SIGKILL, KILLS times. For each kill: from the kill to the first RPC
    started by a worker that had not served before (the promoted spare, or the fresh
    replacement), and to the death's ERROR line in the server log. With a spare, the next kill
    waits for the new spare to boot."""
    extra = ("--spare-workers", str(spares), "--log-level", "info")
    kills = []
    with serving(setup, kind, *extra) as server:
        clients = [Client(server, "spin", {"ms": CRASH_SPIN_MS}, depth=CRASH_DEPTH) for _ in range(CRASH_CONNS)]
        with connected(clients):
            spares_booted = log_counter(server, SPARE_BOOTED)
            # A checkout without spare workers (a --variant) never logs one: then don't wait.
            spares_logged = spares > 0 and drive([], SPARE_BOOT_TIMEOUT_S, lambda: spares_booted() >= spares)
            for client in clients:
                client.sending = True
            drive(clients, pick(WARMUP_S, setup.quick))
            for _ in range(pick(KILLS, setup.quick)):
                kills.append(_kill_one(server, clients, spares_booted))
                if spares_logged:  # the pool is whole again before the next kill
                    drive(clients, SPARE_BOOT_TIMEOUT_S, lambda: spares_booted() > kills[-1]["spares_booted"])
            stop_sending(clients)
            drive(clients, DRAIN_TIMEOUT_S, all_answered(clients))

    def values(key):
        return [k[key] for k in kills if k[key] is not None]

    return {
        "spares": spares,
        "spares_logged": spares_logged,
        "kills": kills,
        "to_replacement_ms": median(values("to_replacement_ms")),
        "to_replacement_max_ms": max(values("to_replacement_ms"), default=None),
        "to_logged_max_ms": max(values("to_logged_ms"), default=None),
        "logged_to_replacement_ms": median(values("logged_to_replacement_ms")),
        **tally(clients, allowed=("WorkerCrashed",)),
    }


def _kill_one(server, clients: list[Client], spares_booted) -> dict:
    seen = {a.data["pid"] for c in clients for a in c.answers}
    victim = max((c.answers[-1] for c in clients if c.answers), key=lambda a: a.recv_ns).data["pid"]
    booted_before = spares_booted()
    kill_wall = time.time()
    kill_ns = time.monotonic_ns()
    os.kill(victim, signal.SIGKILL)
    scanned = [len(c.answers) for c in clients]
    first_new: list[int] = []

    def replacement_started() -> bool:
        for index, client in enumerate(clients):
            for answer in client.answers[scanned[index]:]:
                if answer.data["pid"] not in seen and answer.data["start_ns"] > kill_ns:
                    first_new.append(answer.data["start_ns"])
            scanned[index] = len(client.answers)
        return bool(first_new)

    drive(clients, SCENARIO_TIMEOUT_S, replacement_started)
    died = [m for m in log_matches(server, DIED) if int(m.group(2)) == victim]
    to_replacement = (min(first_new) - kill_ns) / MS if first_new else None
    to_logged = (_log_time(died[0].group(1)) - kill_wall) * 1e3 if died else None
    return {
        "victim": victim,
        "spares_booted": booted_before,
        "to_replacement_ms": to_replacement,
        "to_logged_ms": to_logged,
        # The log's time is cut to the millisecond (never later than the real one): an upper bound.
        "logged_to_replacement_ms": None if None in (to_replacement, to_logged) else to_replacement - to_logged,
    }


def run_once(fn, setup: Setup, kind: str, param) -> dict:
    try:
        return fn(setup, kind, param)
    except RuntimeError as exc:  # ServerUnderTest.wait_ready: the server did not start
        print(f"    {kind}: {exc}", flush=True)
        return {"failed": str(exc).splitlines()[0], "checked": 0, "errors": 0}


def median_run(runs: list[dict], key: str, lower_is_better: bool) -> dict:
    """The run whose ``key`` is the median; with repeats, ``all_<key>`` lists every run's value,
    and checked and errors are summed over all runs (an error in any run is reported)."""
    measured = [r for r in runs if r.get(key) is not None]
    if not measured:
        return runs[0]
    ordered = sorted(measured, key=lambda r: r[key], reverse=not lower_is_better)
    row = dict(ordered[(len(ordered) - 1) // 2])
    if len(runs) > 1:
        row["all_" + key] = [r.get(key) for r in runs]
        row["checked"] = sum(r.get("checked", 0) for r in runs)
        row["errors"] = sum(r.get("errors", 0) for r in runs)
    return row


# (name, params, function, simplerpc-mp only, median key, lower is better)
PLAN = (
    ("fairness", None, run_fairness, False, "heavy_rate", False),
    ("stall1", (None,), run_stall_sleep, False, "ping_max_ms", True),
    ("stall2", (None,), run_stall_block, False, "ping_max_ms", True),
    ("stall3", (None,), run_stall_backlog, False, "echo_max_ms", True),
    ("recycling", (0, 1), run_recycling, True, "max_per_worker", True),
    ("crash", (0, 1), run_crash, True, "to_replacement_ms", True),
)


def run_suite(setup: Setup, scenarios: list[str], mp_kinds: list[str], repeat: int) -> tuple[dict, float | None]:
    """bench/run.py's echo, ping-pong and CPU-heavy measurements, and its N-process ceiling."""
    rows: dict = {}
    ceilings = []
    servers = {kind: suite.ServerUnderTest(kind, setup.workers, setup.roots.get(kind, REPO))
               for kind in (*mp_kinds, "single", "pool")}
    quick = setup.quick
    gen = ProcessPoolExecutor(1, mp_context=get_context("spawn"))
    try:
        for server in servers.values():
            server.wait_ready()
        for scenario in scenarios:
            runs: dict = {}
            for _ in range(repeat):
                if scenario == "cpu":
                    ceilings.append(suite.parallel_inproc_rate(setup.workers, suite.TIMES["cpu"][0 if quick else 1] / 2))
                for kind, server in servers.items():
                    if scenario == "cpu" and kind == "single":
                        continue  # the reference here is the N-process ceiling
                    kwargs = suite.scenario_kwargs(scenario, quick)
                    runs.setdefault(kind, []).append(suite.run_load_scenario(gen, server, quick, **kwargs))
            for kind, kind_runs in runs.items():
                if scenario == "pingpong":
                    row = suite.median_run(kind_runs, "p50_ms", lower_is_better=True)
                else:
                    row = suite.median_run(kind_runs, "rate")
                row["checked"] = sum(r["checked"] for r in kind_runs)
                row["errors"] = sum(r["errors"] for r in kind_runs)
                rows[(scenario, kind)] = row
    finally:
        gen.shutdown()
        for server in servers.values():
            server.stop()
    return rows, median(ceilings)


# -- the table ------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


class Line(NamedTuple):
    row: str
    figure: str
    cells: dict  # server kind -> text
    reference: str = ""
    goal: str = ""
    met: bool | None = None  # judged for simplerpc-mp ("mp") only
    checks: dict | None = None  # server kind -> its result (for checked / errors), on a row's first line


def table_lines(results: dict, columns: list[str], workers: int) -> list[Line]:
    lines: list[Line] = []

    def cells(key: tuple, fn, kinds=None) -> dict:
        out = {}
        for kind in kinds or columns:
            r = results.get((*key, kind))
            out[kind] = "-" if r is None else "failed to start" if "failed" in r else fn(r, kind)
        return out

    def checks(key: tuple, kinds=None) -> dict:
        return {kind: results.get((*key, kind)) for kind in kinds or columns}

    def mp_row(key: tuple):
        r = results.get((*key, "mp"))
        return r if r and "failed" not in r else None

    mp_kinds = [c for c in columns if c != "pool"]
    for k in HEAVY_COUNTS:
        key = ("fairness", k)
        if not any(results.get((*key, kind)) for kind in columns):
            continue

        def light(r, _kind, prefix=""):
            p50, p99 = r[f"light_{prefix}p50_ms"], r[f"light_{prefix}p99_ms"]
            if p50 is None:
                return "- (none answered)"
            # a light RPC unanswered at the end of the window: its wait so far is a lower bound
            bound = ">=" if not prefix and r["light_waiting_ms"] and r["light_waiting_ms"] >= p99 else ""
            return f"{_ms(p50)} / {bound}{_ms(p99)} ({p50 / HANDLER_MS:.1f}x / {bound}{p99 / HANDLER_MS:.1f}x)"

        # The light client's RPCs are work too: served at once, it takes its share of the two
        # cores (about an eighth here), which FCFS denies it; "unchanged" compares the totals.
        def total_rate(r):
            return r["heavy_rate"] + r["light_answered"] / r["window_s"]

        def heavy(r, kind, key=key):
            pool = results.get((*key, "pool"))
            text = f"{total_rate(r):,.0f} ({r['heavy_rate']:,.0f}"
            if kind == "pool" or not pool or not pool.get("heavy_rate"):
                return text + ")"
            return text + f"; {total_rate(r) / total_rate(pool):.2f}x pool)"

        mp, pool = mp_row(key), results.get((*key, "pool"))
        lines.append(Line(f"fairness, {k} heavy", "light p50 / p99 ms (x handler)", cells(key, light),
                          f"handler {HANDLER_MS} ms", "p99 <= ~2 handlers (2.5x)",
                          mp["light_p99_ms"] <= 2.5 * HANDLER_MS if mp else None, checks(key)))
        lines.append(Line("", "light: wait to start, same", cells(key, lambda r, kind: light(r, kind, "wait_")),
                          "the scheduler's part"))
        ratio = total_rate(mp) / total_rate(pool) if mp and pool and pool.get("heavy_rate") else None
        lines.append(Line("", "RPC/s: heavy + light (heavy alone)", cells(key, heavy), f"{workers / HANDLER_MS * 1e3:,.0f} ideal",
                          ">= 0.95x pool", ratio >= 0.95 if ratio else None))

    def stall(name, label, figure, cell, goal, met_of):
        key = (name, None)
        mp = mp_row(key)
        any_row = next((r for kind in columns if (r := results.get((*key, kind))) and "failed" not in r), None)
        if any_row:
            lines.append(Line(label(any_row), figure, cells(key, cell), "", goal, met_of(mp) if mp else None, checks(key)))

    stall("stall1", lambda r: f"stall 1: {r['sleeps']} x sleep {SLEEP_S:g} s",
          "echo p50 / p99 / max ms; # > 1 s",
          lambda r, _: f"{_ms(r['ping_p50_ms'])} / {_ms(r['ping_p99_ms'])} / {_ms(r['ping_max_ms'])}; {r['pings_over_1s']}",
          "0 echoes > 1 s", lambda r: r["pings_over_1s"] == 0)
    stall("stall2", lambda r: f"stall 2: block {r['block_s']:g} s",
          "pings stuck behind it; max ms",
          lambda r, _: f"{r.get('stuck', '?')} of {r['pings']:,}; {_ms(r['ping_max_ms'])}",
          "0 stuck", lambda r: r.get("stuck") == 0)
    stall("stall3", lambda r: f"stall 3: 2 x {r['backlog']} x {BACKLOG_MS} ms",
          "3rd client: 1st echo ms (RPCs ahead); p50 / max of n",
          lambda r, _: f"{_ms(r.get('first_ms'))} ({r.get('first_started_ahead', '?')}); "
                       f"{_ms(r.get('echo_p50_ms'))} / {_ms(r.get('echo_max_ms'))} of {r['echoes']}",
          f"max < {2 * BACKLOG_MS} ms", lambda r: r.get("echo_max_ms") is not None and r["echo_max_ms"] < 2 * BACKLOG_MS)

    bound = MAX_REQUESTS + MAX_REQUESTS_JITTER
    for spares in (0, 1):
        key = ("recycling", spares)
        mp = mp_row(key)
        if any(results.get((*key, kind)) for kind in mp_kinds):
            lines.append(Line(
                f"recycling, spare {spares}", "max RPCs per worker (workers; RPC/s)",
                cells(key, lambda r, _: f"{r['max_per_worker']} ({r['workers_used']}; {r['rate']:,.0f})"),
                f"{mp['rpcs'] if mp else '?':,} RPCs", f"<= {bound}", mp["max_per_worker"] <= bound if mp else None,
                checks(key)))
    for spares in (0, 1):
        key = ("crash", spares)
        mp = mp_row(key)
        if any(results.get((*key, kind)) for kind in mp_kinds):
            noticed = mp["logged_to_replacement_ms"] if mp else None
            logged = max((r["to_logged_max_ms"] or 0 for kind in mp_kinds
                          if (r := results.get((*key, kind))) and "failed" not in r), default=0)
            lines.append(Line(
                f"crash, spare {spares}", "kill -9 -> replacement's 1st RPC ms",
                cells(key, lambda r, _: f"{_ms(r['to_replacement_ms'])} (max {_ms(r['to_replacement_max_ms'])})"),
                f"{len(mp['kills']) if mp else '?'} kills; logged <= {_ms(logged)} ms after",
                "<= ~10 ms after logged" if spares else "", (noticed is not None and noticed <= 10.0) if spares else None,
                checks(key)))

    suite_rows, ceiling = results.get("suite", {}), results.get("ceiling")

    def suite_cells(scenario, fn) -> dict:
        return {kind: fn(r, kind) if (r := suite_rows.get((scenario, kind))) else "-" for kind in columns}

    def suite_checks(scenario) -> dict:
        return {kind: suite_rows.get((scenario, kind)) for kind in columns}

    cpu = suite_rows.get(("cpu", "mp"))
    if cpu:
        share = cpu["rate"] / ceiling if ceiling else None
        lines.append(Line(
            "CPU-heavy (primes)", "RPC/s (share of ceiling)",
            suite_cells("cpu", lambda r, kind: f"{r['rate']:,.0f}" + (f" ({r['rate'] / ceiling:.0%})" if ceiling else "")),
            f"ceiling {ceiling:,.0f}" if ceiling else "", ">= 95% of ceiling", share >= 0.95 if share else None,
            suite_checks("cpu")))
    single = suite_rows.get(("echo", "single"))
    if suite_rows.get(("echo", "mp")):
        def echo_cell(r, kind):
            if kind == "pool":
                return f"{r['rate']:,.0f}"
            ratio = suite.ratios(suite_rows, "echo", kind)
            return f"{r['rate']:,.0f} ({ratio.get('single', 0):.2f}x, {ratio.get('pool', 0):.1f}x)"

        ratio = suite.ratios(suite_rows, "echo", "mp")
        lines.append(Line(
            "echo (16 x 8)", "RPC/s (vs single, vs pool)", suite_cells("echo", echo_cell),
            f"single {single['rate']:,.0f}" if single else "", ">= 1.0x single, >= 15x pool",
            ratio.get("single", 0) >= 1.0 and ratio.get("pool", 0) >= 15, suite_checks("echo")))
    single = suite_rows.get(("pingpong", "single"))
    if suite_rows.get(("pingpong", "mp")):
        def ping_cell(r, kind):
            if kind == "pool":
                return f"{r['p50_ms']:.3f}"
            return f"{r['p50_ms']:.3f} ({suite.ratios(suite_rows, 'pingpong', kind).get('single', 0):.2f}x)"

        ratio = suite.ratios(suite_rows, "pingpong", "mp")
        lines.append(Line(
            "ping-pong (1 x 1)", "p50 ms (vs single)", suite_cells("pingpong", ping_cell),
            f"single {single['p50_ms']:.3f}" if single else "", "<= 2.0x single", ratio.get("single", 99) <= 2.0,
            suite_checks("pingpong")))
    return lines


def format_table(lines: list[Line], columns: list[str]) -> str:
    def counts(line: Line, field: str) -> str:
        if not line.checks:
            return ""
        return " / ".join(f"{r[field]:,}" if r and field in r else "-" for r in (line.checks.get(k) for k in columns))

    names = [SERVER_NAMES.get(kind, kind) for kind in columns]
    header = ["row", "figure", *names, "reference", "goal (simplerpc-mp)", "", "checked", "errors"]
    cells = [header]
    for line in lines:
        met = "" if line.met is None else "met" if line.met else "MISSED"
        cells.append([line.row, line.figure, *(line.cells.get(k, "-") for k in columns), line.reference, line.goal,
                      met, counts(line, "checked"), counts(line, "errors")])
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    out = ["  ".join(c.ljust(w) for c, w in zip(cells[0], widths)).rstrip(), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells[1:]]
    return "\n".join(out)


# -- main -----------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="simplerpc-mp scheduling benchmark (see bench/README.md)")
    parser.add_argument("--quick", action="store_true", help="shorter windows and backlogs: under 3 minutes")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--heavy", nargs="+", type=int, choices=HEAVY_COUNTS, default=list(HEAVY_COUNTS),
                        help="heavy client counts of the fairness rows")
    parser.add_argument("--workers", type=int, default=2, help="worker processes of every server (default: 2)")
    parser.add_argument("--repeat", type=int, default=1, help="run each measurement N times, keep the median")
    parser.add_argument("--variant", action="append", default=[], metavar="LABEL=DIR",
                        help="also run simplerpc-mp from the checkout DIR (its bench/handlers.py must have this "
                             "one's ops), as a column mp:LABEL")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    repeat = max(1, min(args.repeat, 20))
    roots = {"mp": REPO, "pool": REPO}
    for variant in args.variant:
        label, _, root = variant.partition("=")
        roots["mp:" + label] = Path(root).resolve()
    setup = Setup(args.workers, args.quick, roots)
    mp_kinds = [kind for kind in roots if kind != "pool"]
    columns = [*mp_kinds, "pool"]
    suite.raise_fd_limit(4096)
    info = suite.machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, Python {info['python']}, load average "
          f"{info['loadavg'][0]:.2f}; workers: {setup.workers}; {'quick' if setup.quick else 'full'} run, "
          f"repeat {repeat}", flush=True)
    started = time.monotonic()
    results: dict = {}
    for name, params, fn, mp_only, key, lower in PLAN:
        if name not in args.scenarios:
            continue
        for param in params or args.heavy:
            kinds = mp_kinds if mp_only else columns
            runs: dict = {kind: [] for kind in kinds}
            for _ in range(repeat):
                for kind in kinds:  # in turn, so that a drift of the machine's load hits all alike
                    runs[kind].append(run_once(fn, setup, kind, param))
            for kind in kinds:
                results[(name, param, kind)] = median_run(runs[kind], key, lower)
            print(f"  {name}{'' if param is None else f' {param}'} done ({time.monotonic() - started:.0f}s)", flush=True)
    suite_scenarios = [s for s in ("cpu", "echo", "pingpong") if s in args.scenarios]
    if suite_scenarios:
        results["suite"], results["ceiling"] = run_suite(setup, suite_scenarios, mp_kinds, repeat)
        print(f"  {' '.join(suite_scenarios)} done ({time.monotonic() - started:.0f}s)", flush=True)

    lines = table_lines(results, columns, setup.workers)
    print()
    print(format_table(lines, columns))
    info["loadavg_after"] = os.getloadavg()
    rows = [r for key, r in results.items() if isinstance(key, tuple)] + list(results.get("suite", {}).values())
    errors = sum(r.get("errors", 0) for r in rows)
    failed = sum(1 for r in rows if "failed" in r)
    print(f"\nanswers checked: {errors} errors" + (" (the FAIL reasons are in --json)" if errors else "")
          + (f"; {failed} servers failed to start" if failed else ""))
    print(f"load average after: {info['loadavg_after'][0]:.2f}; took {time.monotonic() - started:.0f}s")
    if args.json:
        document = {
            "machine": info,
            "args": {k: v for k, v in vars(args).items() if k != "json"},
            "table": [dict(line._asdict(), checks=None) for line in lines],
            "results": [{"scenario": name, "param": param, "server": kind, **row}
                        for key, row in results.items() if isinstance(key, tuple) for name, param, kind in [key]],
            "suite": [{"scenario": s, "server": k, **row} for (s, k), row in results.get("suite", {}).items()],
            "ceiling_primes_rate": results.get("ceiling"),
        }
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n")
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
