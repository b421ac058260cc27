"""Baseline (b), asyncio + ProcessPoolExecutor: the server of ``baseline_single`` with each RPC sent
to a ``concurrent.futures.ProcessPoolExecutor``, what a user writes by hand today to use every
core. Answers keep the client's order (a connection's futures are answered oldest first); the
line is decoded, run and encoded in the pool process (with the standard library's json, or
``--codec mp``); pushes come back with the answer.

    python -m bench.baseline_pool --port 0 --handlers bench.handlers --workers 2
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections import deque
from concurrent.futures import ProcessPoolExecutor

from simplerpc_mp.handlers import Conn, load_handlers

try:
    from bench.baseline_single import Hub, RPCProtocol, answer_line, parse_args, serve, use_codec
except ImportError:  # run as a script: python bench/baseline_pool.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench.baseline_single import Hub, RPCProtocol, answer_line, parse_args, serve, use_codec

_handlers = None  # the handler registry of this pool process


def _load(spec: str, codec: str) -> None:
    global _handlers
    use_codec(codec)
    _handlers = load_handlers(spec)


def run_in_pool(net_id: int, line: bytes) -> tuple[bytes, list]:
    """Called in a pool process: one RPC line -> (answer, pushes)."""
    pushes: list = []
    return answer_line(_handlers, Conn(net_id, {}, pushes), line), pushes


class PoolProtocol(RPCProtocol):
    def __init__(self, hub: Hub, pool: ProcessPoolExecutor):
        super().__init__(hub)
        self.pool = pool
        self.waiting: deque = deque()  # futures of this connection, in the order sent

    def data_received(self, data: bytes) -> None:
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        loop = asyncio.get_running_loop()
        for line in lines:
            future = loop.run_in_executor(self.pool, run_in_pool, self.net_id, line)
            future.add_done_callback(self.answer_ready)
            self.waiting.append(future)

    def answer_ready(self, _future) -> None:
        waiting = self.waiting
        done = []
        while waiting and waiting[0].done():  # the oldest first: answers keep the client's order
            done.append(waiting.popleft().result())
        self.send_answers(done)


def main(argv=None) -> None:
    args = parse_args(argv)
    hub = Hub(load_handlers(args.handlers))
    workers = args.workers or os.cpu_count() or 1
    with ProcessPoolExecutor(workers, initializer=_load, initargs=(args.handlers, args.codec)) as pool:
        # Start the pool processes before announcing, as simplerpc-mp boots its workers first.
        list(pool.map(abs, range(workers * 4)))
        asyncio.run(serve(args.host, args.port, lambda: PoolProtocol(hub, pool), f" (pool of {workers})"))


if __name__ == "__main__":
    sys.exit(main())
