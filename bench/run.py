"""The benchmark suite: simplerpc-mp against its two baselines, side by side in one run.

    python bench/run.py [--quick] [--json FILE] [--scenarios echo pingpong ...] [--repeat N]

Starts each server under test on 127.0.0.1 as a child process (simplerpc-mp, the single-process
asyncio baseline and the asyncio + ProcessPoolExecutor baseline, all serving ``bench.handlers``),
drives them with ``simplerpc_mp.loadgen`` in a separate process, and prints one table. Every
answer is checked (echo answers byte for byte, with a per-request sequence number, so order is
checked too). Servers are measured in turn within each scenario, so slow drifts of a noisy
machine hit all of them alike; ``--repeat`` runs each measurement N times and keeps the median.
See bench/README.md for what each column means.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import selectors
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from simplerpc_mp import loadgen  # noqa: E402
from workers.cpu import count_primes  # noqa: E402

HANDLERS = "bench.handlers"
LISTENING = re.compile(rb"listening on (\S+):(\d+)")
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
PRIMES_N = 10_000
SCENARIOS = ("echo", "pingpong", "cpu", "payload64k", "fanout", "idle")
# The targets compare "mp" (as installed: orjson, a core dependency) with "single" and "pool",
# which use the standard library's json as a user's own server does. "mp-stdlib" (our workers on
# the standard library's json) and "single-mp" (the single-process baseline on our codec) show
# how much of the difference is the codec and how much the architecture.
SERVERS = ("mp", "mp-stdlib", "single", "single-mp", "pool")
SERVER_NAMES = {
    "mp": "simplerpc-mp",
    "mp-stdlib": "mp, stdlib json",
    "single": "single-process",
    "single-mp": "single, mp codec",
    "pool": "asyncio+pool",
}

# Durations in seconds: (quick, full).
TIMES = {
    "warmup": (0.5, 1.0),
    "echo": (3.0, 10.0),
    "pingpong": (2.0, 5.0),
    "cpu": (3.0, 10.0),
    "payload64k": (2.0, 5.0),
    "fanout": (3.0, 10.0),
    "idle": (2.0, 5.0),
    "inproc": (0.5, 1.0),
}
IDLE_CLIENTS = 1000
IDLE_SETTLE_S = 1.0
FANOUT_LISTENERS = 1000
ECHO_DATA = {"msg": "hello, simplerpc", "n": 12345, "ok": True}
BLOB_DATA = {"blob": "x" * (64 * 1024 - 32)}  # the request line is 64 KiB


def check_primes(request: dict, answer: dict) -> bool:
    return answer == {"n": PRIMES_N, "count": EXPECTED_PRIMES}


EXPECTED_PRIMES = count_primes(PRIMES_N)


# -- servers under test -------------------------------------------------------------------


class ServerUnderTest:
    """One server as a child process in its own process group; ``pid`` is its main process."""

    def __init__(self, kind: str, workers: int, root: Path = REPO, extra_args: tuple = ()):
        """``extra_args``: more ``serve`` flags for simplerpc-mp (``--spare-workers 0``, ...)."""
        self.kind = kind
        py = sys.executable
        env = dict(os.environ)
        env.pop("SIMPLERPC_MP_JSON", None)
        if kind == "mp" or kind.startswith("mp:") or kind == "mp-stdlib":
            args = [py, "-m", "simplerpc_mp", "serve", "--port", "0", "--workers", str(workers),
                    "--handlers", HANDLERS, "--log-level", "warning", *extra_args]
            if kind == "mp-stdlib":
                env["SIMPLERPC_MP_JSON"] = "stdlib"
        elif kind in ("single", "single-mp"):
            args = [py, "-m", "bench.baseline_single", "--port", "0", "--handlers", HANDLERS,
                    "--codec", "mp" if kind == "single-mp" else "stdlib"]
        else:
            args = [py, "-m", "bench.baseline_pool", "--port", "0", "--handlers", HANDLERS, "--workers", str(workers)]
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"bench-{kind}-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(args, cwd=root, stdout=subprocess.PIPE, stderr=self.log, env=env,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self.pid = self.proc.pid
        self.host, self.port = "", 0

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        buffer = b""
        with selectors.DefaultSelector() as selector:
            selector.register(self.proc.stdout, selectors.EVENT_READ)
            while b"\n" not in buffer:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise RuntimeError(f"{self.kind}: not listening after {START_TIMEOUT_S}s; log: {self.log.name}")
                if selector.select(remaining):
                    chunk = os.read(self.proc.stdout.fileno(), 4096)
                    if not chunk:
                        self.proc.wait(STOP_TIMEOUT_S)
                        self.log.seek(0)
                        raise RuntimeError(f"{self.kind} exited with {self.proc.returncode}:\n{self.log.read()}")
                    buffer += chunk
        match = LISTENING.search(buffer)
        if not match:
            raise RuntimeError(f"{self.kind}: unexpected first line {buffer!r}")
        self.host, self.port = match.group(1).decode(), int(match.group(2))

    def cpu(self) -> tuple[float, float]:
        """CPU seconds (user + system) so far: (main process, main + its child processes)."""
        main = psutil.Process(self.pid)
        times = main.cpu_times()
        own = times.user + times.system
        total = own
        for child in main.children(recursive=True):
            try:
                times = child.cpu_times()
            except psutil.Error:
                continue
            total += times.user + times.system
        return own, total

    def cpu_split(self) -> tuple[float, float]:
        """CPU seconds of the main process so far: (user, system)."""
        times = psutil.Process(self.pid).cpu_times()
        return times.user, times.system

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.pid, signal.SIGKILL)  # its workers, if any outlived it
        except ProcessLookupError:
            pass
        if self.proc.poll() is None:
            self.proc.wait(STOP_TIMEOUT_S)
        self.proc.stdout.close()
        self.log.close()
        os.unlink(self.log.name)


# -- measurements (the load itself runs in the generator process) --------------------------


def inproc_rate(seconds: float, tries: int = 3) -> float:
    """Called in a helper process: primes RPCs per second of the handler run in-process, the best
    of ``tries`` timings (the least disturbed by other processes)."""
    from bench.handlers import handlers

    fn = handlers.ops["primes"].fn
    data = {"n": PRIMES_N}
    best = 0.0
    for _ in range(tries):
        count = 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            fn(None, data)
            count += 1
        best = max(best, count / (time.perf_counter() - start))
    return best


def parallel_inproc_rate(workers: int, seconds: float) -> float:
    """The handler run in-process by ``workers`` processes at once: what the cores give right now."""
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        list(pool.map(abs, range(workers)))  # started before timing
        return sum(pool.map(inproc_rate, [seconds] * workers, [1] * workers))


def load_row(result: loadgen.LoadResult, cpu_own: float, cpu_total: float) -> dict:
    answered = result.answered
    return {
        "rate": result.rate(),
        "p50_ms": result.percentile(50) * 1e3,
        "p99_ms": result.percentile(99) * 1e3,
        "sent": result.sent,
        "answered": answered,
        "checked": result.okay - result.order_errors,
        "errors": result.failed + result.order_errors,
        "fails": dict(result.fails),
        "order_errors": result.order_errors,
        "main_cpu_us": cpu_own / answered * 1e6 if answered else 0.0,
        "total_cpu_us": cpu_total / answered * 1e6 if answered else 0.0,
        "elapsed": result.elapsed,
    }


def run_load_scenario(gen, server: ServerUnderTest, quick: bool, **kwargs) -> dict:
    """A short warm-up run, then the measured run with the server's CPU time taken around it."""
    warm = dict(kwargs, duration=TIMES["warmup"][0 if quick else 1])
    gen.submit(loadgen.run_load, server.host, server.port, **warm).result()
    own0, total0 = server.cpu()
    result = gen.submit(loadgen.run_load, server.host, server.port, **kwargs).result()
    own1, total1 = server.cpu()
    return load_row(result, own1 - own0, total1 - total0)


