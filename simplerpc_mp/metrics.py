"""Prometheus ``GET /metrics`` served from the acceptor's own loop (``metrics_port``).

Runs in the acceptor process: the listener and each HTTP connection are registered with the
loop's selector with an object whose ``on_event(mask)`` the loop calls (no thread, no
``start_http_server``). The acceptor holds every number already, so there is no multiprocess
directory and nothing is left behind by recycled workers.

The text is built by ``prometheus_client`` (the exposition format is theirs, not written by hand)
from a custom collector (``Collector``) that reads the counters at scrape time: the RPC path
never calls ``Histogram.observe()``; ``counters.py`` keeps plain integers per op, per reply.

The HTTP side is the least that a scraper needs, HTTP/1.0 style: one request per connection,
answered and closed. A slow or hostile scraper cannot stall the loop or hold much: the request
head is at most ``MAX_REQUEST_BYTES`` (else 431), a connection has ``TIMEOUT_S`` from accept to
its last byte sent (else closed), at most ``MAX_CLIENTS`` at once, every socket non-blocking. The
text is built at most once per ``MIN_BUILD_INTERVAL_S``; scrapes in between get the same text
(a build with 64 workers takes ~10 ms: 64 scrapers at once, or one in a tight loop, held the
loop for a build each).
"""

from __future__ import annotations

import logging
import selectors
import socket
import time

from .counters import BOUNDS, EXPORTED, RESTART_REASONS

__all__ = ["MetricsServer", "Collector", "exposition", "MissingPrometheusClient"]

log = logging.getLogger("simplerpc_mp.metrics")

READ, WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
MAX_REQUEST_BYTES = 8192  # a scraper's GET with its headers is a few hundred bytes
TIMEOUT_S = 10.0  # Prometheus's own default scrape_timeout
MAX_CLIENTS = 64
RECV_BYTES = 8192
MIN_BUILD_INTERVAL_S = 1.0  # Prometheus scrapes every few seconds at most; top asks once a second


class MissingPrometheusClient(Exception):
    """metrics_port is set but prometheus_client is not installed."""


def _require():
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise MissingPrometheusClient(
            "metrics_port is set but prometheus_client is not installed: pip install 'simplerpc-mp[metrics]'"
        ) from None


