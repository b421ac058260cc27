"""Acceptor <-> worker transport candidates, measured: which IPC costs the acceptor least?

    python bench/ipc_compare.py [--quick]

Between this process and a spawned child, for messages of typical batch sizes (one echo RPC
line of ~60 bytes, a batch of 8, of 32, of 128, and a 64 KiB payload):

- ``stream``: this process sends N messages back to back (the acceptor handing out batches);
  the child reads them all. Reported: messages per second, and CPU microseconds per message in
  the sender and in the receiver (process time, threads included: the acceptor's cost is the
  sender's column).
- ``pingpong``: one message in flight, the child sends it back; microseconds per round trip
  (two process wake-ups, the floor of an RPC's latency through a worker).

Transports: ``Pipe`` (``multiprocessing.Pipe()``, ``send_bytes``/``recv_bytes``, a socketpair on
Unix), ``Pipe1way`` (``Pipe(duplex=False)``, an ``os.pipe``), ``Queue``
(``multiprocessing.Queue``, pickling in a feeder thread), ``SimpleQueue`` and ``socketpair``
(raw ``socket.socketpair`` with a 4-byte length prefix, records cut from 64 KiB reads, what
``simplerpc_mp.ipc`` does; ``socketpair/256K`` reads 256 KiB at a time).
"""

from __future__ import annotations

import argparse
import multiprocessing
import socket
import struct
import sys
import time
from collections import deque

HEADER = struct.Struct("!i")
LINE = b'echo{"seq":123456,"msg":"hello, simplerpc","n":12345,"ok":true}\n'
SIZES = {"1 RPC": len(LINE), "8 RPCs": 8 * len(LINE), "32 RPCs": 32 * len(LINE),
         "128 RPCs": 128 * len(LINE), "64 KiB": 64 * 1024}
TRANSPORTS = ("Pipe", "Pipe1way", "Queue", "SimpleQueue", "socketpair", "socketpair/256K")
# Reads of the raw socketpair. "socketpair/256K" reads 256 KiB at a time, as the acceptor did:
# CPython allocates the whole size for each recv, and from 128 KiB up glibc serves that with
# mmap + page faults + munmap, ~25 us per call.
READ_BYTES = {"socketpair": 64 * 1024, "socketpair/256K": 256 * 1024}


# -- the two ends of each transport ---------------------------------------------------------


class RawSocket:
    """Length-prefixed records over a socketpair end (blocking), as simplerpc_mp.ipc frames them."""

    def __init__(self, sock: socket.socket, read_bytes: int):
        self.sock = sock
        self.read_bytes = read_bytes
        self.buf = bytearray()
        self.records: deque = deque()

    def send(self, payload: bytes) -> None:
        self.sock.sendall(HEADER.pack(len(payload)) + payload)

    def recv(self) -> bytes:
        while not self.records:
            data = self.sock.recv(self.read_bytes)
            if not data:
                raise EOFError
            buf = self.buf
            buf += data
            start, end = 0, len(buf)
            while end - start >= 4:
                (size,) = HEADER.unpack_from(buf, start)
                if end - start - 4 < size:
                    break
                self.records.append(bytes(buf[start + 4:start + 4 + size]))
                start += 4 + size
            del buf[:start]
        return self.records.popleft()


def make_ends(ctx, transport: str):
    """(parent->child, child->parent) endpoint pairs, as objects with send(bytes)/recv()."""
    if transport in ("Pipe", "Pipe1way"):
        duplex = transport == "Pipe"
        if duplex:
            a, b = ctx.Pipe()
            return (a.send_bytes, a.recv_bytes), (b.send_bytes, b.recv_bytes), (a, b)
        down_r, down_w = ctx.Pipe(duplex=False)
        up_r, up_w = ctx.Pipe(duplex=False)
        return (down_w.send_bytes, up_r.recv_bytes), (up_w.send_bytes, down_r.recv_bytes), (down_w, up_r, up_w, down_r)
    if transport in ("Queue", "SimpleQueue"):
        make = ctx.Queue if transport == "Queue" else ctx.SimpleQueue
        down, up = make(), make()
        return (down.put, up.get), (up.put, down.get), (down, up)
    a, b = socket.socketpair()
    return (a, None), (b, None), (a, b)


