"""The supervisor with real worker processes: crashes, timeouts, recycling, start-up failures.

Every test runs ``simplerpc-mp serve`` as a child process (``tests/conftest.py``), kills or
starves its workers with real signals and real handlers (``tests/handlers/basic.py``,
``tests/handlers/sup_*.py``), and checks the promise of issue 3: every RPC the server accepted
gets exactly one answer, in order, and the other connections keep being served.

Waiting is always on a socket, a process, a log line or a file an op creates, with a deadline.
Signal handling (TERM, INT, HUP, TTIN, TTOU, acceptor SIGKILL) is in ``test_signals.py``, which
uses the helpers below.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import selectors
import signal
import socket
import time

import psutil
import pytest

from simplerpc_mp import RemoteError

from .conftest import wait_until

SUP_OPS = "tests.handlers.sup_ops"
BASIC = "tests.handlers.basic"
# The issue's promise for a replacement after a crash is 1 s; a spawned Python worker needs most
# of that to import on a loaded 2-core machine, so the bound on "booted again" is looser.
RESPAWN_S = 1.0
REBOOT_S = 5.0


# -- pipelining over raw sockets --------------------------------------------------------------


class RawConn:
    """A client socket that pipelines frames and records every answer and push, in order.

    Parsing is done here, not with ``simplerpc_mp.protocol``, so a framing bug in the package
    can't hide itself from these tests.
    """

    def __init__(self, server, timeout: float = 10.0):
        self.sock = socket.create_connection((server.host, server.port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.answers: list[tuple[str, dict]] = []
        self.pushes: list[tuple[str, dict]] = []
        self.sent = 0
        self.eof = False

    def send(self, frames: list[tuple[str, dict]]) -> None:
        self.sock.sendall(b"".join(op.encode() + json.dumps(data).encode() + b"\n" for op, data in frames))
        self.sent += len(frames)

    def on_readable(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            self.eof = True
            return
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        for line in lines:
            op, brace, rest = line.partition(b"{")
            assert brace, f"not a frame: {line!r}"
            frame = (op.decode(), json.loads(brace + rest))
            (self.answers if frame[0] in ("OKAY", "FAIL") else self.pushes).append(frame)

    def close(self) -> None:
        self.sock.close()


def drive(conns: list[RawConn], until, timeout: float = 20.0, tick=None) -> None:
    """Read every connection until ``until()`` holds; ``tick()`` runs after each read."""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        for conn in conns:
            selector.register(conn.sock, selectors.EVENT_READ, conn)
        while not until():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                counts = [(len(c.answers), c.sent, c.eof) for c in conns]
                raise AssertionError(f"timed out after {timeout}s; (answers, sent, eof) per connection: {counts}")
            for key, _ in selector.select(min(remaining, 0.05)):
                key.data.on_readable()
                if key.data.eof:
                    selector.unregister(key.data.sock)
            if tick is not None:
                tick()


def all_answered(conns: list[RawConn]):
    return lambda: all(len(c.answers) >= c.sent for c in conns)


def end_marker(n: int) -> tuple[str, dict]:
    """A last RPC whose answer proves no extra answer came before it (answers are in order)."""
    return ("echo", {"end": n})


def check_answers(conn: RawConn, frames: list[tuple[str, dict]], allowed_fail=("WorkerCrashed",)) -> list[int]:
    """Every RPC of ``frames`` (then the end marker) got exactly one answer, in order.

    OKAY answers of the ``i``-carrying test ops must carry their own ``i``; returns the
    positions that got FAIL (with a reason in ``allowed_fail``).
    """
    assert len(conn.answers) == len(frames) + 1, (len(conn.answers), len(frames))
    assert conn.answers[-1] == ("OKAY", {"end": len(frames)}), conn.answers[-1]
    failed = []
    for index, ((op, data), (kind, answer)) in enumerate(zip(frames, conn.answers)):
        if kind == "FAIL":
            assert answer["reason"] in allowed_fail, (index, op, answer)
            failed.append(index)
        elif "i" in data:
            assert answer.get("i") == data["i"], f"answer {index} out of order: {answer} for {op}{data}"
    return failed


# -- processes ---------------------------------------------------------------------------------


def gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for a slow reaper counts as exited)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def worker_pids(server) -> set[int]:
    return {p.pid for p in server.workers() if not gone(p.pid)}


def live_children(server) -> int:
    """Running child processes other than multiprocessing's resource tracker: the workers,
    counted even in the instant between fork and exec, when their command line isn't a worker's."""
    count = 0
    for child in psutil.Process(server.pid).children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(child.cmdline()):
                count += 1
        except psutil.NoSuchProcess:
            pass
    return count


def serve(start_server, *args, workers: int = 2, **kwargs):
    """``start_server`` that also waits until every worker has booted (the fixture returns as
    soon as the first has, when the server starts listening)."""
    server = start_server(*args, workers=workers, **kwargs)
    server.wait_log(r"worker \d+ booted", count=workers)
    return server


def log_time(stamp: str) -> datetime.datetime:
    """The time of a log line (the text format starts with ``%(asctime)s``)."""
    return datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f")


def finish(server, signum: int = signal.SIGTERM) -> None:
    """Stop the server gracefully and check it exits 0 having reaped every worker."""
    pids = worker_pids(server)
    assert server.stop(signum, timeout=30) == 0, server.log()
    assert all(gone(pid) for pid in pids), pids


def call_fail(client, op: str, data: dict | None = None) -> RemoteError:
    with pytest.raises(RemoteError) as info:
        client.call(op, data or {}, timeout=20)
    return info.value


# -- kill -9 from outside, under load ---------------------------------------------------------


def test_kill9_worker_under_pipelined_load_answers_every_rpc(start_server):
    """4 connections x 50 RPCs (serial ``slow`` and concurrent ``cslow``), a worker killed
    with SIGKILL while they run: each RPC answered once, in order; capacity comes back."""
    server = serve(start_server, "--handlers", BASIC)
    before = worker_pids(server)
    assert len(before) == 2
    conns = [RawConn(server) for _ in range(4)]
    frames = [
        [("slow" if (c + i) % 3 else "cslow", {"s": 0.01, "i": i}) for i in range(50)] for c in range(4)
    ]
    for conn, fr in zip(conns, frames):
        conn.send(fr + [end_marker(len(fr))])

    victim = None
    killed_at = respawned_at = 0.0

    def tick():
        nonlocal victim, killed_at, respawned_at
        answered = sum(len(c.answers) for c in conns)
        if victim is None and answered >= 30:
            victim = sorted(before)[0]
            os.kill(victim, signal.SIGKILL)
            killed_at = time.monotonic()
        elif victim is not None and not respawned_at and len(worker_pids(server) - before) == 1:
            respawned_at = time.monotonic()

    drive(conns, all_answered(conns), timeout=30, tick=tick)
    assert victim is not None, "the load finished before the kill"
    crashed = []
    for conn, fr in zip(conns, frames):
        crashed += [(conn, i) for i in check_answers(conn, fr)]
    # Only the RPC the victim was running (if it was between RPCs, none) may fail; answers it
    # finished were flushed (each ``slow`` takes longer than the worker's flush interval), and
    # what it had queued must have been given to the other worker.
    assert len(crashed) <= 1, crashed
    for conn, i in crashed:
        assert "SIGKILL" in conn.answers[i][1]["message"], conn.answers[i]

    # Capacity came back: a new worker (new pid) within RESPAWN_S, booted, and serving.
    if not respawned_at:
        wait_until(lambda: len(worker_pids(server) - before) == 1, RESPAWN_S, what="a replacement worker")
        respawned_at = time.monotonic()
    respawn_s = respawned_at - killed_at
    assert respawn_s <= RESPAWN_S, respawn_s
    now = worker_pids(server)
    assert victim not in now and len(now) == 2, (victim, now)
    log = server.wait_log(r"worker \d+ booted", count=3, timeout=REBOOT_S)
    died = re.search(rf"^(\S+ \S+) .*ERROR .*\(pid {victim}\) died: killed by signal SIGKILL \(perhaps out of memory\?\)",
                     log, re.MULTILINE)
    assert died, log
    booted = [m for m in re.finditer(r"^(\S+ \S+) .*worker \d+ booted", log, re.MULTILINE) if m.start() > died.start()]
    rebooted_s = (log_time(booted[0].group(1)) - log_time(died.group(1))).total_seconds()
    assert rebooted_s < REBOOT_S, rebooted_s
    with server.client() as client:  # concurrent ops of one connection spread over both workers
        pids = set()
        for _ in range(3):
            answers = []
            for _ in range(4):
                client.rpc("cslow", {"s": 0.3}, lambda op, data: answers.append((op, data)))
            wait_until(lambda: (client.poll(0.05), len(answers) == 4)[1], 10, what="4 cslow answers")
            assert all(op == "OKAY" for op, _ in answers), answers
            pids |= {data["pid"] for _, data in answers}
            if pids == now:
                break
        assert pids == now, (pids, now)
    print(f"\nMEASURED kill -9: replacement spawned {respawn_s * 1000:.0f} ms after the kill, booted "
          f"{rebooted_s * 1000:.0f} ms after the death was logged, "
          f"RPCs lost 0 of {sum(len(f) for f in frames)}, failed {len(crashed)}")
    for conn in conns:
        conn.close()
    finish(server)


# -- deaths a handler causes -------------------------------------------------------------------


@pytest.mark.parametrize(
    "op, data, how",
    [
        ("crash", {"code": 7}, "exit code 7"),
        ("kill9", {}, "killed by signal SIGKILL"),
        ("segfault", {}, "killed by signal SIGSEGV"),
    ],
)
def test_handler_death_fails_only_that_rpc_and_the_connection_goes_on(start_server, op, data, how):
    server = serve(start_server, "--handlers", SUP_OPS)
    before = worker_pids(server)
    with server.client() as client:
        net_id = client.call("whoami")["net_id"]
        client.call("session_set", {"a": 1})
        error = call_fail(client, op, data)
        assert error.reason == "WorkerCrashed"
        assert how in error.message, error.message
        # The same connection goes on, on another worker, with its session as it was.
        answer = client.call("session_get")
        assert answer["session"]["a"] == 1, answer
        assert client.call("echo", {"after": op}) == {"after": op}
    died = server.wait_log(r"ERROR .* died: ")
    line = next(l for l in died.splitlines() if " died: " in l)
    crashed_pid = int(re.search(r"\(pid (\d+)\) died", line).group(1))
    assert crashed_pid in before, (line, before)
    assert how in line and f"op {op!r}" in line and f"net_id {net_id}" in line, line
    # SIGKILL hints at the OOM killer, as gunicorn does; nothing else does.
    assert ("perhaps out of memory" in line) == (op == "kill9"), line
    wait_until(lambda: len(worker_pids(server)) == 2 and crashed_pid not in worker_pids(server), RESPAWN_S,
               what="the worker count back to 2")
    finish(server)


def test_crashed_rpc_is_not_rerun_and_session_is_rolled_back(start_server, tmp_path):
    """The crashing RPC runs once (never given to another worker); its session writes vanish."""
    server = serve(start_server, "--handlers", SUP_OPS)
    trace = tmp_path / "ran"
    with server.client() as client:
        client.call("session_set", {"keep": 1})
        assert call_fail(client, "count_crash", {"path": str(trace)}).reason == "WorkerCrashed"
        assert call_fail(client, "session_crash", {"lost": 1}).reason == "WorkerCrashed"
        session = client.call("session_get")["session"]
        # A re-run would have come before this answer: the connection's RPCs run in order.
        assert client.call("echo", {"x": 1}) == {"x": 1}
    assert len(trace.read_text().splitlines()) == 1
    assert session.get("keep") == 1 and "lost" not in session, session
    finish(server)


def test_rpcs_queued_behind_a_crash_run_elsewhere(start_server):
    """One connection pipelines slow, kill9, echo, echo: only kill9 fails."""
    server = serve(start_server, "--handlers", BASIC)
    conn = RawConn(server)
    frames = [("slow", {"s": 0.05, "i": 0}), ("kill9", {}), ("echo", {"i": 2}), ("echo", {"i": 3})]
    conn.send(frames + [end_marker(4)])
    drive([conn], all_answered([conn]))
    assert check_answers(conn, frames) == [1], conn.answers
    conn.close()
    finish(server)


def test_other_connections_jobs_queued_on_the_dying_worker_are_requeued(start_server, tmp_path):
    """With one worker: A runs a slow RPC, B's and C's RPCs queue up behind it on that worker
    (or in the acceptor), then A's next RPC kills the worker. B and C get OKAY from the
    replacement; A gets FAIL only for the RPC that crashed."""
    server = serve(start_server, "--handlers", SUP_OPS, workers=1)
    mark = tmp_path / "started"
    a, b, c = RawConn(server), RawConn(server), RawConn(server)
    a_frames = [("mark_slow", {"path": str(mark), "s": 0.3}), ("kill9", {}), ("echo", {"i": 2})]
    a.send(a_frames + [end_marker(3)])
    wait_until(mark.exists, 10, what="A's slow RPC to start")
    b_frames = [("echo", {"i": i}) for i in range(5)]
    c_frames = [("cecho", {"i": i}) for i in range(5)]
    b.send(b_frames + [end_marker(5)])
    c.send(c_frames + [end_marker(5)])
    drive([a, b, c], all_answered([a, b, c]))
    assert check_answers(a, a_frames) == [1], a.answers
    assert check_answers(b, b_frames) == [], b.answers
    assert check_answers(c, c_frames) == [], c.answers
    for conn in (a, b, c):
        conn.close()
    finish(server)


@pytest.mark.parametrize("killer", ["kill9", "hang"])
def test_finished_rpcs_before_a_crash_or_timeout_are_not_failed(start_server, killer):
    """``push_self, echo, kill9`` (or ``hang`` under --timeout 1) pipelined: push_self and
    echo finished before the killer started, so they must get OKAY.

    The issue: "each RPC it was running gets WorkerCrashed" (or Timeout); they were not
    running, and "pushes it had already sent are delivered".
    """
    server = serve(start_server, "--handlers", BASIC, "--timeout", "1")
    conn = RawConn(server)
    frames = [("push_self", {"n": 1}), ("echo", {"i": 1}), (killer, {}), ("echo", {"i": 3})]
    conn.send(frames + [end_marker(4)])
    drive([conn], all_answered([conn]))
    assert check_answers(conn, frames, ("WorkerCrashed", "Timeout")) == [2], conn.answers
    assert conn.answers[2][1]["reason"] == ("WorkerCrashed" if killer == "kill9" else "Timeout")
    assert ("note", {"to": "self", "n": 1}) in conn.pushes, conn.pushes
    conn.close()
    finish(server)


def test_finished_answer_is_not_held_back_by_the_next_slow_rpc(start_server):
    """``echo, slow 1 s`` pipelined: echo's answer is ready at once and first in order, so
    the client should not wait for slow to get it (worker.py: "slow ones don't hold finished
    answers back")."""
    server = serve(start_server, "--handlers", BASIC)
    conn = RawConn(server)
    drive([conn], lambda: bool(conn.pushes))  # its on_connect hook has run
    started = time.monotonic()
    conn.send([("echo", {"i": 0}), ("slow", {"s": 1.0, "i": 1})])
    drive([conn], lambda: len(conn.answers) >= 1)
    first_s = time.monotonic() - started
    drive([conn], all_answered([conn]))
    assert [kind for kind, _ in conn.answers] == ["OKAY", "OKAY"], conn.answers
    assert first_s < 0.4, f"echo's answer took {first_s:.2f}s: held back until slow finished"
    conn.close()
    finish(server)


def test_bystander_connection_is_not_failed_by_another_connections_crash(start_server, tmp_path):
    """B's echo ends up in the same batch as A's kill9, just before it: B did nothing wrong
    and its RPC ran to completion, yet it gets WorkerCrashed. The issue: "every other
    connection keeps being served while one worker misbehaves"."""
    server = serve(start_server, "--handlers", SUP_OPS, "--max-frame-bytes", "1024", workers=1)
    mark = tmp_path / "started"
    a, b, d, f = conns = [RawConn(server) for _ in range(4)]
    drive(conns, lambda: all(c.pushes for c in conns))  # every on_connect hook has run

    def barrier():
        """Round trip through the acceptor's loop alone: it answers an overlong frame itself."""
        f.sock.sendall(b"echo{" + b" " * 2048 + b"}\n")
        f.sent += 1
        drive([f], all_answered([f]))
        assert f.answers[-1][1]["reason"] == "FrameTooLarge", f.answers

    # The only worker runs A's slow RPC (batch 1) and is sent D's echo (batch 2): it holds its
    # maximum of two batches, so B's echo waits in the acceptor. When A's slow RPC is
    # answered, A's kill9 becomes runnable and goes out in one batch with B's echo, behind it.
    a.send([("mark_slow", {"path": str(mark), "s": 1.0})])
    wait_until(mark.exists, 10, what="A's slow RPC to start")
    d.send([("echo", {"i": 0})])
    barrier()
    b.send([("echo", {"i": 0})])
    a.send([("kill9", {})])
    barrier()
    assert not a.answers, "A's slow RPC ended before the scene was set"
    drive([a, b, d], all_answered([a, b, d]))
    assert a.answers[1][0] == "FAIL" and a.answers[1][1]["reason"] == "WorkerCrashed", a.answers
    assert d.answers == [("OKAY", {"i": 0})], d.answers
    assert b.answers == [("OKAY", {"i": 0})], b.answers
    for conn in conns:
        conn.close()
    finish(server)


def test_connect_hook_that_crashes_its_worker_does_not_wedge_the_connection(start_server, tmp_path):
    """The first connection's on_connect hook kills its worker. The hook has no answer to
    carry the crash; the client's own RPCs must each get exactly one answer (they never ran)."""
    server = serve(start_server, "--handlers", "tests.handlers.sup_hooks", "--graceful-timeout", "1",
                   env={"SUP_HOOKS_DIR": str(tmp_path)})
    conn = RawConn(server)
    frames = [("echo", {"i": 0}), ("echo", {"i": 1})]
    conn.send(frames + [end_marker(2)])
    server.wait_log(r"ERROR .* died: exit code 6 while running op '<on_connect>' for net_id 1")
    try:
        drive([conn], all_answered([conn]), timeout=3)
    finally:
        # Not one answer may be unsolicited: the first FAIL here answers no RPC of the client.
        assert not conn.answers or conn.answers[0][0] == "OKAY", conn.answers
    assert check_answers(conn, frames, allowed_fail=()) == []
    conn.close()
    finish(server)


def test_rpc_does_not_wait_behind_a_hung_rpc_while_a_worker_is_free(start_server, tmp_path):
    """A hangs on worker X; C keeps worker Y busy for 0.5 s. B's echo, sent now, is handed to
    X (X holds 1 RPC, Y 2) and queued behind the hang in X's pipe, though Y is free 0.5 s later:
    B waits for the timeout (30 s by default; 3 s here). The issue: "every other connection
    keeps being served while one worker misbehaves"."""
    server = serve(start_server, "--handlers", SUP_OPS, "--timeout", "3")
    hung, busy = tmp_path / "hung", tmp_path / "busy"
    a, b, c = conns = [RawConn(server) for _ in range(3)]
    drive(conns, lambda: all(conn.pushes for conn in conns))  # every on_connect hook has run
    a.send([("mark_hang", {"path": str(hung)})])
    wait_until(hung.exists, 10, what="A's hang to start")
    c.send([("mark_slow", {"path": str(busy), "s": 0.5}), ("echo", {"i": 1})])
    wait_until(busy.exists, 10, what="C's slow RPC to start")
    assert hung.read_text() != busy.read_text(), "A and C share a worker"
    started = time.monotonic()
    b.send([("echo", {"i": 0})])
    drive([b], all_answered([b]), timeout=10)
    waited = time.monotonic() - started
    assert b.answers == [("OKAY", {"i": 0})], b.answers
    assert waited < 2.0, f"B's echo waited {waited:.1f}s behind A's hung RPC while a worker was free"
    drive([a, c], all_answered([a, c]))
    for conn in conns:
        conn.close()
    finish(server)


# -- timeouts ----------------------------------------------------------------------------------


def test_timeout_answers_dumps_the_stack_and_replaces_the_worker(start_server):
    """``--timeout 1``: hang gets FAIL Timeout within ~1-2 s, the log holds the handler's
    stack, the worker is replaced, and another client's RPCs on the other worker all succeed."""
    server = serve(start_server, "--handlers", BASIC, "--timeout", "1")
    before = worker_pids(server)
    other = RawConn(server)
    drive([other], lambda: bool(other.pushes))  # its on_connect hook has run
    other_frames = [("slow", {"s": 0.02, "i": i}) for i in range(40)]
    with server.client() as client:
        net_id = client.call("whoami")["net_id"]
        started = time.monotonic()
        hung = []
        client.rpc("hang", {}, lambda op, data: hung.append((op, data, time.monotonic() - started)))
        other.send(other_frames + [end_marker(len(other_frames))])
        drive([other], all_answered([other]))
        while client.pending():
            client.poll(None)
        assert client.call("echo", {"x": 1}) == {"x": 1}
        assert client.call("whoami")["net_id"] == net_id
    # The other client's RPCs were untouched, in order (some may have waited behind the hung
    # RPC in its worker's queue; they were given to the other worker, not failed).
    assert check_answers(other, other_frames) == [], other.answers
    # The hung RPC: FAIL Timeout after about 1 s.
    [(op, answer, elapsed)] = hung
    assert op == "FAIL" and answer["reason"] == "Timeout", answer
    assert 0.9 <= elapsed <= 2.5, elapsed
    log = server.log()
    assert re.search(rf"ERROR .*\(pid \d+\): op 'hang' for net_id {net_id} ran past its 1s timeout", log), log
    # The worker dumped its stack (faulthandler) before it was killed: handler name and file.
    assert re.search(r'File ".*tests/handlers/basic\.py", line \d+ in hang', log), log
    wait_until(lambda: len(worker_pids(server)) == 2, RESPAWN_S, what="two workers again")
    assert len(before & worker_pids(server)) == 1, (before, worker_pids(server))
    other.close()
    finish(server)


def test_timeout_stack_dump_goes_to_the_log_file(start_server, tmp_path):
    """With --log-file, the stack of a timed-out handler belongs in that file ("the log shows
    the Python stack"), not on a stderr nobody reads."""
    log_file = tmp_path / "server.log"
    server = start_server("--handlers", BASIC, "--timeout", "1", "--log-file", str(log_file), workers=1)
    with server.client() as client:
        assert call_fail(client, "hang").reason == "Timeout"
    wait_until(lambda: "ran past its 1s timeout" in log_file.read_text(), 5, what="the timeout log line")
    finish(server)
    text = log_file.read_text()
    assert re.search(r'File ".*tests/handlers/basic\.py", line \d+ in hang', text), (text, server.log())


def test_per_op_timeout(start_server):
    """``hang_short`` has timeout=0.5 of its own; the server's default is 30 s."""
    server = serve(start_server, "--handlers", BASIC)
    with server.client() as client:
        started = time.monotonic()
        error = call_fail(client, "hang_short")
        elapsed = time.monotonic() - started
        assert error.reason == "Timeout", error
        assert 0.45 <= elapsed <= 2.0, elapsed
        assert client.call("echo", {"x": 1}) == {"x": 1}
    log = server.wait_log(r"in hang_short")
    assert re.search(r"ERROR .*op 'hang_short' .*ran past its 0\.5s timeout", log), log
    finish(server)


# -- recycling ---------------------------------------------------------------------------------


@pytest.mark.parametrize("spares", [0, 1])
def test_max_requests_is_exact_under_pipelined_load(start_server, spares):
    """--max-requests 20 --max-requests-jitter 5 while 3 connections pipeline 100 RPCs each (serial
    and concurrent): all OKAY and in order, and no worker process serves more than 25 of them,
    with or without a spare (a worker at its limit stops taking RPCs at once). With a spare,
    capacity never drops: at least 2 workers run all along."""
    server = serve(start_server, "--handlers", BASIC, "--max-requests", "20", "--max-requests-jitter", "5",
                   "--spare-workers", str(spares))
    before = worker_pids(server)
    counts = []
    conns = [RawConn(server) for _ in range(3)]
    frames = [[("slow" if i % 4 else "cslow", {"s": 0.002, "i": i}) for i in range(100)] for _ in conns]
    for conn, fr in zip(conns, frames):
        conn.send(fr + [end_marker(len(fr))])
    drive(conns, all_answered(conns), timeout=90, tick=lambda: counts.append(live_children(server)))
    served: dict[int, int] = {}
    for conn, fr in zip(conns, frames):
        assert check_answers(conn, fr, allowed_fail=()) == []
        for kind, data in conn.answers[:-1]:
            served[data["pid"]] = served.get(data["pid"], 0) + 1
        conn.close()
    assert max(served.values()) <= 25, served
    assert len(served) >= 300 // 25, served
    assert re.search(r"retiring: served max_requests \(2\d\)", server.log()), server.log()
    if spares:
        assert min(counts) >= 2, counts
    wait_until(lambda: len(worker_pids(server)) == 2 + spares, 20, what="the pool at rest")
    log = server.log()
    assert " died" not in log and " ERROR " not in log, log
    assert not (before & worker_pids(server))
    finish(server)


def test_a_spare_takes_over_from_a_recycled_worker_at_once(start_server):
    """One worker and one spare, --max-requests 5, workers that take 0.8 s to boot: each 5th RPC
    retires its worker and the spare serves the next one; no worker serves more than 5, and the
    log says the spare took over (counted, not timed)."""
    server = serve(start_server, "--handlers", "tests.handlers.sup_slowboot", "--max-requests", "5",
                   "--spare-workers", "1", workers=1, env={"SUP_BOOT_S": "0.8"})
    server.wait_log(r"booted \(pid \d+\) as a spare")
    served: dict[int, int] = {}
    with server.client() as client:
        for i in range(7):
            pid = client.call("pid", {}, timeout=20)["pid"]
            served[pid] = served.get(pid, 0) + 1
    assert sorted(served.values()) == [2, 5], served
    server.wait_log(r"spare booted, now serving")
    finish(server)


def test_max_worker_memory_recycles_gracefully(start_server):
    """A worker whose RSS passes --max-worker-memory is retired (WARNING with the figure) and
    replaced; the RPCs in flight meanwhile all succeed."""
    server = serve(start_server, "--handlers", "tests.handlers.sup_memory", "--max-worker-memory", "80")
    before = worker_pids(server)
    other = RawConn(server)
    frames = [("slow", {"s": 0.01, "i": i}) for i in range(150)]
    other.send(frames + [end_marker(len(frames))])
    with server.client() as client:
        grown = client.call("grow", {"mib": 100})
        assert grown["pid"] in before
        log = server.wait_log(rf"WARNING .*\(pid {grown['pid']}\) retiring: RSS \d+\.\d MiB over max_worker_memory \(80 MiB\)", timeout=10)
        rss = float(re.search(rf"\(pid {grown['pid']}\) retiring: RSS (\d+\.\d) MiB", log).group(1))
        assert 100 < rss < 400, rss
        wait_until(lambda: gone(grown["pid"]), 10, what="the big worker to leave")
        server.wait_log(rf"\(pid {grown['pid']}\) exited")
        assert client.call("echo", {"x": 1}) == {"x": 1}
    drive([other], all_answered([other]))
    assert check_answers(other, frames, allowed_fail=()) == []
    wait_until(lambda: len(worker_pids(server)) == 2, 10, what="two workers")
    assert " ERROR " not in server.log(), server.log()
    other.close()
    finish(server)


# -- start-up failures -------------------------------------------------------------------------


def _run_serve(start_server, *args, env=None, timeout: float = 20.0):
    """Start a server that should not come up; returns (exit code, seconds, stderr, server)."""
    started = time.monotonic()
    server = start_server(*args, ready=False, env=env)
    code = server.proc.wait(timeout)
    return code, time.monotonic() - started, server.log(), server


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("tests.handlers.broken_import",
         r"'tests\.handlers\.broken_import'.*RuntimeError: this module is broken on purpose at .*tests/handlers/broken_import\.py:3"),
        ("tests.handlers.no_handlers",
         r"'tests\.handlers\.no_handlers' \(.*tests/handlers/no_handlers\.py\): attribute 'handlers' is a dict"),
        ("tests.handlers.does_not_exist",
         r"'tests\.handlers\.does_not_exist'.*ModuleNotFoundError: No module named 'tests\.handlers\.does_not_exist'"),
        ("tests.handlers.sup_missing_dep",
         r"'tests\.handlers\.sup_missing_dep'.*ModuleNotFoundError: No module named "
         r"'simplerpc_mp_test_no_such_dependency' at .*tests/handlers/sup_missing_dep\.py:5"),
        ("tests.handlers.basic:nothing_here", r"'tests\.handlers\.basic' \(.*basic\.py\): attribute 'nothing_here' is nothing"),
    ],
    ids=["raises_at_import", "no_handlers", "missing_module", "missing_dependency", "missing_attribute"],
)
def test_broken_handler_module_exits_with_one_clear_line(start_server, spec, expected):
    code, seconds, stderr, server = _run_serve(start_server, "--handlers", spec)
    assert code != 0 and seconds < 10, (code, seconds, stderr)
    assert server.proc.stdout.read() == b"", "it must not have listened"
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if re.search(expected, line)]
    assert len(errors) == 1, stderr
    assert errors[0].startswith("simplerpc-mp: error: "), stderr
    # A missing module has no file:line of its own: importlib's internals are noise.
    assert "importlib" not in errors[0], errors[0]
    # One line: the rest of stderr is at most a few log lines, no wall.
    assert len(stderr.splitlines()) <= 4, stderr


