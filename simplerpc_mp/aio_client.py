"""An asyncio simplerpc client. Runs in the user's process, on the user's event loop.

    async with AsyncClient("127.0.0.1", 30000) as client:
        client.on("welcome", print)
        answer = await client.call("echo", {"x": 1})

Answers are matched to calls first-in first-out (the protocol has no request ids), so many
``call()``s may be awaited at once on one connection: that is pipelining.
"""

from __future__ import annotations

import asyncio
import inspect
from collections import deque
from typing import Callable

from .errors import MalformedPayload, RemoteError
from .protocol import DEFAULT_MAX_FRAME_BYTES, FrameDecoder, decode_frame, encode_frame, split_lines

__all__ = ["AsyncClient"]


class AsyncClient:
    def __init__(self, host: str = "127.0.0.1", port: int = 30000, *, max_frame_bytes: int = 64 * DEFAULT_MAX_FRAME_BYTES):
        self.host = host
        self.port = port
        self._decoder = FrameDecoder(max_frame_bytes)
        self._waiting: deque[asyncio.Future] = deque()
        self._push_callbacks: dict[str, list[Callable]] = {}
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._read_task: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self.closed = asyncio.Event()

    async def connect(self) -> "AsyncClient":
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        self._read_task = asyncio.create_task(self._read_loop())
        return self

    def on(self, op: str, fn: Callable) -> Callable:
        """Call ``fn(data)`` (a function or a coroutine function) for every push of ``op``."""
        self._push_callbacks.setdefault(op, []).append(fn)
        return fn

    async def call(self, op: str, data: dict | None = None, timeout: float | None = None) -> dict:
        """Send one RPC and await its answer: the OKAY dict, or ``RemoteError`` on FAIL."""
        if self._writer is None or self.closed.is_set():
            raise ConnectionError("not connected")
        future = asyncio.get_running_loop().create_future()
        self._waiting.append(future)
        self._writer.write(encode_frame(op, {} if data is None else data))
        await self._writer.drain()
        # shield: on timeout the future stays queued, so the late answer still finds its place.
        op_answer, payload = await asyncio.wait_for(asyncio.shield(future), timeout)
        if op_answer == "FAIL":
            raise RemoteError(str(payload.get("reason")), str(payload.get("message")))
        return payload

    async def close(self) -> None:
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
        self._fail_waiting()

    async def __aenter__(self) -> "AsyncClient":
        return await self.connect()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _read_loop(self) -> None:
        try:
            while True:
                data = await self._reader.read(262144)
                if not data:
                    break
                for chunk in self._decoder.feed(data):
                    if chunk is not None:
                        for line in split_lines(chunk):
                            try:
                                self._dispatch(line)
                            except MalformedPayload:
                                continue  # not a frame: skip it, keep the answers in step
        except ConnectionError:
            pass
        finally:
            self.closed.set()
            self._fail_waiting()

    def _dispatch(self, line: bytes) -> None:
        op, data = decode_frame(line)
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

    def _fail_waiting(self) -> None:
        while self._waiting:
            future = self._waiting.popleft()
            if not future.done():
                future.set_exception(ConnectionError("connection closed before the answer came"))
