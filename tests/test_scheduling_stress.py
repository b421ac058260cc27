"""Scheduling under stress, and the faults a review of it found (each test failed before its fix).

The stress tests run mixed serial and concurrent load through take-backs, give-backs, kill -9 at
random instants, recycling, reload, scaling and timeouts, with ``tests/handlers/sched_stress.py``
logging every handler run, and check: exactly one answer per RPC, in order; no RPC run twice;
a serial RPC never overlapping another RPC of its connection; every answer seeing the session
its predecessors left.
"""

from __future__ import annotations

import collections
import os
import random
import re
import selectors
import signal
import socket
import sys
import time

import psutil

from .conftest import wait_until
from .test_supervisor import RawConn, drive, finish, serve, worker_pids

OPS = "tests.handlers.sched_stress"


def _env(tmp_path):
    path = tmp_path / "exec.log"
    return path, {"SCHED_EXEC_LOG": str(path)}


def _frames(c: int, n: int, rng: random.Random):
    frames = []
    for i in range(n):
        ms = rng.choice([0.05, 0.05, 0.3, 3, 7, 12])
        if rng.random() < 0.55:
            frames.append(("rs", {"t": c, "i": i, "ms": ms, "incr": i % 3 == 0}))
        else:
            frames.append(("rc", {"t": c, "i": i, "ms": ms}))
    return frames


def _check(conns, frames, log_path):
    """Exactly one answer per RPC, in order; none run twice; serial ones alone; sessions in step."""
    runs = collections.defaultdict(list)
    for line in log_path.read_text().splitlines():
        t, i, kind, pid, start, end, n = line.split()
        runs[(int(t), int(i))].append((kind, int(pid), int(start), int(end), int(n)))
    twice = {key: value for key, value in runs.items() if len(value) > 1}
    assert not twice, f"RPCs that ran more than once: {twice}"
    crashed = 0
    for c, (conn, fr) in enumerate(zip(conns, frames)):
        assert len(conn.answers) == len(fr), (c, len(conn.answers), len(fr))
        expected_n = 0
        for i, ((op, data), (kind, answer)) in enumerate(zip(fr, conn.answers)):
            if kind == "FAIL":
                assert answer["reason"] == "WorkerCrashed", (c, i, answer)
                crashed += 1
                continue
            assert answer["i"] == i, f"conn {c}: answer {i} out of order: {answer}"
            assert (c, i) in runs, f"conn {c}: RPC {i} answered OKAY but never ran"
            assert runs[(c, i)][0][1] == answer["pid"]
            if op == "rs" and data["incr"]:
                expected_n += 1
            assert answer["n"] == expected_n, f"conn {c}: RPC {i} ({op}) saw session n={answer['n']}, expected {expected_n}"
        # A serial RPC never overlaps another RPC of its connection.
        intervals = sorted((start, end, kind, i) for (t, i), [(kind, _, start, end, _n)] in runs.items() if t == c)
        for (s1, e1, k1, i1), (s2, e2, k2, i2) in zip(intervals, intervals[1:]):
            if k1 == "S" or k2 == "S":
                assert e1 <= s2, f"conn {c}: RPC {i1} ({k1}) and RPC {i2} ({k2}) overlapped"
    return crashed


# -- (1)/(2) stress: kill -9 at random instants while take-back and give-back happen ----------------


