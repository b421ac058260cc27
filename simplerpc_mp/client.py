"""A blocking simplerpc client, with the seed's callback style on top. Runs in the user's process.

Answers carry no request id: the server answers a connection's RPCs in the order they were
sent, so the client matches each ``OKAY``/``FAIL`` to the oldest RPC still waiting. Any other
incoming frame is a push from the server, delivered to the callbacks registered for its op.

    with Client("127.0.0.1", 30000) as client:
        client.on("welcome", lambda data: print(data["msg"]))
        print(client.call("echo", {"x": 1}))        # {'x': 1}, or raises RemoteError
"""

from __future__ import annotations

import selectors
import socket
import time
from collections import deque
from typing import Callable

from .errors import MalformedPayload, RemoteError
from .protocol import DEFAULT_MAX_FRAME_BYTES, FrameDecoder, decode_frame, encode_frame, split_lines

__all__ = ["Client", "ClientHandler"]

_ANSWER_OPS = ("OKAY", "FAIL")


class ClientHandler:
    """The seed's MessageHandler for clients: ``on(op, fn)`` with ``fn(client, data)``.

    ``on("OKAY", fn)`` and ``on("FAIL", fn)`` see every answer.
    """

    def __init__(self) -> None:
        self.ops: dict[str, list[Callable]] = {}

    def on(self, op: str, fn: Callable) -> Callable:
        if not callable(fn):
            raise TypeError(f"expected a callable, got {type(fn).__name__}")
        self.ops.setdefault(op, []).append(fn)
        return fn

    def clear(self, op: str) -> None:
        self.ops.pop(op, None)

    def __call__(self, client: "Client", op: str, data: dict) -> None:
        for fn in self.ops.get(op, ()):
            fn(client, data)


class _Waiter:
    __slots__ = ("done", "op", "data", "callback")

    def __init__(self, callback: Callable | None = None):
        self.done = False
        self.op = ""
        self.data: dict = {}
        self.callback = callback


