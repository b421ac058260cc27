"""Where the acceptor's time goes under echo load, per RPC.

    python bench/profile_acceptor.py [--tool py-spy|cprofile] [--seconds 5] [--workers N]

``py-spy`` (``pip install py-spy``): samples the running acceptor of ``simplerpc-mp serve`` from
outside, without slowing it much, and turns each function's share of the samples into
microseconds per RPC (share x acceptor CPU time in the window / RPCs answered in the window).

``cprofile``: runs the ``Server`` in a child process under ``cProfile`` and prints each
function's own time and calls per RPC. The profiler inflates times (every call is hooked), so
read the calls per RPC and the ranking, not the absolute microseconds.

The load is the echo scenario of ``bench/run.py`` (16 connections x 8 in flight) from a
separate generator process.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import psutil  # noqa: E402

from bench.run import ECHO_DATA, HANDLERS, ServerUnderTest  # noqa: E402
from simplerpc_mp import loadgen  # noqa: E402

WARMUP_S = 1.0


def echo_load(gen, host: str, port: int, seconds: float, conns: int, depth: int):
    return gen.submit(loadgen.run_load, host, port, conns=conns, depth=depth, duration=seconds,
                      data=ECHO_DATA, check=loadgen.check_echo)


def profile_with_pyspy(args) -> None:
    if not shutil.which("py-spy"):
        sys.exit("py-spy not found: pip install py-spy, or use --tool cprofile")
    server = ServerUnderTest("mp", args.workers, Path(args.root).resolve())
    gen = ProcessPoolExecutor(1, mp_context=get_context("spawn"))
    raw = tempfile.NamedTemporaryFile(prefix="acceptor-", suffix=".txt", delete=False).name
    try:
        server.wait_ready()
        echo_load(gen, server.host, server.port, WARMUP_S, args.conns, args.depth).result()
        # The load runs longer than the sampling window, which sits inside it.
        load = echo_load(gen, server.host, server.port, args.seconds + 2.0, args.conns, args.depth)
        time.sleep(1.0)  # let the load reach its steady state before sampling
        target = server.pid
        if args.process == "worker":  # the first worker: it runs about 1/workers of the RPCs
            target = min(p.pid for p in psutil.Process(server.pid).children() if "spawn_main" in " ".join(p.cmdline()))
        user0, sys0 = _cpu_split(target)
        started = time.perf_counter()
        spy = subprocess.run(
            ["py-spy", "record", "--pid", str(target), "--duration", str(int(args.seconds)), "--rate", str(args.rate),
             "--format", "raw", "--output", raw, "--nonblocking"],
            capture_output=True, text=True, timeout=args.seconds + 30,
        )
        window = time.perf_counter() - started
        user1, sys1 = _cpu_split(target)
        result = load.result()
        if spy.returncode != 0:
            sys.exit(f"py-spy failed ({spy.returncode}): {spy.stderr.strip()[-2000:]}")
    finally:
        gen.shutdown()
        server.stop()
    rpcs = result.rate() * window  # RPCs answered during the sampling window, at the run's mean rate
    if args.process == "worker":
        rpcs /= args.workers
    cpu = (user1 - user0) + (sys1 - sys0)
    print(f"echo load: {result.rate():,.0f} RPC/s, {result.answered:,} answered, {result.order_errors} order errors")
    print(f"{args.process} (pid {target}): {cpu:.2f} s CPU in {window:.2f} s = {cpu / window:.0%} of a core, "
          f"{cpu / rpcs * 1e6:.2f} us per RPC ({(user1 - user0) / rpcs * 1e6:.2f} user + "
          f"{(sys1 - sys0) / rpcs * 1e6:.2f} system)")
    report_collapsed(Path(raw).read_text(), cpu / rpcs * 1e6, args.top)
    os.unlink(raw)


def _cpu_split(pid: int) -> tuple[float, float]:
    times = psutil.Process(pid).cpu_times()
    return times.user, times.system


# Where a process waits for work. py-spy's idle detection misses most of this waiting (the
# acceptor sleeps in epoll_wait thousands of times a second), so samples whose innermost frame
# is one of these are left out, and the process's CPU time is spread over the others.
WAITING = {"EpollSelector.select (selectors.py)", "PollSelector.select (selectors.py)",
           "Connection._recv (connection.py)", "wait (connection.py)"}


def report_collapsed(text: str, us_per_rpc: float, top: int) -> None:
    """Self and inclusive time per function from py-spy's collapsed stacks."""
    own = collections.Counter()
    inclusive = collections.Counter()
    by_line = collections.Counter()
    total = waiting = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        count = int(count)
        frames = [_function(frame) for frame in stack.split(";")]
        if frames[-1] in WAITING:
            waiting += count
            continue
        total += count
        own[frames[-1]] += count
        by_line[_short(stack.rsplit(";", 1)[-1])] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        print("no samples")
        return
    scale = us_per_rpc / total
    print(f"\n{total} samples at work, {waiting} waiting (left out); us/RPC = share of the samples at work "
          f"x {us_per_rpc:.2f} us")
    print(f"\n{'self us/RPC':>11}  {'share':>6}  function (self time: the function's own code and C calls)")
    for frame, count in own.most_common(top):
        print(f"{count * scale:11.3f}  {count / total:6.1%}  {frame}")
    print(f"\n{'self us/RPC':>11}  {'share':>6}  line (self time by source line)")
    for frame, count in by_line.most_common(top):
        print(f"{count * scale:11.3f}  {count / total:6.1%}  {frame}")
    print(f"\n{'incl us/RPC':>11}  {'share':>6}  function (inclusive: with everything it calls)")
    entry = "Server.start (server.py)" if "Server.start (server.py)" in inclusive else "worker_main (worker.py)"
    for frame, count in inclusive.most_common(top + 16):
        if count >= inclusive.get(entry, total) and frame != entry:
            continue  # the frames above the server loop (runpy, typer, cli)
        print(f"{count * scale:11.3f}  {count / total:6.1%}  {frame}")


