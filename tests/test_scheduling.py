"""Scheduling: fair turns across connections, nothing stuck behind a slow RPC, spare workers.

Real servers (``tests/conftest.py``) with two workers and ``tests/handlers/sched_ops.py``, whose
answers say when each RPC started on the machine-wide monotonic clock. Every property is checked
by counting (which RPCs started before which, how many answers came), never by timing, and every
RPC sent must get exactly one answer, in order.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from .conftest import wait_until
from .test_supervisor import RawConn, all_answered, check_answers, drive, end_marker, finish, gone, serve, worker_pids

SCHED = "tests.handlers.sched_ops"


def started_between(conns: list[RawConn], after_ns: int, before_ns: int) -> int:
    """How many answered RPCs of ``conns`` started in the window (after_ns, before_ns)."""
    return sum(
        1 for conn in conns for kind, data in conn.answers
        if kind == "OKAY" and "start_ns" in data and after_ns < data["start_ns"] < before_ns
    )


def heavy_rpcs_ahead_of_a_light_one(server, heavy: list[RawConn], frames: list, light_frame: tuple) -> int:
    """The heavy clients send their backlogs; once each has had its first turn (so all of them
    keep work queued), a light client sends one RPC. Every answer is checked; returns how many
    heavy RPCs started between the light RPC's sending and its start."""
    for conn, fr in zip(heavy, frames):
        conn.send(fr + [end_marker(len(fr))])
    drive(heavy, lambda: all(c.answers for c in heavy), timeout=30)
    light = RawConn(server)
    sent_ns = time.monotonic_ns()
    light.send([light_frame])
    drive(heavy + [light], lambda: light.answers, timeout=30)
    light_start = light.answers[0][1]["start_ns"]
    drive(heavy, all_answered(heavy), timeout=60)
    for conn, fr in zip(heavy, frames):
        assert check_answers(conn, fr, allowed_fail=()) == []
    return started_between(heavy, sent_ns, light_start)


@pytest.mark.parametrize("heavy_clients", [1, 10])
def test_a_light_client_is_served_before_the_heavy_clients_backlog(start_server, heavy_clients):
    """Heavy clients pipeline 120 concurrent 2.5 ms RPCs between them, then a light client sends
    one. Before its RPC starts, only a few of the heavy RPCs queued ahead of it may start (a
    worker's current and next one), not the backlog (first come, first served ran ~100)."""
    server = serve(start_server, "--handlers", SCHED)
    heavy = [RawConn(server) for _ in range(heavy_clients)]
    per_client = 120 // heavy_clients
    frames = [[("spin", {"ms": 2.5, "i": i}) for i in range(per_client)] for _ in heavy]
    ahead = heavy_rpcs_ahead_of_a_light_one(server, heavy, frames, ("spin", {"ms": 2.5, "i": 0}))
    assert ahead <= 6, f"{ahead} heavy RPCs started between the light RPC's arrival and its start"
    finish(server)


def test_a_serial_backlog_is_cut_at_a_time_slice(start_server):
    """Two clients pipeline 30 serial 20 ms RPCs each (a backlog that would hold each worker for
    600 ms); a third client's one RPC starts before more than a few of those lines do."""
    server = serve(start_server, "--handlers", SCHED)
    heavy = [RawConn(server) for _ in range(2)]
    frames = [[("sspin", {"ms": 20, "i": i}) for i in range(30)] for _ in heavy]
    ahead = heavy_rpcs_ahead_of_a_light_one(server, heavy, frames, ("stamp", {"i": 0}))
    assert ahead <= 4, f"{ahead} backlog RPCs started between the light RPC's arrival and its start"
    finish(server)


