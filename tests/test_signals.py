"""Signals sent to a real ``simplerpc-mp serve``: TERM, INT (once, twice), QUIT, HUP (reload,
good and broken code), TTIN / TTOU, and SIGKILL of the acceptor itself (no orphan workers).

The checks are the operator's promises of issue 3: a graceful stop answers every RPC already
received and exits 0; a reload swaps the code without failing an RPC or closing a connection;
a bad deploy never takes the service down. Helpers come from ``test_supervisor.py``.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time

import psutil
import pytest

from simplerpc_mp import RemoteError

from .conftest import wait_until
from .test_supervisor import (
    BASIC,
    SUP_OPS,
    RawConn,
    all_answered,
    check_answers,
    drive,
    end_marker,
    finish,
    gone,
    serve,
    worker_pids,
)

# -- graceful and immediate stops --------------------------------------------------------------


def test_term_answers_every_rpc_in_flight_then_exits_0(start_server):
    server = serve(start_server, "--handlers", BASIC)
    pids = worker_pids(server)
    conns = [RawConn(server) for _ in range(3)]
    frames = [[("slow", {"s": 0.02, "i": i}) for i in range(25)] for _ in conns]
    for conn, fr in zip(conns, frames):
        conn.send(fr + [end_marker(len(fr))])
    drive(conns, lambda: all(conn.answers for conn in conns))  # every RPC was received
    server.send(signal.SIGTERM)
    server.wait_log("stopping gracefully")
    with pytest.raises(ConnectionRefusedError):  # it stopped accepting
        socket.create_connection((server.host, server.port), timeout=5).close()
    drive(conns, lambda: all(conn.eof for conn in conns))  # answers, then the server closes
    for conn, fr in zip(conns, frames):
        assert check_answers(conn, fr, allowed_fail=()) == []
        conn.close()
    assert server.proc.wait(10) == 0, server.log()
    assert all(gone(pid) for pid in pids), pids
    assert " ERROR " not in server.log(), server.log()


def test_graceful_timeout_fails_what_is_left_with_shutting_down(start_server, tmp_path):
    """--graceful-timeout 1 with a hung RPC (and one queued behind it): both FAIL
    ShuttingDown about 1 s after TERM; exit 0; no worker left."""
    server = serve(start_server, "--handlers", SUP_OPS, "--graceful-timeout", "1")
    pids = worker_pids(server)
    mark = tmp_path / "hung"
    conn = RawConn(server)
    conn.send([("mark_hang", {"path": str(mark)}), ("echo", {"i": 1})])
    wait_until(mark.exists, 10, what="the hang to start")
    started = time.monotonic()
    server.send(signal.SIGTERM)
    drive([conn], lambda: conn.eof)
    assert [(kind, data["reason"]) for kind, data in conn.answers] == [("FAIL", "ShuttingDown")] * 2, conn.answers
    assert server.proc.wait(10) == 0, server.log()
    elapsed = time.monotonic() - started
    assert 0.9 <= elapsed <= 5, elapsed
    assert all(gone(pid) for pid in pids), pids
    conn.close()


@pytest.mark.parametrize("second", [signal.SIGINT, signal.SIGQUIT], ids=["INT", "QUIT"])
def test_second_interrupt_or_quit_stops_at_once(start_server, tmp_path, second):
    """The first SIGINT starts a graceful stop (which would wait 30 s for the hung RPC); a
    second SIGINT, or QUIT, stops now: the hung RPC gets ShuttingDown, no worker is left."""
    server = serve(start_server, "--handlers", SUP_OPS)
    pids = worker_pids(server)
    mark = tmp_path / "hung"
    conn = RawConn(server)
    conn.send([("mark_hang", {"path": str(mark)})])
    wait_until(mark.exists, 10, what="the hang to start")
    server.send(signal.SIGINT)
    server.wait_log("stopping gracefully")
    started = time.monotonic()
    server.send(second)
    drive([conn], lambda: conn.eof)
    assert [(kind, data.get("reason")) for kind, data in conn.answers] == [("FAIL", "ShuttingDown")], conn.answers
    code = server.proc.wait(10)
    elapsed = time.monotonic() - started
    assert elapsed < 3, elapsed
    assert code == 0, server.log()
    wait_until(lambda: all(gone(pid) for pid in pids), 1, what="the workers to be gone")
    conn.close()


def test_term_when_idle_exits_0_quickly(start_server):
    server = serve(start_server, "--handlers", BASIC)
    with server.client() as client:
        assert client.call("echo", {"x": 1}) == {"x": 1}
        started = time.monotonic()
        finish(server)
        assert time.monotonic() - started < 3
        # The server closed the idle connection on its way out.
        with pytest.raises(ConnectionError):
            client.call("echo", {}, timeout=5)


# -- reload ------------------------------------------------------------------------------------

RELOAD_MODULE = '''\
import os
import time

from simplerpc_mp import Handlers

handlers = Handlers()
VERSION = {version}


@handlers.on("version")
def version(conn, data):
    return {{"v": VERSION, "pid": os.getpid()}}


@handlers.on("echo")
def echo(conn, data):
    return data


@handlers.on("work")
def work(conn, data):
    time.sleep(data.get("s", 0.005))
    return {{"i": data.get("i"), "v": VERSION}}


OPTIONS = {{}}


@handlers.on_start
def keep_options(options):
    OPTIONS.update(options)
    time.sleep(float(os.environ.get("SUP_RELOAD_BOOT_S", "0")))  # a slow boot, when a test asks


@handlers.on("options")
def options(conn, data):
    return OPTIONS


@handlers.on("hang")
def hang(conn, data):
    while True:
        time.sleep(3600)


@handlers.on("session_set")
def session_set(conn, data):
    conn.session.update(data)


@handlers.on("session_get")
def session_get(conn, data):
    return dict(conn.session)
'''


class Caller(threading.Thread):
    """Calls ``version`` in a loop over one connection until stopped; records every answer."""

    def __init__(self, server):
        super().__init__(daemon=True)
        self.client = server.client()
        self.versions: list[int] = []
        self.errors: list[Exception] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                self.versions.append(self.client.call("version", {}, timeout=20)["v"])
            except Exception as exc:  # recorded, and the test fails on it
                self.errors.append(exc)
                return

    def seen(self, version: int, count: int = 1):
        return lambda: self.errors or self.versions.count(version) >= count

    def finish(self) -> None:
        self.halt.set()
        self.join(25)
        self.client.close()
        assert not self.is_alive()
        assert not self.errors, self.errors


def _reload_server(start_server, tmp_path, *args, env: dict | None = None):
    module = tmp_path / "sup_reload_mod.py"
    module.write_text(RELOAD_MODULE.format(version=1))
    env = {
        "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "PYTHONDONTWRITEBYTECODE": "1",  # a rewrite in the same second must not meet a stale .pyc
        **(env or {}),
    }
    return module, serve(start_server, "--handlers", "sup_reload_mod", *args, env=env)


def test_hup_reloads_changed_code_without_failing_an_rpc(start_server, tmp_path):
    module, server = _reload_server(start_server, tmp_path)
    old = worker_pids(server)
    caller = Caller(server)
    caller.start()
    loaded = RawConn(server)
    frames = [("work", {"i": i, "s": 0.005}) for i in range(300)]
    with server.client() as client:
        client.call("session_set", {"kept": "across the reload"})
        wait_until(caller.seen(1, 5), 10, what="answers from version 1")
        loaded.send(frames + [end_marker(len(frames))])
        module.write_text(RELOAD_MODULE.format(version=2) + "\n# version 2\n")
        server.send(signal.SIGHUP)
        wait_until(caller.seen(2, 5), 15, what="answers from version 2")
        # Once every old worker has left, only the new code answers; the connections stayed open.
        wait_until(lambda: not (old & worker_pids(server)) and len(worker_pids(server)) == 2, 15,
                   what="the old workers to be replaced")
        assert client.call("version")["v"] == 2
        assert client.call("session_get") == {"kept": "across the reload"}
    drive([loaded], all_answered([loaded]))
    caller.finish()
    assert check_answers(loaded, frames, allowed_fail=()) == []
    versions = {data["v"] for _, data in loaded.answers[:-1]}
    assert versions <= {1, 2}, versions
    assert caller.versions[-1] == 2
    log = server.log()
    assert " ERROR " not in log and " died" not in log, log
    assert len(re.findall(r"retiring: replaced by reload", log)) == 2, log
    finish(server)


def test_second_hup_during_a_reload_restarts_it(start_server, tmp_path):
    """HUP, then HUP again while the first reload's workers are still booting (a deploy script
    that signals twice): the first reload's workers are killed before they boot (logged as
    superseded, not as failures), and in the end 2 workers serve, all running the latest code."""
    module, server = _reload_server(start_server, tmp_path, env={"SUP_RELOAD_BOOT_S": "0.5"})
    old = worker_pids(server)
    module.write_text(RELOAD_MODULE.format(version=2))
    server.send(signal.SIGHUP)
    server.wait_log(r"starting 2 workers of generation 1")
    module.write_text(RELOAD_MODULE.format(version=3) + "\n# version 3\n")
    server.send(signal.SIGHUP)
    server.wait_log(r"starting 2 workers of generation 2")
    log = server.wait_log(r"gone \(killed by signal SIGKILL\): superseded by a newer reload before it booted", count=2)
    between = log[log.index("generation 1"):log.index("generation 2")]
    assert not re.search(r"worker \d+ booted", between), "the second HUP came after the first reload booted"
    try:
        wait_until(lambda: not (old & worker_pids(server)) and len(worker_pids(server)) == 2, 15,
                   what="2 workers after the reloads")
    except AssertionError:
        pytest.fail(f"{len(worker_pids(server))} workers after the reloads:\n{server.log()}")
    with server.client() as client:
        assert {client.call("version")["v"] for _ in range(20)} == {3}
    log = server.log()
    assert len(re.findall(r"worker \d+ booted", log)) == 4, log  # 2 first + 2 of the last reload
    assert " died" not in log and "failed to start" not in log, log
    finish(server)
    assert "stopped (worker crashes: 0," in server.log(), server.log()


def test_a_burst_of_hups_never_stacks_generations(start_server, tmp_path):
    """20 HUPs in a second, with workers that take 2 s to boot, so each reload is superseded
    before it boots but the last: at no time do more worker processes live than the 2 serving
    plus the 2 of the reload booting, and in the end 2 workers serve the latest code. (It used
    to boot 80 workers, 38 alive at once.)"""
    module, server = _reload_server(start_server, tmp_path, env={"SUP_RELOAD_BOOT_S": "2"})
    old = worker_pids(server)
    module.write_text(RELOAD_MODULE.format(version=2) + "\n# version 2\n")
    counts: list[int] = []
    halt = threading.Event()

    def sample() -> None:
        while not halt.is_set():
            counts.append(len(worker_pids(server)))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        for _ in range(20):
            server.send(signal.SIGHUP)
            time.sleep(0.05)  # the burst's pace (20 in a second), not a wait for anything
        wait_until(lambda: not (old & worker_pids(server)) and len(worker_pids(server)) == 2, 30,
                   what="the old workers to be replaced")
        with server.client() as client:
            assert {client.call("version")["v"] for _ in range(10)} == {2}
    finally:
        halt.set()
        sampler.join(10)
    assert max(counts) <= 4, (max(counts), server.log())
    log = server.log()
    # HUPs sent while one is pending arrive as one (a loaded machine merges many): count reloads.
    reloads = len(re.findall(r"reloading: starting 2 workers", log))
    superseded = re.findall(r"gone \(killed by signal SIGKILL\): superseded by a newer reload before it booted", log)
    assert reloads >= 2 and len(superseded) == 2 * (reloads - 1), log
    assert len(re.findall(r"worker \d+ booted", log)) == 4, log  # 2 first + 2 of the last reload
    assert " died" not in log and "failed to start" not in log, log
    finish(server)
    assert "stopped (worker crashes: 0," in server.log(), server.log()


def test_hup_with_broken_code_keeps_the_old_workers_serving(start_server, tmp_path):
    module, server = _reload_server(start_server, tmp_path)
    old = worker_pids(server)
    caller = Caller(server)
    caller.start()
    wait_until(caller.seen(1, 3), 10, what="answers from version 1")
    module.write_text("import os\n\ndef broken(:\n")
    server.send(signal.SIGHUP)
    log = server.wait_log(r"ERROR .*reload failed, old workers keep serving: .*SyntaxError", timeout=15)
    assert re.search(r"reload failed.*sup_reload_mod\.py:3", log), log
    count = len(caller.versions)
    wait_until(lambda: caller.errors or len(caller.versions) >= count + 5, 10, what="more answers")
    assert set(caller.versions) == {1}
    assert worker_pids(server) == old, server.log()  # the same workers, still serving
    # A fixed deploy, next: the reload works (the failed one left no stale state behind).
    module.write_text(RELOAD_MODULE.format(version=3))
    server.send(signal.SIGHUP)
    wait_until(caller.seen(3, 3), 15, what="answers from version 3")
    wait_until(lambda: not (old & worker_pids(server)) and len(worker_pids(server)) == 2, 15,
               what="the old workers to be replaced")
    caller.finish()
    finish(server)


def test_bad_deploy_survives_the_loss_of_an_old_worker(start_server, tmp_path):
    """After a reload with broken code, the old workers serve. One of them then dies (kill -9
    here; max_requests recycling or max_worker_memory do the same): its replacements import the
    broken file and fail. The server must go on serving with what it has, not stop: "a bad
    deploy never takes the service down"."""
    module, server = _reload_server(start_server, tmp_path)
    old = sorted(worker_pids(server))
    module.write_text("import os\n\ndef broken(:\n")
    server.send(signal.SIGHUP)
    server.wait_log(r"reload failed, old workers keep serving")
    os.kill(old[0], signal.SIGKILL)
    server.wait_log(rf"\(pid {old[0]}\) died")
    # Give the supervisor the room it takes to give up on a crash loop (5 failed starts with
    # back-off, ~3 s), observed through its log, or until it exits.
    failed = re.compile(r"failed to start")
    try:
        wait_until(lambda: server.proc.poll() is not None or len(failed.findall(server.log())) >= 6, 10,
                   what="the back-off to play out")
    except AssertionError:
        pass  # no fast respawn loop and still up: fine
    assert server.proc.poll() is None, f"the server stopped (exit {server.proc.returncode}):\n{server.log()}"
    with server.client() as client:
        assert client.call("version")["v"] == 1
    finish(server)