def _function(frame: str) -> str:
    # "function (path/to/file.py:123)" -> "function (file.py)"
    name, _, where = frame.partition(" (")
    return f"{name} ({os.path.basename(where.rstrip(')')).rsplit(':', 1)[0]})" if where else name


def _short(frame: str) -> str:
    # "function (path/to/file.py:123)" -> "function (file.py:123)"
    name, _, where = frame.partition(" (")
    return f"{name} ({os.path.basename(where.rstrip(')'))})" if where else name


# -- cProfile -------------------------------------------------------------------------------


def serve_profiled(stats_path: str, workers: int) -> None:
    """Child: run the Server under cProfile until SIGTERM, then write the stats."""
    import cProfile

    from simplerpc_mp.server import Server

    def announce(server) -> None:
        host, port = server.address
        print(f"listening on {host}:{port}", flush=True)

    server = Server("127.0.0.1", 0, HANDLERS, workers, on_ready=announce, log_level="warning")
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        server.start()
    finally:
        profiler.disable()
        profiler.dump_stats(stats_path)


def profile_with_cprofile(args) -> None:
    import pstats
    import selectors
    import signal

    stats_path = tempfile.NamedTemporaryFile(prefix="acceptor-", suffix=".pstats", delete=False).name
    proc = subprocess.Popen([sys.executable, __file__, "--serve-profiled", stats_path, "--workers", str(args.workers)],
                            cwd=REPO, stdout=subprocess.PIPE, start_new_session=True)
    gen = ProcessPoolExecutor(1, mp_context=get_context("spawn"))
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            if not sel.select(60):
                sys.exit("profiled server did not start in 60s")
        line = proc.stdout.readline().decode()
        host, port = line.split("listening on ")[1].strip().rsplit(":", 1)
        warm = echo_load(gen, host, int(port), WARMUP_S, args.conns, args.depth).result()
        result = echo_load(gen, host, int(port), args.seconds, args.conns, args.depth).result()
    finally:
        gen.shutdown()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    total_rpcs = warm.answered + result.answered  # the profile covers both runs
    print(f"echo load under cProfile: {result.rate():,.0f} RPC/s; {total_rpcs:,} RPCs answered in all")
    stats = pstats.Stats(stats_path)
    os.unlink(stats_path)
    print(f"\n{'own us/RPC':>10}  {'calls/RPC':>9}  function   (own time, inflated by the profiler)")
    rows = sorted(stats.stats.items(), key=lambda item: -item[1][2])[: args.top]
    for (filename, lineno, name), (cc, nc, tt, ct, callers) in rows:
        print(f"{tt / total_rpcs * 1e6:10.3f}  {nc / total_rpcs:9.3f}  {name} ({os.path.basename(filename)}:{lineno})")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tool", choices=("py-spy", "cprofile"), default="py-spy")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--conns", type=int, default=16)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--rate", type=int, default=500, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--process", choices=("acceptor", "worker"), default="acceptor",
                        help="py-spy only: profile the acceptor or one worker (per-RPC figures then assume "
                             "each worker ran 1/workers of the RPCs)")
    parser.add_argument("--root", default=str(REPO), help="py-spy only: run simplerpc-mp from this checkout")
    parser.add_argument("--serve-profiled", metavar="STATS", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.seconds = max(1.0, min(args.seconds, 120.0))
    if args.serve_profiled:
        serve_profiled(args.serve_profiled, args.workers)
    elif args.tool == "py-spy":
        profile_with_pyspy(args)
    else:
        profile_with_cprofile(args)


if __name__ == "__main__":
    main()
