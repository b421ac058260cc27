"""The built-in demo served by ``simplerpc-mp serve`` without ``--handlers``: echo plus the
seed's messenger sample (welcome on connect, ``thanks``), with rooms (``join``, ``leave``,
``say``, ``rooms``) and ways to push to one client or to all.

Imported in worker processes. Membership lives in the acceptor, so rooms work on any number
of workers: no dict of sets here.
"""

import logging

from .errors import ArgumentMissing, ArgumentValueError
from .handlers import Handlers
from .rooms import check_room

__all__ = ["handlers", "echo_handlers", "messenger_handlers"]

log = logging.getLogger("simplerpc_mp.demo")

echo_handlers = Handlers()


@echo_handlers.on("echo")
def echo(conn, data):
    """Answer with the data sent."""
    return data


messenger_handlers = Handlers()


@messenger_handlers.on_connect
def welcome(conn):
    conn.rpc("welcome", {"msg": "Welcome to simplerpc"})


@messenger_handlers.on("thanks")
def thanks(conn, data):
    log.info("net_id %s showed gratitude: %s", conn.net_id, data.get("msg"))
    conn.okay_data = {"Custom OKAY data": 123}


@messenger_handlers.on("whoami")
def whoami(conn, data):
    return {"net_id": conn.net_id}


@messenger_handlers.on("tell")
def tell(conn, data):
    """Push ``message{"from", "msg"}`` to the connection ``to``."""
    if "to" not in data:
        raise ArgumentMissing("Expected argument 'to' in RPC: 'tell'")
    conn.rpc_to(data["to"], "message", {"from": conn.net_id, "msg": data.get("msg")})


@messenger_handlers.on("shout")
def shout(conn, data):
    """Push ``message{"from", "msg"}`` to every connected client."""
    conn.rpc_all("message", {"from": conn.net_id, "msg": data.get("msg")})


def _room(data: dict, op: str) -> str:
    if "room" not in data:
        raise ArgumentMissing(f"Expected argument 'room' in RPC: {op!r}")
    try:
        return check_room(data["room"])
    except ValueError as exc:
        raise ArgumentValueError(f"argument 'room' of {op!r}: {exc}") from None


@messenger_handlers.on("join")
def join(conn, data):
    """Enter the room ``room``; answers the caller's rooms."""
    conn.join(_room(data, "join"))
    return {"rooms": sorted(conn.rooms)}


@messenger_handlers.on("leave")
def leave(conn, data):
    """Leave the room ``room``; answers the caller's rooms."""
    conn.leave(_room(data, "leave"))
    return {"rooms": sorted(conn.rooms)}


@messenger_handlers.on("say")
def say(conn, data):
    """Push ``message{"room", "from", "msg"}`` to every member of ``room`` (the caller too, if in it)."""
    room = _room(data, "say")
    conn.rpc_room(room, "message", {"room": room, "from": conn.net_id, "msg": data.get("msg")})


@messenger_handlers.on("rooms")
def rooms(conn, data):
    """The caller's rooms."""
    return {"rooms": sorted(conn.rooms)}


@messenger_handlers.on_disconnect
def goodbye(net_id):
    log.info("net_id %s disconnected", net_id)


handlers = Handlers().merge(echo_handlers).merge(messenger_handlers)
