"""The server's snapshot for ``stats``, ``top`` and ``/metrics``: built on request, never per RPC.

Runs in the acceptor process, inside its loop (called by a control command or a scrape). It reads
what the loop already keeps: the connections, each worker's handle and progress board (which RPC
it runs, since when), the counters (``counters.py``), and samples CPU and memory of the processes
with psutil, only when asked. ``build_snapshot`` returns one JSON-able dict whose keys are a
contract (README, Operations); other parts of the server add sections of their own through
``Server.stats_providers`` (name -> function returning a JSON-able value), so this module does not
grow a branch per feature.
"""

from __future__ import annotations

import os
import time

from . import ipc
from .counters import RESTART_REASONS, percentile

__all__ = ["build_snapshot", "ProcessSampler", "worker_state", "version"]

# A CPU percentage is measured since the previous sample of the same process, if there was one in
# this many seconds; else since the process started.
SAMPLE_MAX_AGE_S = 60.0


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as _version

    try:
        return _version("simplerpc-mp")
    except PackageNotFoundError:
        return "unknown"


class ProcessSampler:
    """CPU % and RSS of processes, sampled on request (psutil reads /proc; no thread, no timer)."""

    def __init__(self) -> None:
        self._seen: dict[int, tuple] = {}  # pid -> (psutil.Process, cpu seconds, monotonic time)

    def sample(self, pid: int) -> dict:
        """``{"cpu_percent", "cpu_seconds", "rss_bytes", "age_s"}``, None values if it's gone."""
        import psutil

        now = time.monotonic()
        entry = self._seen.get(pid)
        try:
            process = entry[0] if entry else psutil.Process(pid)
            with process.oneshot():
                times = process.cpu_times()
                rss = process.memory_info().rss
                created = process.create_time()
        except psutil.Error:
            self._seen.pop(pid, None)
            return {"cpu_percent": None, "cpu_seconds": None, "rss_bytes": None, "age_s": None}
        cpu = times.user + times.system
        age = max(time.time() - created, 1e-6)
        if entry and now - entry[2] <= SAMPLE_MAX_AGE_S and now > entry[2]:
            percent = (cpu - entry[1]) / (now - entry[2]) * 100
        else:
            percent = cpu / age * 100
        self._seen[pid] = (process, cpu, now)
        return {"cpu_percent": round(max(percent, 0.0), 1), "cpu_seconds": cpu, "rss_bytes": rss, "age_s": round(age, 3)}

    def forget_others(self, pids) -> None:
        """Drop the processes not in ``pids`` (workers gone since)."""
        for pid in [p for p in self._seen if p not in pids]:
            del self._seen[pid]


def worker_state(worker) -> str:
    """booting, idle, busy or retiring."""
    if not worker.booted:
        return "booting"
    if not worker.accepting:
        return "retiring"
    if worker.jobs and worker.board is not None and worker.board[ipc.BOARD_JOB]:
        return "busy"
    return "idle"


def _running(worker, now_ns: int) -> tuple:
    """(op, net_id, running_s) of the RPC the worker runs now, or Nones."""
    board = worker.board
    if board is None or not worker.jobs:
        return None, None, None
    job_id, line, started = board[ipc.BOARD_JOB], board[ipc.BOARD_LINE], board[ipc.BOARD_START_NS]
    if not job_id:
        return None, None, None
    for job in worker.jobs:
        if job.job_id == job_id:
            if job.count and line >= job.count:
                return None, None, None  # (a board read between two jobs)
            return job.op_of(line), job.conn.net_id, round(max(now_ns - started, 0) / 1e9, 6)
    return None, None, None


def _workers(pool, sampler: ProcessSampler) -> list[dict]:
    now_ns = time.monotonic_ns()
    rows = []
    for worker in pool.workers:
        if worker.dead:
            continue
        op, net_id, running_s = _running(worker, now_ns)
        sample = sampler.sample(worker.pid)
        rows.append({
            "worker_id": worker.worker_id,
            "pid": worker.pid,
            "state": worker_state(worker),
            "op": op,
            "net_id": net_id,
            "running_s": running_s,
            "rpcs": worker.served,
            "cpu_percent": sample["cpu_percent"],
            "rss_bytes": sample["rss_bytes"],
            "age_s": sample["age_s"] if sample["age_s"] is not None else round(time.monotonic() - worker.spawned_at, 3),
            "cpu_seconds": sample["cpu_seconds"],
            "spare": worker.spare,
            "generation": worker.generation,
            "queued_rpcs": max(worker.load - (1 if op is not None else 0), 0),
        })
    sampler.forget_others({row["pid"] for row in rows} | {os.getpid()})
    return rows


def _ops(counters) -> dict:
    ops = {}
    for name, stats in sorted(counters.by_name().items()):
        p50, p99 = percentile(stats, 0.5), percentile(stats, 0.99)
        ops[name] = {
            "count": stats.count,
            "fail": stats.fail,
            "p50_ms": None if p50 is None else round(p50 * 1000, 3),
            "p99_ms": None if p99 is None else round(p99 * 1000, 3),
            "fails": dict(sorted(stats.fails.items())),
        }
    return ops


def build_snapshot(server, sampler: ProcessSampler, providers: dict | None = None) -> dict:
    """The snapshot (see the module docstring); ``providers`` add sections of their own."""
    acceptor, pool = server.acceptor, server.pool
    counters = acceptor.counters
    conns = acceptor.conns
    inflight = 0
    for conn in conns.values():
        inflight += conn.next_seq - conn.write_seq
    workers = _workers(pool, sampler)
    states = {"booting": 0, "idle": 0, "busy": 0, "retiring": 0}
    for row in workers:
        states[row["state"]] += 1
    ops = _ops(counters)
    me = sampler.sample(os.getpid())
    snapshot = {
        "pid": os.getpid(),
        "version": version(),
        "uptime_s": round(time.monotonic() - server.started_at, 3),
        "address": list(server.address) if server.address else None,
        "connections": len(conns),
        "connections_gated": len(getattr(acceptor, "gated", ())),  # in their TLS handshake or auth
        "connections_accepted_total": acceptor.accepted_total,
        "auth_failures": acceptor.auth_failures,  # refused credentials and auth_timeouts (auth on)
        "inflight": inflight,
        "rpcs_total": sum(op["count"] for op in ops.values()),
        "pushes_total": acceptor.pushes_total,
        "pushes_dropped": acceptor.pushes_dropped,
        "output_buffer_bytes": acceptor.output_bytes,
        "request_buffer_bytes": acceptor.request_bytes,
        "runnable_jobs": len(acceptor.scheduler),
        "workers_target": pool.target,
        "workers_by_state": states,
        "workers": workers,
        "ops": ops,
        "restarts": {reason: counters.restarts.get(reason, 0) for reason in RESTART_REASONS},
        "recent_restarts": [
            {"time": round(when, 3), "worker_id": worker_id, "pid": pid, "reason": reason}
            for when, worker_id, pid, reason in counters.recent_restarts
        ],
        "closed": dict(sorted(counters.closed.items())),
        "acceptor": {"cpu_percent": me["cpu_percent"], "cpu_seconds": me["cpu_seconds"], "rss_bytes": me["rss_bytes"]},
    }
    for name, provide in (providers or {}).items():
        snapshot[name] = provide()
    return snapshot
