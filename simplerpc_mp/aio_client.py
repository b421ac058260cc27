"""An asyncio simplerpc client. Runs in the user's process, on the user's event loop.

    async with AsyncClient("127.0.0.1", 30000) as client:
        client.on("welcome", print)
        answer = await client.call("echo", {"x": 1})

``ssl`` (an ``ssl.SSLContext``, or True for the default verifying context) connects over TLS;
``token`` sends ``auth{"token": ...}`` first, and ``connect()`` raises ``RemoteError`` (reason
``Unauthorized``) if the server refuses it.

Answers are matched to calls first-in first-out (the protocol has no request ids), so many
``call()``s may be awaited at once on one connection: that is pipelining.

A call encodes its frame, then writes it and takes its slot in ``_waiting`` with no ``await``
between, so the slots are in the order of the frames on the wire. A call that gives up
(timeout, cancellation, a failed drain) cancels its future but leaves it queued: its answer,
when it comes, is dropped there. A line longer than ``max_frame_bytes``, or the end of the
connection, fails every waiting call and closes the connection: past a line it could not read,
the client could no longer tell which call an answer belongs to.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import ssl as _ssl
from collections import deque
from typing import Callable

from .client import _ANSWER_PREFIXES
from .errors import FrameTooLarge, MalformedPayload, RemoteError
from .protocol import DEFAULT_MAX_FRAME_BYTES, FrameDecoder, decode_frame, encode_frame, split_lines

__all__ = ["AsyncClient"]

log = logging.getLogger(__name__)


class AsyncClient:
    def __init__(self, host: str = "127.0.0.1", port: int = 30000, *, max_frame_bytes: int = 64 * DEFAULT_MAX_FRAME_BYTES,
                 ssl: _ssl.SSLContext | bool | None = None, token: str | None = None):
        self.host = host
        self.port = port
        self.ssl_context = _ssl.create_default_context() if ssl is True else (ssl or None)
        self.token = token
        self.identity = None  # what the server answered to our token
        self.max_frame_bytes = max_frame_bytes  # the longest line taken from the server
        self._decoder = FrameDecoder(max_frame_bytes)
        self._closed_reason: str | None = None  # set once the connection is closing or closed
        self._waiting: deque[asyncio.Future] = deque()
        self._push_callbacks: dict[str, list[Callable]] = {}
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._read_task: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self.closed = asyncio.Event()

    async def connect(self) -> "AsyncClient":
        self._reader, self._writer = await asyncio.open_connection(
            self.host, self.port, ssl=self.ssl_context,
            server_hostname=self.host if self.ssl_context is not None else None,
        )
        self._read_task = asyncio.create_task(self._read_loop())
        if self.token is not None:
            try:
                answer = await self.call("auth", {"token": self.token})
            except RemoteError as exc:
                self._closed_reason = f"authentication refused: {exc}"
                await self.close()
                raise
            self.identity = answer.get("identity")
        return self

    def on(self, op: str, fn: Callable) -> Callable:
        """Call ``fn(data)`` (a function or a coroutine function) for every push of ``op``."""
        self._push_callbacks.setdefault(op, []).append(fn)
        return fn

    async def call(self, op: str, data: dict | None = None, timeout: float | None = None) -> dict:
        """Send one RPC and await its answer: the OKAY dict, or ``RemoteError`` on FAIL.

        ``asyncio.TimeoutError`` after ``timeout`` seconds (the connection stays usable).
        ``FrameTooLarge`` if the answer is longer than ``max_frame_bytes``, ``ConnectionError``
        if the connection ended first: both leave the connection closed.
        """
        frame = encode_frame(op, {} if data is None else data)  # first: a frame that fails takes no slot
        if self._writer is None or self._closed_reason is not None:
            raise ConnectionError(self._closed_reason or "not connected")
        future = asyncio.get_running_loop().create_future()
        self._writer.write(frame)  # buffered whole or raises: never half a frame
        self._waiting.append(future)
        try:
            op_answer, payload = await asyncio.wait_for(self._answer(future), timeout)
        finally:
            # Given up (timeout, cancellation, drain failed): the cancelled future keeps its slot,
            # so the late answer is dropped there, and no error is set on a future nobody awaits.
            future.cancel()
        if op_answer == "FAIL":
            raise RemoteError(str(payload.get("reason")), str(payload.get("message")))
        return payload

    async def _answer(self, future: asyncio.Future) -> tuple[str, dict]:
        await self._writer.drain()
        return await future

    async def close(self) -> None:
        if self._closed_reason is None:
            self._closed_reason = "connection closed by the client"
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except ConnectionError:
                pass
        if self._read_task is not None:
            self._read_task.cancel()
            try:
                await self._read_task
            except asyncio.CancelledError:
                pass
        self._fail_waiting(self._closed_reason)

    async def __aenter__(self) -> "AsyncClient":
        return await self.connect()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _read_loop(self) -> None:
        reason, head_error = "connection closed by the server", None
        try:
            while True:
                data = await self._reader.read(262144)
                if not data:
                    break
                for chunk in self._decoder.feed(data):
                    if chunk is None:
                        # The line is gone, and with it the one way to tell which call its
                        # successors answer: skipping it would hand each to the call before.
                        limit = self.max_frame_bytes
                        reason = f"connection closed: a line from the server was longer than max_frame_bytes ({limit} bytes)"
                        head_error = FrameTooLarge(
                            f"the answer is longer than max_frame_bytes ({limit} bytes); the connection is closed"
                        )
                        log.warning("%s:%s: %s", self.host, self.port, reason)
                        return
                    for line in split_lines(chunk):
                        self._dispatch(line)
        except OSError as exc:  # a reset, or another socket error: the connection is gone
            reason = f"connection lost: {exc}"
        finally:
            if self._closed_reason is None:
                self._closed_reason = reason
            self._fail_waiting(self._closed_reason, head_error)
            self._writer.close()
            self.closed.set()

    def _dispatch(self, line: bytes) -> None:
        try:
            op, data = decode_frame(line)
        except MalformedPayload as exc:
            if line.startswith(_ANSWER_PREFIXES) and self._waiting:
                # An answer we cannot read still answers the oldest call: fail it, keep the rest in step.
                future = self._waiting.popleft()
                if not future.done():
                    future.set_exception(MalformedPayload(f"the answer could not be read: {exc}"))
            return  # not a frame, and not an answer: nothing waits for it
        if op == "OKAY" or op == "FAIL":
            if self._waiting:
                future = self._waiting.popleft()
                if not future.done():
                    future.set_result((op, data))
            return
        for fn in self._push_callbacks.get(op, ()):
            try:
                result = fn(data)
            except Exception as exc:  # a user callback failed: report it the asyncio way, read on
                asyncio.get_running_loop().call_exception_handler(
                    {"message": f"push callback for {op!r} failed", "exception": exc}
                )
                continue
            if inspect.isawaitable(result):
                task = asyncio.ensure_future(result)
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    def _fail_waiting(self, reason: str, head_error: Exception | None = None) -> None:
        """No answer will come now: every waiting call fails, the oldest with ``head_error`` if
        given (the answer that could not be read was its), the others with ConnectionError."""
        while self._waiting:
            future = self._waiting.popleft()
            if not future.done():
                future.set_exception(head_error or ConnectionError(reason))
            head_error = None
