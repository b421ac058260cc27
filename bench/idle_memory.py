"""Memory scenario (issue 4): many idle connections, and what each costs the acceptor.

Starts ``python -m simplerpc_mp serve --port 0`` (the built-in demo unless ``--handlers``) with
its RLIMIT_NOFILE raised, opens ``--conns`` idle connections (10,000 by default) and reports:

- the acceptor's RSS per connection (goal: at most 4 KiB each), from its RSS before and after;
- the time to accept them (from the first connect until the server holds every descriptor);
- the acceptor's CPU while all of them, then ``--idle-conns`` (1,000) of them, sit idle for
  ``--idle-seconds`` (goal: under 1% of a core).

    python bench/idle_memory.py                 # a table
    python bench/idle_memory.py --conns 2000 --json

Runs in its own process (the clients) and starts the server as a child, which it stops at the end.
RSS counts the acceptor's user-space memory only; the kernel's socket buffers are not in it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
KiB = 1024
GOAL_BYTES_PER_CONN = 4 * KiB
GOAL_IDLE_CPU_PERCENT = 1.0
# The descriptors a server needs beyond its connections: listener, selector, worker pipes, logs.
SPARE_FDS = 200
LISTENING = re.compile(rb"listening on (\S+):(\d+)")

# Raise RLIMIT_NOFILE in the child, then become the server (same pid, so psutil sees the acceptor).
_WRAPPER = (
    "import os, resource, sys\n"
    "n = int(sys.argv[1])\n"
    "resource.setrlimit(resource.RLIMIT_NOFILE, (n, max(n, resource.getrlimit(resource.RLIMIT_NOFILE)[1])))\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def raise_own_fd_limit(wanted: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards ``wanted`` (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def start_server(args, nofile: int, log_path: str) -> tuple[subprocess.Popen, str, int]:
    command = [
        sys.executable, "-c", _WRAPPER, str(nofile),
        sys.executable, "-m", "simplerpc_mp", "serve",
        "--host", "127.0.0.1", "--port", "0",
        "--workers", str(args.workers),
        "--max-connections", str(args.conns + 100),
    ]
    if args.handlers:
        command += ["--handlers", args.handlers]
    log = open(log_path, "w")
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL)
    log.close()
    deadline = time.monotonic() + 60
    banner = b""
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        while b"\n" not in banner:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or proc.poll() is not None:
                proc.kill()
                raise SystemExit(f"server did not start; log:\n{Path(log_path).read_text()}")
            if selector.select(remaining):
                banner += os.read(proc.stdout.fileno(), 4096)
    match = LISTENING.search(banner)
    if not match:
        proc.kill()
        raise SystemExit(f"unexpected banner {banner!r}")
    return proc, match.group(1).decode(), int(match.group(2))


def call_echo(host: str, port: int) -> None:
    """One RPC, to be sure the server and a worker answer (and to warm the code paths up)."""
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b'echo{"warm":"up"}\n')
        data = b""
        while b"OKAY" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                raise SystemExit(f"server closed the connection: {data!r}")
            data += chunk


def wait_for(predicate, timeout: float, what: str, interval: float = 0.01):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def settled_rss(proc: psutil.Process, seconds: float = 0.5) -> int:
    """The RSS once it stopped changing for ``seconds`` (connect hooks and frees finished)."""
    last = proc.memory_info().rss
    stable_since = time.monotonic()
    deadline = stable_since + 30
    while time.monotonic() - stable_since < seconds and time.monotonic() < deadline:
        time.sleep(0.05)
        now = proc.memory_info().rss
        if now != last:
            last, stable_since = now, time.monotonic()
    return last


def listen_drops() -> int:
    """The kernel's count of SYNs dropped at full accept queues (Linux TcpExt ListenDrops), or -1."""
    try:
        with open("/proc/net/netstat") as f:
            lines = f.read().splitlines()
    except OSError:
        return -1
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:]))
            return int(table.get("ListenDrops", -1))
    return -1