def test_stress_kill9_take_back_give_back_sessions(start_server, tmp_path):
    """6 clients pipeline mixed serial/concurrent RPCs of 0.05-12 ms (take-backs and 5 ms slices
    happen all the time), with a session counter; workers that served are killed with SIGKILL at
    random instants. Every RPC answered once, in order; none ran twice; serial ones ran alone;
    each answer saw the session its predecessors left."""
    log_path, env = _env(tmp_path)
    server = serve(start_server, "--handlers", OPS, "--spare-workers", "1", env=env)
    rng = random.Random(int(os.environ.get("REVIEW_SEED", "7")))
    conns = [RawConn(server, timeout=60) for _ in range(6)]
    frames = [_frames(c, 120, rng) for c in range(6)]
    for conn, fr in zip(conns, frames):
        conn.send(fr)
    kills = []
    next_kill = [time.monotonic() + 0.2]

    def tick():
        now = time.monotonic()
        if len(kills) >= 6 or now < next_kill[0]:
            return
        served = {a.get("pid") for c in conns for k, a in c.answers[-20:] if k == "OKAY"}
        victims = []
        for pid in served & worker_pids(server):
            try:
                if time.time() - psutil.Process(pid).create_time() > 2.0:
                    victims.append(pid)
            except psutil.NoSuchProcess:
                pass
        if victims:
            victim = rng.choice(sorted(victims))
            os.kill(victim, signal.SIGKILL)
            kills.append(victim)
            next_kill[0] = now + rng.uniform(0.05, 0.4)

    drive(conns, lambda: all(len(c.answers) >= len(f) for c, f in zip(conns, frames)), timeout=120, tick=tick)
    crashed = _check(conns, frames, log_path)
    assert crashed <= len(kills), (crashed, kills)
    finish(server)
    log = server.log()
    assert "Traceback" not in log, log
    print("kills", len(kills), "crashed", crashed, re.findall(r"jobs taken back: \d+, time slices given back: \d+", log))


def test_stress_recycling_reload_scaling(start_server, tmp_path):
    """The same load with max_requests 30 (workers retire all the time), a HUP and a TTIN/TTOU
    in the middle, and a kill -9: the same promises."""
    log_path, env = _env(tmp_path)
    server = serve(start_server, "--handlers", OPS, "--spare-workers", "1", "--max-requests", "30", env=env)
    rng = random.Random(int(os.environ.get("REVIEW_SEED", "7")))
    conns = [RawConn(server, timeout=60) for _ in range(5)]
    frames = [_frames(c, 100, rng) for c in range(5)]
    for conn, fr in zip(conns, frames):
        conn.send(fr)
    events = [(40, signal.SIGHUP), (120, signal.SIGTTIN), (200, signal.SIGTTOU), (300, "kill")]
    done = []
    peak = [0]

    def tick():
        answered = sum(len(c.answers) for c in conns)
        peak[0] = max(peak[0], len(worker_pids(server)))
        for at, what in events:
            if answered >= at and at not in done:
                done.append(at)
                if what == "kill":
                    pids = {a.get("pid") for c in conns for k, a in c.answers[-10:] if k == "OKAY"} & worker_pids(server)
                    if pids:
                        os.kill(sorted(pids)[0], signal.SIGKILL)
                else:
                    server.send(what)

    drive(conns, lambda: all(len(c.answers) >= len(f) for c, f in zip(conns, frames)), timeout=180, tick=tick)
    _check(conns, frames, log_path)
    finish(server)
    print("peak workers", peak[0], re.findall(r"jobs taken back: \d+, time slices given back: \d+", server.log()))


def test_stress_timeouts(start_server, tmp_path):
    """RPCs past --timeout (workers killed and replaced) among the same load: every RPC answered
    once, in order (Timeout or WorkerCrashed only for the killed ones), none ran twice."""
    log_path, env = _env(tmp_path)
    server = serve(start_server, "--handlers", OPS, "--spare-workers", "1", "--timeout", "0.2", env=env)
    rng = random.Random(int(os.environ.get("REVIEW_SEED", "7")))
    conns = [RawConn(server, timeout=60) for _ in range(4)]
    frames = [_frames(c, 80, rng) for c in range(4)]
    for c, fr in enumerate(frames):
        for i in rng.sample(range(5, 80), 2):
            op, data = fr[i]
            data["ms"] = 250  # past the timeout
    for conn, fr in zip(conns, frames):
        conn.send(fr)
    drive(conns, lambda: all(len(c.answers) >= len(f) for c, f in zip(conns, frames)), timeout=180)
    runs = collections.defaultdict(int)
    for line in log_path.read_text().splitlines():
        t, i = line.split()[:2]
        runs[(int(t), int(i))] += 1
    assert all(v == 1 for v in runs.values()), {k: v for k, v in runs.items() if v > 1}
    for c, (conn, fr) in enumerate(zip(conns, frames)):
        assert len(conn.answers) == len(fr)
        for i, ((op, data), (kind, answer)) in enumerate(zip(fr, conn.answers)):
            if kind == "FAIL":
                assert answer["reason"] in ("Timeout", "WorkerCrashed"), (c, i, answer)
                if answer["reason"] == "Timeout":
                    assert data["ms"] == 250, (c, i, data, answer)
                # (an innocent RPC may get WorkerCrashed: see test_an_rpc_after_a_timed_out_one...)
            else:
                assert answer["i"] == i
    finish(server)


