"""Fixtures that run real servers: ``python -m simplerpc_mp serve`` as a child process on
127.0.0.1 port 0, with real worker processes. Each waits for the "listening on" line (the
server prints it once a worker has booted), never a sleep, and every process it starts is
killed at teardown, workers included, even when the test fails.
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from simplerpc_mp import Client

REPO = Path(__file__).resolve().parent.parent
LISTENING = re.compile(r"listening on (\S+):(\d+)")
START_TIMEOUT_S = 60.0


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.01, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value or ``timeout`` passes (then fail)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class RunningServer:
    """A ``simplerpc-mp serve`` child process and ways to inspect it."""

    def __init__(self, args: list[str], env: dict | None = None, cwd: Path = REPO, preexec_fn=None):
        self.log_file = tempfile.NamedTemporaryFile("w+", prefix="simplerpc-test-", suffix=".log", delete=False)
        full_env = dict(os.environ)
        # No spare workers unless a test asks (--spare-workers wins): most tests count worker
        # processes, and each spare is one more Python process to boot on a loaded 2-core machine.
        full_env.setdefault("SIMPLERPC_MP_SPARE_WORKERS", "0")
        full_env.update(env or {})
        self.args = args
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "simplerpc_mp", "serve", *args],
            cwd=cwd,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=self.log_file,
            stdin=subprocess.DEVNULL,
            preexec_fn=preexec_fn,  # (say, resource limits for the server process)
        )
        self.pid = self.proc.pid
        self.host = ""
        self.port = 0
        self.banner = ""

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> "RunningServer":
        """Block until the server prints its listening line; fail if it exits first."""
        deadline = time.monotonic() + timeout
        buffer = b""
        with selectors.DefaultSelector() as selector:
            selector.register(self.proc.stdout, selectors.EVENT_READ)
            while b"\n" not in buffer:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"server not ready after {timeout}s; log:\n{self.log()}")
                if selector.select(remaining):
                    chunk = os.read(self.proc.stdout.fileno(), 4096)
                    if not chunk:
                        self.proc.wait(10)
                        raise AssertionError(f"server exited with {self.proc.returncode} before listening; log:\n{self.log()}")
                    buffer += chunk
        self.banner = buffer.decode()
        match = LISTENING.search(self.banner)
        assert match, self.banner
        self.host, self.port = match.group(1), int(match.group(2))
        return self

    def client(self, **kwargs) -> Client:
        return Client(self.host, self.port, **kwargs)

    def log(self) -> str:
        with open(self.log_file.name) as f:
            return f.read()

    def wait_log(self, pattern: str, timeout: float = 10.0, count: int = 1) -> str:
        regex = re.compile(pattern)
        return wait_until(
            lambda: len(regex.findall(self.log())) >= count and self.log(), timeout, what=f"log line {pattern!r}"
        )

    def workers(self) -> list[psutil.Process]:
        """The worker processes (children running the worker main), not multiprocessing helpers."""
        try:
            children = psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return []
        return [child for child in children if _is_worker(child)]

    def send(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """End the server and every process under it (teardown; also after a failed test).

        A graceful SIGTERM first, as an operator would; SIGKILL for whatever is left after 10 s.
        """
        try:
            tree = psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for child in tree:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        # Wait for the workers only: multiprocessing's resource tracker exits by itself once the
        # server is gone, and waiting for an orphan to be reaped by init can take seconds.
        psutil.wait_procs([p for p in tree if _is_worker(p)], timeout=10)
        self.proc.stdout.close()
        self.log_file.close()
        os.unlink(self.log_file.name)


def kill_process_tree(proc: subprocess.Popen) -> None:
    """Kill a child process and every process under it (a test's script and its workers), and
    wait for them: teardown, also after a failed test."""
    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)
    for child in tree:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=10)


def _is_worker(process: psutil.Process) -> bool:
    try:
        command = " ".join(process.cmdline())
    except psutil.Error:
        return False
    # With the optional setproctitle the title replaces the command line.
    return "spawn_main" in command or "simplerpc-mp worker" in command


@pytest.fixture
def start_server():
    """``start_server(*args, env=None, ready=True)`` -> a running server, killed at teardown."""
    started: list[RunningServer] = []

    def start(*args: str, env: dict | None = None, ready: bool = True, workers: int = 2) -> RunningServer:
        full_args = ["--host", "127.0.0.1", "--port", "0", "--workers", str(workers), *args]
        server = RunningServer(full_args, env=env)
        started.append(server)
        return server.wait_ready() if ready else server

    yield start
    for server in started:
        server.kill()


@pytest.fixture
def basic_server(start_server):
    """A server with the test handlers (tests/handlers/basic.py) and two workers."""
    return start_server("--handlers", "tests.handlers.basic")
