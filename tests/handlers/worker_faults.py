"""Handlers that get things wrong in every way a worker must survive (tests/test_worker_faults.py).
Imported in worker processes.

``handlers`` holds the ops; ``hooks`` is the same registry with an ``on_connect`` that leaves an
unpicklable value in the session (served as ``tests.handlers.worker_faults:hooks``); ``counted``
one whose workers count the bytes they receive from the acceptor (op ``received``).
"""

import os
import socket
import threading

from simplerpc_mp import Handlers, SimpleRPCException

handlers = Handlers()


class Unprintable(SimpleRPCException):
    def __str__(self):
        raise RuntimeError("__str__ of Unprintable fails")


class NumberedReason(SimpleRPCException):
    @property
    def reason(self):
        return 123


class BadItems(dict):
    def items(self):
        raise RuntimeError("items() of BadItems fails")


@handlers.on("echo")
def echo(conn, data):
    return data


@handlers.on("pid")
def pid(conn, data):
    return {"pid": os.getpid()}


@handlers.on("big")
def big(conn, data):
    """An answer of about ``n`` bytes."""
    return {"x": "a" * data["n"]}


@handlers.on("big_fail")
def big_fail(conn, data):
    raise SimpleRPCException("m" * data["n"])


@handlers.on("push")
def push(conn, data):
    """Push ``note`` frames of about each of ``sizes`` bytes to this client, then answer."""
    for size in data["sizes"]:
        conn.rpc("note", {"x": "p" * size})
    return {"pushed": len(data["sizes"])}


@handlers.on("push_object")
def push_object(conn, data):
    conn.rpc_to(data.get("to", conn.net_id), "note", {"x": object()})
    return {}


@handlers.on("set")
def set_(conn, data):
    conn.session.update(data)
    return {}


@handlers.on("set_big")
def set_big(conn, data):
    conn.session["big"] = "s" * data["n"]
    return {}


@handlers.on("set_lock")
def set_lock(conn, data):
    conn.session["lock"] = threading.Lock()
    return {"set": True}


@handlers.on("get")
def get(conn, data):
    return {"session": dict(conn.session), "pid": os.getpid()}


@handlers.on("unprintable")
def unprintable(conn, data):
    raise Unprintable()


@handlers.on("numbered_reason")
def numbered_reason(conn, data):
    raise NumberedReason("the reason is a number")


@handlers.on("bad_items")
def bad_items(conn, data):
    return BadItems(a=1)


_received = [0]  # bytes this worker has received on its sockets (counted when served as :counted)


@handlers.on("received")
def received(conn, data):
    return {"bytes": _received[0], "pid": os.getpid()}


_stray = []


@handlers.on("stray_thread")
def stray_thread(conn, data):
    """Start a non-daemon thread that never ends (as a careless handler does)."""
    thread = threading.Thread(target=threading.Event().wait, name="stray", daemon=False)
    thread.start()
    _stray.append(thread)
    return {"pid": os.getpid()}


hooks = Handlers().merge(handlers)


@hooks.on_connect
def connect_with_lock(conn):
    conn.session["lock"] = threading.Lock()
    conn.rpc("welcome", {"net_id": conn.net_id})



counted = Handlers().merge(handlers)


@counted.on_start
def count_received(options):
    """Wrap socket.recv in this worker (its pipe to the acceptor is a socket.socket): the
    /proc/self/io counters miss recv(2)."""
    recv = socket.socket.recv

    def counting_recv(self, *args):
        data = recv(self, *args)
        _received[0] += len(data)
        return data

    socket.socket.recv = counting_recv
