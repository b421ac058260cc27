"""Handlers for tests/test_security.py: echo, identity, a welcome push, bulk pushes and large frames."""

from simplerpc_mp import Handlers

handlers = Handlers()


@handlers.on_connect
def connected(conn):
    conn.rpc("welcome", {"net_id": conn.net_id, "identity": conn.identity})


@handlers.on("echo")
def echo(conn, data):
    return data


@handlers.on("whoami")
def whoami(conn, data):
    return {"identity": conn.identity}


@handlers.on("pushes")
def pushes(conn, data):
    for index in range(int(data["count"])):
        conn.rpc("item", {"index": index, "pad": "x" * int(data.get("pad", 0))})
    return {"pushed": int(data["count"])}


@handlers.on("broadcast")
def broadcast(conn, data):
    conn.rpc_all("news", data)
    return {}


@handlers.on("hold")
def hold(conn, data):
    """Runs until the file named by data["until"] exists (so its request bytes stay held)."""
    import os
    import time

    deadline = time.monotonic() + 30
    while not os.path.exists(data["until"]) and time.monotonic() < deadline:
        time.sleep(0.01)
    return {"held": len(data.get("pad", ""))}