def test_hup_applies_new_config_file_values(start_server, tmp_path):
    """HUP: "new workers import the handler module afresh (new code, new config file values
    where they can change live)". The config file's timeout and [handlers.options] change."""
    config = tmp_path / "server.toml"
    config.write_text('timeout = 30\n\n[handlers.options]\ngreeting = "v1"\n')
    module, server = _reload_server(start_server, tmp_path, "--config", str(config))
    old = worker_pids(server)
    with server.client() as client:
        assert client.call("options") == {"greeting": "v1"}
        config.write_text('timeout = 1\n\n[handlers.options]\ngreeting = "v2"\n')
        server.send(signal.SIGHUP)
        wait_until(lambda: not (old & worker_pids(server)) and len(worker_pids(server)) == 2, 15,
                   what="the old workers to be replaced")
        assert client.call("options") == {"greeting": "v2"}
        started = time.monotonic()
        with pytest.raises(RemoteError) as info:
            client.call("hang", {}, timeout=10)
        assert info.value.reason == "Timeout" and time.monotonic() - started < 3, info.value
    finish(server)


# -- scaling -----------------------------------------------------------------------------------


def test_ttin_ttou_change_the_worker_count_never_below_one(start_server):
    server = serve(start_server, "--handlers", BASIC)
    conn = RawConn(server)
    frames = [("slow", {"s": 0.01, "i": i}) for i in range(150)]
    conn.send(frames + [end_marker(len(frames))])

    def scale(signum: int, target: int, occurrence: int) -> None:
        # One signal at a time: two of the same kind sent at once may arrive as one.
        server.send(signum)
        server.wait_log(rf"worker target now {target}\b", count=occurrence)

    scale(signal.SIGTTIN, 3, 1)
    wait_until(lambda: len(worker_pids(server)) == 3, 5, what="3 workers")
    server.wait_log(r"worker 3 booted")
    scale(signal.SIGTTOU, 2, 1)
    wait_until(lambda: len(worker_pids(server)) == 2, 10, what="2 workers")
    scale(signal.SIGTTOU, 1, 1)
    wait_until(lambda: len(worker_pids(server)) == 1, 10, what="1 worker")
    scale(signal.SIGTTOU, 1, 2)  # already at 1: stays there
    with server.client() as client:  # a round trip: the loop has done whatever TTOU caused
        assert client.call("echo", {"x": 1}) == {"x": 1}
    assert len(worker_pids(server)) == 1
    assert len(re.findall(r"retiring: scaling down", server.log())) == 2, server.log()
    drive([conn], all_answered([conn]))
    assert check_answers(conn, frames, allowed_fail=()) == []  # no RPC failed while scaling
    scale(signal.SIGTTIN, 2, 2)
    wait_until(lambda: len(worker_pids(server)) == 2, 5, what="2 workers again")
    conn.close()
    finish(server)


