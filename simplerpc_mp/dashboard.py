"""Readable views of a stats snapshot (``stats.build_snapshot``): ``stats`` tables and ``top`` frames.

Runs in the CLI process (``simplerpc-mp stats`` and ``top``), never in the server: the server
only sends its snapshot. Rendering uses rich (typer brings it).
"""

from __future__ import annotations

import time

from rich import box
from rich.console import Group
from rich.markup import escape as _escape_markup
from rich.table import Table
from rich.text import Text

__all__ = ["stats_tables", "top_frame", "Rates", "console"]

TOP_OPS = 10  # ops shown by top, busiest first
# Output that is not a terminal (a script, a pipe) is not cut to 80 columns.
PIPE_WIDTH = 200


# Control characters (C0, DEL, C1) of strings a client or another node chose (an op name, a FAIL
# reason, a node's name) shown as "?": rich strips only a few, so an ESC reached the terminal.
_CONTROL = dict.fromkeys([*range(0x20), *range(0x7F, 0xA0)], "?")


def escape(text: str) -> str:
    """``text`` for a rich cell: its markup escaped, its control characters replaced."""
    return _escape_markup(text.translate(_CONTROL))


def console():
    import sys

    from rich.console import Console

    return Console(highlight=False, width=None if sys.stdout.isatty() else PIPE_WIDTH)


def _bytes(n) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _num(value, fmt: str = "{:.1f}") -> str:
    return "-" if value is None else fmt.format(value)


def _summary(snap: dict, rate: float | None = None) -> Text:
    restarts = ", ".join(f"{k} {v}" for k, v in snap["restarts"].items() if v) or "none"
    line = (f"simplerpc-mp {snap['version']}  pid {snap['pid']}  up {snap['uptime_s']:.0f}s  "
            f"connections {snap['connections']}  in flight {snap['inflight']}  RPCs {snap['rpcs_total']}")
    if rate is not None:
        line += f"  ({rate:.0f}/s)"
    line += (f"  pushes {snap['pushes_total']} (dropped {snap['pushes_dropped']})  "
             f"output {_bytes(snap['output_buffer_bytes'])}  restarts: {restarts}")
    return Text(line)


class Rates:
    """Per-second rates between two snapshots (``top``); the first frame shows averages."""

    def __init__(self) -> None:
        self.previous: dict | None = None
        self.previous_t = 0.0

    def update(self, snap: dict) -> dict:
        now = time.monotonic()
        prev, dt = self.previous, now - self.previous_t
        rates = {"workers": {}, "ops": {}, "total": None}
        if prev is not None and dt > 0:
            before = {w["pid"]: w["rpcs"] for w in prev["workers"]}
            for w in snap["workers"]:
                rates["workers"][w["pid"]] = (w["rpcs"] - before.get(w["pid"], 0)) / dt
            for name, op in snap["ops"].items():
                rates["ops"][name] = (op["count"] - prev["ops"].get(name, {"count": 0})["count"]) / dt
            rates["total"] = (snap["rpcs_total"] - prev["rpcs_total"]) / dt
        else:
            for w in snap["workers"]:
                rates["workers"][w["pid"]] = w["rpcs"] / w["age_s"] if w.get("age_s") else 0.0
            uptime = snap["uptime_s"] or 1.0
            for name, op in snap["ops"].items():
                rates["ops"][name] = op["count"] / uptime
            rates["total"] = snap["rpcs_total"] / uptime
        self.previous, self.previous_t = snap, now
        return rates


