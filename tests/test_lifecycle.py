"""The pool's life cycle at its edges: stopping on failure, running out of descriptors, workers
that hang while they boot, and kills the supervisor decides itself.

Real ``simplerpc-mp serve`` processes (``tests/conftest.py``) with real workers, signals and
resource limits, except two tests that drive a ``Pool`` without processes to check one decision
exactly. Helpers come from ``test_supervisor.py``.
"""

from __future__ import annotations

import errno
import os
import re
import resource
import selectors
import signal
import socket
import time

import pytest

from .conftest import RunningServer, wait_until
from .test_supervisor import BASIC, RawConn, _run_serve, drive, finish, gone, serve, worker_pids

# -- every RPC is answered, whatever stops the server -----------------------------------------


def test_exit_4_answers_every_rpc_it_held(start_server, tmp_path):
    """One good worker, then every replacement dies in on_start (tests/handlers/sup_crashloop.py).
    A crash takes the good worker while 99 RPCs wait behind the crashed one; then 50 more come
    on another connection while no worker serves. The server gives up with exit 4, and every
    RPC sent got exactly one answer first: WorkerCrashed for the crashed one, ShuttingDown for
    the rest. (They used to get nothing: the connections were just closed.)"""
    slots = tmp_path / "slots"
    slots.mkdir()
    env = {"SUP_CRASHLOOP_DIR": str(slots), "SUP_CRASHLOOP_GOOD": "1"}
    server = serve(start_server, "--handlers", "tests.handlers.sup_crashloop", workers=1, env=env)
    a, b = RawConn(server), RawConn(server)
    drive([a, b], lambda: bool(a.pushes and b.pushes))  # both on_connect hooks have run
    a.send([("crash", {"code": 5})] + [("echo", {"i": i}) for i in range(1, 100)])
    drive([a], lambda: bool(a.answers))
    b.send([("echo", {"i": i}) for i in range(50)])
    drive([a, b], lambda: a.eof and b.eof, timeout=30)
    assert server.proc.wait(10) == 4, server.log()
    assert [(kind, data["reason"]) for kind, data in a.answers] == [("FAIL", "WorkerCrashed")] + [("FAIL", "ShuttingDown")] * 99
    assert [(kind, data["reason"]) for kind, data in b.answers] == [("FAIL", "ShuttingDown")] * 50
    log = server.log()
    assert re.search(r"149 RPCs answered ShuttingDown", log), log
    assert re.search(r"simplerpc-mp: error: workers keep failing to start", log), log
    a.close()
    b.close()


# -- out of file descriptors ------------------------------------------------------------------


def _limit_open_files(n: int):
    def limit() -> None:  # in the child, before exec: soft = hard, so the server cannot raise it
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))

    return limit


def test_a_worker_lost_while_out_of_descriptors_is_replaced(tmp_path):
    """ulimit -n 256, one worker, --timeout 2, and 300 clients: the acceptor runs out of
    descriptors. An RPC times out, so its worker is killed: a replacement must still start (the
    pool keeps descriptors in reserve for that) and serve. It used to fail with "[Errno 24]",
    then "[Errno 9] Bad file descriptor", and was never tried again: no worker, nothing answered."""
    server = RunningServer(
        ["--host", "127.0.0.1", "--port", "0", "--workers", "1", "--timeout", "2", "--handlers", BASIC],
        preexec_fn=_limit_open_files(256),
    )
    flood: list[socket.socket] = []
    try:
        server.wait_ready()
        server.wait_log(r"WARNING .*max_connections \(10000\) .* more than the limit of 256 \(ulimit -n\)")
        first = RawConn(server)
        drive([first], lambda: bool(first.pushes))  # accepted, and its on_connect hook has run
        for _ in range(300):
            flood.append(socket.create_connection((server.host, server.port), timeout=10))
        server.wait_log(r"accept failed \(Too many open files\)")
        first.send([("hang", {}), ("echo", {"i": 1})])
        drive([first], lambda: len(first.answers) == 2, timeout=30)
        assert first.answers == [("FAIL", first.answers[0][1]), ("OKAY", {"i": 1})], first.answers
        assert first.answers[0][1]["reason"] == "Timeout"
        log = server.wait_log(r"worker \d+ booted", count=2)
        assert "Bad file descriptor" not in log and "cannot start a worker" not in log, log
        for sock in flood:
            sock.close()
        flood.clear()
        first.close()
        # The descriptors freed, new clients are served.
        wait_until(lambda: _echo(server), 20, what="a new connection served")
        assert server.stop(signal.SIGTERM, timeout=30) == 0, server.log()
    finally:
        for sock in flood:
            sock.close()
        server.kill()


def _echo(server) -> bool:
    try:
        with server.client(connect_timeout=2) as client:
            return client.call("echo", {"x": 1}, timeout=5) == {"x": 1}
    except (OSError, TimeoutError):
        return False


def _pool_without_processes(**changes):
    from simplerpc_mp.acceptor import Acceptor
    from simplerpc_mp.config import Settings
    from simplerpc_mp.supervisor import Pool
    from simplerpc_mp.timers import Timers

    settings = Settings().with_changes(workers=1, spare_workers=0, **changes)
    selector = selectors.DefaultSelector()
    timers = Timers()
    acceptor = Acceptor(settings, selector, timers)
    pool = Pool(settings, BASIC, selector, timers, acceptor, lambda: None, lambda: None)
    return pool, selector, timers


