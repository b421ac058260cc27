"""core_ops.py with an on_connect slow enough that an RPC run before it finished would be caught:
the session key ``hello`` appears only at its end. Imported in worker processes."""

import os
import time

from simplerpc_mp import Handlers
from tests.handlers import core_ops

CONNECT_S = 0.3

handlers = Handlers().merge(core_ops.handlers)


@handlers.on_connect
def slow_hello(conn):
    time.sleep(CONNECT_S)
    conn.session["hello"] = os.getpid()
    conn.rpc("welcome", {"net_id": conn.net_id})
