"""A module with ``handlers.on_any``: every op without a handler of its own goes to the seed-style
generic handler ``fn(conn, op, data)``. Imported in worker processes."""

from simplerpc_mp import Handlers, SimpleRPCException

handlers = Handlers()


class AnyFailed(SimpleRPCException):
    pass


@handlers.on("echo")
def echo(conn, data):
    return {"echo": data}


def anything(conn, op, data):
    if op == "any_fail":
        raise AnyFailed(f"generic handler refused {op}")
    if op == "any_okay_data":
        conn.okay_data = {"via": "okay_data", "op": op}
        return None
    return {"op": op, "data": data, "net_id": conn.net_id}


handlers.on_any(anything)