def test_syntax_error_in_handler_module_names_file_and_line(start_server, tmp_path):
    (tmp_path / "sup_syntax_mod.py").write_text("from simplerpc_mp import Handlers\nhandlers = Handlers(\n\ndef x(:\n")
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    code, seconds, stderr, _ = _run_serve(start_server, "--handlers", "sup_syntax_mod", env=env)
    assert code != 0 and seconds < 10, (code, seconds, stderr)
    assert "Traceback" not in stderr, stderr
    assert re.search(rf"simplerpc-mp: error: .*'sup_syntax_mod'.*SyntaxError: .* at {re.escape(str(tmp_path))}/sup_syntax_mod\.py:\d", stderr), stderr


@pytest.mark.parametrize("when", ["start", "booted"])
def test_workers_dying_at_start_back_off_then_the_server_stops(start_server, tmp_path, when):
    """The first two workers live; every later one exits with code 17, in on_start
    (``start``) or right after it reported that it booted (``booted``). Once both good workers
    are lost, their replacements keep dying: they are respawned with a growing back-off, then
    the server gives up with a clear message and a non-zero exit, leaving no worker behind."""
    env = {"SUP_CRASHLOOP_DIR": str(tmp_path), "SUP_CRASHLOOP_WHEN": when}
    server = serve(start_server, "--handlers", "tests.handlers.sup_crashloop", env=env)
    pids = worker_pids(server)
    with server.client() as client:
        # Two crashes: the first takes one good worker; the second can only land on the other.
        assert call_fail(client, "crash", {"code": 5}).reason == "WorkerCrashed"
        assert call_fail(client, "crash", {"code": 5}).reason == "WorkerCrashed"
    started = time.monotonic()

    def tries() -> int:  # the slot files count the workers: 2 good ones + the failed ones
        return len(list(tmp_path.iterdir())) - 2

    wait_until(lambda: server.proc.poll() is not None or tries() > 12, 20, what="the server to give up")
    seconds = time.monotonic() - started
    if server.proc.poll() is None:
        pytest.fail(f"still serving after {seconds:.1f}s: {tries()} replacement workers died, no back-off, no stop")
    code = server.proc.returncode
    log = server.log()
    assert code == 4, log  # server.EXIT_WORKERS_FAILING
    delays = [float(d) for d in re.findall(r"failed to start: .*exit code 17.*; next try in (\d+\.\d)s", log)]
    assert len(delays) >= 3 and delays == sorted(delays) and delays[-1] > delays[0], log
    assert re.search(r"simplerpc-mp: error: workers keep failing to start \(\d+ in a row\).*exit code 17", log), log
    assert "Traceback" not in log, log
    assert 3 <= tries() <= 10, tries()  # a handful of tries, no spin
    assert seconds < 15, seconds
    wait_until(lambda: all(gone(pid) for pid in pids), 2, what="the workers to be gone")


