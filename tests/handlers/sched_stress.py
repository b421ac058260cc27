"""Handlers for the scheduling stress tests (tests/test_scheduling_stress.py), imported in workers.

Every RPC appends one line to the file $SCHED_EXEC_LOG when its handler finishes running:
``tag i kind pid start_ns end_ns n``, so a test can check that no RPC ran twice and that a
serial RPC of a connection never overlapped another RPC of the same connection.
"""

import os
import time

from simplerpc_mp import Handlers

handlers = Handlers()
_fd = None


def _record(kind, data, start, end, n):
    global _fd
    if _fd is None:
        _fd = os.open(os.environ["SCHED_EXEC_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(_fd, f"{data['t']} {data['i']} {kind} {os.getpid()} {start} {end} {n}\n".encode())


def _spin(ms):
    until = time.monotonic_ns() + int(ms * 1_000_000)
    while time.monotonic_ns() < until:
        pass


@handlers.on("rs")
def rs(conn, data):
    """Serial: spin ``ms``; with ``incr``, add one to conn.session["n"]."""
    start = time.monotonic_ns()
    _spin(data.get("ms", 0))
    if data.get("incr"):
        conn.session["n"] = conn.session.get("n", 0) + 1
        conn.session.setdefault("pad", "x" * 2000)
    n = conn.session.get("n", 0)
    end = time.monotonic_ns()
    _record("S", data, start, end, n)
    return {"i": data["i"], "n": n, "pid": os.getpid()}


@handlers.on("rc", concurrent=True)
def rc(conn, data):
    """Concurrent: spin ``ms``; report the session's n (read only)."""
    start = time.monotonic_ns()
    _spin(data.get("ms", 0))
    n = conn.session.get("n", 0)
    end = time.monotonic_ns()
    _record("C", data, start, end, n)
    return {"i": data["i"], "n": n, "pid": os.getpid()}


@handlers.on("echo")
def echo(conn, data):
    return data