class Collector:
    """A prometheus_client collector reading the server's counters when scraped."""

    def __init__(self, server, sampler):
        self.server = server
        self.sampler = sampler

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        from .stats import build_snapshot

        server = self.server
        counters = server.acceptor.counters
        snap = build_snapshot(server, self.sampler)

        info = GaugeMetricFamily("simplerpc_info", "Version of the server (value 1).", labels=["version"])
        info.add_metric([snap["version"]], 1)
        yield info
        yield GaugeMetricFamily("simplerpc_uptime_seconds", "Seconds since the server started.", value=snap["uptime_s"])

        rpcs = CounterMetricFamily("simplerpc_rpcs_total", "RPCs answered, by op and result (OKAY or the FAIL reason).",
                                   labels=["op", "result"])
        duration = HistogramMetricFamily(
            "simplerpc_rpc_duration_seconds", "From an RPC's arrival to its answer entering the connection's output.",
            labels=["op"])
        for name, stats in counters.by_name().items():
            fails = dict(stats.fails)
            rpcs.add_metric([name, "OKAY"], stats.count - sum(fails.values()))
            for reason, n in fails.items():
                rpcs.add_metric([name, reason], n)
            buckets = []
            cumulative = 0
            previous = 0
            for index in EXPORTED:
                cumulative += sum(stats.buckets[previous:index + 1])
                previous = index + 1
                buckets.append((_le(BOUNDS[index]), cumulative))
            buckets.append(("+Inf", sum(stats.buckets)))
            duration.add_metric([name], buckets, stats.sum_s)
        yield rpcs
        yield duration

        yield GaugeMetricFamily("simplerpc_connections", "Open client connections.", value=snap["connections"])
        yield GaugeMetricFamily("simplerpc_connections_gated", "Connections in their TLS handshake or authentication.",
                                value=snap["connections_gated"])
        yield CounterMetricFamily("simplerpc_connections_accepted_total", "Client connections accepted.",
                                  value=snap["connections_accepted_total"])
        yield CounterMetricFamily("simplerpc_auth_failures_total",
                                  "Authentications refused or not finished within auth_timeout.",
                                  value=snap["auth_failures"])
        closed = CounterMetricFamily("simplerpc_connections_closed_total", "Client connections closed, by reason.",
                                     labels=["reason"])
        for reason, n in snap["closed"].items():
            closed.add_metric([reason], n)
        yield closed
        yield GaugeMetricFamily("simplerpc_inflight_rpcs", "RPCs received and not yet answered.", value=snap["inflight"])
        yield GaugeMetricFamily("simplerpc_runnable_jobs", "Jobs waiting for a worker.", value=snap["runnable_jobs"])

        workers = GaugeMetricFamily("simplerpc_workers", "Worker processes, by state.", labels=["state"])
        for state, n in snap["workers_by_state"].items():
            workers.add_metric([state], n)
        yield workers
        yield GaugeMetricFamily("simplerpc_workers_target", "Workers the server keeps serving (workers, scale).",
                                value=snap["workers_target"])
        restarts = CounterMetricFamily("simplerpc_worker_restarts_total", "Worker processes replaced, by reason.",
                                       labels=["reason"])
        for reason in RESTART_REASONS:
            restarts.add_metric([reason], snap["restarts"].get(reason, 0))
        yield restarts
        rss = GaugeMetricFamily("simplerpc_worker_rss_bytes", "Resident memory of each worker.", labels=["worker_id"])
        cpu = CounterMetricFamily("simplerpc_worker_cpu_seconds_total", "CPU time of each worker.", labels=["worker_id"])
        served = CounterMetricFamily("simplerpc_worker_rpcs_total", "RPCs each worker answered.", labels=["worker_id"])
        running = GaugeMetricFamily("simplerpc_worker_rpc_running_seconds",
                                    "How long the RPC each worker runs now has run (0 when idle).", labels=["worker_id"])
        for w in snap["workers"]:
            label = [str(w["worker_id"])]
            if w["rss_bytes"] is not None:
                rss.add_metric(label, w["rss_bytes"])
            if w["cpu_seconds"] is not None:
                cpu.add_metric(label, w["cpu_seconds"])
            served.add_metric(label, w["rpcs"])
            running.add_metric(label, w["running_s"] or 0.0)
        yield rss
        yield cpu
        yield served
        yield running

        yield CounterMetricFamily("simplerpc_pushes_total", "Pushes put in a connection's output.", value=snap["pushes_total"])
        yield CounterMetricFamily("simplerpc_pushes_dropped_total", "Pushes to connections already gone.",
                                  value=snap["pushes_dropped"])
        yield GaugeMetricFamily("simplerpc_output_buffer_bytes", "Unsent output of all connections.",
                                value=snap["output_buffer_bytes"])
        yield GaugeMetricFamily("simplerpc_request_buffer_bytes", "Request bytes all connections hold (max_total_request_bytes).",
                                value=snap["request_buffer_bytes"])
        me = snap["acceptor"]
        if me["cpu_seconds"] is not None:
            yield CounterMetricFamily("simplerpc_acceptor_cpu_seconds_total", "CPU time of the acceptor process.",
                                      value=me["cpu_seconds"])
            yield GaugeMetricFamily("simplerpc_acceptor_rss_bytes", "Resident memory of the acceptor process.",
                                    value=me["rss_bytes"])
        for name, provide in server.stats_providers.items():
            yield from _provided(name, provide())


