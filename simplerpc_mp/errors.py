"""The one exception hierarchy of simplerpc-mp.

Every FAIL answer on the wire is ``FAIL{"reason": <class name>, "message": <str(exc)>}``, so the
reason a client sees is the name of a class below (or of a user's own ``SimpleRPCException``
subclass). Errors cross process boundaries as ``(reason, message)`` pairs, never pickled.

Runs in every process: acceptor, workers and clients.
"""

__all__ = [
    "SimpleRPCException",
    "ArgumentMissing",
    "ArgumentTypeError",
    "ArgumentValueError",
    "MalformedPayload",
    "UnknownOpcode",
    "FrameTooLarge",
    "TooManyConnections",
    "Unauthorized",
    "WorkerCrashed",
    "Timeout",
    "ShuttingDown",
    "SessionReadOnly",
    "AnswerTooLarge",
    "SessionTooLarge",
    "TooManyRooms",
    "RemoteError",
    "UNKNOWN_REASON",
    "UNKNOWN_MESSAGE",
]

# What a client sees when a handler raises something that is not a SimpleRPCException: the
# details stay in the server log, because they may hold secrets or internals.
UNKNOWN_REASON = "Unknown"
UNKNOWN_MESSAGE = "Unknown Server Error"


class SimpleRPCException(Exception):
    """Base of every error that becomes a FAIL answer with the class name as its reason.

    Raise a subclass of it in a handler to fail one RPC with a reason of your own. A subclass
    may override ``reason``; one that is not a ``str`` is replaced by the class name on the wire.
    """

    @property
    def reason(self) -> str:
        return type(self).__name__

    @property
    def message(self) -> str:
        return str(self)


# The seed's argument errors, kept so handlers written for it run unchanged.
class ArgumentMissing(SimpleRPCException):
    pass


class ArgumentTypeError(SimpleRPCException):
    pass


class ArgumentValueError(SimpleRPCException):
    pass


# Protocol errors: the client sent something the server cannot serve.
class MalformedPayload(SimpleRPCException):
    """A frame is not ``OPNAME{json object}`` in UTF-8."""


class UnknownOpcode(SimpleRPCException):
    """No handler is registered for the frame's OPNAME."""


class FrameTooLarge(SimpleRPCException):
    """A line is longer than ``max_frame_bytes``."""


class TooManyConnections(SimpleRPCException):
    """The server already holds ``max_connections`` connections."""


class Unauthorized(SimpleRPCException):
    """The connection has not authenticated (a frame before ``auth``, or a refused token); it is closed."""


# Server faults: the client did nothing wrong.
class WorkerCrashed(SimpleRPCException):
    """The worker process running the RPC died before it answered."""


class Timeout(SimpleRPCException):
    """The RPC ran longer than its timeout; its worker was replaced."""


class ShuttingDown(SimpleRPCException):
    """The server stopped before it could run the RPC."""


class SessionReadOnly(SimpleRPCException, TypeError):
    """A concurrent op tried to change ``conn.session``."""


# The handler's output is too large to send: the RPC fails, the worker and connection go on.
class AnswerTooLarge(SimpleRPCException):
    """The encoded answer is longer than ``max_answer_bytes``."""


class SessionTooLarge(SimpleRPCException):
    """The RPC left a pickled ``conn.session`` longer than ``max_session_bytes``; the change was discarded."""


class TooManyRooms(SimpleRPCException):
    """A join would put the connection in more than ``max_rooms_per_connection`` rooms."""


class RemoteError(Exception):
    """Raised by the clients when the server answers an RPC with FAIL."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