def scenario_kwargs(name: str, quick: bool) -> dict:
    duration = TIMES[name][0 if quick else 1]
    if name == "echo":
        return dict(conns=16, depth=8, duration=duration, op="echo", data=ECHO_DATA, check=loadgen.check_echo)
    if name == "pingpong":
        return dict(conns=1, depth=1, duration=duration, op="echo", data=ECHO_DATA, check=loadgen.check_echo)
    if name == "cpu":
        return dict(conns=4, depth=2, duration=duration, op="primes", data={"n": PRIMES_N}, check=check_primes)
    if name == "payload64k":
        return dict(conns=8, depth=2, duration=duration, op="echo", data=BLOB_DATA, check=loadgen.check_echo)
    raise ValueError(name)


def run_fanout_scenario(gen, server: ServerUnderTest, quick: bool) -> dict:
    duration = TIMES["fanout"][0 if quick else 1]
    own0, total0 = server.cpu()
    result = gen.submit(loadgen.run_fanout, server.host, server.port, listeners=FANOUT_LISTENERS,
                        rounds=1000, duration=duration, op="fanout", data={"headline": "all hands"}).result()
    own1, total1 = server.cpu()
    pushes = result.pushes
    return {
        "rate": result.rate(),
        "p50_ms": result.percentile(50) * 1e3,
        "p99_ms": result.percentile(99) * 1e3,
        "sent": result.rounds,
        "answered": result.rounds,
        "checked": pushes,
        "errors": result.missing + result.answer_errors,
        "main_cpu_us": (own1 - own0) / pushes * 1e6 if pushes else 0.0,
        "total_cpu_us": (total1 - total0) / pushes * 1e6 if pushes else 0.0,
        "elapsed": result.elapsed,
        "rounds": result.rounds,
    }


