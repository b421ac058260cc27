"""The handler module every server under test serves in ``bench/run.py`` and ``bench/scheduling.py``:
echo and the CPU-heavy ops of ``workers.echo`` and ``workers.cpu``, plus

- ``fanout``: pushes one ``news`` RPC to every connected client (the sender included) and
  answers ``{"pushed": true}``;
- ``room_join``: joins the room ``room`` (default ``bench``); ``room_fanout``: pushes one ``news``
  RPC to every member of ``room`` (``bench/rooms.py`` compares the two fan-outs);
- ``spin`` (concurrent) and ``sspin`` (serial): ``ms`` milliseconds of pure-Python CPU work;
- ``sleep`` (serial): blocks for ``s`` seconds without using the CPU (a slow I/O call);
- ``pid``: the echo of its data, plus the pid of the worker that ran it;
- ``stamp``: the echo of its data, plus the pid and the time it started.

``spin``, ``sspin`` and ``sleep`` answer their data too, with ``pid``, ``start_ns`` and
``end_ns`` added; times are ``time.monotonic_ns()``, one clock for every process of the machine,
so the benchmark can tell when an RPC started relative to another process's events.

Serve it with ``simplerpc-mp serve --handlers bench.handlers`` from the repository root.
"""

import os
import time

from simplerpc_mp import ArgumentValueError, Handlers
from workers.cpu import handlers as cpu_handlers
from workers.echo import handlers as echo_handlers

handlers = Handlers().merge(echo_handlers).merge(cpu_handlers)

# Bounds for the timed ops: a mistyped benchmark should not hold a worker for an hour.
MAX_SPIN_MS = 10_000
MAX_SLEEP_S = 60


@handlers.on("fanout")
def fanout(conn, data):
    conn.rpc_all("news", data)
    return {"pushed": True}


@handlers.on("room_join")
def room_join(conn, data):
    conn.join(data.get("room", "bench"))


@handlers.on("room_fanout")
def room_fanout(conn, data):
    conn.rpc_room(data.get("room", "bench"), "news", data)
    return {"pushed": True}


def _spin(data: dict) -> dict:
    ms = data.get("ms", 2.5)
    if not isinstance(ms, (int, float)) or not 0 <= ms <= MAX_SPIN_MS:
        raise ArgumentValueError(f"ms must be a number from 0 to {MAX_SPIN_MS}")
    start = time.monotonic_ns()
    until = start + int(ms * 1_000_000)
    while time.monotonic_ns() < until:
        pass
    return dict(data, pid=os.getpid(), start_ns=start, end_ns=time.monotonic_ns())


@handlers.on("spin", concurrent=True)
def spin(conn, data):
    return _spin(data)


@handlers.on("sspin")
def sspin(conn, data):
    return _spin(data)


@handlers.on("sleep")
def sleep(conn, data):
    seconds = data.get("s", 1.0)
    if not isinstance(seconds, (int, float)) or not 0 <= seconds <= MAX_SLEEP_S:
        raise ArgumentValueError(f"s must be a number from 0 to {MAX_SLEEP_S}")
    start = time.monotonic_ns()
    time.sleep(seconds)
    return dict(data, pid=os.getpid(), start_ns=start, end_ns=time.monotonic_ns())


@handlers.on("pid")
def pid(conn, data):
    return dict(data, pid=os.getpid())


@handlers.on("stamp")
def stamp(conn, data):
    return dict(data, pid=os.getpid(), start_ns=time.monotonic_ns())