# -- a Pool driven by hand, with stand-in worker processes ------------------------------------------


class _StandIn:
    """A worker process that is only a sleeping child ignoring SIGUSR1 (the pool's decisions
    are what is tested; the test plays the worker's messages)."""

    def __init__(self):
        import subprocess

        self.popen = subprocess.Popen(
            [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGUSR1, signal.SIG_IGN); time.sleep(60)"]
        )
        self.pid = self.popen.pid
        self.sentinel, self._w = os.pipe()

    @property
    def exitcode(self):
        return self.popen.poll()

    def kill(self):
        self.popen.kill()

    def join(self, timeout=None):
        self.popen.wait(timeout)

    def close(self):
        for fd in (self.sentinel, self._w):
            try:
                os.close(fd)
            except OSError:
                pass


INFO = {"concurrent": [], "timeouts": {}, "connect": False, "disconnect": False}


def _hand_driven_pool(monkeypatch, **changes):
    """(pool, acceptor, timers, selector, client_for(conn_bytes)) with workers that are stand-ins."""
    import multiprocessing

    from simplerpc_mp import ipc
    from simplerpc_mp.acceptor import Acceptor
    from simplerpc_mp.config import Settings
    from simplerpc_mp.supervisor import Pool, WorkerHandle
    from simplerpc_mp.timers import Timers

    settings = Settings().with_changes(**changes)
    selector = selectors.DefaultSelector()
    timers = Timers()
    acceptor = Acceptor(settings, selector, timers)
    pool = Pool(settings, "tests.handlers.basic", selector, timers, acceptor, lambda: None, lambda: None)
    ctx = multiprocessing.get_context("spawn")
    worker_ends = []

    def spawn(spare):
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        process = _StandIn()
        worker = WorkerHandle(pool.next_worker_id, process, ours, ipc.board_view(ctx.RawArray("q", ipc.BOARD_SLOTS)),
                              ctx.RawArray("c", 64 * 1024), pool.generation, 0, ctx.Lock(), spare)
        worker_ends.append(theirs)  # the worker's end, played by the test
        pool.next_worker_id += 1
        pool.workers.append(worker)
        selector.register(ours, selectors.EVENT_READ, worker)
        selector.register(process.sentinel, selectors.EVENT_READ, None)
        if settings.boot_timeout > 0:
            worker.boot_timer = timers.call_later(settings.boot_timeout, pool._boot_timed_out, worker)
        return worker

    monkeypatch.setattr(pool, "_spawn", spawn)
    listener = socket.create_server(("127.0.0.1", 0))
    clients = []

    def client(data: bytes):
        sock = socket.create_connection(listener.getsockname())
        served, _ = listener.accept()
        clients.append(sock)
        conn = acceptor.add_connection(served, "peer")
        sock.sendall(data)
        wait_until(lambda: acceptor.on_read(conn) or conn.next_seq >= data.count(b"\n"), what="lines read")
        return sock, conn

    def cleanup():
        for worker in list(pool.workers):
            worker.process.kill()
            worker.process.join()
        for sock in clients + worker_ends:
            sock.close()
        listener.close()
        selector.close()

    pool.worker_ends = worker_ends
    return pool, acceptor, timers, client, cleanup