@contextlib.contextmanager
def one_job_on_a_fake_worker(requests: bytes):
    """The real Acceptor and Pool, one real client connection that sent ``requests`` (one job),
    dispatched to a worker that is only a socketpair: the test plays the worker's replies.
    Yields (pool, worker, conn, job_id, read_answers(n_bytes): flush, then read that many bytes)."""
    from simplerpc_mp import ipc
    from simplerpc_mp.acceptor import Acceptor
    from simplerpc_mp.config import Settings
    from simplerpc_mp.supervisor import Pool, WorkerHandle
    from simplerpc_mp.timers import Timers

    settings = Settings()
    with selectors.DefaultSelector() as selector, socket.create_server(("127.0.0.1", 0)) as listener:
        timers = Timers()
        acceptor = Acceptor(settings, selector, timers)
        pool = Pool(settings, "tests.handlers.basic", selector, timers, acceptor, lambda: None, lambda: None)
        client = socket.create_connection(listener.getsockname())
        served, _ = listener.accept()
        conn = acceptor.add_connection(served, "peer")
        client.sendall(requests)
        acceptor.on_read(conn)
        ours, theirs = socket.socketpair()
        ours.setblocking(False)

        class NoProcess:  # the worker's process is not needed to route its replies
            pid, sentinel = 0, None

        worker = WorkerHandle(1, NoProcess(), ours, [0] * ipc.BOARD_SLOTS, None, 0, 0)
        worker.booted = True
        pool.workers.append(worker)
        pool.send_batch(worker, acceptor.scheduler.take_batch(1))

        def read_answers(size: int) -> bytes:
            acceptor.flush()
            client.settimeout(5)
            received = b""
            while len(received) < size:
                received += client.recv(4096)
            return received

        try:
            yield pool, worker, conn, worker.jobs[0].job_id, read_answers
        finally:
            client.close()
            theirs.close()
            ours.close()