def run_idle_scenario(server: ServerUnderTest, quick: bool) -> dict:
    """Hold IDLE_CLIENTS silent connections (from this process) and measure the server's CPU."""
    window = TIMES["idle"][0 if quick else 1]
    socks = loadgen.open_idle(server.host, server.port, IDLE_CLIENTS)
    try:
        time.sleep(IDLE_SETTLE_S)  # a measurement window, not a wait for a condition
        own0, total0 = server.cpu()
        start = time.perf_counter()
        time.sleep(window)
        own1, total1 = server.cpu()
        elapsed = time.perf_counter() - start
    finally:
        loadgen.close_all(socks)
    return {
        "idle_main_pct": (own1 - own0) / elapsed * 100,
        "idle_total_pct": (total1 - total0) / elapsed * 100,
        "clients": IDLE_CLIENTS,
        "elapsed": elapsed,
    }


def median_run(runs: list[dict], key: str, lower_is_better: bool = False) -> dict:
    ordered = sorted(runs, key=lambda r: r[key], reverse=not lower_is_better)
    best = dict(ordered[(len(ordered) - 1) // 2])
    if len(runs) > 1:
        for name in (key, "rate", "p50_ms", "main_cpu_us", "total_cpu_us"):
            if name in runs[0]:
                best["all_" + name] = [round(r[name], 3) for r in runs]
    return best


# -- the table ------------------------------------------------------------------------------


def ratios(rows: dict, scenario: str, kind: str) -> dict:
    """Ratio of ``kind`` to each baseline: throughput (higher is better), or p50 for pingpong."""
    out = {}
    mine = rows.get((scenario, kind))
    for base in ("single", "pool"):
        other = rows.get((scenario, base))
        if not mine or not other or "rate" not in mine:
            continue
        if scenario == "pingpong":
            out[base] = mine["p50_ms"] / other["p50_ms"] if other["p50_ms"] else 0.0
        else:
            out[base] = mine["rate"] / other["rate"] if other["rate"] else 0.0
    return out


def format_table(rows: dict, scenarios: list[str], servers: list[str]) -> str:
    header = ("scenario", "server", "throughput", "p50 ms", "p99 ms", "checked", "errors", "srv CPU", "vs single", "vs pool")
    lines = []
    for scenario in scenarios:
        for kind in servers:
            row = rows.get((scenario, kind))
            if row is None:
                continue
            ratio = ratios(rows, scenario, kind)
            fmt_ratio = lambda b: f"{ratio[b]:.2f}x" if b in ratio else "-"  # noqa: E731
            if scenario == "idle":
                lines.append((scenario, SERVER_NAMES.get(kind, kind), "-", "-", "-", f"{row['clients']} conns", "-",
                              f"{row['idle_total_pct']:.2f}% core", "-", "-"))
                continue
            unit = "push/s" if scenario == "fanout" else "RPC/s"
            cpu_unit = "us/push" if scenario == "fanout" else "us/RPC"
            lines.append((
                scenario, SERVER_NAMES.get(kind, kind), f"{row['rate']:,.0f} {unit}", f"{row['p50_ms']:.3f}", f"{row['p99_ms']:.3f}",
                f"{row['checked']:,}", f"{row['errors']:,}",
                f"{row['main_cpu_us']:.1f}/{row['total_cpu_us']:.1f} {cpu_unit}", fmt_ratio("single"), fmt_ratio("pool"),
            ))
    widths = [max(len(str(r[i])) for r in [header, *lines]) for i in range(len(header))]
    out = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths))]
    out.append("  ".join("-" * w for w in widths))
    for line in lines:
        out.append("  ".join(str(c).rjust(w) if i >= 2 else str(c).ljust(w) for i, (c, w) in enumerate(zip(line, widths))))
    return "\n".join(out)


