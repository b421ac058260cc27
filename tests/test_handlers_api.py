"""The programmatic API: ``Server(host, port, handlers, workers=N)`` run in this process (its workers
are real spawned processes), the seed's registration style, a script under
``if __name__ == "__main__":`` stopped with SIGINT, and the ``Handlers`` registry's checks.

Handlers given to ``Server`` as an object are pickled by name to the spawned workers, so the
functions below are module-level, and the workers import this module to find them.
"""

from __future__ import annotations

import os
import signal
import socket
import textwrap
import threading
import time

import psutil
import pytest

from simplerpc_mp import Client, Handlers, RemoteError, Server, ServerError, SimpleRPCException
from tests.conftest import wait_until
from tests.test_seed_compat import ScriptOutput, kill_tree, run_script

START_TIMEOUT_S = 60.0

api = Handlers()


class NotANumber(SimpleRPCException):
    pass


@api.on("add")
def add(conn, data):
    if not all(isinstance(data.get(k), (int, float)) for k in ("a", "b")):
        raise NotANumber("a and b must be numbers")
    return {"sum": data["a"] + data["b"]}


@api.on("where", concurrent=True)
def where(conn, data):
    return {"pid": os.getpid()}


@api.on_connect
def api_connect(conn):
    conn.rpc("hi", {"net_id": conn.net_id})


# The seed's style: plain module-level functions, registered on server.handler.
def handle_thanks(connection, data):
    connection.okay_data = {"Custom OKAY data": 123}


def handle_connect(connection):
    connection.rpc("welcome", {"msg": "Welcome to simplerpc"})


def handle_pid(connection, data):
    return {"pid": os.getpid()}


class ServerThread:
    """``server.start()`` in a thread of this process; ``stop()`` asks it to stop and joins."""

    def __init__(self, server: Server):
        self.server = server
        self.result: dict = {}
        self.thread = threading.Thread(target=self._run, name="server-under-test", daemon=True)

    def _run(self) -> None:
        try:
            self.result["code"] = self.server.start()
        except BaseException as exc:  # reported to the test through result
            self.result["error"] = exc
            self.server.ready.set()

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        assert self.server.ready.wait(START_TIMEOUT_S), "server not ready"
        assert "error" not in self.result, self.result
        return self

    def stop(self) -> int:
        self.server.stop()
        self.thread.join(30)
        assert not self.thread.is_alive(), "start() did not return after stop()"
        assert "error" not in self.result, self.result
        return self.result["code"]

    def __exit__(self, *exc) -> None:
        if self.thread.is_alive():
            self.server.stop()
            self.thread.join(30)
            if self.thread.is_alive() and getattr(self.server, "pool", None) is not None:
                self.server.pool.kill_all()


def assert_gone(pids) -> None:
    for pid in pids:
        try:
            proc = psutil.Process(pid)
        except psutil.NoSuchProcess:
            continue
        assert proc.status() == psutil.STATUS_ZOMBIE or not proc.is_running(), f"worker {pid} still running"


def test_server_with_handlers_object_in_a_thread_and_stop_from_another():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    server = Server("127.0.0.1", 0, api, workers=2)
    with ServerThread(server) as running:
        host, port = server.address
        assert port != 0
        # start() runs in a non-main thread: it installs no signal handlers.
        assert {sig: signal.getsignal(sig) for sig in before} == before
        pushes = []
        with Client(host, port) as client:
            client.on("hi", pushes.append)
            assert client.call("add", {"a": 2, "b": 40}) == {"sum": 42}
            with pytest.raises(RemoteError) as info:
                client.call("add", {"a": "x"})
            assert (info.value.reason, info.value.message) == ("NotANumber", "a and b must be numbers")
            pids = set()
            deadline = time.monotonic() + 20
            while len(pids) < 2:
                assert time.monotonic() < deadline, f"concurrent op ran only in {pids}"
                answers = []
                for _ in range(8):
                    client.rpc("where", {}, lambda op, data: answers.append(data["pid"]))
                wait_until(lambda: client.poll(0.05) or len(answers) == 8, what="where answers")
                pids.update(answers)
            assert pushes and set(pushes[0]) == {"net_id"}
            assert pids <= {child.pid for child in psutil.Process().children()}
            code = running.stop()
            # The server closed the client's connection on its way out.
            with pytest.raises(ConnectionError):
                client.call("add", {"a": 1, "b": 1}, timeout=10)
    assert code == 0
    assert_gone(pids)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, port), timeout=5).close()


def test_server_with_module_path():
    server = Server("127.0.0.1", 0, "tests.handlers.basic", workers=1)
    with ServerThread(server) as running:
        with Client(*server.address) as client:
            assert client.call("echo", {"m": 1}) == {"m": 1}
            pid = client.call("pid")["pid"]
        assert running.stop() == 0
    assert_gone([pid])


def test_seed_registration_style_in_process():
    server = Server("127.0.0.1", 0, workers=2)
    server.handler.on("thanks", handle_thanks)
    server.handler.on("pid", handle_pid)
    server.on_connect(handle_connect)
    with ServerThread(server) as running:
        welcomes = []
        with Client(*server.address) as client:
            client.on("welcome", welcomes.append)
            assert client.call("thanks", {"msg": "Thanks for having me simple"}) == {"Custom OKAY data": 123}
            assert welcomes == [{"msg": "Welcome to simplerpc"}]
            with pytest.raises(RemoteError) as info:
                client.call("echo")  # nothing but what was registered
            assert info.value.reason == "UnknownOpcode"
            pid = client.call("pid")["pid"]
        assert running.stop() == 0
    assert_gone([pid])


