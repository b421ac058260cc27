"""Handlers for tests/test_security.py with @handlers.on_auth: users in a dict, a reason of our own."""

from simplerpc_mp import Handlers, SimpleRPCException

from tests.handlers.sec_ops import handlers as ops

handlers = Handlers().merge(ops)

USERS = {"alice": "wonderland", "bob": "builder"}


class BadPassword(SimpleRPCException):
    pass


@handlers.on_auth
def check_password(conn, data):
    if "nest" in data:  # an identity nested this deep (lists), for a test of the server's limit
        identity = "bottom"
        for _ in range(int(data["nest"])):
            identity = [identity]
        return identity
    if "until" in data:  # a slow check: runs until the file named by data["until"] exists
        import os
        import time

        deadline = time.monotonic() + 30
        while not os.path.exists(data["until"]) and time.monotonic() < deadline:
            time.sleep(0.01)
    user = data.get("user")
    if user not in USERS or USERS[user] != data.get("password"):  # (auth{} is no user None)
        conn.rpc("leak", {"should": "never arrive"})  # pushes from on_auth are dropped
        raise BadPassword(f"no such user or wrong password for {user!r}")
    identity = {"user": user, "role": "admin" if user == "alice" else "user"}
    if conn.identity is not None:  # mutual TLS: the client certificate's commonName
        identity["cert"] = conn.identity
    return identity