# Sections of Server.stats_providers with metrics of their own: key -> (metric, kind, help).
_SECTION_METRICS = {
    "room_stats": {
        "rooms": ("simplerpc_rooms", "gauge", "Rooms with at least one member."),
        "room_members": ("simplerpc_room_members", "gauge", "Memberships (a connection in 3 rooms counts 3)."),
        "room_pushes": ("simplerpc_room_pushes_total", "counter", "Pushes to a room."),
        "room_deliveries": ("simplerpc_room_deliveries_total", "counter", "Room push frames put in a member's output."),
        "room_joins": ("simplerpc_room_joins_total", "counter", "Joins."),
        "room_leaves": ("simplerpc_room_leaves_total", "counter", "Leaves."),
        "room_joins_refused": ("simplerpc_room_joins_refused_total", "counter", "Joins past max_rooms_per_connection."),
    },
    "security": {
        "tls_failures": ("simplerpc_tls_handshake_failures_total", "counter", "TLS handshakes failed or timed out."),
    },
    "cluster": {
        "outages": ("simplerpc_cluster_broker_outages_total", "counter", "Times the Redis link was lost."),
        "pushes_forwarded": ("simplerpc_cluster_pushes_forwarded_total", "counter", "Pushes sent to another node."),
        "broadcasts_published": ("simplerpc_cluster_broadcasts_published_total", "counter", "Broadcasts published."),
        "room_pushes_published": ("simplerpc_cluster_room_pushes_published_total", "counter", "Room pushes published."),
        "pushes_received": ("simplerpc_cluster_pushes_received_total", "counter", "Pushes received from other nodes."),
        "buffered_bytes": ("simplerpc_cluster_buffered_bytes", "gauge", "Bytes waiting for the Redis link."),
    },
}


def _provided(name: str, section):
    """A section of Server.stats_providers as metrics: the known keys of ``_SECTION_METRICS``
    under their names, any other number as a gauge ``simplerpc_<name>_<key>``."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    if not isinstance(section, dict):
        return
    known = _SECTION_METRICS.get(name, {})
    for key, value in section.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not str(key).isidentifier():
            continue
        metric, kind, text = known.get(key, (f"simplerpc_{name}_{key}", "gauge", f"{name}: {key}."))
        family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
        yield family(metric, text, value=value)
    if name == "cluster":
        up = GaugeMetricFamily("simplerpc_cluster_broker_up", "1 while the Redis link is up.")
        up.add_metric([], 1 if section.get("broker") == "up" else 0)
        yield up
        dropped = CounterMetricFamily("simplerpc_cluster_pushes_dropped_total", "Cross-node pushes dropped, by reason.",
                                      labels=["reason"])
        for reason, n in (section.get("pushes_dropped") or {}).items():
            dropped.add_metric([reason], n)
        yield dropped
        yield GaugeMetricFamily("simplerpc_cluster_nodes", "Live nodes of the cluster.", value=len(section.get("nodes", ())))


def _le(bound: float) -> str:
    return repr(float(bound))


def exposition(collector: Collector) -> tuple[bytes, str]:
    """``(body, content type)`` of one scrape."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from prometheus_client.registry import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return generate_latest(registry), CONTENT_TYPE_LATEST


class MetricsServer:
    """The /metrics listener in the acceptor's loop."""

    def __init__(self, host: str, port: int, selector: selectors.BaseSelector, timers, collector: Collector,
                 clock=time.monotonic):
        _require()
        self.clock = clock
        self._built: tuple | None = None  # (monotonic time, body, content type) of the last build
        self.selector = selector
        self.timers = timers
        self.collector = collector
        self.clients: set[MetricsConnection] = set()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.create_server((host, port), family=family, backlog=64)
        self.sock.setblocking(False)
        self.address = self.sock.getsockname()[:2]
        self.scrapes = 0
        selector.register(self.sock, READ, self)

    def exposition(self) -> tuple[bytes, str]:
        """The text of a scrape: built afresh once ``MIN_BUILD_INTERVAL_S`` has passed since
        the last build, else that one's."""
        now = self.clock()
        built = self._built
        if built is not None and 0 <= now - built[0] < MIN_BUILD_INTERVAL_S:
            return built[1], built[2]
        started = time.perf_counter()
        body, content_type = exposition(self.collector)
        log.debug("metrics: scrape of %d bytes built in %.2f ms", len(body), (time.perf_counter() - started) * 1000)
        self._built = (now, body, content_type)
        return body, content_type

    def on_event(self, mask: int) -> None:
        for _ in range(MAX_CLIENTS):
            try:
                sock, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("metrics: accept failed: %s", exc.strerror or exc)
                return
            if len(self.clients) >= MAX_CLIENTS:
                sock.close()
                continue
            self.clients.add(MetricsConnection(self, sock))

    def close(self) -> None:
        for client in list(self.clients):
            client.close()
        try:
            self.selector.unregister(self.sock)
        except (KeyError, ValueError):
            pass
        self.sock.close()


