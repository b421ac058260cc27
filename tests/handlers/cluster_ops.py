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
