"""The handler module of ``bench/cluster.py``: ``bench.handlers`` (echo, fanout = rpc_all) plus

- ``tell``: one push ``told`` to ``data["to"]`` (a net_id on any node), carrying ``data``;
- ``flood``: ``data["n"]`` pushes ``told`` to ``data["to"]``;
- ``whoami``: the caller's net_id.
"""

from bench.handlers import handlers


@handlers.on("whoami")
def whoami(conn, data):
    return {"net_id": conn.net_id}


@handlers.on("tell")
def tell(conn, data):
    conn.rpc_to(data["to"], "told", data)
    return {}


@handlers.on("flood")
def flood(conn, data):
    body = {"msg": data.get("msg", "")}
    for _ in range(data["n"]):
        conn.rpc_to(data["to"], "told", body)
    return {}
