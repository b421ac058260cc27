"""The handler API: the ``Handlers`` registry users fill, and the ``conn`` object handlers get.

A ``Handlers`` object is built at import time of the user's module, in every worker process
(and in the acceptor only when a script passes one to ``Server``). ``Conn`` objects live in a
worker for the duration of one job; pushes they make are collected and sent to the acceptor,
which routes them by ``net_id``. Room joins, leaves and room pushes go in the same list, as
*actions* (tuples of 3 or 4 items, a push has 2), so the acceptor applies all of them in the
order the handler made them (see ``rooms.py``): ``(JOIN, net_id, room)``, ``(LEAVE, net_id,
room)``, ``(ROOM_PUSH, room, frame, excluded net_id or None)``.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Any, Callable

from .config import SETTINGS_BY_NAME, ConfigError
from .errors import SessionReadOnly, TooManyRooms
from .protocol import encode_frame
from .rooms import check_room

__all__ = [
    "Handlers", "Conn", "PushLimit", "load_handlers", "HandlerLoadError", "BROADCAST", "JOIN", "LEAVE", "ROOM_PUSH",
    "DEFAULT_MAX_ROOMS",
]

# Push target meaning "every connected client": not an int, so that no net_id given to rpc_to (a
# client's tell{"to": -1}) is taken for it; such a push is dropped as to a gone connection.
BROADCAST = None
JOIN, LEAVE, ROOM_PUSH = range(3)  # the tags of room actions (see the module docstring)
DEFAULT_MAX_ROOMS = 1000  # config.py's default of max_rooms_per_connection
_NO_ROOMS: frozenset = frozenset()

log = logging.getLogger("simplerpc_mp.handlers")


class HandlerLoadError(Exception):
    """The handler module named by the user cannot be used; the message is one line."""


class _Op:
    __slots__ = ("fn", "concurrent", "timeout")

    def __init__(self, fn: Callable, concurrent: bool, timeout: float | None):
        self.fn = fn
        self.concurrent = concurrent
        self.timeout = timeout


class Handlers:
    """Maps op names to handler functions ``fn(conn, data)``.

    ``on(op, fn)`` registers directly, ``@on(op)`` as a decorator; ``concurrent=True`` lets one
    connection's calls of the op run in parallel; ``timeout`` (seconds) overrides the server's.
    """

    def __init__(self) -> None:
        self.ops: dict[str, _Op] = {}
        self.any_fn: Callable | None = None
        self.connect_fn: Callable | None = None
        self.disconnect_fn: Callable | None = None
        self.auth_fn: Callable | None = None
        self.start_fns: list[Callable] = []

    def on(self, op: str, fn: Callable | None = None, *, concurrent: bool = False, timeout: float | None = None):
        if not op or "{" in op or "\n" in op:
            raise ValueError(f"invalid op name {op!r}: must be non-empty, without '{{' or newline")
        if op in ("OKAY", "FAIL"):
            raise ValueError(f"op name {op!r} is reserved by the protocol")
        if isinstance(timeout, str):  # convert() would parse it, as it does the environment's text
            raise TypeError(f"timeout of op {op!r} must be a number of seconds, got {timeout!r}")
        if timeout is not None:
            # The rule of the timeout setting (a finite number, at most MAX_DURATION_S, and not a
            # fraction of a millisecond that would round to "off"), so a bad value fails at import.
            try:
                timeout = SETTINGS_BY_NAME["timeout"].convert(timeout, f"timeout of op {op!r}")
            except ConfigError as exc:
                raise ValueError(str(exc)) from None

        def register(func: Callable) -> Callable:
            if not callable(func):
                raise TypeError(f"handler for {op!r} is not callable: {func!r}")
            self.ops[op] = _Op(func, concurrent, timeout)
            return func

        return register if fn is None else register(fn)

    def on_any(self, fn: Callable) -> Callable:
        """``fn(conn, op, data)`` receives every op that has no handler of its own."""
        self.any_fn = _checked(fn)
        return fn

    def on_connect(self, fn: Callable) -> Callable:
        """``fn(conn)`` runs when a client connects, before any of its RPCs."""
        self.connect_fn = _checked(fn)
        return fn

    def on_disconnect(self, fn: Callable) -> Callable:
        """``fn(net_id)`` runs after a client's last RPC, once it has gone."""
        self.disconnect_fn = _checked(fn)
        return fn

    def on_auth(self, fn: Callable) -> Callable:
        """``fn(conn, data)`` decides a connection's ``auth{...}`` frame, in a worker: it returns
        the identity (a JSON value, then ``conn.identity``) or raises a ``SimpleRPCException``
        subclass, whose name is the FAIL reason before the connection is closed. Registering
        it turns authentication on, with or without ``auth_tokens_file``. Its ``conn.identity``
        is the client certificate's commonName with mutual TLS, else None."""
        self.auth_fn = _checked(fn)
        return fn

    def on_start(self, fn: Callable) -> Callable:
        """``fn(options)`` runs once in each worker after it boots; ``options`` is a dict."""
        self.start_fns.append(_checked(fn))
        return fn

    def merge(self, other: "Handlers") -> "Handlers":
        """Add every registration of ``other`` to this registry; returns self."""
        self.ops.update(other.ops)
        for name in ("any_fn", "connect_fn", "disconnect_fn", "auth_fn"):
            if getattr(other, name) is not None:
                setattr(self, name, getattr(other, name))
        self.start_fns.extend(other.start_fns)
        return self

    def describe(self) -> dict:
        """What the acceptor needs to know, sent by each worker when it boots."""
        return {
            "ops": sorted(self.ops),
            "concurrent": sorted(op for op, entry in self.ops.items() if entry.concurrent),
            "timeouts": {op: entry.timeout for op, entry in self.ops.items() if entry.timeout is not None},
            "connect": self.connect_fn is not None,
            "disconnect": self.disconnect_fn is not None,
            "auth": self.auth_fn is not None,
        }

    # The seed's MessageHandler was itself the generic handler: handler(conn, op, data).
    def __call__(self, conn: "Conn", op: str, data: dict) -> Any:
        entry = self.ops.get(op)
        if entry is not None:
            return entry.fn(conn, data)
        if self.any_fn is not None:
            return self.any_fn(conn, op, data)
        return None


