"""simplerpc-mp: the simplerpc line protocol served by a pool of worker processes.

Public API only; see the README for the protocol, the handler API and operations. The server and
client classes are imported on first use, so a worker process importing ``Handlers`` (through
the user's handler module) does not pay for asyncio and the acceptor.
"""

from .errors import (
    ArgumentMissing,
    ArgumentTypeError,
    ArgumentValueError,
    RemoteError,
    SimpleRPCException,
)
from .handlers import Handlers

__all__ = [
    "Server",
    "ServerError",
    "Handlers",
    "SimpleRPCException",
    "ArgumentMissing",
    "ArgumentTypeError",
    "ArgumentValueError",
    "Client",
    "ClientHandler",
    "AsyncClient",
    "RemoteError",
]

__version__ = "0.1.0"

_LAZY = {
    "Server": ".server",
    "ServerError": ".server",
    "Client": ".client",
    "ClientHandler": ".client",
    "AsyncClient": ".aio_client",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'simplerpc_mp' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