class Client:
    def __init__(self, host: str = "127.0.0.1", port: int = 30000, handler: ClientHandler | None = None, *,
                 connect: bool = True, connect_timeout: float | None = 10.0,
                 max_frame_bytes: int = 64 * DEFAULT_MAX_FRAME_BYTES):
        self.host = host
        self.port = port
        self.handler = handler if handler is not None else ClientHandler()
        self.sock: socket.socket | None = None
        self.connect_timeout = connect_timeout
        self._decoder = FrameDecoder(max_frame_bytes)
        self._waiting: deque[_Waiter] = deque()
        self._push_callbacks: dict[str, list[Callable]] = {}
        self._connect_callback: Callable = _nop
        self._disconnect_callback: Callable = _nop
        self._fail_callback: Callable = _nop
        self._selector = selectors.DefaultSelector()
        self.connected = False
        self._connect_reported = True
        if connect:
            self._open()
            # The seed registers on_connect after constructing the client: report the connection
            # from the client's loop (start, poll, call), as its asyncore client did.
            self._connect_reported = False

    # -- set-up ------------------------------------------------------------------------------

    def connect(self) -> "Client":
        """Connect (for a client made with ``connect=False``); the connect callback runs now."""
        self._open()
        self._connect_callback()
        return self

    def _open(self) -> None:
        sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        self.sock = sock
        self._selector.register(sock, selectors.EVENT_READ)
        self.connected = True

    def on(self, op: str, fn: Callable) -> Callable:
        """Call ``fn(data)`` for every push of ``op`` from the server."""
        self._push_callbacks.setdefault(op, []).append(fn)
        return fn

    def on_connect(self, fn: Callable) -> None:
        self._connect_callback = fn

    def on_disconnect(self, fn: Callable) -> None:
        self._disconnect_callback = fn

    def on_fail(self, fn: Callable) -> None:
        """The seed's hook: ``fn(data)`` for every FAIL answer."""
        self._fail_callback = fn

    # -- calling -----------------------------------------------------------------------------

    def call(self, op: str, data: dict | None = None, timeout: float | None = None) -> dict:
        """Send one RPC and wait for its answer: the OKAY dict, or ``RemoteError`` on FAIL.

        ``TimeoutError`` if no answer came within ``timeout`` seconds (the connection stays
        usable: the late answer is matched to this call and dropped).
        """
        waiter = _Waiter()
        self._send(encode_frame(op, {} if data is None else data), waiter)
        deadline = None if timeout is None else time.monotonic() + timeout
        while not waiter.done:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"no answer to {op!r} within {timeout}s")
            self._read(remaining)
        if waiter.op == "FAIL":
            raise RemoteError(str(waiter.data.get("reason")), str(waiter.data.get("message")))
        return waiter.data

    def rpc(self, op: str, data: dict | None = None, callback: Callable | None = None) -> None:
        """Send one RPC without waiting; ``callback(answer_op, data)`` runs when it is answered."""
        self._send(encode_frame(op, {} if data is None else data), _Waiter(callback))

    send = rpc

    def pending(self) -> int:
        """RPCs sent and not answered yet."""
        return len(self._waiting)

    def poll(self, timeout: float | None = 0) -> None:
        """Process what has arrived, waiting up to ``timeout`` seconds for something."""
        self._read(timeout)

    def start(self) -> None:
        """Process incoming frames until the server closes the connection (the seed's loop)."""
        try:
            while self.connected:
                self._read(None)
        except ConnectionError:
            pass  # the server closed the connection: the disconnect callback has run

    def close(self) -> None:
        if self.sock is not None:
            self._selector.unregister(self.sock)
            self.sock.close()
            self.sock = None
        if self.connected:
            self.connected = False
            self._disconnect_callback()
        self._selector.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- I/O ---------------------------------------------------------------------------------

    def _send(self, frame: bytes, waiter: _Waiter) -> None:
        if not self.connected:
            raise ConnectionError("not connected")
        self._waiting.append(waiter)
        view = memoryview(frame)
        while view:
            try:
                sent = self.sock.send(view)
                view = view[sent:]
                continue
            except BlockingIOError:
                pass
            # The server stops reading when we have too many RPCs unanswered: read its answers
            # while we wait, or both sides would wait forever.
            self._selector.modify(self.sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
            try:
                for _, mask in self._selector.select(None):
                    if mask & selectors.EVENT_READ:
                        self._read(0)
            finally:
                if self.sock is not None:
                    self._selector.modify(self.sock, selectors.EVENT_READ)
            if not self.connected:
                raise ConnectionError("connection closed by the server")

    def _read(self, timeout: float | None) -> None:
        if not self.connected:
            raise ConnectionError("connection closed by the server")
        if not self._connect_reported:
            # Like the seed's asyncore client: the connect callback runs from the client's loop,
            # so one registered after the constructor still runs.
            self._connect_reported = True
            self._connect_callback()
        if not self._selector.select(timeout):
            return
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            raise ConnectionError("connection closed by the server")
        callback_error: BaseException | None = None
        for chunk in self._decoder.feed(data):
            if chunk is None:
                continue  # an overlong frame from the server: skip it
            for line in split_lines(chunk):
                try:
                    self._dispatch(line)
                except MalformedPayload:
                    continue  # not a frame: skip it, and keep the lines after it in step
                except Exception as exc:  # a user callback failed: finish the read, then raise it
                    if callback_error is None:
                        callback_error = exc
        if callback_error is not None:
            # Every line of this read was matched first, so answers stay in step with calls.
            raise callback_error

    def _dispatch(self, line: bytes) -> None:
        op, data = decode_frame(line)
        if op in _ANSWER_OPS:
            waiter = self._waiting.popleft() if self._waiting else _Waiter()
            waiter.done, waiter.op, waiter.data = True, op, data
            if op == "FAIL":
                self._fail_callback(data)
            self.handler(self, op, data)
            if waiter.callback is not None:
                waiter.callback(op, data)
            return
        for fn in self._push_callbacks.get(op, ()):
            fn(data)
        self.handler(self, op, data)


def _nop(*args) -> None:
    pass
