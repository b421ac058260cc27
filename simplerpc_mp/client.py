"""A blocking simplerpc client, with the seed's callback style on top. Runs in the user's process.

Answers carry no request id: the server answers a connection's RPCs in the order they were
sent, so the client matches each ``OKAY``/``FAIL`` to the oldest RPC still waiting. Any other
incoming frame is a push from the server, delivered to the callbacks registered for its op.

    with Client("127.0.0.1", 30000) as client:
        client.on("welcome", lambda data: print(data["msg"]))
        print(client.call("echo", {"x": 1}))        # {'x': 1}, or raises RemoteError

``ssl`` (an ``ssl.SSLContext``, or True for the default verifying context) connects over TLS;
``token`` sends ``auth{"token": ...}`` first and raises ``RemoteError`` (reason
``Unauthorized``) if the server refuses it. A TLS socket is drained on each read: bytes it has
decrypted are not seen by the selector (``SSLSocket.pending()``).

Keeping that FIFO in step is the whole contract: an RPC takes its slot in ``_waiting`` in the
same step that queues its encoded frame in ``_out``, after the frame was encoded, and every
slot is given exactly one answer line, in order. A call that gives up (timeout, an interrupt,
a callback's error) leaves both queued, so its frame still goes out whole and its answer is
dropped in its slot. Callbacks run while a frame may be half written and may send RPCs of
their own: those queue behind it, and lines still undelivered (``_inbox``) are delivered
before newer ones. When a line cannot be taken (longer than ``max_frame_bytes``) or the
connection ends, every waiting RPC fails and the connection is closed: a FIFO that lost its
place never finds it again.
"""

from __future__ import annotations

import logging
import selectors
import socket
import ssl as _ssl
import time
from collections import deque
from typing import Callable

from .errors import FrameTooLarge, MalformedPayload, RemoteError
from .protocol import DEFAULT_MAX_FRAME_BYTES, FrameDecoder, decode_frame, encode_frame, split_lines

__all__ = ["Client", "ClientHandler"]

log = logging.getLogger(__name__)

_ANSWER_OPS = ("OKAY", "FAIL")
# A line with one of these OPNAMEs is an answer even when its JSON is bad: it takes a slot.
_ANSWER_PREFIXES = (b"OKAY{", b"FAIL{")


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
    """One RPC's slot in the FIFO of answers."""

    __slots__ = ("done", "op", "data", "callback", "error")

    def __init__(self, callback: Callable | None = None):
        self.done = False
        self.op = ""
        self.data: dict = {}
        self.callback = callback
        self.error: Exception | None = None  # no answer will come: raise this instead


class _End:
    """Queued in ``_inbox`` after the last line the connection will deliver."""

    __slots__ = ("reason", "head_error")

    def __init__(self, reason: str, head_error: Exception | None = None):
        self.reason = reason
        self.head_error = head_error  # for the oldest waiting RPC, whose answer this was