def test_a_refused_spawn_always_arms_its_retry(monkeypatch):
    """The OS refuses a worker (EMFILE) inside manage(): the retry is armed then, not left to
    some later event that may never come (the pool stayed short for good)."""
    pool, selector, timers = _pool_without_processes()
    pool.ever_booted = True  # (before the first boot, a refusal stops the server: exit 4)
    tries = []

    def refuse(spare: bool):
        tries.append(spare)
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(pool, "_spawn", refuse)
    with selector:
        pool.manage()
        assert tries == [False]
        due = pool.respawn_after
        assert timers.timeout(time.monotonic()) is not None, "no retry armed"
        timers.run_due(due)
        assert tries == [False, False]
        assert timers.timeout(time.monotonic()) is not None, "no retry armed after the second refusal"
        # A shortage is no reason to stop serving: refusals never end in exit 4.
        for _ in range(10):
            timers.run_due(pool.respawn_after)
        assert len(tries) == 12
        pool.kill_all()


def test_a_spawn_that_fails_half_way_reports_its_own_error_and_closes_its_sockets(monkeypatch):
    """process.start() fails (EMFILE): the error says so (it used to be "[Errno 9] Bad file
    descriptor", from a socket used after it was closed) and no socket of the pair is left open."""
    pool, selector, _ = _pool_without_processes()
    real_ctx = pool.ctx

    class RefusedProcess:
        def __init__(self, *args, **kwargs):
            pass

        def start(self):
            raise OSError(errno.EMFILE, "Too many open files")

    class Context:
        RawArray = staticmethod(real_ctx.RawArray)
        Lock = staticmethod(real_ctx.Lock)
        Process = RefusedProcess

    monkeypatch.setattr(pool, "ctx", Context)
    before = _open_sockets()
    with selector, pytest.raises(OSError) as info:
        pool._spawn(False)
    assert info.value.errno == errno.EMFILE, info.value
    assert _open_sockets() == before


def _open_sockets() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:
            pass  # the listing's own descriptor, gone by now
    return count


# -- boot_timeout -----------------------------------------------------------------------------

HANGS_AT_IMPORT = '''\
import time

from simplerpc_mp import Handlers

handlers = Handlers()


def wait_for_a_database():
    while True:
        time.sleep(3600)


wait_for_a_database()
'''

HANGS_IN_ON_START = '''\
import time

from simplerpc_mp import Handlers

handlers = Handlers()


@handlers.on_start
def wait_for_a_database(options):
    while True:
        time.sleep(3600)
'''


@pytest.mark.parametrize("source", [HANGS_AT_IMPORT, HANGS_IN_ON_START], ids=["import", "on_start"])
def test_a_worker_that_hangs_while_booting_is_killed_after_boot_timeout(start_server, tmp_path, source):
    """A handler module that never finishes loading: each worker is killed after boot_timeout
    with a line naming the module and its stack (faulthandler) showing where it hung; those are
    boot failures, so with nothing ever booted the server gives up: exit 4. It used to hang
    silently, forever."""
    (tmp_path / "sup_hang_mod.py").write_text(source)
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    code, _, log, server = _run_serve(start_server, "--handlers", "sup_hang_mod", "--boot-timeout", "1",
                                      env=env, timeout=60)
    assert code == 4, log
    assert server.proc.stdout.read() == b"", "it must not have listened"
    assert re.search(r"ERROR .*worker \d+ \(pid \d+\) has not booted after boot_timeout \(1s\): loading handlers "
                     r"'sup_hang_mod' hangs", log), log
    assert re.search(r'File ".*sup_hang_mod\.py", line \d+ in wait_for_a_database', log), log
    assert re.search(r"simplerpc-mp: error: workers keep failing to start \(\d+ in a row\): worker \d+ failed to start: "
                     r"did not boot within boot_timeout \(1s\) loading handlers 'sup_hang_mod'", log), log
    assert " died" not in log and "Traceback" not in log, log


# -- kills the supervisor decided are no crashes ------------------------------------------------


def test_a_worker_killed_for_not_stopping_in_time_is_not_a_crash(start_server):
    """A worker asked to stop (here TTOU retires it) that does not leave within 10 s is killed:
    the log says it was killed for that, not that it "died ... (perhaps out of memory?)", and
    it is not counted in the crashes. (A frozen process, SIGSTOP, is the worker that won't go.)"""
    server = serve(start_server, "--handlers", BASIC)
    newest = max(int(pid) for pid in re.findall(r"worker 2 booted \(pid (\d+)\)", server.log()))
    os.kill(newest, signal.SIGSTOP)
    server.send(signal.SIGTTOU)  # retires the newest worker first
    log = server.wait_log(rf"\(pid {newest}\) gone \(killed by signal SIGKILL\): did not stop in time", timeout=30)
    assert re.search(rf"WARNING .*worker 2 \(pid {newest}\) killed: did not stop in time", log), log
    assert " died" not in log and "out of memory" not in log, log
    wait_until(lambda: gone(newest), 5, what="the frozen worker to be gone")
    with server.client() as client:
        assert client.call("echo", {"x": 1}) == {"x": 1}
    assert len(worker_pids(server)) == 1
    finish(server)
    assert "stopped (worker crashes: 0," in server.log(), server.log()