def test_journal_replies_ahead_of_unread_pipe_data_are_not_applied_out_of_turn():
    """Regression: the live-journal sweep may see replies the worker logged after a pipe send
    the acceptor has only partly read. Applying one of those early made the late pipe reply for
    the line before it look like a duplicate: one RPC lost its answer, another got two, and the
    connection stalled. Drives the real Acceptor and Pool over real sockets, in that order."""
    from simplerpc_mp import ipc

    with one_job_on_a_fake_worker(b"echo{}\necho{}\necho{}\nslow{}\n") as (pool, worker, conn, job_id, read_answers):

        def reply(i):
            return (job_id, i, 1, b'OKAY{"i":%d}\n' % i, [], ipc.UNCHANGED)

        pool._apply_replies(worker, [reply(0)])  # the first record of a pipe message [r0, r1]
        pool._apply_replies(worker, [reply(2)])  # the live journal, already past that message
        pool._apply_replies(worker, [reply(1)])  # the rest of the pipe message
        pool._apply_replies(worker, [reply(2), reply(3)])  # the next pipe message
        expected = b'OKAY{"i":0}\nOKAY{"i":1}\nOKAY{"i":2}\nOKAY{"i":3}\n'
        assert read_answers(len(expected)) == expected
        assert conn.write_seq == conn.next_seq == 4 and not conn.done and not worker.jobs