class Client:
    def __init__(self, host: str = "127.0.0.1", port: int = 30000, handler: ClientHandler | None = None, *,
                 connect: bool = True, connect_timeout: float | None = 10.0,
                 max_frame_bytes: int = 64 * DEFAULT_MAX_FRAME_BYTES,
                 ssl: _ssl.SSLContext | bool | None = None, token: str | None = None):
        self.host = host
        self.port = port
        self.ssl_context = _ssl.create_default_context() if ssl is True else (ssl or None)
        self.token = token
        self.identity = None  # what the server answered to our token
        self.handler = handler if handler is not None else ClientHandler()
        self.sock: socket.socket | None = None
        self.connect_timeout = connect_timeout
        self.max_frame_bytes = max_frame_bytes  # the longest line taken from the server
        self._decoder = FrameDecoder(max_frame_bytes)
        self._waiting: deque[_Waiter] = deque()
        self._out: deque[memoryview] = deque()  # frames not fully written yet, oldest first
        self._inbox: deque[bytes | _End] = deque()  # lines read and not delivered yet
        self._flushing = False  # an rpc() below us on the stack writes until _out is empty
        self._ended = False  # the connection has ended: _inbox holds an _End, nothing is read
        self._events = 0
        self._closed_reason = "not connected"
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
        if self.ssl_context is not None:
            try:  # the handshake, blocking up to connect_timeout
                sock = self.ssl_context.wrap_socket(sock, server_hostname=self.host)
            except BaseException:
                sock.close()
                raise
        sock.setblocking(False)
        self.sock = sock
        self._selector.register(sock, selectors.EVENT_READ)
        self._events = selectors.EVENT_READ
        self._ended = False
        self.connected = True
        if self.token is not None:
            self._authenticate()

    def _authenticate(self) -> None:
        """The auth frame first; a refusal closes the connection (the server closes its side too)."""
        try:
            answer = self.call("auth", {"token": self.token}, timeout=self.connect_timeout)
        except RemoteError as exc:
            self._shut(f"authentication refused: {exc}")
            raise
        self.identity = answer.get("identity")

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
        usable: the late answer is matched to this call and dropped). ``FrameTooLarge`` if the
        answer is longer than ``max_frame_bytes``, ``ConnectionError`` if the connection ended
        first: both leave the connection closed.
        """
        frame = encode_frame(op, {} if data is None else data)  # first: a frame that fails takes no slot
        deadline = None if timeout is None else time.monotonic() + timeout
        waiter = _Waiter()
        self._send(frame, waiter)
        while not waiter.done:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"no answer to {op!r} within {timeout}s")
            callback_error = self._pump(remaining)
            if callback_error is not None:
                raise callback_error
        if waiter.error is not None:
            raise waiter.error
        if waiter.op == "FAIL":
            raise RemoteError(str(waiter.data.get("reason")), str(waiter.data.get("message")))
        return waiter.data

    def rpc(self, op: str, data: dict | None = None, callback: Callable | None = None) -> None:
        """Send one RPC without waiting; ``callback(answer_op, data)`` runs when it is answered.

        Returns once the frame is written; ``ConnectionError`` if the connection ended first.
        """
        self._send(encode_frame(op, {} if data is None else data), _Waiter(callback))
        if self._flushing:
            return  # called from a callback inside another rpc(), which writes this frame too
        self._flushing = True
        callback_error = None
        try:
            while self._out:
                error = self._pump(None)
                callback_error = callback_error or error
        finally:
            self._flushing = False
        if not self.connected:
            raise ConnectionError(self._closed_reason)
        if callback_error is not None:
            raise callback_error  # only now: the frame is out whole, nothing is left half sent

    send = rpc

    def pending(self) -> int:
        """RPCs sent and not answered yet."""
        return len(self._waiting)

    def poll(self, timeout: float | None = 0) -> None:
        """Process what has arrived, waiting up to ``timeout`` seconds for something."""
        callback_error = self._pump(timeout)
        if callback_error is not None:
            raise callback_error

    def start(self) -> None:
        """Process incoming frames until the server closes the connection (the seed's loop)."""
        while self.connected:
            callback_error = self._pump(None)
            if callback_error is not None:
                raise callback_error

    def close(self) -> None:
        self._shut("connection closed by the client")

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- I/O ---------------------------------------------------------------------------------

    def _send(self, frame: bytes, waiter: _Waiter) -> None:
        """Take the slot and queue the frame in one step, then write what the socket takes now."""
        if not self.connected:
            raise ConnectionError(self._closed_reason)
        self._waiting.append(waiter)
        self._out.append(memoryview(frame))
        self._write()

    def _pump(self, timeout: float | None) -> Exception | None:
        """One round of I/O: deliver the lines already read, or else wait up to ``timeout``
        seconds to write queued frames and read. Returns the first error a user callback raised."""
        if not self.connected:
            raise ConnectionError(self._closed_reason)
        if not self._connect_reported:
            # Like the seed's asyncore client: the connect callback runs from the client's loop,
            # so one registered after the constructor still runs.
            self._connect_reported = True
            self._connect_callback()
        if not self._inbox:
            # Read while we write: the server stops reading when we have too many RPCs
            # unanswered, so reading its answers is what lets our writes go on.
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self._out else 0)
            if events != self._events:
                self._selector.modify(self.sock, events)
                self._events = events
            for _, mask in self._selector.select(timeout):
                if mask & selectors.EVENT_WRITE:
                    self._write()
                if mask & selectors.EVENT_READ:
                    self._receive()
        return self._deliver()

    def _write(self) -> None:
        while self._out and not self._ended:
            view = self._out[0]
            try:
                sent = self.sock.send(view)
            except (BlockingIOError, _ssl.SSLWantWriteError, _ssl.SSLWantReadError):
                return
            except OSError as exc:  # reset or broken pipe: the server has gone
                self._end_input(_End(f"connection lost while sending: {exc}"))
                return
            if sent == len(view):
                self._out.popleft()
            else:
                self._out[0] = view[sent:]

    def _receive(self) -> None:
        if self._ended:
            return
        try:
            data = self.sock.recv(65536)
            if data and self.ssl_context is not None:
                data += _drain_tls(self.sock)
        except (BlockingIOError, _ssl.SSLWantReadError, _ssl.SSLWantWriteError):
            return
        except (_ssl.SSLZeroReturnError, _ssl.SSLEOFError):
            data = b""
        except OSError as exc:  # a reset
            self._end_input(_End(f"connection lost: {exc}"))
            return
        if not data:
            self._end_input(_End("connection closed by the server"))
            return
        for chunk in self._decoder.feed(data):
            if chunk is None:
                # The line is gone, and with it the one way to tell which slot its successors
                # belong to: skipping it would hand every later answer to the call before.
                limit = self.max_frame_bytes
                self._end_input(_End(
                    f"connection closed: a line from the server was longer than max_frame_bytes ({limit} bytes)",
                    FrameTooLarge(f"the answer is longer than max_frame_bytes ({limit} bytes); the connection is closed"),
                ))
                return
            self._inbox.extend(split_lines(chunk))

    def _end_input(self, end: _End) -> None:
        """Read and write nothing more: the lines read before ``end`` are delivered, then it closes."""
        self._inbox.append(end)
        self._ended = True

    def _deliver(self) -> Exception | None:
        callback_error: Exception | None = None
        while self._inbox:
            item = self._inbox.popleft()
            if type(item) is _End:
                if item.head_error is not None:
                    log.warning("%s:%s: %s", self.host, self.port, item.reason)
                self._shut(item.reason, item.head_error)
                break
            try:
                self._dispatch(item)
            except Exception as exc:  # a user callback failed: deliver the rest, then report it
                if callback_error is None:
                    callback_error = exc
        return callback_error

    def _shut(self, reason: str, head_error: Exception | None = None) -> None:
        """Close the connection. No answer will come now: every waiting RPC fails, the oldest
        with ``head_error`` if given, the others with ``ConnectionError(reason)``."""
        if self.connected:
            self._closed_reason = reason
            self._out.clear()
            self._inbox.clear()
            waiting, self._waiting = self._waiting, deque()
            for waiter in waiting:
                waiter.done = True
                waiter.error = head_error or ConnectionError(reason)
                head_error = None
        if self.sock is not None:
            self._selector.unregister(self.sock)
            self.sock.close()
            self.sock = None
        if self.connected:
            self.connected = False
            self._disconnect_callback()
        self._selector.close()

    def _dispatch(self, line: bytes) -> None:
        try:
            op, data = decode_frame(line)
        except MalformedPayload as exc:
            if line.startswith(_ANSWER_PREFIXES):
                # An answer we cannot read still answers the oldest RPC: fail it, keep the rest in step.
                waiter = self._waiting.popleft() if self._waiting else _Waiter()
                waiter.done, waiter.error = True, MalformedPayload(f"the answer could not be read: {exc}")
                if waiter.callback is not None:
                    log.warning("%s:%s: an answer could not be read: %s", self.host, self.port, exc)
            return  # not a frame, and not an answer: nothing waits for it
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


def _drain_tls(sock: _ssl.SSLSocket) -> bytes:
    """What the TLS layer already decrypted (after one recv): no selector event announces it."""
    parts = []
    while sock.pending():
        try:
            parts.append(sock.recv(65536))
        except (_ssl.SSLWantReadError, _ssl.SSLWantWriteError):
            break
    return b"".join(parts)