def test_start_in_the_main_thread_with_stop_from_another_restores_signals():
    """start() in the main thread installs its signal handling and puts the old handlers back."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    server = Server("127.0.0.1", 0, api, workers=1)
    seen = {}

    def drive():
        if not server.ready.wait(START_TIMEOUT_S):
            return
        try:
            seen["during"] = signal.getsignal(signal.SIGTERM)
            with Client(*server.address) as client:
                seen["sum"] = client.call("add", {"a": 1, "b": 2}, timeout=20)["sum"]
        finally:
            server.stop()

    driver = threading.Thread(target=drive, daemon=True)
    watchdog = threading.Timer(60, lambda: os.kill(os.getpid(), signal.SIGQUIT))  # never hang the suite
    driver.start()
    watchdog.start()
    try:
        code = server.start()
    finally:
        watchdog.cancel()
    driver.join(30)
    assert code == 0
    assert seen == {"during": seen["during"], "sum": 3}
    assert seen["during"] is not before[signal.SIGTERM]
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_handlers_that_cannot_be_pickled_fail_at_start():
    local = Handlers()
    local.on("x", lambda conn, data: data)  # not importable by name from a spawned worker
    server = Server("127.0.0.1", 0, local, workers=1)
    started = time.monotonic()
    with pytest.raises(Exception, match="pickle"):
        server.start()
    assert time.monotonic() - started < 10


def test_stop_before_the_workers_have_booted():
    server = Server("127.0.0.1", 0, "tests.handlers.basic", workers=2)
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("code", server.start()), daemon=True)
    thread.start()
    server.stop()
    thread.join(30)
    assert not thread.is_alive() and result == {"code": 0}


def test_a_module_without_handlers_raises_server_error():
    server = Server("127.0.0.1", 0, "tests.handlers.no_handlers", workers=1)
    with pytest.raises(ServerError) as info:
        server.start()
    assert info.value.exit_code == 3
    assert "tests.handlers.no_handlers" in str(info.value) and "Handlers" in str(info.value)


# -- a script under `if __name__ == "__main__":` ----------------------------------------------

SCRIPT = textwrap.dedent(
    '''
    import os
    import sys

    from simplerpc_mp import Handlers, Server

    handlers = Handlers()


    @handlers.on("double", concurrent=True)
    def double(conn, data):
        return {"value": data["value"] * 2, "pid": os.getpid()}


    def handle_thanks(connection, data):
        connection.okay_data = {"Custom OKAY data": 123}


    def handle_connect(connection):
        connection.session["greeted"] = True
        connection.rpc("welcome", {"msg": "Welcome to simplerpc"})


    def handle_greeted(connection, data):
        return {"greeted": connection.session.get("greeted", False)}


    def handle_disconnect(net_id):
        print("Disconnect: %s" % net_id, flush=True)


    if __name__ == "__main__":
        server = Server("127.0.0.1", 0, handlers, workers=2,
                        on_ready=lambda s: print("ready on %s:%s" % s.address, flush=True))
        server.handler.on("thanks", handle_thanks)
        server.handler.on("greeted", handle_greeted)
        server.on_connect(handle_connect)
        server.on_disconnect(handle_disconnect)
        code = server.start()
        print("start() returned %r" % (code,), flush=True)
        sys.exit(code)
    '''
)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_script_with_main_guard_stops_cleanly_on_signal(tmp_path, signum):
    proc = run_script(tmp_path, SCRIPT, "myserver.py")
    try:
        out = ScriptOutput(proc)
        ready = out.wait_for(lambda ls: any(l.startswith("ready on ") for l in ls), what="ready")
        host, port = next(l for l in ready if l.startswith("ready on ")).split()[-1].split(":")
        workers = [p for p in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(p.cmdline())]
        with Client(host, int(port)) as client:
            welcomes = []
            client.on("welcome", welcomes.append)
            assert client.call("thanks", {"msg": "Thanks"}) == {"Custom OKAY data": 123}
            assert welcomes == [{"msg": "Welcome to simplerpc"}]
            assert client.call("greeted") == {"greeted": True}
            assert client.call("double", {"value": 21})["value"] == 42
        out.wait_for(lambda ls: any(l.startswith("Disconnect: ") for l in ls), what="on_disconnect")
        proc.send_signal(signum)
        assert proc.wait(30) == 0
        out.wait_for(lambda ls: "start() returned 0" in ls, what="start() returning 0")
        gone, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive
    finally:
        kill_tree(proc)


# -- the Handlers registry ---------------------------------------------------------------------


@pytest.mark.parametrize("op", ["", "a{b", "line\nbreak", "OKAY", "FAIL"])
def test_invalid_op_names_are_refused(op):
    with pytest.raises(ValueError):
        Handlers().on(op, add)


def test_non_callables_are_refused():
    handlers = Handlers()
    with pytest.raises(TypeError):
        handlers.on("x", "not a function")
    with pytest.raises(TypeError):
        handlers.on_connect(42)
    with pytest.raises(TypeError):
        handlers.on_any(None)


def test_registration_forms():
    handlers = Handlers()
    assert handlers.on("a", add) is add
    decorated = handlers.on("b", concurrent=True, timeout=2)(where)
    assert decorated is where
    assert handlers.describe()["concurrent"] == ["b"]
    assert handlers.describe()["timeouts"] == {"b": 2}
    assert handlers.on_connect(api_connect) is api_connect
    assert handlers.describe()["connect"] is True and handlers.describe()["disconnect"] is False
