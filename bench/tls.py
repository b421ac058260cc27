"""TLS scenario (issue 13): echo over TLS against plain text, and acceptor memory per idle TLS connection.

Starts two servers of the same build (``python -m simplerpc_mp serve``, the built-in demo), one
plain and one with ``certfile`` (a trustme certificate made here, ECDSA P-256), and reports:

- echo throughput over TLS as a ratio of plain text, one run each in the same process tree
  (goal: at least 0.7x), loaded by ``simplerpc-mp bench`` (its own process; TLS costs it too);
- the acceptor's RSS per idle connection after ``--conns`` TLS handshakes (10,000 by default;
  this script raises RLIMIT_NOFILE for itself and the server), next to the same for plain text.

    python bench/tls.py --quick        # about a minute: 2,000 idle connections, 2 x 3 s loads each
    python bench/tls.py                # 10,000 idle connections, 10 s loads
    python bench/tls.py --json out.json

Needs trustme (the test extra). RSS counts the acceptor's user-space memory, not kernel buffers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.idle_memory import LISTENING, SPARE_FDS, _WRAPPER, raise_own_fd_limit, settled_rss  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
KiB = 1024
GOAL_RATIO = 0.7


def make_certificates(directory: str) -> tuple[str, str]:
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    server_pem = os.path.join(directory, "server.pem")
    ca_pem = os.path.join(directory, "ca.pem")
    cert.private_key_and_cert_chain_pem.write_to_path(server_pem)
    os.chmod(server_pem, 0o600)
    ca.cert_pem.write_to_path(ca_pem)
    return server_pem, ca_pem


def start_server(extra: list[str], workers: int, nofile: int, max_connections: int, log_path: str):
    command = [
        sys.executable, "-c", _WRAPPER, str(nofile),
        sys.executable, "-m", "simplerpc_mp", "serve", "--host", "127.0.0.1", "--port", "0",
        "--workers", str(workers), "--max-connections", str(max_connections), "--spare-workers", "0", *extra,
    ]
    log = open(log_path, "w")
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL)
    log.close()
    line = proc.stdout.readline()  # the listening line (printed once a worker has booted)
    match = LISTENING.search(line)
    if not match:
        proc.kill()
        raise SystemExit(f"server did not start: {line!r}; log:\n{Path(log_path).read_text()}")
    return proc, match.group(1).decode(), int(match.group(2))


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def echo_rate(host: str, port: int, duration: float, tls_args: list[str], acceptor_pid: int) -> tuple[float, float, float]:
    """``(RPC/s, acceptor CPU us per RPC, load generator CPU us per RPC)`` of one load by
    ``simplerpc-mp bench`` (16 connections x 8 in flight, its own process)."""
    acceptor = psutil.Process(acceptor_pid)
    before = acceptor.cpu_times()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(
        [sys.executable, "-m", "simplerpc_mp", "bench", f"{host}:{port}", "--conns", "16", "--depth", "8",
         "--duration", str(duration), "--json", *tls_args],
        cwd=REPO, capture_output=True, text=True, timeout=duration + 120,
    )
    after = acceptor.cpu_times()
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"bench failed ({done.returncode}): {done.stderr}")
    summary = json.loads(done.stdout)
    if summary.get("fails"):
        raise SystemExit(f"bench saw FAILs: {summary['fails']}")
    # (answers during connect and drain count too: the CPU of those moments is in the window)
    answered = max(summary["answered"], 1)
    server_s = (after.user + after.system) - (before.user + before.system)
    client_s = (children_after.ru_utime + children_after.ru_stime) - (children.ru_utime + children.ru_stime)
    return summary["rate"], server_s * 1e6 / answered, client_s * 1e6 / answered


def idle_bytes_per_conn(host: str, port: int, pid: int, conns: int, context: ssl.SSLContext | None) -> tuple[float, float]:
    """(acceptor RSS bytes per idle connection, seconds to open them); each connection has
    finished its handshake and one echo, so the server holds it as it would any idle client."""
    acceptor = psutil.Process(pid)
    warm = _open(host, port, 50, context)  # warm the code paths (and the allocator) up first
    for sock in warm:
        sock.close()
    before = settled_rss(acceptor)
    started = time.monotonic()
    socks = _open(host, port, conns, context)
    opened = time.monotonic() - started
    try:
        after = settled_rss(acceptor)
    finally:
        for sock in socks:
            sock.close()
    return (after - before) / conns, opened


def _open(host: str, port: int, count: int, context: ssl.SSLContext | None) -> list:
    socks = []
    for _ in range(count):
        sock = socket.create_connection((host, port), timeout=30)
        if context is not None:
            sock = context.wrap_socket(sock, server_hostname=host)
        sock.sendall(b'echo{"idle":1}\n')
        data = b""
        while not data.endswith(b"\n"):
            more = sock.recv(4096)
            if not more:
                raise SystemExit("the server closed an idle connection")
            data += more
        socks.append(sock)
    return socks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="about a minute: 2,000 idle connections, 2 x 3 s loads each")
    parser.add_argument("--conns", type=int, default=None, help="idle connections (default 10,000; --quick 2,000)")
    parser.add_argument("--duration", type=float, default=None, help="seconds per echo load (default 10; --quick 3)")
    parser.add_argument("--repeat", type=int, default=None, help="echo loads per server, taking turns, median kept (default 3; --quick 2)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    conns = args.conns or (2000 if args.quick else 10000)
    duration = args.duration or (3.0 if args.quick else 10.0)
    repeat = args.repeat or (2 if args.quick else 3)
    needed = conns + SPARE_FDS
    own = raise_own_fd_limit(needed)
    if own < needed:
        print(f"RLIMIT_NOFILE hard limit {own} is below {needed}: measuring {own - SPARE_FDS} connections instead")
        conns = own - SPARE_FDS
        needed = own
    workdir = tempfile.mkdtemp(prefix="simplerpc-tls-bench-")
    server_pem, ca_pem = make_certificates(workdir)
    client = ssl.create_default_context(cafile=ca_pem)
    results = {"conns": conns, "duration_s": duration, "workers": args.workers, "openssl": ssl.OPENSSL_VERSION}
    variants = (
        ("plain", [], [], None),
        ("tls", ["--certfile", server_pem], ["--ca-certs", ca_pem], client),
    )
    servers = {}
    try:
        for label, extra, _, _ in variants:
            servers[label] = start_server(extra, args.workers, needed, conns + 100, os.path.join(workdir, label + ".log"))
        # The loads take turns (plain, TLS, plain, TLS, ...), so a change in the machine's load
        # (other processes) falls on both alike.
        runs = {label: [] for label, *_ in variants}
        for _ in range(repeat):
            for label, _, tls_args, _ in variants:
                proc, host, port = servers[label]
                runs[label].append(echo_rate(host, port, duration, tls_args, proc.pid))
        for label, _, _, context in variants:
            proc, host, port = servers[label]
            per_conn, opened = idle_bytes_per_conn(host, port, proc.pid, conns, context)
            results[label] = {
                "echo_rpc_per_s": statistics.median(run[0] for run in runs[label]),
                "acceptor_us_per_rpc": statistics.median(run[1] for run in runs[label]),
                "loadgen_us_per_rpc": statistics.median(run[2] for run in runs[label]),
                "echo_runs": runs[label], "idle_bytes_per_conn": per_conn, "open_s": opened,
            }
    finally:
        for proc, _, _ in servers.values():
            stop(proc)
    plain, tls = results["plain"], results["tls"]
    ratio = tls["echo_rpc_per_s"] / plain["echo_rpc_per_s"]
    results["ratio"] = ratio
    print(f"TLS against plain text, {repeat} loads each taking turns in this process tree ({args.workers} workers, "
          f"{ssl.OPENSSL_VERSION}; {os.cpu_count()} cores shared with whatever else runs):\n")
    print("| measure | plain | TLS | TLS / plain |")
    print("|---|---|---|---|")
    print(f"| echo 16 x 8, RPC/s | {plain['echo_rpc_per_s']:,.0f} | {tls['echo_rpc_per_s']:,.0f} | "
          f"{ratio:.2f}x (goal >= {GOAL_RATIO}x) |")
    for key, what in (("acceptor_us_per_rpc", "acceptor CPU per RPC"), ("loadgen_us_per_rpc", "load generator CPU per RPC")):
        print(f"| {what} | {plain[key]:.1f} us | {tls[key]:.1f} us | {tls[key] / max(plain[key], 1e-9):.2f}x |")
    print(f"| acceptor RSS per idle connection ({conns:,}) | {plain['idle_bytes_per_conn'] / KiB:.1f} KiB | "
          f"{tls['idle_bytes_per_conn'] / KiB:.1f} KiB | {tls['idle_bytes_per_conn'] / max(plain['idle_bytes_per_conn'], 1):.1f}x |")
    print(f"| time to open them (client and server on one machine) | {plain['open_s']:.1f} s | {tls['open_s']:.1f} s | |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
