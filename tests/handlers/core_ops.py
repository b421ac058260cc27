"""Ops for the core end-to-end tests (tests/test_server.py): every op of basic.py, plus ops that
report when, where and after how many serial ops they ran. Imported in worker processes.

``mark`` (serial) and ``cmark`` (concurrent) return their start and end times on the system-wide
monotonic clock (CLOCK_MONOTONIC on Linux, so times from different workers compare) and the
session's ``serial_count``: how many ``mark`` RPCs of the connection ran before. Only ``mark``
increments it, so a serial op that ran out of order, overlapped another, or lost the session
on its way between workers shows up as a wrong count.
"""

import collections
import os
import time

from simplerpc_mp import Handlers
from tests.handlers import basic

handlers = Handlers().merge(basic.handlers)


def _timed(conn, data) -> dict:
    start = time.monotonic()
    time.sleep(data.get("s", 0))
    return {
        "i": data.get("i"),
        "pid": os.getpid(),
        "start": start,
        "end": time.monotonic(),
        "serial_count": conn.session.get("serial_count", 0),
    }


@handlers.on("mark")
def mark(conn, data):
    result = _timed(conn, data)
    conn.session["serial_count"] = result["serial_count"] + 1
    return result


@handlers.on("cmark", concurrent=True)
def cmark(conn, data):
    return _timed(conn, data)


@handlers.on("seen_connect")
def seen_connect(conn, data):
    return {"hello": conn.session.get("hello"), "pid": os.getpid()}


@handlers.on("cseen_connect", concurrent=True)
def cseen_connect(conn, data):
    return {"hello": conn.session.get("hello"), "pid": os.getpid()}


@handlers.on("slow_log")
def slow_log(conn, data):
    """Sleep, then append ``rpc NET_ID I`` to the file basic.py's on_disconnect appends to."""
    time.sleep(data.get("s", 0.2))
    with open(os.environ["SIMPLERPC_TEST_DISCONNECT_LOG"], "a") as f:
        f.write(f"rpc {conn.net_id} {data.get('i')}\n")
    return {"i": data.get("i")}


@handlers.on("ordered")
def ordered(conn, data):
    """A dict subclass is a dict: it is the OKAY payload as it is."""
    return collections.OrderedDict([("b", 1), ("a", 2)])


@handlers.on("okay_data_scalar")
def okay_data_scalar(conn, data):
    conn.okay_data = data.get("value", "done")


@handlers.on("push_scalar")
def push_scalar(conn, data):
    conn.rpc("note", data.get("value", "not an object"))
