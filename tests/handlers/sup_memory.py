"""Handlers for the max_worker_memory test: ``basic`` plus ``grow``, which keeps memory.

``grow {"mib": N}`` keeps N MiB of written bytes in a module global, so the worker's RSS stays
up after the RPC has been answered. Imported in workers.
"""

import os

from simplerpc_mp import Handlers

from tests.handlers import basic

handlers = Handlers().merge(basic.handlers)

_KEPT: list = []


@handlers.on("grow")
def grow(conn, data):
    # bytes repetition writes every byte, so the pages count in RSS (a calloc'd buffer may not).
    _KEPT.append(b"x" * (int(data.get("mib", 100)) * 1024 * 1024))
    return {"pid": os.getpid(), "kept_mib": sum(len(b) for b in _KEPT) // (1024 * 1024)}
