"""Handlers for the supervisor tests whose connect hook kills its worker, once.

``basic``'s ops, with an ``on_connect`` that exits its worker (code 6) for the first connection
the server sees (a flag file created with O_EXCL in ``$SUP_HOOKS_DIR`` makes it once per test),
and pushes ``welcome`` for every later one. Imported in workers.
"""

import os

from simplerpc_mp import Handlers

from tests.handlers import basic

handlers = Handlers().merge(basic.handlers)


@handlers.on_connect
def crash_first_connect(conn):
    try:
        os.close(os.open(os.path.join(os.environ["SUP_HOOKS_DIR"], "crashed"), os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        conn.rpc("welcome", {"net_id": conn.net_id})
        return
    os._exit(6)