def evaluate_targets(rows: dict, inproc: float | None, workers: int, parallel: float | None = None) -> list[dict]:
    """The targets of issue 5 for simplerpc-mp, each with its measured value."""
    targets = []

    def add(name: str, value, goal: str, met: bool) -> None:
        targets.append({"target": name, "measured": value, "goal": goal, "met": met})

    echo = ratios(rows, "echo", "mp")
    if "single" in echo:
        add("echo throughput vs single-process", f"{echo['single']:.2f}x", ">= 1.0x", echo["single"] >= 1.0)
    if "pool" in echo:
        add("echo throughput vs asyncio+pool", f"{echo['pool']:.1f}x", ">= 15x", echo["pool"] >= 15)
    ping = ratios(rows, "pingpong", "mp")
    if "single" in ping:
        add("ping-pong p50 latency vs single-process", f"{ping['single']:.2f}x", "<= 2.0x", ping["single"] <= 2.0)
    cpu = rows.get(("cpu", "mp"))
    if cpu and inproc:
        share = cpu["rate"] / (workers * inproc)
        add(f"CPU-heavy throughput vs {workers} x in-process rate ({inproc:.0f}/s)", f"{share:.1%}", ">= 95%", share >= 0.95)
    if cpu and parallel:
        share = cpu["rate"] / parallel
        add(f"(context) CPU-heavy throughput vs {workers} processes running it in-process at once ({parallel:.0f}/s)",
            f"{share:.1%}", ">= 95%", share >= 0.95)
    acceptor = rows.get(("echo", "mp"))
    if acceptor:
        add("acceptor CPU per RPC (echo)", f"{acceptor['main_cpu_us']:.1f} us", "<= 5 us", acceptor["main_cpu_us"] <= 5.0)
    blob = ratios(rows, "payload64k", "mp")
    if "single" in blob:
        add("64 KiB payload throughput vs single-process", f"{blob['single']:.2f}x", ">= 1.0x", blob["single"] >= 1.0)
    idle = rows.get(("idle", "mp"))
    if idle:
        add(f"idle CPU with {idle['clients']} clients (acceptor + workers)", f"{idle['idle_total_pct']:.2f}% of a core",
            "< 1%", idle["idle_total_pct"] < 1.0)
    errors = sum(r.get("errors", 0) for r in rows.values())
    add("answers checked (all servers, all scenarios)", f"{errors} errors", "0 errors", errors == 0)
    return targets


def machine() -> dict:
    cpu_model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu_model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg": os.getloadavg(),
    }


