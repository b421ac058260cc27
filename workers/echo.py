"""Echo: answers every ``echo`` RPC with the data it was sent. The smallest handler module."""

from simplerpc_mp import Handlers

handlers = Handlers()


@handlers.on("echo")
def echo(conn, data):
    return data