def test_a_pipe_reply_for_several_lines_after_the_journal_gave_some_of_them():
    """A worker sends one reply for a run of lines of a job, while the live-journal sweep may
    already have delivered the first lines of that run (one record per line): the acceptor must
    take the rest of the run, once each, and not apply the skipped lines' pushes again."""
    from simplerpc_mp import ipc

    with one_job_on_a_fake_worker(b"echo{}\n" * 5) as (pool, worker, conn, job_id, read_answers):
        push = [(conn.net_id, b"note{}\n")]

        def answers(*indexes):
            return b"".join(b'OKAY{"i":%d}\n' % i for i in indexes)

        pool._apply_replies(worker, [(job_id, 0, 1, answers(0), push, ipc.UNCHANGED)])  # journal
        pool._apply_replies(worker, [(job_id, 1, 1, answers(1), [], ipc.UNCHANGED)])  # journal
        pool._apply_replies(worker, [(job_id, 0, 4, answers(0, 1, 2, 3), push, ipc.UNCHANGED)])  # pipe
        pool._apply_replies(worker, [(job_id, 2, 1, answers(2), [], ipc.UNCHANGED)])  # stale journal
        pool._apply_replies(worker, [(job_id, 4, 1, answers(4), [], ipc.UNCHANGED)])  # pipe
        expected = b"note{}\n" + answers(0, 1, 2, 3, 4)
        assert read_answers(len(expected)) == expected
        assert conn.write_seq == conn.next_seq == 5 and not conn.done and not worker.jobs
