"""What observability costs: echo throughput with /metrics scraped every second, and with
``stats`` asked every second (what ``top`` does), against the same server with metrics off,
side by side in one run. Also what one scrape and one stats snapshot cost the acceptor.

    python bench/observability.py [--quick] [--repeat N] [--baseline-root /work/main]

Every server runs at once, each a child process serving ``bench.handlers``; the echo load (16
connections x depth 8, as bench/run.py) is measured on each in turn, ``--repeat`` times,
keeping the median, so slow drifts of a loaded machine hit all of them alike. ``--baseline-root``
adds the code of another checkout (say main before the counters) as one more row.
Prints a markdown table of rates and ratios against "metrics off" (the median of the ratios of
each turn, in which every server is measured back to back).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.run import ServerUnderTest, run_load_scenario, scenario_kwargs  # noqa: E402
from simplerpc_mp.control import request  # noqa: E402
from simplerpc_mp.metrics import MIN_BUILD_INTERVAL_S  # noqa: E402

POLL_S = 1.0  # Prometheus's scrape_interval is usually 15 s: once a second is 15 times that
COST_SAMPLES = 40  # scrapes / stats calls timed for the per-call cost


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Poller:
    """Calls ``fn`` every POLL_S in a thread while a measurement runs."""

    def __init__(self, fn):
        self.fn = fn
        self.stop = threading.Event()
        self.calls = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(POLL_S):
            self.fn()
            self.calls += 1

    def __enter__(self) -> "Poller":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(30)


def scrape(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        return len(response.read())


def per_call_cost(server: ServerUnderTest, fn, samples: int = COST_SAMPLES, spacing: float = 0.0) -> tuple[float, float]:
    """(acceptor CPU ms per call, wall ms per call), over ``samples`` calls on an idle server,
    ``spacing`` seconds apart (/metrics builds its text at most once a second: a scrape sooner
    would time the reuse)."""
    fn()  # imports, first samples
    own0, _ = server.cpu()
    wall = 0.0
    for _ in range(samples):
        if spacing:
            time.sleep(spacing)  # (the server's build interval, not a wait for a condition)
        started = time.perf_counter()
        fn()
        wall += time.perf_counter() - started
    own1, _ = server.cpu()
    return (own1 - own0) / samples * 1000, wall / samples * 1000


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 s runs (about a minute with --repeat 3)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--baseline-root", default="", help="another checkout to add as a row (e.g. /work/main)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="srpc-bench-", dir="/tmp")
    metrics_port = _free_port()
    common = ("--spare-workers", "0")
    sockets = {name: os.path.join(tmp, f"{name}.sock") for name in ("off", "metrics", "stats")}
    setups = {
        "metrics off": ("mp", REPO, (*common, "--control-socket", sockets["off"])),
        "metrics on, scraped 1/s": ("mp", REPO, (*common, "--control-socket", sockets["metrics"],
                                                 "--metrics-port", str(metrics_port))),
        "stats asked 1/s (top)": ("mp", REPO, (*common, "--control-socket", sockets["stats"])),
    }
    if args.baseline_root:
        setups[f"baseline {args.baseline_root}"] = ("mp:baseline", Path(args.baseline_root).resolve(), common)
    pollers = {
        "metrics on, scraped 1/s": lambda: scrape(metrics_port),
        "stats asked 1/s (top)": lambda: request(sockets["stats"], {"cmd": "stats"}),
    }
    print(f"load average {os.getloadavg()[0]:.2f}; workers {args.workers}; {'quick' if args.quick else 'full'} run, "
          f"repeat {args.repeat} (the machine is shared: compare rows of this run only)")
    servers = {name: ServerUnderTest(kind, args.workers, root, extra) for name, (kind, root, extra) in setups.items()}
    gen = ProcessPoolExecutor(1, mp_context=get_context("spawn"))
    runs: dict[str, list[float]] = {name: [] for name in servers}
    cpu_us: dict[str, list[float]] = {name: [] for name in servers}
    polls: dict[str, int] = {name: 0 for name in servers}
    try:
        for server in servers.values():
            server.wait_ready()
        kwargs = scenario_kwargs("echo", args.quick)
        names = list(servers)
        for turn in range(max(1, args.repeat)):
            # Each turn starts with another server: a burst of load from elsewhere on the
            # machine does not always hit the same one.
            for name in names[turn % len(names):] + names[:turn % len(names)]:
                server = servers[name]
                poll = pollers.get(name)
                if poll is None:
                    row = run_load_scenario(gen, server, args.quick, **kwargs)
                else:
                    with Poller(poll) as poller:
                        row = run_load_scenario(gen, server, args.quick, **kwargs)
                    polls[name] += poller.calls
                assert row["errors"] == 0, row
                runs[name].append(row["rate"])
                cpu_us[name].append(row["main_cpu_us"])
        scrape_cost = per_call_cost(servers["metrics on, scraped 1/s"], lambda: scrape(metrics_port), samples=5,
                                    spacing=MIN_BUILD_INTERVAL_S + 0.05)
        scrape_bytes = scrape(metrics_port)
        stats_cost = per_call_cost(servers["stats asked 1/s (top)"], lambda: request(sockets["stats"], {"cmd": "stats"}))
    finally:
        gen.shutdown()
        for server in servers.values():
            server.stop()
    print()
    # Ratios per turn (each turn measures every server back to back), then their median: a
    # machine whose speed drifts over the run moves both sides of a ratio alike.
    def paired(values: dict, name: str) -> float:
        return statistics.median(v / b for v, b in zip(values[name], values["metrics off"]))

    print("| echo, 16 conns x depth 8 | RPCs/s (median) | vs metrics off | acceptor CPU us/RPC | vs metrics off | polls |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, rates in runs.items():
        print(f"| {name} | {statistics.median(rates):,.0f} | {paired(runs, name):.3f} | "
              f"{statistics.median(cpu_us[name]):.2f} | {paired(cpu_us, name):.3f} | {polls[name] or '-'} |")
    print()
    print("| one call on an idle server | acceptor CPU ms | wall ms | size |")
    print("|---|---:|---:|---:|")
    print(f"| GET /metrics | {scrape_cost[0]:.2f} | {scrape_cost[1]:.2f} | {scrape_bytes:,} bytes |")
    print(f"| stats (control socket) | {stats_cost[0]:.2f} | {stats_cost[1]:.2f} | |")
    ratio = paired(runs, "metrics on, scraped 1/s")
    print(f"\ngoal: metrics on + a scraper each second within 3% of metrics off: "
          f"{'met' if ratio >= 0.97 else 'MISSED'} ({ratio:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