def _workers_table(snap: dict, rates: dict | None, limit: int | None) -> Table:
    table = Table(title="workers", box=box.SIMPLE_HEAD, title_justify="left")
    for name, justify in (("id", "right"), ("pid", "right"), ("state", "left"), ("op", "left"), ("net_id", "right"),
                          ("running", "right"), ("RPCs", "right"), ("RPCs/s", "right"), ("CPU %", "right"),
                          ("RSS", "right"), ("age", "right")):
        table.add_column(name, justify=justify, no_wrap=True)
    workers = snap["workers"]
    if limit is not None and len(workers) > limit:
        # The busy ones first (the longest-running RPC first): that is what an operator looks for.
        workers = sorted(workers, key=lambda w: (w["state"] != "busy", -(w["running_s"] or 0), w["worker_id"]))
    shown = workers if limit is None else workers[:limit]
    for w in shown:
        state = w["state"] + (" (spare)" if w.get("spare") else "")
        rate = rates["workers"].get(w["pid"]) if rates else None
        table.add_row(
            str(w["worker_id"]), str(w["pid"]), state, escape(w["op"] or "-"), _num(w["net_id"], "{}"),
            _num(w["running_s"], "{:.3f}s"), str(w["rpcs"]), _num(rate, "{:.0f}"), _num(w["cpu_percent"]),
            _bytes(w["rss_bytes"]), _num(w["age_s"], "{:.0f}s"),
        )
    if len(shown) < len(workers):
        hidden = workers[len(shown):]
        states = {}
        for w in hidden:
            states[w["state"]] = states.get(w["state"], 0) + 1
        table.add_row("", "", f"... {len(hidden)} more: " + ", ".join(f"{v} {k}" for k, v in sorted(states.items())),
                      *[""] * 8)
    return table


def _ops_table(snap: dict, rates: dict | None, limit: int | None) -> Table:
    table = Table(title="ops", box=box.SIMPLE_HEAD, title_justify="left")
    for name in ("op", "count", "FAIL", "rate/s", "p50 ms", "p99 ms", "FAIL reasons"):
        table.add_column(name, justify="left" if name in ("op", "FAIL reasons") else "right", no_wrap=True)
    ops = list(snap["ops"].items())
    if rates:
        ops.sort(key=lambda item: (-rates["ops"].get(item[0], 0.0), -item[1]["count"], item[0]))
    if limit is not None:
        ops = [item for item in ops if item[1]["count"]][:limit]
    for name, op in ops:
        reasons = ", ".join(f"{k} {v}" for k, v in op.get("fails", {}).items())
        rate = rates["ops"].get(name) if rates else None
        table.add_row(escape(name), str(op["count"]), str(op["fail"]), _num(rate, "{:.0f}"),
                      _num(op["p50_ms"], "{:.3f}"), _num(op["p99_ms"], "{:.3f}"), escape(reasons))
    return table


def _counts_table(title: str, counts: dict) -> Table:
    table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left")
    table.add_column("reason")
    table.add_column("count", justify="right")
    for reason, count in counts.items():
        table.add_row(escape(reason), str(count))
    return table


def _extra_sections(snap: dict, known: set) -> list:
    """Sections added by other parts of the server (Server.stats_providers), shown as key/value."""
    out = []
    for name, value in snap.items():
        if name in known or not isinstance(value, dict):
            continue
        table = Table(title=escape(name), box=box.SIMPLE_HEAD, title_justify="left")
        table.add_column("key")
        table.add_column("value", justify="right")
        for key, item in value.items():
            table.add_row(escape(str(key)), escape(str(item)))
        out.append(table)
    return out


_KNOWN = {"ops", "workers", "restarts", "closed", "acceptor", "workers_by_state", "address", "recent_restarts"}


def stats_tables(snap: dict) -> Group:
    """``simplerpc-mp stats``: everything in the snapshot, as tables."""
    return Group(
        _summary(snap),
        _workers_table(snap, None, None),
        _ops_table(snap, None, None),
        _counts_table("restarts", snap["restarts"]),
        _counts_table("connections closed", snap["closed"]),
        *_extra_sections(snap, _KNOWN),
    )


def top_frame(snap: dict, rates: dict, height: int | None = None) -> Group:
    """One frame of ``simplerpc-mp top``; ``height`` (the terminal's) caps the worker rows."""
    limit = None if height is None else max(height - TOP_OPS - 16, 4)
    recent = snap.get("recent_restarts", [])[-5:]
    lines = [f"{time.strftime('%H:%M:%S', time.localtime(r['time']))} worker {r['worker_id']} (pid {r['pid']}): {r['reason']}"
             for r in recent]
    return Group(
        _summary(snap, rates.get("total")),
        _workers_table(snap, rates, limit),
        _ops_table(snap, rates, TOP_OPS),
        Text("recent restarts: " + ("; ".join(lines) if lines else "none")),
    )