def child_main(transport: str, child_end, mode: str, count: int) -> None:
    """In the child: receive ``count`` messages; echo each back (pingpong) or ack at the end."""
    if transport in READ_BYTES:
        end = RawSocket(child_end[0], READ_BYTES[transport])
        send, recv = end.send, end.recv
    else:
        send, recv = child_end
    cpu = time.process_time()
    if mode == "pingpong":
        for _ in range(count):
            send(recv())
    else:
        for _ in range(count):
            recv()
    cpu = time.process_time() - cpu
    send(struct.pack("!d", cpu))


def measure(ctx, transport: str, size: int, mode: str, count: int) -> dict:
    parent_end, child_end, keep = make_ends(ctx, transport)
    proc = ctx.Process(target=child_main, args=(transport, child_end, mode, count))
    proc.start()
    if transport in READ_BYTES:
        end = RawSocket(parent_end[0], READ_BYTES[transport])
        send, recv = end.send, end.recv
    else:
        send, recv = parent_end
    message = (LINE * (size // len(LINE) + 1))[:size]
    send_cpu = time.process_time()
    started = time.perf_counter()
    if mode == "pingpong":
        for _ in range(count):
            send(message)
            recv()
    else:
        for _ in range(count):
            send(message)
    send_cpu = time.process_time() - send_cpu
    (recv_cpu,) = struct.unpack("!d", recv())
    elapsed = time.perf_counter() - started
    proc.join(30)
    if proc.exitcode is None:
        proc.kill()
        proc.join()
    for obj in keep:
        close = getattr(obj, "close", None)
        if close:
            close()
    return {
        "rate": count / elapsed,
        "us_per_msg": elapsed / count * 1e6,
        "sender_cpu_us": send_cpu / count * 1e6,
        "receiver_cpu_us": recv_cpu / count * 1e6,
    }


def table(rows: list[tuple], header: tuple) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    for row in rows:
        lines.append("  ".join(str(c).rjust(w) if i >= 2 else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--transports", nargs="+", choices=TRANSPORTS, default=list(TRANSPORTS))
    args = parser.parse_args(argv)
    ctx = multiprocessing.get_context("spawn")
    budget_bytes = 20e6 if args.quick else 100e6  # bytes per streaming case, to bound the runtime
    stream_max = 20_000 if args.quick else 100_000
    pings = 2_000 if args.quick else 10_000
    stream_rows, ping_rows = [], []
    for label, size in SIZES.items():
        count = int(min(stream_max, max(200, budget_bytes // size)))
        for transport in args.transports:
            r = measure(ctx, transport, size, "stream", count)
            stream_rows.append((label, transport, f"{r['rate']:,.0f}", f"{r['rate'] * size / 1e6:,.1f}",
                                f"{r['sender_cpu_us']:.2f}", f"{r['receiver_cpu_us']:.2f}"))
        print(f"  stream {label} done", file=sys.stderr, flush=True)
    for label in ("1 RPC", "32 RPCs", "64 KiB"):
        size = SIZES[label]
        for transport in args.transports:
            r = measure(ctx, transport, size, "pingpong", pings if size < 10_000 else pings // 4)
            ping_rows.append((label, transport, f"{r['us_per_msg']:.1f}", f"{r['sender_cpu_us']:.2f}",
                              f"{r['receiver_cpu_us']:.2f}"))
        print(f"  pingpong {label} done", file=sys.stderr, flush=True)
    print(f"stream: this process sends back to back, the child receives ({'quick' if args.quick else 'full'} run)")
    print(table(stream_rows, ("message", "transport", "msg/s", "MB/s", "sender CPU us/msg", "receiver CPU us/msg")))
    print("\npingpong: one message in flight, echoed back by the child")
    print(table(ping_rows, ("message", "transport", "round trip us", "parent CPU us/trip", "child CPU us/trip")))


if __name__ == "__main__":
    main()