def test_a_worker_condemned_by_boot_timeout_is_not_given_rpcs_when_its_hello_comes_late(monkeypatch):
    """boot_timeout fires (SIGUSR1 now, SIGKILL DUMP_GRACE_S later), then the worker's HELLO
    arrives inside that grace: _on_hello makes it a booted, accepting worker, dispatch hands it
    the waiting RPCs, and the kill armed by _boot_timed_out then fails the one it runs with
    WorkerCrashed (and _hand_over may already have retired an old worker for it)."""

    pool, acceptor, timers, client, cleanup = _hand_driven_pool(monkeypatch, workers=1, spare_workers=0, boot_timeout=1.0)
    try:
        pool.start()
        [worker] = pool.workers
        pool.ever_booted = True
        timers.run_due(time.monotonic() + 1.05)  # boot_timeout passed: SIGUSR1, kill armed
        assert worker.killed_for and worker.kill_timer is not None
        pool._on_hello(worker, INFO)  # ... and the HELLO arrives within DUMP_GRACE_S
        sock, conn = client(b'echo{"i":1}\n')
        pool.dispatch()
        assert not worker.jobs, (
            f"{len(worker.jobs)} RPC(s) handed to worker {worker.worker_id}, whose SIGKILL is due in "
            f"{worker.kill_timer.when - time.monotonic():.2f}s ({worker.killed_for})"
        )
    finally:
        cleanup()


def test_an_rpc_after_a_timed_out_one_is_not_run_by_the_condemned_worker(start_server, tmp_path):
    """--timeout 0.5: a serial RPC of 0.6 s, then one of 0.45 s in the same pipelined job. The
    first is past its deadline: the worker is condemned (SIGUSR1, SIGKILL DUMP_GRACE_S later). It
    still finishes the first and starts the second, which the kill then fails with WorkerCrashed:
    an RPC within its own timeout fails for another's. (The give-back/take-back machinery could
    hand the rest to another worker: the condemned worker's claim and time-slice checks are
    never told.)"""
    log_path, env = _env(tmp_path)
    server = serve(start_server, "--handlers", OPS, "--timeout", "0.5", env=env)
    conn = RawConn(server, timeout=30)
    frames = [("rs", {"t": 0, "i": 0, "ms": 600}), ("rs", {"t": 0, "i": 1, "ms": 450}), ("rs", {"t": 0, "i": 2, "ms": 1})]
    conn.send(frames)
    drive([conn], lambda: len(conn.answers) >= 3, timeout=30)
    got = [(kind, answer.get("reason") or answer.get("i")) for kind, answer in conn.answers]
    assert got[1] == ("OKAY", 1), f"the 0.45 s RPC, within its timeout, got {got[1]} (all: {got})"
    finish(server)


# -- fairness: a pipelining client that is served as a "sparse" one ------------------------------


def test_a_pipelining_client_of_one_op_at_a_time_is_not_served_as_a_light_one():
    """scheduler.py: "A client can't game it by pipelining: the more it queues, the more of its
    work waits in old". A client whose pipelined RPCs form one job each (serial ones between
    concurrent ones, or lines past MAX_JOB_BYTES) never has more than one job runnable, so each
    job it queues is pushed with ``conn.running == len(conn.runnable)`` and goes to ``new``,
    ahead of every connection in ``old``: five such clients with 40 RPCs queued each get their
    next RPC served before a light client's one that arrived after them (with concurrent-only
    backlogs the light RPC goes first)."""
    from simplerpc_mp.acceptor import Acceptor
    from simplerpc_mp.config import Settings
    from simplerpc_mp.timers import Timers

    with selectors.DefaultSelector() as selector, socket.create_server(("127.0.0.1", 0)) as listener:
        acceptor = Acceptor(Settings(), selector, Timers())
        acceptor.set_handler_info({"concurrent": ["c"], "connect": False, "disconnect": False})
        socks = []

        def connect(data: bytes):
            sock = socket.create_connection(listener.getsockname())
            served, _ = listener.accept()
            socks.append(sock)
            conn = acceptor.add_connection(served, "peer")
            sock.sendall(data)
            wait_until(lambda: acceptor.on_read(conn) or conn.next_seq >= data.count(b"\n"), what="read")
            return conn

        heavy = [connect(b's{}\nc{}\n' * 20) for _ in range(5)]  # 40 RPCs queued each
        scheduler = acceptor.scheduler
        first = [job for _ in heavy for job in scheduler.take_batch(1)]  # each heavy client's first job goes to a worker
        assert {job.conn for job in first} == set(heavy)
        for job in first:
            acceptor.job_done(job)  # ... and finishes: each heavy client's next job is runnable
        light = connect(b"s{}\n")  # a light client's one RPC arrives
        order = [scheduler.take_batch(1)[0].conn for _ in range(len(heavy) + 1)]
        ahead = order.index(light)
        for sock in socks:
            sock.close()
        assert ahead == 0, f"{ahead} jobs of pipelining clients (40 RPCs queued each) went before the light client's RPC"


