"""simplerpc-mp: the simplerpc line protocol served by a pool of worker processes.

Public API only; see the README for the protocol, the handler API and operations.
"""

from .aio_client import AsyncClient
from .client import Client, ClientHandler
from .errors import (
    ArgumentMissing,
    ArgumentTypeError,
    ArgumentValueError,
    RemoteError,
    SimpleRPCException,
)
from .handlers import Handlers
from .server import Server, ServerError

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