def test_no_rpc_waits_behind_a_blocked_handler(start_server, tmp_path):
    """--timeout 0, one client's handler blocks (until the test releases it); four other clients
    keep pinging. Every ping is answered while the handler still blocks: nothing handed to the
    blocked worker stays there (it is taken back for the other worker)."""
    server = serve(start_server, "--handlers", SCHED, "--timeout", "0")
    release = tmp_path / "release"
    blocker = RawConn(server)
    blocker.send([("block", {"path": str(release), "i": 0})])
    pingers = [RawConn(server, timeout=30) for _ in range(4)]
    rounds = 150
    for round_ in range(rounds):
        for conn in pingers:
            conn.send([("echo", {"i": round_})])
        drive(pingers, all_answered(pingers), timeout=20)
    assert not blocker.answers, "the blocking handler was released early"
    for conn in pingers:
        assert [data["i"] for _, data in conn.answers] == list(range(rounds))
    release.touch()
    drive([blocker], all_answered([blocker]), timeout=30)
    assert blocker.answers[0][0] == "OKAY"
    finish(server)


def test_order_per_connection_holds_through_take_backs(start_server):
    """Mixed serial and concurrent RPCs of several clients while RPCs that run 30 ms make workers
    give back and take back work: every answer in order, exactly once."""
    server = serve(start_server, "--handlers", SCHED)
    conns = [RawConn(server) for _ in range(5)]
    frames = [
        [(("spin", "sspin", "stamp")[(c + i) % 3], {"ms": 30 if i % 7 == 0 else 0.2, "i": i}) for i in range(60)]
        for c in range(5)
    ]
    for conn, fr in zip(conns, frames):
        conn.send(fr + [end_marker(len(fr))])
    drive(conns, all_answered(conns), timeout=60)
    for conn, fr in zip(conns, frames):
        assert check_answers(conn, fr, allowed_fail=()) == []
    finish(server)


# -- spare workers -------------------------------------------------------------------------------


def pool_at_rest(server, size: int) -> set[int]:
    return wait_until(lambda: len(worker_pids(server)) == size and worker_pids(server), 30, what=f"{size} workers")


def test_kill9_with_a_spare_loses_nothing_and_restores_the_pool(start_server):
    """Two workers and a spare, pipelined load, a serving worker killed with SIGKILL: the spare
    takes over (logged), every RPC is answered once and in order (only the running one may fail
    WorkerCrashed), and the pool comes back to 2 + 1."""
    server = serve(start_server, "--handlers", SCHED, "--spare-workers", "1")
    server.wait_log(r"as a spare")
    before = pool_at_rest(server, 3)
    conns = [RawConn(server) for _ in range(4)]
    frames = [[(("sspin", "spin")[(c + i) % 2], {"ms": 3, "i": i}) for i in range(60)] for c in range(4)]
    for conn, fr in zip(conns, frames):
        conn.send(fr + [end_marker(len(fr))])
    drive(conns, lambda: sum(len(c.answers) for c in conns) >= 20, timeout=30)
    victim = next(data["pid"] for conn in conns for kind, data in conn.answers if kind == "OKAY" and "pid" in data)
    os.kill(victim, signal.SIGKILL)
    drive(conns, all_answered(conns), timeout=60)
    failed = sum(len(check_answers(conn, fr)) for conn, fr in zip(conns, frames))
    assert failed <= 1, failed
    server.wait_log(r"spare booted, now serving")
    after = pool_at_rest(server, 3)
    assert victim not in after and len(before - after) == 1
    finish(server)


def test_ttin_ttou_and_hup_with_a_spare(start_server):
    """TTIN adds a serving worker (the spare is promoted, a new spare boots), TTOU retires one;
    HUP replaces every worker, spare included; RPCs keep being answered throughout."""
    server = serve(start_server, "--handlers", SCHED, "--spare-workers", "1")
    server.wait_log(r"as a spare")
    first = pool_at_rest(server, 3)
    with server.client() as client:
        server.send(signal.SIGTTIN)
        server.wait_log(r"spare booted, now serving")
        pool_at_rest(server, 4)
        assert client.call("echo", {"x": 1}, timeout=20)["x"] == 1
        server.send(signal.SIGTTOU)
        server.wait_log(r"retiring: scaling down")
        pool_at_rest(server, 3)
        server.send(signal.SIGHUP)
        wait_until(lambda: not (first & worker_pids(server)) and len(worker_pids(server)) == 3, 60,
                   what="every worker replaced by the reload")
        assert client.call("echo", {"x": 2}, timeout=20)["x"] == 2
    assert all(gone(pid) for pid in first)
    finish(server)