# -- main -----------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="simplerpc-mp benchmark suite (see bench/README.md)")
    parser.add_argument("--quick", action="store_true", help="short runs: about a minute in all")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS))
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes (default: cores)")
    parser.add_argument("--repeat", type=int, default=1, help="run each measurement N times, keep the median")
    parser.add_argument("--variant", action="append", default=[], metavar="LABEL=DIR",
                        help="also run simplerpc-mp from another checkout DIR (holding simplerpc_mp/, workers/, "
                             "bench/), shown as mp:LABEL: to measure a change side by side")
    return parser.parse_args(argv)


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))


def main(argv=None) -> int:
    args = parse_args(argv)
    quick = args.quick
    repeat = max(1, min(args.repeat, 20))
    raise_fd_limit(4 * IDLE_CLIENTS + 1024)  # servers and the generator inherit it
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, Python {info['python']}, load average "
          f"{info['loadavg'][0]:.2f}; workers: {args.workers}; {'quick' if quick else 'full'} run, repeat {repeat}")
    started = time.monotonic()
    servers: dict[str, ServerUnderTest] = {}
    rows: dict = {}
    inproc = parallel = None
    parallel_runs: list[float] = []
    gen = ProcessPoolExecutor(1, mp_context=get_context("spawn"))
    try:
        for kind in args.servers:
            servers[kind] = ServerUnderTest(kind, args.workers)
            if kind == "mp":
                for variant in args.variant:
                    label, _, root = variant.partition("=")
                    servers["mp:" + label] = ServerUnderTest("mp:" + label, args.workers, Path(root).resolve())
        for server in servers.values():
            server.wait_ready()
        if "cpu" in args.scenarios:
            inproc = gen.submit(inproc_rate, TIMES["inproc"][0 if quick else 1]).result()
            print(f"primes n={PRIMES_N} in-process: {inproc:.1f} RPC/s on one core "
                  f"({1000 / inproc:.2f} ms each); {args.workers} x = {args.workers * inproc:.1f} RPC/s")
        for scenario in args.scenarios:
            runs: dict[str, list] = {kind: [] for kind in servers}
            for _ in range(repeat):
                if scenario == "cpu":  # the cores' capacity now, measured alongside the servers
                    parallel_runs.append(parallel_inproc_rate(args.workers, TIMES["cpu"][0 if quick else 1] / 2))
                for kind, server in servers.items():
                    if scenario == "idle":
                        row = run_idle_scenario(server, quick)
                    elif scenario == "fanout":
                        row = run_fanout_scenario(gen, server, quick)
                    else:
                        row = run_load_scenario(gen, server, quick, **scenario_kwargs(scenario, quick))
                    runs[kind].append(row)
            for kind, kind_runs in runs.items():
                if scenario == "idle":
                    rows[(scenario, kind)] = median_run(kind_runs, "idle_total_pct", lower_is_better=True)
                elif scenario == "pingpong":
                    rows[(scenario, kind)] = median_run(kind_runs, "p50_ms", lower_is_better=True)
                else:
                    rows[(scenario, kind)] = median_run(kind_runs, "rate")
            if scenario == "cpu":
                parallel = statistics.median(parallel_runs)
                print(f"  primes run in-process by {args.workers} processes at once: {parallel:.1f} RPC/s (median)")
            print(f"  {scenario} done ({time.monotonic() - started:.0f}s)", flush=True)
    finally:
        gen.shutdown()
        for server in servers.values():
            server.stop()
    print()
    print(format_table(rows, args.scenarios, list(servers)))
    targets = evaluate_targets(rows, inproc, args.workers, parallel)
    print()
    print("targets (issue 5) for simplerpc-mp:")
    for t in targets:
        print(f"  [{'met' if t['met'] else 'MISSED'}] {t['target']}: {t['measured']} (goal {t['goal']})")
    info["loadavg_after"] = os.getloadavg()
    print(f"\nload average after: {info['loadavg_after'][0]:.2f}; took {time.monotonic() - started:.0f}s")
    if args.json:
        document = {
            "machine": info,
            "args": {k: v for k, v in vars(args).items() if k != "json"},
            "inproc_primes_rate": inproc,
            "parallel_inproc_primes_rate": parallel,
            "results": [{"scenario": s, "server": k, **row} for (s, k), row in rows.items()],
            "targets": targets,
        }
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n")
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
