"""``Server``: wires the acceptor and the worker pool into one selector loop, and owns signals.

Runs in the main server process. The loop, read top to bottom:

1. select on client sockets, listeners, worker pipes, worker sentinels and the signal wakeup
   socket, with the timeout of the nearest timer; any other descriptor (the control socket,
   metrics HTTP, a broker connection) is registered with an object whose ``on_event(mask)``
   handles it, so each lives in a small module of its own;
2. handle what is ready: accept, read, write, worker replies, worker exits, signals;
3. run the timers that are due (RPC deadlines, output limits, respawn back-off, ...);
4. hand runnable jobs to workers, and send each connection its answers in one write.

Signal handlers only record the signal: ``signal.set_wakeup_fd`` writes its number to a
socket the selector watches, and the loop calls ``handle_<name>()``.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import selectors
import signal
import socket
import sys
import threading
import time

from .acceptor import CLOSED, Acceptor, Connection, Listener
from .auth import TokensFileError
from .config import ConfigError, Settings
from .handlers import Handlers
from .logs import configure_logging
from .stats import ProcessSampler
from .supervisor import (
    EXIT_UNGUARDED_MAIN, SPAWN_RESERVE_FDS, FatalError, Pool, Sentinel, UnguardedMainError, WorkerHandle,
)
from .timers import Timers
from .tls import TLSError

log = logging.getLogger("simplerpc_mp.server")

__all__ = ["Server", "ServerError", "EXIT_OK", "EXIT_HANDLERS", "EXIT_WORKERS_FAILING", "EXIT_LISTEN"]

EXIT_OK = 0
EXIT_LISTEN = 1  # the address could not be bound
EXIT_CONFIG = 2  # bad settings (a log_file that cannot be opened)
EXIT_HANDLERS = 3  # the handler module could not be loaded
EXIT_WORKERS_FAILING = 4  # workers kept dying during start-up

DEMO_HANDLERS = "simplerpc_mp.demo:handlers"
# Workers get this long to leave after STOP when the server stops; then they are killed.
WORKER_STOP_S = 5.0
# A stopping server gives clients this long to read their last answers before closing.
FINAL_FLUSH_S = 2.0
# Descriptors the acceptor holds per worker (measured on Linux: its socketpair end, the process
# sentinel and the spawn pipe, two shared-memory arenas), and for everything else (the pool's
# spawn reserve; listeners, selector, wakeup pair, stdio, log file, multiprocessing's resource
# tracker, with room to spare).
FDS_PER_WORKER = 5
FDS_BASE = SPAWN_RESERVE_FDS + 16

_SIGNALS = {
    signal.SIGINT: "int",
    signal.SIGTERM: "term",
    signal.SIGQUIT: "quit",
    signal.SIGHUP: "hup",
    signal.SIGTTIN: "ttin",
    signal.SIGTTOU: "ttou",
}


class ServerError(Exception):
    """The server could not start or had to stop; ``exit_code`` is what the CLI exits with."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class Server:
    """A simplerpc server whose handlers run in a pool of worker processes.

    ``handlers`` is a ``Handlers`` object, a module path (``"mymod"`` or ``"mymod:attr"``), or
    None for an empty registry to fill through ``server.handler`` (the seed's style). Any
    setting of ``config.SETTINGS`` can be given as a keyword argument.
    """

    def __init__(self, host: str | None = None, port: int | None = None, handlers=None, workers: int | None = None, *,
                 settings: Settings | None = None, on_ready=None, settings_loader=None, **overrides):
        changes = {name: value for name, value in (("host", host), ("port", port), ("workers", workers)) if value is not None}
        self.settings = (settings or Settings()).with_changes(**changes, **overrides)
        if handlers is None and self.settings.handlers:
            handlers = self.settings.handlers
        if handlers is None:
            handlers = Handlers()
        self.handler: Handlers | None = handlers if isinstance(handlers, Handlers) else None
        self.handlers_spec = handlers
        self.on_ready = on_ready
        # Called on HUP to read the settings again (the config file may have changed).
        self.settings_loader = settings_loader
        self.address: tuple | None = None
        self.ready = threading.Event()
        self.exit_code = EXIT_OK
        self._selector: selectors.BaseSelector | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._stopping = False
        self._done = False
        self._graceful_timer = None
        self.cluster = None  # cluster.Cluster when the ``cluster`` setting names a Redis URL
        self.started_at = time.monotonic()
        # Extra sections of the stats snapshot: name -> function returning a JSON-able value.
        self.stats_providers: dict = {}
        self.sampler = ProcessSampler()  # CPU and RSS, sampled when stats are asked for
        self.control = None  # control.ControlServer, when control_socket is on
        self.metrics = None  # metrics.MetricsServer, when metrics_port is set

    # The seed's registration style.
    def on_connect(self, fn):
        self._registry().on_connect(fn)
        return fn

    def on_disconnect(self, fn):
        self._registry().on_disconnect(fn)
        return fn

    def _registry(self) -> Handlers:
        if self.handler is None:
            raise TypeError("this server loads its handlers from a module; register them there")
        return self.handler

    # -- running -----------------------------------------------------------------------------

    def listen(self) -> tuple:
        """Bind the listening socket; returns ``(host, port)``. ``start()`` calls it if needed."""
        _exit_if_rerun_by_a_worker()
        if self.address is None:
            self._selector = selectors.DefaultSelector()
            self.timers = Timers()
            try:
                self.acceptor = Acceptor(self.settings, self._selector, self.timers)
            except (TLSError, TokensFileError) as exc:
                raise ServerError(str(exc), EXIT_CONFIG) from None
            try:
                self.address = self.acceptor.listen(self.settings.host, self.settings.port)
            except OSError as exc:
                raise ServerError(
                    f"cannot listen on {self.settings.host}:{self.settings.port}: {exc.strerror or exc}", EXIT_LISTEN
                ) from None
        return self.address

    def start(self) -> int:
        """Serve until stopped (blocking); returns the exit code (0 after a graceful stop).

        Raises ``ServerError`` when the handlers can't be loaded or the workers keep dying.
        A script that starts its server without the ``if __name__ == "__main__":`` guard (each
        worker would run it again) gets one line on stderr and ``SystemExit(3)``, no traceback.
        """
        _exit_if_rerun_by_a_worker()
        self._configure_logging()
        self._check_handlers_picklable()
        _raise_open_file_limit(self.settings)
        cluster_class = self._cluster_class()
        self.listen()
        selector = self._selector
        if cluster_class is not None:
            self.cluster = cluster_class(self.settings, selector, self.timers, self.acceptor, self.address[1])
            self.acceptor.cluster = self.cluster
            self.cluster.start()
        self.pool = Pool(
            self.settings, self.handlers_spec, selector, self.timers, self.acceptor,
            on_first_boot=self.acceptor.start_accepting, on_all_booted=self._on_ready,
        )
        self.started_at = time.monotonic()
        # The room counts the rooms issue names at the top level (numbers), the rest as a section.
        rooms = self.acceptor.rooms
        self.stats_providers.setdefault("rooms", rooms.__len__)
        self.stats_providers.setdefault("room_members", lambda: rooms.memberships)
        self.stats_providers.setdefault("largest_rooms", rooms.largest)
        self.stats_providers.setdefault("room_stats", rooms.stats)
        acceptor = self.acceptor
        self.stats_providers.setdefault("security", lambda: {
            "tls": acceptor.tls_context is not None, "auth": acceptor.tokens is not None or acceptor.has_auth_fn,
            "tls_failures": acceptor.tls_failures,  # (auth_failures: a key of the snapshot itself)
        })
        if self.cluster is not None:
            self.stats_providers.setdefault("cluster", self.cluster.stats)
        try:
            self._open_control()
            self._open_metrics()
        except ServerError:
            if self.cluster is not None:
                self.cluster.close()
            raise
        selector.register(self._wake_r, selectors.EVENT_READ, None)
        restore = self._install_signals()
        try:
            self.pool.start()
            self._loop()
        except UnguardedMainError as exc:
            self._stop_now()
            print(f"simplerpc-mp: error: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(exc.exit_code) from None
        except FatalError as exc:
            self._stop_now()
            raise ServerError(str(exc), exc.exit_code) from None
        except BaseException:
            if not self._done:
                self._stop_now()  # an unexpected error: still answer every RPC held
            raise
        finally:
            if self.pool.workers:
                self.pool.kill_all()  # an unexpected error: leave no orphans
            restore()
            if self.cluster is not None:
                self.cluster.close()
            self._close_control()
            self.acceptor.stop_accepting(close=True)
            self.acceptor.close_all("server stopped")
            selector.close()
        return self.exit_code

    def _open_control(self) -> None:
        """The control socket (``control.py``) in this loop, unless control_socket is ""."""
        from .control import Commands, ControlServer, control_path

        path = control_path(self.settings.control_socket, self.address[1])
        if not path:
            return
        try:
            self.control = ControlServer(path, self._selector, self.timers, Commands(self, self.sampler),
                                         private_dir=self.settings.control_socket == "auto")
        except OSError as exc:
            raise ServerError(f"cannot open control socket {path}: {exc.strerror or exc}", EXIT_LISTEN) from None
        log.debug("control socket at %s", path)

    def _close_control(self) -> None:
        if self.control is not None:
            self.control.close()
            self.control = None
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None

    def _open_metrics(self) -> None:
        """GET /metrics (``metrics.py``) in this loop, when metrics_port is set."""
        if not self.settings.metrics_port:
            return
        from .metrics import Collector, MetricsServer, MissingPrometheusClient

        host, port = self.settings.metrics_host, self.settings.metrics_port
        try:
            self.metrics = MetricsServer(host, port, self._selector, self.timers, Collector(self, self.sampler))
        except MissingPrometheusClient as exc:
            self._close_control()
            raise ServerError(str(exc), EXIT_CONFIG) from None
        except OSError as exc:
            self._close_control()
            raise ServerError(f"cannot listen for metrics on {host}:{port}: {exc.strerror or exc}", EXIT_LISTEN) from None
        log.info("metrics at http://%s:%s/metrics", *self.metrics.address)

    def _configure_logging(self) -> None:
        """Log as ``serve`` does, unless the application has set up logging itself (a script)."""
        if logging.getLogger().handlers or logging.getLogger("simplerpc_mp").handlers:
            return
        try:
            configure_logging(self.settings.log_level, self.settings.log_format, self.settings.log_file)
        except OSError as exc:
            raise ServerError(f"cannot open log_file {self.settings.log_file!r}: {exc.strerror or exc}", EXIT_CONFIG) from None

    def _cluster_class(self):
        """``cluster.Cluster`` when the ``cluster`` setting is set (its extra installed, its URL
        usable), else None; ``ServerError`` (exit 2) with one line otherwise."""
        if not self.settings.cluster:
            return None
        try:
            from .cluster import Cluster
        except ImportError as exc:
            if exc.name != "hiredis":
                raise
            raise ServerError(
                "the cluster setting needs hiredis, which is not installed: pip install 'simplerpc-mp[cluster]'", EXIT_CONFIG
            ) from None
        from .broker import RedisURLError, parse_url, tls_context

        try:
            url = parse_url(self.settings.cluster)
        except RedisURLError as exc:
            raise ServerError(str(exc), EXIT_CONFIG) from None
        try:
            tls_context(url)
        except OSError as exc:  # (ssl.SSLError is one): a CA file missing or not PEM
            raise ServerError(f"cluster: cannot load ssl_ca_certs {url.ca_certs!r}: {exc.strerror or exc}", EXIT_CONFIG) from None
        return Cluster

    def _check_handlers_picklable(self) -> None:
        if isinstance(self.handlers_spec, Handlers):
            import pickle

            try:
                pickle.dumps(self.handlers_spec)
            except (pickle.PicklingError, AttributeError, TypeError) as exc:
                raise ServerError(
                    f"cannot send the handlers to the worker processes ({exc}); handlers given as an "
                    "object must be module-level functions of an importable module or script",
                    EXIT_HANDLERS,
                ) from None

    def stop(self) -> None:
        """Ask the server to stop gracefully; safe from any thread or a signal handler."""
        try:
            self._wake_w.send(bytes([signal.SIGTERM]))
        except BlockingIOError:
            pass  # the wakeup buffer is full, so the loop is about to wake anyway

    def _on_ready(self) -> None:
        self.ready.set()
        if self.on_ready is not None:
            self.on_ready(self)
        else:  # (serve prints its own line)
            host, port = self.address
            log.info("listening on %s:%s (workers: %d, pid %s)", host, port, self.settings.worker_count, os.getpid())

    def _loop(self) -> None:
        selector, acceptor, pool, timers = self._selector, self.acceptor, self.pool, self.timers
        monotonic = time.monotonic
        while not self._done:
            now = monotonic()
            # Connections with bytes already out of their socket (TLS) are read without waiting.
            events = selector.select(0 if acceptor.read_ready else timers.timeout(now))
            acceptor.now = monotonic()
            for key, mask in events:
                data = key.data
                kind = type(data)
                if kind is Connection:
                    if mask & selectors.EVENT_READ:
                        acceptor.on_read(data)
                    if mask & selectors.EVENT_WRITE:
                        acceptor.on_write(data)
                elif kind is WorkerHandle:
                    if mask & selectors.EVENT_READ:
                        pool.on_readable(data)
                    if mask & selectors.EVENT_WRITE:
                        pool.on_writable(data)
                elif kind is Listener:
                    acceptor.on_accept(data)
                elif kind is Sentinel:
                    pool.on_exit(data.worker)
                elif data is None:
                    self._read_signals()
                else:  # any other descriptor (control socket, metrics, broker): its own handler
                    data.on_event(mask)
            if acceptor.read_ready:
                acceptor.serve_read_ready()
            timers.run_due(monotonic())
            pool.dispatch()
            acceptor.flush()
            if acceptor.scheduler:  # a connection closed while flushing may have queued on_disconnect
                pool.dispatch()
            if self._stopping and acceptor.is_idle() and not pool.busy():
                self._finish_stop()

    # -- signals -----------------------------------------------------------------------------

    def _install_signals(self):
        if threading.current_thread() is not threading.main_thread():
            log.debug("not in the main thread: signals are not handled, use stop()")
            return lambda: None
        previous = {sig: signal.signal(sig, _record_only) for sig in _SIGNALS}
        previous_fd = signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)

        def restore() -> None:
            signal.set_wakeup_fd(previous_fd)
            for sig, handler in previous.items():
                signal.signal(sig, handler)

        return restore

    def _read_signals(self) -> None:
        try:
            data = self._wake_r.recv(512)
        except BlockingIOError:
            return
        for signum in data:
            name = _SIGNALS.get(signum)
            if name is not None:
                getattr(self, "handle_" + name)()

    def handle_int(self) -> None:
        if self._stopping:
            log.warning("second interrupt: stopping now")
            self.handle_quit()
        else:
            self.handle_term()

    def handle_term(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        log.info("stopping gracefully: waiting up to %gs for RPCs in progress", self.settings.graceful_timeout)
        self.acceptor.stop_accepting(close=True)
        self.acceptor.stop_reading()
        self._graceful_timer = self.timers.call_later(self.settings.graceful_timeout, self._graceful_timeout)

    def handle_quit(self) -> None:
        log.info("stopping now")
        self._stop_now()

    def _stop_now(self) -> None:
        """Stop at once, whatever the reason (QUIT, workers failing, an error in the loop):
        workers killed, every RPC without an answer answered FAIL ShuttingDown, clients given
        a moment to read it, connections closed."""
        self._stopping = True
        self.pool.kill_all()
        self.acceptor.stop_accepting(close=True)
        failed = self.acceptor.answer_unanswered()
        if failed:
            log.warning("%d RPCs answered ShuttingDown", failed)
        self._close_connections()
        self._done = True

    def handle_hup(self) -> None:
        if self._stopping:
            return
        if self.settings_loader is not None:
            self._reload_settings()
        self.acceptor.reload_security()
        self.pool.reload()

    def _reload_settings(self) -> None:
        try:
            new = self.settings_loader()
        except ConfigError as exc:  # keep serving with the settings we have
            log.error("reload: settings not changed: %s", exc)
            return
        # What a running server cannot change (the cluster settings: the links and keys are made at start).
        fixed = ("host", "port", "handlers", "cluster", "node_name", "cluster_node_ttl", "cluster_buffer_bytes",
                 "control_socket", "metrics_port", "metrics_host")
        changed = [s for s in fixed if getattr(new, s) != getattr(self.settings, s)]
        if changed:
            log.warning("reload: %s cannot change while running; restart to apply", ", ".join(changed))
        new = new.with_changes(**{name: getattr(self.settings, name) for name in fixed})
        self.settings = new
        self.acceptor.apply_settings(new)
        self.pool.apply_settings(new)

    def handle_ttin(self) -> None:
        self.pool.scale(+1)

    def handle_ttou(self) -> None:
        self.pool.scale(-1)

    def _graceful_timeout(self) -> None:
        self.pool.kill_all()
        failed = self.acceptor.answer_unanswered()
        log.warning("graceful_timeout (%gs) passed: %d RPCs answered ShuttingDown", self.settings.graceful_timeout, failed)
        self._finish_stop()

    def _finish_stop(self) -> None:
        if self._done:
            return
        if self._graceful_timer is not None:
            self._graceful_timer.cancel()
        self._close_connections()
        self.pool.stop_all(WORKER_STOP_S)
        log.info(
            "stopped (worker crashes: %d, RPC timeouts: %d, pushes to gone connections dropped: %d, "
            "jobs taken back: %d, time slices given back: %d)",
            self.pool.crashes, self.pool.timeouts, self.acceptor.pushes_dropped, self.pool.taken_back, self.pool.given_back,
        )
        self._done = True

    def _close_connections(self) -> None:
        """Give clients a short while to take their last answers, then close every connection."""
        acceptor = self.acceptor
        acceptor.flush()
        deadline = time.monotonic() + FINAL_FLUSH_S
        pending = [c for c in [*acceptor.conns.values(), *acceptor.gated.values()] if c.wbuf]  # (the gated: a verdict)
        while pending and time.monotonic() < deadline:
            with selectors.DefaultSelector() as waiter:
                for conn in pending:
                    waiter.register(conn.sock, selectors.EVENT_WRITE, conn)
                for key, _ in waiter.select(deadline - time.monotonic()):
                    acceptor.on_write(key.data)
            pending = [c for c in pending if c.wbuf and c.state != CLOSED]
        acceptor.close_all("server stopping")


def _exit_if_rerun_by_a_worker() -> None:
    """A spawned worker runs the user's script again (as ``__mp_main__``) before it gets its
    job; one without the main guard then starts a server here. Leave at once, quietly, with a
    code the supervisor turns into one clear line (not a second server on the same port, or a
    wall of tracebacks). ``_inheriting`` is multiprocessing's own flag for that phase (its
    ``spawn._check_not_importing_main`` reads it)."""
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        os._exit(EXIT_UNGUARDED_MAIN)


def _raise_open_file_limit(settings) -> None:
    """Raise the soft RLIMIT_NOFILE to the hard limit (as nginx and most servers do: every
    connection is a descriptor), and warn if the settings may need more than that."""
    try:
        import resource
    except ImportError:  # not POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:  # macOS refuses an unlimited soft limit
            log.debug("cannot raise the open file limit from %s to %s: %s", soft, hard, exc)
    workers = settings.worker_count + settings.spare_workers
    worker_fds = FDS_PER_WORKER * 2 * workers  # twice: during a reload, old and new workers
    need = settings.max_connections + worker_fds + FDS_BASE
    if soft != resource.RLIM_INFINITY and need > soft:
        log.warning(
            "max_connections (%d) plus %d descriptors for the workers need about %d open files, more than "
            "the limit of %d (ulimit -n): past about %d connections, accept() fails and new clients wait "
            "unanswered; raise the limit or lower max_connections",
            settings.max_connections, worker_fds, need, soft, max(0, soft - worker_fds - FDS_BASE),
        )


def _record_only(signum, frame) -> None:
    """The Python-level handler: the wakeup fd already carries the signal to the loop."""
