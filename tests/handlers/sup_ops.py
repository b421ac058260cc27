"""Handlers for the supervisor tests: every op of ``basic`` plus ops that leave a trace.

A test waits on the file an op creates (``mark_*``), never on a sleep, to know the op has
started; ``count_crash`` appends a line before it dies, so a test can tell whether a crashed RPC
was ever run a second time. Imported in workers.
"""

import ctypes
import os
import time

from simplerpc_mp import Handlers

from tests.handlers import basic

handlers = Handlers().merge(basic.handlers)


def _mark(path: str) -> None:
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")


@handlers.on("mark_slow")
def mark_slow(conn, data):
    _mark(data["path"])
    time.sleep(data.get("s", 0.2))
    return {"pid": os.getpid()}


@handlers.on("mark_hang")
def mark_hang(conn, data):
    _mark(data["path"])
    while True:
        time.sleep(3600)


@handlers.on("mark_spin", concurrent=True)
def mark_spin(conn, data):
    _mark(data["path"])
    while True:  # busy in pure Python: never reads its pipe, never sleeps
        pass


@handlers.on("count_crash")
def count_crash(conn, data):
    _mark(data["path"])
    os._exit(data.get("code", 9))


@handlers.on("session_crash")
def session_crash(conn, data):
    conn.session.update(data)
    os._exit(3)


@handlers.on("segfault")
def segfault(conn, data):
    ctypes.string_at(0)  # reads address 0: SIGSEGV
