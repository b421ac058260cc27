"""The handler module every server under test serves in ``bench/run.py``: echo and the CPU-heavy
ops of ``workers.echo`` and ``workers.cpu``, plus ``fanout``, which pushes one ``news`` RPC to
every connected client (the sender included) and answers ``{"pushed": true}``.

Serve it with ``simplerpc-mp serve --handlers bench.handlers`` from the repository root.
"""

from simplerpc_mp import Handlers
from workers.cpu import handlers as cpu_handlers
from workers.echo import handlers as echo_handlers

handlers = Handlers().merge(echo_handlers).merge(cpu_handlers)


@handlers.on("fanout")
def fanout(conn, data):
    conn.rpc_all("news", data)
    return {"pushed": True}
