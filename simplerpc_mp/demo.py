"""The built-in demo served by ``simplerpc-mp serve`` without ``--handlers``: echo plus the
seed's messenger sample (welcome on connect, ``thanks``), with ways to push to others.

Imported in worker processes.
"""

import logging

from .errors import ArgumentMissing
from .handlers import Handlers

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


@messenger_handlers.on_disconnect
def goodbye(net_id):
    log.info("net_id %s disconnected", net_id)


handlers = Handlers().merge(echo_handlers).merge(messenger_handlers)
