"""Handlers for the scheduling tests: CPU-bound ops that say when they ran, and one that blocks.

Every answer carries ``start_ns``/``end_ns`` (``time.monotonic_ns()``: CLOCK_MONOTONIC, one clock
for every process of the machine), so a test can count which RPCs started before which, across
workers and connections, without timing anything. Imported in workers.
"""

import os
import time

from simplerpc_mp import Handlers

handlers = Handlers()


def _spin(data):
    start = time.monotonic_ns()
    until = start + int(data.get("ms", 2.5) * 1_000_000)
    n = 0
    while time.monotonic_ns() < until:
        n += 1
    return {"i": data.get("i"), "pid": os.getpid(), "start_ns": start, "end_ns": time.monotonic_ns()}


@handlers.on("spin", concurrent=True)
def spin(conn, data):
    """Pure-Python CPU work for ``ms`` milliseconds; concurrent, so one client can fill the pool."""
    return _spin(data)


@handlers.on("sspin")
def sspin(conn, data):
    """The same, serial: a client's pipelined calls form one backlog."""
    return _spin(data)


@handlers.on("block")
def block(conn, data):
    """Blocks until the file ``path`` exists (at most 60 s): a hung handler the test releases."""
    start = time.monotonic_ns()
    deadline = time.monotonic() + 60
    while not os.path.exists(data["path"]) and time.monotonic() < deadline:
        time.sleep(0.01)
    return {"i": data.get("i"), "pid": os.getpid(), "start_ns": start, "end_ns": time.monotonic_ns()}


@handlers.on("echo")
def echo(conn, data):
    return data


@handlers.on("stamp")
def stamp(conn, data):
    return dict(data, pid=os.getpid(), start_ns=time.monotonic_ns())