# -- the acceptor killed -----------------------------------------------------------------------


def test_acceptor_sigkill_leaves_no_orphan_workers(start_server, tmp_path):
    """Both workers busy (one sleeping in a handler, one spinning in pure Python): after the
    acceptor is SIGKILLed, every process it started is gone within 1 s."""
    server = serve(start_server, "--handlers", SUP_OPS)
    hung, spun = tmp_path / "hung", tmp_path / "spun"
    a, b = RawConn(server), RawConn(server)
    drive([a, b], lambda: bool(a.pushes and b.pushes))  # both on_connect hooks have run
    a.send([("mark_hang", {"path": str(hung)})])
    wait_until(hung.exists, 10, what="the hang to start")
    b.send([("mark_spin", {"path": str(spun)})])
    wait_until(spun.exists, 10, what="the spin to start")
    busy = {int(hung.read_text()), int(spun.read_text())}
    workers = worker_pids(server)
    assert busy == workers, (busy, workers)  # both workers are busy
    descendants = psutil.Process(server.pid).children(recursive=True)  # workers + resource tracker
    started = time.monotonic()
    server.proc.kill()
    server.proc.wait(5)
    wait_until(lambda: all(gone(p.pid) for p in descendants), 1.0, what="every child process to be gone")
    print(f"\nMEASURED acceptor SIGKILL: all {len(descendants)} child processes gone in "
          f"{(time.monotonic() - started) * 1000:.0f} ms")
    a.close()
    b.close()