def cpu_seconds(procs) -> float:
    total = 0.0
    for p in procs:
        try:
            times = p.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def measure_idle_cpu(acceptor: psutil.Process, seconds: float) -> tuple[float, float]:
    """Percent of one core used by the acceptor, and by its workers together, over ``seconds``."""
    workers = acceptor.children(recursive=True)
    a0, w0, t0 = cpu_seconds([acceptor]), cpu_seconds(workers), time.monotonic()
    time.sleep(seconds)  # the measurement window: nothing to wait for, the server should be idle
    elapsed = time.monotonic() - t0
    return 100 * (cpu_seconds([acceptor]) - a0) / elapsed, 100 * (cpu_seconds(workers) - w0) / elapsed


def open_connections(host: str, port: int, count: int) -> tuple[list[socket.socket], float]:
    """``count`` connected sockets, and the slowest connect() in seconds (1s+ means a SYN retry)."""
    socks = []
    slowest = 0.0
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        started = time.monotonic()
        sock.connect((host, port))
        slowest = max(slowest, time.monotonic() - started)
        socks.append(sock)
    return socks, slowest


def wait_quiet(procs, timeout: float = 30.0, window: float = 0.5, percent: float = 0.5) -> float:
    """Wait until ``procs`` together use under ``percent`` of a core over ``window`` (the work
    the previous step caused, such as on_disconnect hooks, is done); returns seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        before = cpu_seconds(procs)
        time.sleep(window)
        if 100 * (cpu_seconds(procs) - before) / window < percent:
            break
    return time.monotonic() - started


def run(args) -> dict:
    needed = args.conns + SPARE_FDS
    own = raise_own_fd_limit(needed)
    if own < needed:
        raise SystemExit(f"RLIMIT_NOFILE hard limit {own} is too low for {args.conns} connections; try --conns {own - SPARE_FDS}")
    log_path = tempfile.NamedTemporaryFile(prefix="simplerpc-idle-", suffix=".log", delete=False).name
    server, host, port = start_server(args, needed, log_path)
    acceptor = psutil.Process(server.pid)
    socks: list[socket.socket] = []
    try:
        wait_for(lambda: len(acceptor.children()) >= args.workers, 30, "the workers")
        for _ in range(20):
            call_echo(host, port)
        base_fds = wait_for(lambda: _stable_fds(acceptor), 10, "a stable descriptor count")
        base_rss = settled_rss(acceptor)

        drops_before = listen_drops()
        started = time.monotonic()
        socks, slowest_connect = open_connections(host, port, args.conns)
        connected_s = time.monotonic() - started
        wait_for(lambda: acceptor.num_fds() >= base_fds + args.conns, 120, "the server to accept every connection")
        accepted_s = time.monotonic() - started
        # Drops mean the accept queue overflowed and clients waited for a SYN retry (1s each):
        # the acceptor fell behind. (The count is host-wide: other programs can add to it.)
        drops = listen_drops() - drops_before if drops_before >= 0 else -1
        rss = settled_rss(acceptor)
        everyone = [acceptor, *acceptor.children(recursive=True)]
        wait_quiet(everyone)
        cpu_all, workers_all = measure_idle_cpu(acceptor, args.idle_seconds)

        keep = min(args.idle_conns, args.conns)
        for sock in socks[keep:]:
            sock.close()
        del socks[keep:]
        wait_for(lambda: acceptor.num_fds() <= base_fds + keep, 120, "the server to close the connections")
        rss_after_close = settled_rss(acceptor)
        settle_s = wait_quiet(everyone)
        cpu_some, workers_some = measure_idle_cpu(acceptor, args.idle_seconds)

        with open(log_path) as f:
            errors = [line.rstrip() for line in f if " ERROR " in line or "Traceback" in line]
        return {
            "connections": args.conns,
            "workers": args.workers,
            "handlers": args.handlers or "simplerpc_mp.demo:handlers",
            "rss_base_bytes": base_rss,
            "rss_with_connections_bytes": rss,
            "rss_per_connection_bytes": (rss - base_rss) / args.conns,
            "rss_after_closing_bytes": rss_after_close,
            "connect_seconds": connected_s,
            "accept_seconds": accepted_s,
            "accepts_per_second": args.conns / accepted_s,
            "listen_drops": drops,
            "slowest_connect_seconds": slowest_connect,
            "settle_after_closing_seconds": settle_s,
            "idle_seconds": args.idle_seconds,
            "idle_cpu_percent_all": cpu_all,
            "idle_workers_cpu_percent_all": workers_all,
            "idle_conns": keep,
            "idle_cpu_percent": cpu_some,
            "idle_workers_cpu_percent": workers_some,
            "server_errors": errors[:5],
        }
    finally:
        for sock in socks:
            sock.close()
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            for child in acceptor.children(recursive=True):
                child.kill()
            server.kill()
            server.wait()
        server.stdout.close()
        os.unlink(log_path)


def _stable_fds(proc: psutil.Process) -> int | None:
    first = proc.num_fds()
    time.sleep(0.1)
    return first if proc.num_fds() == first else None


def print_table(r: dict) -> None:
    per_conn = r["rss_per_connection_bytes"]
    mark = lambda ok: "ok" if ok else "OVER GOAL"  # noqa: E731
    rows = [
        ("connections", f"{r['connections']:,}", ""),
        ("acceptor RSS before", f"{r['rss_base_bytes'] / 2**20:.1f} MiB", ""),
        ("acceptor RSS with them", f"{r['rss_with_connections_bytes'] / 2**20:.1f} MiB", ""),
        ("RSS per connection", f"{per_conn / KiB:.2f} KiB", f"goal <= 4 KiB: {mark(per_conn <= GOAL_BYTES_PER_CONN)}"),
        ("RSS after closing all but idle_conns", f"{r['rss_after_closing_bytes'] / 2**20:.1f} MiB", ""),
        ("time to connect them (client)", f"{r['connect_seconds']:.2f} s",
         f"slowest connect() {r['slowest_connect_seconds'] * 1000:.0f} ms"),
        ("time to accept them (server)", f"{r['accept_seconds']:.2f} s",
         f"{r['accepts_per_second']:,.0f}/s; SYNs dropped at a full backlog: {r['listen_drops']}"),
        (f"idle CPU, {r['connections']:,} conns, acceptor", f"{r['idle_cpu_percent_all']:.2f} %",
         f"workers {r['idle_workers_cpu_percent_all']:.2f} %"),
        ("busy closing the others (disconnect hooks)", f"{r['settle_after_closing_seconds']:.1f} s", ""),
        (f"idle CPU, {r['idle_conns']:,} conns, acceptor", f"{r['idle_cpu_percent']:.2f} %",
         f"goal < 1%: {mark(r['idle_cpu_percent'] < GOAL_IDLE_CPU_PERCENT)}; workers {r['idle_workers_cpu_percent']:.2f} %"),
    ]
    width = max(len(name) for name, _, _ in rows)
    print(f"idle memory: {r['handlers']}, {r['workers']} worker(s), idle windows of {r['idle_seconds']:g}s")
    for name, value, note in rows:
        print(f"  {name:<{width}}  {value:>12}  {note}")
    for line in r["server_errors"]:
        print(f"  server error: {line}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conns", type=int, default=10_000, help="idle connections to open (default 10000)")
    parser.add_argument("--idle-conns", type=int, default=1_000, help="connections kept for the idle CPU window")
    parser.add_argument("--idle-seconds", type=float, default=3.0, help="length of each idle CPU window")
    parser.add_argument("--workers", type=int, default=1, help="worker processes of the server")
    parser.add_argument("--handlers", default="", help="handler module (default: the built-in demo)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    ok = result["rss_per_connection_bytes"] <= GOAL_BYTES_PER_CONN and result["idle_cpu_percent"] < GOAL_IDLE_CPU_PERCENT
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