def _checked(fn: Callable) -> Callable:
    if not callable(fn):
        raise TypeError(f"expected a callable, got {type(fn).__name__}")
    return fn


class _ReadOnlySession(dict):
    """The session as a concurrent op sees it: readable, and loud when written."""

    def _refuse(self, *args, **kwargs):
        raise SessionReadOnly(
            "conn.session is read-only in a concurrent op; register the op without "
            "concurrent=True to change the session"
        )

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = __ior__ = _refuse


class PushLimit:
    """The largest push frame a worker sends (``max_answer_bytes``), and how many it dropped."""

    __slots__ = ("max_bytes", "dropped")

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.dropped = 0


class Conn:
    """What a handler gets as ``conn``: identity, session, rooms, and the ways to push RPCs.

    ``identity`` is who authenticated: the token's name, what ``on_auth`` returned, or with
    mutual TLS and no authentication the client certificate's subject commonName; else None.

    A push is encoded here, when the handler makes it: data JSON cannot encode raises (the RPC
    fails ``Unknown``, and the error names the push), and a frame longer than ``push_limit``
    allows is dropped, logged and counted; the RPC goes on, since the answer is still small.
    """

    __slots__ = ("net_id", "session", "okay_data", "pushes", "push_limit", "_rooms", "max_rooms", "identity")

    def __init__(self, net_id: int, session: dict, pushes: list, read_only: bool = False,
                 push_limit: PushLimit | None = None, rooms: frozenset | None = None,
                 max_rooms: int = DEFAULT_MAX_ROOMS, identity: Any = None):
        self.net_id = net_id
        self.identity = identity
        self.session = _ReadOnlySession(session) if read_only else session
        self.okay_data: dict | None = None
        # (target net_id or BROADCAST, encoded frame) and room actions, sent with the answer
        self.pushes = pushes
        self.push_limit = push_limit  # None: no size limit (a Conn made outside a worker)
        # The rooms as the acceptor shipped them with the job (a frozenset), or a set once this
        # handler joined or left one (``rooms`` freezes it again when read).
        self._rooms = rooms or _NO_ROOMS
        self.max_rooms = max_rooms

    # -- rooms (membership is the acceptor's: these ask it for changes, in order) -------------

    @property
    def rooms(self) -> frozenset:
        """The rooms this connection is in: as of the start of the RPC, plus this handler's
        own joins and leaves (a concurrent op of the connection may change them meanwhile)."""
        rooms = self._rooms
        if type(rooms) is not frozenset:
            rooms = self._rooms = frozenset(rooms)
        return rooms

    def join(self, room: str) -> None:
        """Enter ``room`` (a non-empty str of at most 200 characters, else ``ValueError``);
        ``TooManyRooms`` past ``max_rooms_per_connection``. Joining twice is not an error."""
        room = check_room(room)
        rooms = self._rooms
        if room not in rooms:
            if len(rooms) >= self.max_rooms:
                raise TooManyRooms(
                    f"cannot join {room!r}: the connection is in {len(rooms)} rooms, "
                    f"max_rooms_per_connection is {self.max_rooms}"
                )
            if type(rooms) is frozenset:
                rooms = self._rooms = set(rooms)
            rooms.add(room)
        self.pushes.append((JOIN, self.net_id, room))

    def leave(self, room: str) -> None:
        """Leave ``room``; leaving a room the connection is not in is not an error."""
        room = check_room(room)
        rooms = self._rooms
        if room in rooms:
            if type(rooms) is frozenset:
                rooms = self._rooms = set(rooms)
            rooms.discard(room)
        self.pushes.append((LEAVE, self.net_id, room))

    def join_to(self, net_id: int, room: str) -> None:
        """Put another connection in ``room`` (ignored and counted if it has gone, or if it is
        in ``max_rooms_per_connection`` rooms already)."""
        net_id = int(net_id)
        if net_id == self.net_id:
            self.join(room)
        else:
            self.pushes.append((JOIN, net_id, check_room(room)))

    def leave_to(self, net_id: int, room: str) -> None:
        """Take another connection out of ``room`` (ignored and counted if it has gone)."""
        net_id = int(net_id)
        if net_id == self.net_id:
            self.leave(room)
        else:
            self.pushes.append((LEAVE, net_id, check_room(room)))

    def rpc_room(self, room: str, op: str, data: dict, exclude_self: bool = False) -> None:
        """Push an RPC to every member of ``room`` (this connection too, unless ``exclude_self``);
        an empty or unknown room is not an error. Encoded once, however many members."""
        room = check_room(room)
        frame = self._encode(op, data, f"room {room!r}")
        if frame is not None:
            self.pushes.append((ROOM_PUSH, room, frame, self.net_id if exclude_self else None))

    # -- pushes ----------------------------------------------------------------------------

    def rpc(self, op: str, data: dict) -> None:
        """Push an RPC to this client."""
        self._push(self.net_id, op, data)

    def rpc_to(self, net_id: int, op: str, data: dict) -> None:
        """Push an RPC to another connection; dropped (and counted) if it has gone."""
        self._push(int(net_id), op, data)

    def rpc_all(self, op: str, data: dict) -> None:
        """Push an RPC to every connected client, this one included."""
        self._push(BROADCAST, op, data)

    def _push(self, target: int, op: str, data: dict) -> None:
        frame = self._encode(op, data, _target_name(target))
        if frame is not None:
            self.pushes.append((target, frame))

    def _encode(self, op: str, data: dict, target_name: str) -> bytes | None:
        """The push's frame, or None if it is over the size limit (dropped, logged, counted)."""
        try:
            frame = encode_frame(op, data)
        except (TypeError, ValueError, RecursionError) as exc:
            # The same error type, so a handler catching it still does; the message says which push.
            raise type(exc)(f"push {op!r} to {target_name} cannot be encoded: {exc}") from None
        limit = self.push_limit
        if limit is not None and len(frame) > limit.max_bytes:
            limit.dropped += 1
            log.warning(
                "push %r to %s dropped: %d bytes is over max_answer_bytes (%d) (from net_id %s, pid %s; %d dropped so far)",
                op, target_name, len(frame), limit.max_bytes, self.net_id, os.getpid(), limit.dropped,
            )
            return None
        return frame

    # The seed's Connection and Client both spelled it this way.
    send = rpc


