"""Handlers the test-suite serves: every behaviour a test needs, as ops. Imported in workers."""

import os
import signal
import time

from simplerpc_mp import Handlers, SimpleRPCException

handlers = Handlers()


class Custom(SimpleRPCException):
    pass


@handlers.on_connect
def connected(conn):
    conn.session["connected_at_pid"] = os.getpid()
    conn.rpc("welcome", {"net_id": conn.net_id})


@handlers.on_disconnect
def disconnected(net_id):
    path = os.environ.get("SIMPLERPC_TEST_DISCONNECT_LOG")
    if path:
        with open(path, "a") as f:
            f.write(f"{net_id}\n")


@handlers.on("echo")
def echo(conn, data):
    return data


@handlers.on("cecho", concurrent=True)
def cecho(conn, data):
    return data


@handlers.on("slow")
def slow(conn, data):
    time.sleep(data.get("s", 0.05))
    return {"pid": os.getpid(), "i": data.get("i")}


@handlers.on("cslow", concurrent=True)
def cslow(conn, data):
    time.sleep(data.get("s", 0.05))
    return {"pid": os.getpid(), "i": data.get("i")}


@handlers.on("pid")
def pid(conn, data):
    return {"pid": os.getpid()}


@handlers.on("custom_fail")
def custom_fail(conn, data):
    raise Custom(data.get("msg", "custom failure"))


@handlers.on("boom")
def boom(conn, data):
    raise ValueError("a handler bug")


@handlers.on("bad_result")
def bad_result(conn, data):
    return {"not json": object()}


@handlers.on("deep_result")
def deep_result(conn, data):
    nested: list = []
    for _ in range(100_000):  # deeper than any recursion limit: json's encoder gives up
        nested = [nested]
    return {"deep": nested}


@handlers.on("bad_push")
def bad_push(conn, data):
    conn.rpc("x", {"not json": object()})


@handlers.on("scalar")
def scalar(conn, data):
    return data.get("value", 42)


@handlers.on("okay_data")
def okay_data(conn, data):
    conn.okay_data = {"Custom OKAY data": 123}


@handlers.on("session_set")
def session_set(conn, data):
    conn.session.update(data)
    return {"pid": os.getpid()}


@handlers.on("session_get")
def session_get(conn, data):
    return {"session": dict(conn.session), "pid": os.getpid()}


@handlers.on("csession_get", concurrent=True)
def csession_get(conn, data):
    return {"session": dict(conn.session), "pid": os.getpid()}


@handlers.on("csession_set", concurrent=True)
def csession_set(conn, data):
    conn.session["x"] = 1


@handlers.on("push_self")
def push_self(conn, data):
    conn.rpc("note", {"to": "self", "n": data.get("n")})


@handlers.on("push_to")
def push_to(conn, data):
    conn.rpc_to(data["to"], "note", {"from": conn.net_id, "msg": data.get("msg")})


@handlers.on("push_all")
def push_all(conn, data):
    conn.rpc_all("note", {"from": conn.net_id, "msg": data.get("msg")})


@handlers.on("whoami")
def whoami(conn, data):
    return {"net_id": conn.net_id}


@handlers.on("crash")
def crash(conn, data):
    os._exit(data.get("code", 7))


@handlers.on("kill9")
def kill9(conn, data):
    os.kill(os.getpid(), signal.SIGKILL)


@handlers.on("hang")
def hang(conn, data):
    while True:
        time.sleep(3600)


@handlers.on("hang_short", timeout=0.5)
def hang_short(conn, data):
    while True:
        time.sleep(3600)


@handlers.on("spin", concurrent=True)
def spin(conn, data):
    end = time.monotonic() + data.get("s", 0.1)
    while time.monotonic() < end:
        pass
    return {"pid": os.getpid()}
