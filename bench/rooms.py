"""Room fan-out: one ``rpc_room`` to a room of N members against ``rpc_all`` to N clients.

    python bench/rooms.py [--quick] [--members 1000 10000] [--repeat N] [--json FILE]

One simplerpc-mp server (``bench/run.py``'s ``ServerUnderTest``, serving ``bench.handlers``, 2
workers, no spare) as a child process; this process holds the N client sockets on one selectors
loop. For each N, the same N connections are used twice, in turn: every one of them answers one
barrier RPC (``room_join{}`` for the room: every client is a member; ``echo{}`` for ``rpc_all``),
then the first sends one trigger RPC (``room_fanout`` or ``fanout``) at a time, and the next
goes out once every client has its push. Both push the same ``news`` frame, encoded once by a
worker and sent to the acceptor in one message; the acceptor appends it to each member's
output. Reported: deliveries per second (pushes received by the clients, over the rounds only)
and the acceptor's CPU per delivery (the server's main process, ``psutil``, sampled after the
barrier and after the last round). The client side is a single Python loop reading N sockets,
so deliveries/s is bounded by it for both alike: the CPU per delivery is the acceptor's own
cost. The last rows time the acceptor's fan-out loop alone, in this process (no sockets), which
the machine's noise hardly touches. Prints one markdown table, with the room's figures as ratios
of rpc_all's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import selectors
import socket
import statistics
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.run import ServerUnderTest  # noqa: E402

MEMBERS = (1000, 10000)
DURATION_S = (3.0, 10.0)  # of the rounds, per measurement: (quick, full)
CONNECT_BATCH = 500  # connections opened before their barrier is answered (under the listen backlog)
ROUND_TIMEOUT_S = 30.0
RECV_BYTES = 64 * 1024
TRIGGER_DATA = {"headline": "all hands"}
MODES = {"rpc_all": ("echo", "fanout"), "rpc_room": ("room_join", "room_fanout")}


def raise_open_files(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            sys.exit(f"bench/rooms.py: needs {need} open files, the hard limit (ulimit -Hn) is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def connect(server: ServerUnderTest, count: int, barrier: bytes, selector) -> list[socket.socket]:
    """``count`` connections, each registered with ``selector`` once its barrier RPC is answered."""
    socks: list[socket.socket] = []
    while len(socks) < count:
        waiting = {}
        for _ in range(min(CONNECT_BATCH, count - len(socks))):
            sock = socket.create_connection((server.host, server.port), timeout=10)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(barrier)
            sock.setblocking(False)
            waiting[sock] = b""
            selector.register(sock, selectors.EVENT_READ, len(socks))
            socks.append(sock)
        deadline = time.monotonic() + ROUND_TIMEOUT_S
        while waiting:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(waiting)} barrier RPCs unanswered")
            for key, _ in selector.select(1.0):
                sock = key.fileobj
                if sock not in waiting:
                    continue
                data = waiting[sock] + sock.recv(RECV_BYTES)
                if b"\n" in data:
                    if not data.startswith(b"OKAY"):
                        raise RuntimeError(f"barrier answered {data[:200]!r}")
                    del waiting[sock]
                else:
                    waiting[sock] = data
    return socks


def wait_disconnected(server: ServerUnderTest, timeout: float = 60.0) -> None:
    """Until the server holds no client connection (so rpc_all reaches only the next set)."""
    deadline = time.monotonic() + timeout
    process = psutil.Process(server.pid)
    while time.monotonic() < deadline:
        established = [c for c in process.net_connections(kind="tcp")
                       if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == server.port]
        if not established:
            return
        time.sleep(0.1)  # polling the server's sockets from outside: nothing to wait on
    raise TimeoutError("the server still holds connections")


def measure(server: ServerUnderTest, mode: str, members: int, duration: float) -> dict:
    barrier_op, trigger_op = MODES[mode]
    trigger = f"{trigger_op}{json.dumps(TRIGGER_DATA, separators=(',', ':'))}\n".encode()
    selector = selectors.DefaultSelector()
    socks = connect(server, members, f"{barrier_op}{{}}\n".encode(), selector)
    partial: dict[int, bytes] = {}
    rounds = deliveries = errors = 0
    try:
        cpu_before = server.cpu()[0]
        clock = time.perf_counter
        start = clock()
        while clock() - start < duration:
            waiting = set(range(members))
            answered = False
            socks[0].sendall(trigger)
            deadline = clock() + ROUND_TIMEOUT_S
            while waiting or not answered:
                if clock() > deadline:
                    raise TimeoutError(f"round {rounds + 1}: {len(waiting)} members without the push")
                for key, _ in selector.select(1.0):
                    index = key.data
                    chunk = partial.pop(index, b"") + key.fileobj.recv(RECV_BYTES)
                    if not chunk:
                        raise ConnectionError("the server closed a member")
                    lines = chunk.split(b"\n")
                    if lines[-1]:
                        partial[index] = lines[-1]
                    for line in lines[:-1]:
                        if line.startswith(b"OKAY"):
                            answered = True
                        elif line.startswith(b"FAIL"):
                            answered = True
                            errors += 1
                        elif index in waiting:
                            waiting.discard(index)
                            deliveries += 1
                        else:
                            errors += 1  # a second push in one round
            rounds += 1
        elapsed = clock() - start
        cpu = server.cpu()[0] - cpu_before
    finally:
        selector.close()
        for sock in socks:
            sock.close()
    wait_disconnected(server)
    return {
        "mode": mode, "members": members, "rounds": rounds, "deliveries": deliveries, "errors": errors,
        "elapsed_s": elapsed, "deliveries_per_s": deliveries / elapsed,
        "acceptor_us_per_delivery": cpu / deliveries * 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 s of rounds per measurement instead of 10")
    parser.add_argument("--members", type=int, nargs="+", default=list(MEMBERS))
    parser.add_argument("--repeat", type=int, default=1, help="measure each N times, keep the median")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", help="also write every result here")
    args = parser.parse_args(argv)
    duration = DURATION_S[0 if args.quick else 1]
    largest = max(args.members)
    raise_open_files(largest + 100)
    server = ServerUnderTest("mp", args.workers, extra_args=(
        "--spare-workers", "0", "--max-connections", str(largest + 100)))
    results = []
    try:
        server.wait_ready()
        for members in args.members:
            for repeat in range(args.repeat):
                # In turn, and each first every other time, so the machine's drifts hit both alike.
                for mode in (list(MODES) if repeat % 2 == 0 else list(MODES)[::-1]):
                    result = measure(server, mode, members, duration)
                    results.append(result)
                    print(f"# {mode} x {members}: {result['deliveries_per_s']:,.0f} deliveries/s, "
                          f"{result['acceptor_us_per_delivery']:.2f} us/delivery, {result['rounds']} rounds, "
                          f"{result['errors']} errors", file=sys.stderr, flush=True)
    finally:
        server.stop()
    loops = {members: fanout_loop_ns(members) for members in args.members}
    print(table(results, loops, args))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "date": datetime.date.today().isoformat(), "python": platform.python_version(),
            "cpus": psutil.cpu_count(), "results": results,
        }, indent=2))
    return 1 if any(r["errors"] for r in results) else 0


def fanout_loop_ns(members: int, runs: int = 50) -> dict:
    """The acceptor's fan-out loop alone, in this process (no sockets, no syscalls): ns per
    delivery of ``Acceptor.push(BROADCAST)`` and of ``Acceptor.push_room``, median of 5."""
    import selectors as _selectors

    from simplerpc_mp.acceptor import Acceptor, Connection
    from simplerpc_mp.config import Settings
    from simplerpc_mp.handlers import BROADCAST
    from simplerpc_mp.timers import Timers

    acceptor = Acceptor(Settings(), _selectors.DefaultSelector(), Timers())
    for index in range(members):
        conn = Connection.__new__(Connection)  # only what the push path reads
        conn.net_id, conn.wbuf, conn.events = index + 1, bytearray(), _selectors.EVENT_READ
        acceptor.conns[conn.net_id] = conn
        acceptor.rooms.join(conn.net_id, "bench")
    frame = b'news{"headline":"all hands"}\n'
    pushes = {"rpc_all": lambda: acceptor.push(BROADCAST, frame), "rpc_room": lambda: acceptor.push_room("bench", frame)}
    timings: dict[str, list[float]] = {mode: [] for mode in pushes}
    for _ in range(5):
        for mode, push in pushes.items():
            elapsed = 0.0
            for _ in range(runs):
                for conn in acceptor.conns.values():
                    conn.wbuf.clear()
                acceptor.dirty.clear()
                acceptor.output_bytes = 0
                start = time.perf_counter()
                push()
                elapsed += time.perf_counter() - start
            timings[mode].append(elapsed / runs / members * 1e9)
    return {mode: statistics.median(values) for mode, values in timings.items()}


def table(results: list[dict], loops: dict, args) -> str:
    def median(mode: str, members: int, key: str) -> float:
        return statistics.median(r[key] for r in results if r["mode"] == mode and r["members"] == members)

    lines = [
        f"{datetime.date.today().isoformat()}, Python {platform.python_version()}, {psutil.cpu_count()} cores, "
        f"{args.workers} workers, {'--quick' if args.quick else 'full'}, median of {args.repeat}",
        "",
        "| members | rpc_all deliveries/s | rpc_room deliveries/s | room / all | acceptor CPU per delivery, rpc_all | rpc_room | room / all |",
        "|---|---|---|---|---|---|---|",
    ]
    for members in args.members:
        all_rate = median("rpc_all", members, "deliveries_per_s")
        room_rate = median("rpc_room", members, "deliveries_per_s")
        all_cpu = median("rpc_all", members, "acceptor_us_per_delivery")
        room_cpu = median("rpc_room", members, "acceptor_us_per_delivery")
        lines.append(
            f"| {members:,} | {all_rate:,.0f} | {room_rate:,.0f} | **{room_rate / all_rate:.2f}x** | "
            f"{all_cpu:.2f} µs | {room_cpu:.2f} µs | **{room_cpu / all_cpu:.2f}x** |"
        )
    for members in args.members:
        loop = loops[members]
        lines.append(
            f"| {members:,}: the acceptor's fan-out loop alone (in process, no syscalls) | | | | "
            f"{loop['rpc_all']:.0f} ns | {loop['rpc_room']:.0f} ns | **{loop['rpc_room'] / loop['rpc_all']:.2f}x** |"
        )
    errors = sum(r["errors"] for r in results)
    lines.append("")
    lines.append(f"Every push of every round was checked: {errors} errors. One worker message per push in both.")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