def _target_name(target: int) -> str:
    return "every connection" if target == BROADCAST else f"net_id {target}"


def load_handlers(spec: str) -> Handlers:
    """Import ``module`` or ``module:attribute`` and return its ``Handlers`` object.

    Raises ``HandlerLoadError`` with one line naming the module, the error and file:line.
    """
    module_name, _, attr = spec.partition(":")
    attr = attr or "handlers"
    if not module_name:
        raise HandlerLoadError(f"handler module {spec!r}: empty module name")
    # Like gunicorn, let `--handlers mymod` find mymod.py in the directory the server runs from.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except BaseException as exc:  # a broken module may raise anything, SystemExit included
        if isinstance(exc, ModuleNotFoundError) and exc.name and (module_name + ".").startswith(exc.name + "."):
            # The module itself (or its package) is not there: no file:line to show.
            raise HandlerLoadError(f"cannot import handler module {module_name!r}: ModuleNotFoundError: {exc}") from None
        raise HandlerLoadError(f"cannot import handler module {module_name!r}: {_describe(exc)}") from None
    handlers = getattr(module, attr, None)
    if not isinstance(handlers, Handlers):
        found = "nothing" if handlers is None else f"a {type(handlers).__name__}"
        raise HandlerLoadError(
            f"handler module {module_name!r} ({module.__file__}): attribute {attr!r} is {found}, "
            "expected a simplerpc_mp.Handlers object"
        )
    return handlers


def _describe(exc: BaseException) -> str:
    where = ""
    if isinstance(exc, SyntaxError) and exc.filename:
        where = f" at {exc.filename}:{exc.lineno}"
    else:
        # The innermost frame of the user's code, not of importlib or of this module.
        tb, last = exc.__traceback__, None
        while tb is not None:
            filename = tb.tb_frame.f_code.co_filename
            if not filename.startswith("<frozen") and filename != __file__ and "importlib" not in filename:
                last = tb
            tb = tb.tb_next
        if last is not None:
            where = f" at {last.tb_frame.f_code.co_filename}:{last.tb_lineno}"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}{where}"
