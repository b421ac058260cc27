"""Handlers for the pipe tests: answers as large as asked. Imported in workers."""

from simplerpc_mp import Handlers

handlers = Handlers()


@handlers.on("big")
def big(conn, data):
    return "x" * data["bytes"]
