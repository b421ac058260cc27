"""Handlers for tests/test_rooms.py: every room operation as an op. Imported in workers."""

import os
import time

from simplerpc_mp import Handlers, SimpleRPCException

handlers = Handlers()


@handlers.on_connect
def arrived(conn):
    if os.environ.get("SIMPLERPC_TEST_LOBBY"):
        conn.join("lobby")


@handlers.on("whoami")
def whoami(conn, data):
    return {"net_id": conn.net_id, "pid": os.getpid(), "rooms": sorted(conn.rooms)}


@handlers.on("join")
def join(conn, data):
    conn.join(data["room"])
    return {"rooms": sorted(conn.rooms), "pid": os.getpid()}


@handlers.on("cjoin", concurrent=True)
def cjoin(conn, data):
    conn.join(data["room"])
    return {"rooms": sorted(conn.rooms)}


@handlers.on("leave")
def leave(conn, data):
    conn.leave(data["room"])
    return {"rooms": sorted(conn.rooms)}


@handlers.on("rooms")
def rooms(conn, data):
    return {"rooms": sorted(conn.rooms), "pid": os.getpid()}


@handlers.on("say")
def say(conn, data):
    conn.rpc_room(data["room"], "message", {"room": data["room"], "from": conn.net_id, "msg": data.get("msg")},
                  exclude_self=data.get("exclude_self", False))
    return {"pid": os.getpid()}


@handlers.on("join_say")
def join_say(conn, data):
    conn.join(data["room"])
    conn.rpc_room(data["room"], "message", {"room": data["room"], "from": conn.net_id, "msg": data.get("msg")})


@handlers.on("say_leave")
def say_leave(conn, data):
    conn.rpc_room(data["room"], "message", {"room": data["room"], "from": conn.net_id, "msg": data.get("msg")})
    conn.leave(data["room"])
    return {"rooms": sorted(conn.rooms)}


@handlers.on("join_to")
def join_to(conn, data):
    conn.join_to(data["net_id"], data["room"])


@handlers.on("leave_to")
def leave_to(conn, data):
    conn.leave_to(data["net_id"], data["room"])


@handlers.on("join_many")
def join_many(conn, data):
    """Join rooms prefix0 .. prefix{n-1}; with ``catch``, stop at TooManyRooms and say where."""
    joined = 0
    try:
        for index in range(data["n"]):
            conn.join(f"{data['prefix']}{index}")
            joined += 1
    except SimpleRPCException as exc:
        if not data.get("catch"):
            raise
        return {"joined": joined, "reason": exc.reason, "count": len(conn.rooms)}
    return {"joined": joined, "count": len(conn.rooms)}


@handlers.on("bad_name")
def bad_name(conn, data):
    """Try each room name of ``names`` with each call; say which raised ValueError."""
    results = []
    for name in data["names"]:
        outcome = []
        for call in (conn.join, conn.leave, lambda r: conn.rpc_room(r, "x", {}),
                     lambda r: conn.join_to(conn.net_id + 1, r), lambda r: conn.leave_to(conn.net_id + 1, r)):
            try:
                call(name)
            except ValueError:
                outcome.append("ValueError")
            else:
                outcome.append("ok")
        results.append(outcome)
    return {"results": results, "rooms": sorted(conn.rooms)}


@handlers.on("hold")
def hold(conn, data):
    """Keep this worker busy until the file ``release`` exists (``started`` is made at once)."""
    open(data["started"], "w").close()
    deadline = time.monotonic() + 30
    while not os.path.exists(data["release"]):
        if time.monotonic() > deadline:
            raise TimeoutError("hold: never released")
        time.sleep(0.002)
    return {"pid": os.getpid()}


@handlers.on("flood")
def flood(conn, data):
    """Push one ``fill`` frame of about ``size`` bytes to ``net_id``."""
    conn.rpc_to(data["net_id"], "fill", {"pad": "x" * data["size"]})