class MetricsConnection:
    __slots__ = ("server", "sock", "rbuf", "wbuf", "timer", "events", "draining")

    def __init__(self, server: MetricsServer, sock: socket.socket):
        self.server = server
        self.sock = sock
        sock.setblocking(False)
        self.rbuf = b""
        self.wbuf = bytearray()
        self.events = READ
        self.draining = False  # answered: reading what the client still sends until it closes
        self.timer = server.timers.call_later(TIMEOUT_S, self.close)
        server.selector.register(sock, READ, self)

    def on_event(self, mask: int) -> None:
        if self.draining:
            self._drain()
        elif mask & READ and not self.wbuf:
            self._read()
        elif mask & WRITE:
            self._send()

    def _recv(self) -> bytes | None:
        """What the client sent, or None: nothing yet, or it closed or failed (then closed here)."""
        try:
            data = self.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            data = b""
        if not data:
            self.close()
            return None
        return data

    def _drain(self) -> None:
        self._recv()

    def _read(self) -> None:
        data = self._recv()
        if data is None:
            return
        self.rbuf += data
        end = self.rbuf.find(b"\r\n\r\n")
        if end < 0:
            end = self.rbuf.find(b"\n\n")
        if end < 0:
            if len(self.rbuf) > MAX_REQUEST_BYTES:
                self._respond(431, b"request head too large\n")
            return
        if end > MAX_REQUEST_BYTES:
            self._respond(431, b"request head too large\n")
            return
        self._handle(self.rbuf[:end].split(b"\n", 1)[0].strip())

    def _handle(self, request_line: bytes) -> None:
        parts = request_line.split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            self._respond(400, b"bad request\n")
            return
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            self._respond(405, b"only GET\n", extra=b"Allow: GET, HEAD\r\n")
        elif target != b"/metrics":
            self._respond(404, b"see /metrics\n")
        else:
            body, content_type = self.server.exposition()
            self.server.scrapes += 1
            self._respond(200, body, content_type.encode("ascii"), head_only=method == b"HEAD")

    def _respond(self, status: int, body: bytes, content_type: bytes = b"text/plain; charset=utf-8",
                 extra: bytes = b"", head_only: bool = False) -> None:
        reason = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed",
                  431: b"Request Header Fields Too Large"}[status]
        self.wbuf += (b"HTTP/1.0 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n%s\r\n"
                      % (status, reason, content_type, len(body), extra))
        if not head_only:
            self.wbuf += body
        self._send()

    def _send(self) -> None:
        try:
            sent = self.sock.send(self.wbuf)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.close()
            return
        del self.wbuf[:sent]
        if not self.wbuf:
            # Half-close and wait for the client's EOF (or the timeout): closing with its unread
            # bytes still here (a 431 for an overlong head) would send RST, which can destroy
            # the answer before the client has read it.
            self.draining = True
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                self.close()
                return
            if self.events != READ:
                self.server.selector.modify(self.sock, READ, self)
                self.events = READ
        elif self.events != WRITE:
            self.server.selector.modify(self.sock, WRITE, self)
            self.events = WRITE

    def close(self) -> None:
        if self.sock.fileno() < 0:
            return
        self.timer.cancel()
        try:
            self.server.selector.unregister(self.sock)
        except (KeyError, ValueError):
            pass
        self.sock.close()
        self.server.clients.discard(self)
