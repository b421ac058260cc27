"""Handlers for tests/test_cluster.py and bench/cluster.py: pushes across the nodes of a cluster."""

import os

from simplerpc_mp import Handlers

handlers = Handlers()


@handlers.on("whoami")
def whoami(conn, data):
    return {"net_id": conn.net_id, "pid": os.getpid()}


@handlers.on("echo")
def echo(conn, data):
    return data


@handlers.on("tell")
def tell(conn, data):
    """Push ``told`` to ``data["to"]`` (a net_id on any node), ``data.get("n", 1)`` times in order."""
    for i in range(data.get("n", 1)):
        conn.rpc_to(data["to"], "told", {"from": conn.net_id, "msg": data.get("msg"), "i": i})
    return {}


@handlers.on("shout")
def shout(conn, data):
    conn.rpc_all("shouted", {"from": conn.net_id, "msg": data.get("msg")})
    return {}


@handlers.on("join")
def join(conn, data):
    conn.join(data["room"])
    return {"rooms": sorted(conn.rooms)}


@handlers.on("rooms")
def rooms(conn, data):
    return {"rooms": sorted(conn.rooms)}


@handlers.on("say")
def say(conn, data):
    conn.rpc_room(data["room"], "said", {"from": conn.net_id, "msg": data.get("msg")},
                  exclude_self=data.get("exclude_self", False))
    return {}


@handlers.on("join_to")
def join_to(conn, data):
    """Put ``data["who"]`` in the room and, with ``say``, push to the room right after."""
    conn.join_to(data["who"], data["room"])
    if data.get("say"):
        conn.rpc_room(data["room"], "said", {"from": conn.net_id, "msg": data["say"]})
    return {}


@handlers.on("leave_to")
def leave_to(conn, data):
    conn.leave_to(data["who"], data["room"])
    if data.get("say"):
        conn.rpc_room(data["room"], "said", {"from": conn.net_id, "msg": data["say"]})
    return {}


@handlers.on("flood")
def flood(conn, data):
    """``data["n"]`` pushes of ``data["size"]`` bytes to ``data["to"]``, in one reply."""
    blob = "x" * data["size"]
    for i in range(data["n"]):
        conn.rpc_to(data["to"], "told", {"i": i, "msg": blob})
    return {}