def test_scale_down_while_a_spare_is_owed_spawns_one_spare(monkeypatch):
    """manage() is re-entered through retire(): a TTOU that comes while a spare is still owed
    (its respawn back-off just over, the retry timer not yet run) retires a worker, whose
    retire() -> manage() spawns the owed spare, and then the outer manage() spawns it again from
    its stale list: two spares for spare_workers = 1."""
    pool, acceptor, timers, client, cleanup = _hand_driven_pool(monkeypatch, workers=2, spare_workers=1, boot_timeout=0)
    try:
        pool.start()
        pool.ever_booted = True
        for worker in pool.workers:
            pool._on_hello(worker, INFO)
        spare = next(w for w in pool.workers if w.spare)
        pool.respawn_after = time.monotonic() + 60  # backing off (a refused spawn, say)
        spare.process.kill()
        spare.process.join()
        pool.on_exit(spare)  # the spare is lost; its replacement waits for the back-off
        assert sum(w.spare for w in pool.workers) == 0
        pool.respawn_after = time.monotonic() - 0.001  # back-off over, its timer not run yet
        pool.scale(-1)  # TTOU
        spares = [w for w in pool.workers if w.spare and w.accepting]
        assert len(spares) == 1, f"{len(spares)} spares spawned for spare_workers = 1"
    finally:
        cleanup()


def test_a_timed_out_worker_keeps_no_unstarted_rpcs_of_other_connections(monkeypatch):
    """Worker 1 runs RPC A past --timeout 0.5 with B (another client's) queued behind it; worker 2
    is busy. _time_out condemns worker 1 (SIGKILL in DUMP_GRACE_S), but B stays on it: balance
    takes back only after HUNG_AGE_NS when no worker is idle. If A returns within the grace,
    worker 1 claims and starts B, and the kill fails B with WorkerCrashed. Nothing stops the
    take-back at once: worker 1 will never be given the chance to finish B."""
    from simplerpc_mp import ipc

    pool, acceptor, timers, client, cleanup = _hand_driven_pool(
        monkeypatch, workers=2, spare_workers=0, timeout=0.5, boot_timeout=0)
    try:
        pool.start()
        pool.ever_booted = True
        w1, w2 = pool.workers
        for worker in (w1, w2):
            pool._on_hello(worker, INFO)
        for _ in range(3):
            client(b'echo{}\n')
        scheduler = acceptor.scheduler
        [a], [b], [c] = scheduler.take_batch(1), scheduler.take_batch(1), scheduler.take_batch(1)
        pool.send_batch(w1, [a])
        pool.send_batch(w1, [b])
        pool.send_batch(w2, [c])
        now = time.monotonic_ns()
        for worker, job, started in ((w1, a, now - 600_000_000), (w2, c, now)):
            board = worker.board
            board[ipc.BOARD_CLAIMED] = board[ipc.BOARD_JOB] = job.job_id
            board[ipc.BOARD_START_NS], board[ipc.BOARD_TIMEOUT_MS] = started, 500
        pool.check_deadline(w1)
        pool.check_deadline(w1)  # the same board a moment later: timed out
        assert w1.timed_out is not None and w1.kill_timer is not None
        pool.dispatch()
        assert b not in w1.jobs, "an unstarted RPC of another client left on a worker whose SIGKILL is due"
    finally:
        cleanup()
