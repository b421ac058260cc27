"""Observability and control (issue 12): the control socket and its commands (stats, top,
reload, scale, stop), the counters, /metrics, and structured logs. Real servers, real worker
processes, real signals; every wait is on a socket, a log line or a snapshot, with a deadline.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading

import pytest

from simplerpc_mp import RemoteError
from simplerpc_mp.control import ControlError, ControlProtocol, NoServer, default_path, request
from simplerpc_mp.counters import BOUNDS, OTHER, Counters, percentile

from .conftest import REPO, wait_until

CLI_TIMEOUT_S = 60


@pytest.fixture
def runtime_dir():
    """A private $XDG_RUNTIME_DIR (short: a Unix socket path has at most 107 bytes)."""
    path = tempfile.mkdtemp(prefix="srpc-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def obs_server(start_server, runtime_dir):
    """``obs_server(*args, workers=2)``: a server with the test handlers and its control socket."""

    def start(*args: str, workers: int = 2, env: dict | None = None):
        server = start_server("--handlers", "tests.handlers.basic", *args, workers=workers,
                              env={"XDG_RUNTIME_DIR": runtime_dir, **(env or {})})
        server.control_path = os.path.join(runtime_dir, "simplerpc-mp", f"control-{server.port}.sock")
        return server

    return start


def cli(*args: str, runtime_dir: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "XDG_RUNTIME_DIR": runtime_dir}
    result = subprocess.run([sys.executable, "-m", "simplerpc_mp", *args], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=CLI_TIMEOUT_S)
    if check:
        assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return result


def snapshot(server) -> dict:
    answer = request(server.control_path, {"cmd": "stats"})
    assert answer["ok"], answer
    return answer["stats"]


# -- the sans-IO parts -------------------------------------------------------------------------

def test_control_protocol_splits_lines_and_refuses_garbage():
    protocol = ControlProtocol(max_request_bytes=64)
    assert protocol.feed(b'{"cmd": "st') == []
    assert protocol.feed(b'ats"}\n{"cmd": "reload"}\n') == [{"cmd": "stats"}, {"cmd": "reload"}]
    for bad in (b"garbage\n", b"[1, 2]\n", b'{"cmd": 3}\n', b"\xff\xfe\n", b"[" * 16000 + b"\n",
                b'{"cmd": "stats", "x": ' + b"[" * 16000 + b"\n"):
        with pytest.raises(ControlError):
            ControlProtocol().feed(bad)
    with pytest.raises(ControlError, match="longer than 64"):
        ControlProtocol(max_request_bytes=64).feed(b"x" * 65)


def test_counters_per_op_per_reason_and_percentiles():
    class FakeJob:
        def __init__(self, payload: bytes, count: int, arrived: float = 0.0):
            self.payload, self.count, self.arrived, self.op_stats = payload, count, arrived, None

    counters = Counters()
    counters.set_ops(["echo", "add"])
    okay, fail = b'OKAY{}\n', b'FAIL{"reason":"Custom","message":"m"}\n'
    # one op for the whole job: one bucket update per reply
    counters.reply(FakeJob(b'echo{}\n' * 3, 3), 0, 3, okay * 2 + fail, now=0.001)
    # mixed ops, and a name nobody registered
    mixed = FakeJob(b'echo{}\nadd{"a":1}\nnosuch{}\n', 3)
    counters.reply(mixed, 0, 2, okay + fail, now=0.002)
    counters.reply(mixed, 2, 1, b'FAIL{"reason":"UnknownOpcode","message":"x"}\n', now=0.003)
    counters.fail(FakeJob(b'add{}\n', 1), 0, 1, "WorkerCrashed", now=0.004)
    ops = counters.by_name()
    assert (ops["echo"].count, ops["echo"].fails) == (4, {"Custom": 1})
    assert (ops["add"].count, ops["add"].fails) == (2, {"Custom": 1, "WorkerCrashed": 1})
    assert (ops[OTHER].count, ops[OTHER].fails) == (1, {"UnknownOpcode": 1})
    assert set(ops) == {"echo", "add", OTHER}
    # a FAIL{ inside an OKAY's string is no FAIL
    counters.reply(FakeJob(b'echo{}\n', 1), 0, 1, b'OKAY{"s":"FAIL{"}\n', now=0.001)
    assert ops["echo"].fails == {"Custom": 1}
    p50 = percentile(ops["echo"], 0.5)
    assert BOUNDS[0] < p50 <= 0.001 + 1e-9


# -- the control socket ------------------------------------------------------------------------

def test_control_requests_from_one_write_are_served_one_per_loop_pass(runtime_dir):
    """64 stats in one write built 64 snapshots in one pass of the loop (milliseconds each with
    many workers): now one per pass, and the socket is not read while an answer is unsent."""
    import selectors

    from simplerpc_mp.control import ControlServer
    from simplerpc_mp.timers import Timers

    served = []
    selector = selectors.DefaultSelector()
    path = os.path.join(runtime_dir, "c.sock")
    server = ControlServer(path, selector, Timers(), lambda message: served.append(message) or {"ok": True},
                           private_dir=False)
    try:
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(path)
            client.sendall(b'{"cmd": "stats"}\n' * 10)
            passes = []
            answers = b""
            client.settimeout(10)
            while answers.count(b"\n") < 10:
                before = len(served)
                for key, mask in selector.select(10):
                    key.data.on_event(mask)
                passes.append(len(served) - before)
                client.setblocking(False)
                try:
                    answers += client.recv(65536)
                except BlockingIOError:
                    pass
                assert len(passes) < 1000, passes
            assert max(passes) == 1 and len(served) == 10, passes
    finally:
        server.close()
        selector.close()



def test_stats_json_has_every_key_and_names_the_stuck_op(obs_server, runtime_dir):
    server = obs_server()
    assert stat.S_IMODE(os.stat(server.control_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(server.control_path)).st_mode) == 0o700
    with socket.create_connection((server.host, server.port)) as stuck:
        stuck.sendall(b'slow{"s": 30}\n')
        with server.client() as client:  # load on the other worker meanwhile
            for i in range(20):
                client.call("echo", {"i": i})
        busy = wait_until(lambda: [w for w in snapshot(server)["workers"] if w["op"] == "slow"], 30, 0.05,
                          "a worker running op slow")[0]
        first = busy["running_s"]
        later = wait_until(
            lambda: [w for w in snapshot(server)["workers"] if w["op"] == "slow" and w["running_s"] > first + 0.2],
            30, 0.05, "running_s to grow")[0]
        assert later["pid"] == busy["pid"] and later["state"] == "busy" and isinstance(later["net_id"], int)
        result = cli("stats", "--json", "--port", str(server.port), runtime_dir=runtime_dir)
    snap = json.loads(result.stdout)
    for key in ("pid", "version", "uptime_s", "connections", "inflight", "rpcs_total", "pushes_total",
                "pushes_dropped", "workers", "ops", "restarts", "closed"):
        assert key in snap, key
    assert snap["pid"] == server.pid and snap["connections"] >= 1 and snap["inflight"] >= 1
    for worker in snap["workers"]:
        for key in ("worker_id", "pid", "state", "op", "net_id", "running_s", "rpcs", "cpu_percent", "rss_bytes", "age_s"):
            assert key in worker, key
        assert worker["state"] in ("booting", "idle", "busy", "retiring")
        assert worker["rss_bytes"] > 0
    assert [w["op"] for w in snap["workers"]].count("slow") == 1
    assert snap["ops"]["echo"]["count"] == 20 and snap["ops"]["echo"]["p99_ms"] > 0
    for reason in ("crashed", "timeout", "recycled", "reload", "scaled"):
        assert snap["restarts"][reason] == 0
    for reason in ("output_hard_limit", "output_soft_limit", "idle_timeout", "max_connections"):
        assert reason in snap["closed"]
    text = cli("stats", "--port", str(server.port), runtime_dir=runtime_dir).stdout
    assert "slow" in text and str(busy["pid"]) in text


def test_counters_match_the_rpcs_sent_by_op_and_reason(obs_server):
    server = obs_server("--max-frame-bytes", "1024")
    with server.client() as client:
        for i in range(7):
            client.call("echo", {"i": i})
        for _ in range(3):
            with pytest.raises(RemoteError, match="Custom"):
                client.call("custom_fail", {})
        for _ in range(2):
            with pytest.raises(RemoteError, match="Unknown"):
                client.call("boom", {})
        for name in ("nosuch", "other_unknown"):
            with pytest.raises(RemoteError, match="UnknownOpcode"):
                client.call(name, {})
        with pytest.raises(RemoteError, match="FrameTooLarge"):
            client.call("echo", {"x": "y" * 2000})
    ops = snapshot(server)["ops"]
    assert (ops["echo"]["count"], ops["echo"]["fail"]) == (7, 0)
    assert (ops["custom_fail"]["count"], ops["custom_fail"]["fails"]) == (3, {"Custom": 3})
    assert (ops["boom"]["count"], ops["boom"]["fails"]) == (2, {"Unknown": 2})
    assert ops[OTHER]["fails"] == {"UnknownOpcode": 2, "FrameTooLarge": 1} and ops[OTHER]["count"] == 3
    assert "nosuch" not in ops
    assert snapshot(server)["rpcs_total"] == 15
    assert snapshot(server)["pushes_total"] == 1  # the welcome push of on_connect


def test_kill_9_of_a_worker_counts_as_crashed(obs_server):
    server = obs_server()
    with server.client() as client:
        client.call("echo", {})
    victim = snapshot(server)["workers"][0]["pid"]
    os.kill(victim, signal.SIGKILL)
    snap = wait_until(lambda: (s := snapshot(server))["restarts"]["crashed"] == 1 and len(s["workers"]) == 2 and s,
                      30, 0.05, "the crash counted and the worker replaced")
    assert victim not in [w["pid"] for w in snap["workers"]]
    assert snap["recent_restarts"][-1]["pid"] == victim and snap["recent_restarts"][-1]["reason"] == "crashed"


def test_control_socket_refuses_garbage_huge_requests_and_non_readers_without_harm(obs_server):
    server = obs_server()
    path = server.control_path
    with server.client() as client:
        # garbage: one error line, then the server closes
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(path)
            sock.sendall(b"\x00\xffGET / HTTP/1.1\r\n\r\n")
            answer = sock.makefile("rb").readline()
            assert json.loads(answer)["ok"] is False
            assert sock.recv(10) == b""
        # JSON nested deeper than the parser's recursion limit: refused like any garbage
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(path)
            sock.sendall(b"[" * 16000 + b"\n")
            assert json.loads(sock.makefile("rb").readline())["ok"] is False
        assert client.call("echo", {"after": "nesting"}) == {"after": "nesting"}
        # a huge request without a newline is cut off at the limit
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(path)
            try:
                sock.sendall(b"x" * (1024 * 1024))
            except (BrokenPipeError, ConnectionResetError):
                pass  # closed before we finished: that is the point
            data = b""
            try:
                while chunk := sock.recv(65536):
                    data += chunk
            except ConnectionResetError:
                pass
            assert b"longer than" in data or data == b""
        # a client that asks and never reads: RPCs still flow, and it is dropped at the output limit
        with socket.socket(socket.AF_UNIX) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(path)
            sock.setblocking(False)
            try:
                for _ in range(2000):
                    sock.send(b'{"cmd":"stats"}\n')
                    assert client.call("echo", {"ok": 1}) == {"ok": 1}
            except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                pass  # the server stopped reading it, or dropped it
            # (the server reads nothing more while an answer waits: it is dropped at the write timeout)
            server.wait_log("control socket: a client (does not read its answers|left an answer unread)", 30)
        assert client.call("echo", {"still": True}) == {"still": True}
    assert snapshot(server)["ops"]["echo"]["count"] >= 2


def test_no_server_is_one_line_and_exit_1(runtime_dir):
    result = cli("stats", "--port", "1", runtime_dir=runtime_dir, check=False)
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "no server" in result.stderr
    for args in (["reload"], ["scale", "+1"], ["stop"], ["top", "--once"]):
        result = cli(*args, "--control-socket", os.path.join(runtime_dir, "none.sock"), runtime_dir=runtime_dir, check=False)
        assert result.returncode == 1 and result.stderr.count("\n") == 1, (args, result.stderr)
    with pytest.raises(NoServer):
        request(default_path(1), {"cmd": "stats"})


def test_control_socket_off_and_found_through_config(obs_server, runtime_dir, tmp_path):
    server = obs_server("--control-socket", "")
    assert not os.path.exists(server.control_path)
    explicit = os.path.join(runtime_dir, "mine.sock")
    other = obs_server("--control-socket", explicit)
    config = tmp_path / "server.toml"
    config.write_text(f'control_socket = "{explicit}"\n')
    snap = json.loads(cli("stats", "--json", "--config", str(config), runtime_dir=runtime_dir).stdout)
    assert snap["pid"] == other.pid


def test_the_cli_finds_a_server_that_ran_without_xdg_runtime_dir(obs_server, runtime_dir):
    """A server run without $XDG_RUNTIME_DIR (a service, cron) has its socket in the home
    directory; a login shell has the variable set: the CLI looked only there, "no server"."""
    home = os.path.join(runtime_dir, "home")
    os.mkdir(home)
    server = obs_server(env={"XDG_RUNTIME_DIR": "", "HOME": home})
    assert os.path.exists(os.path.join(home, ".simplerpc-mp", f"control-{server.port}.sock"))
    env = {**os.environ, "XDG_RUNTIME_DIR": runtime_dir, "HOME": home}
    result = subprocess.run([sys.executable, "-m", "simplerpc_mp", "stats", "--json", "--port", str(server.port)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["pid"] == server.pid


def test_scale_then_stats_shows_one_more_worker(obs_server, runtime_dir):
    os.mkdir(os.path.join(runtime_dir, "simplerpc-mp"), 0o755)  # the default directory, too open
    server = obs_server(workers=1)
    assert stat.S_IMODE(os.stat(os.path.dirname(server.control_path)).st_mode) == 0o700
    result = cli("scale", "+1", "--port", str(server.port), runtime_dir=runtime_dir)
    assert "1 -> 2" in result.stdout
    wait_until(lambda: [w["state"] for w in snapshot(server)["workers"]] == ["idle", "idle"], 60, 0.05, "two idle workers")
    assert cli("scale", "1", "--port", str(server.port), runtime_dir=runtime_dir).stdout.strip() == "worker target 2 -> 1"
    snap = wait_until(lambda: (s := snapshot(server))["restarts"]["scaled"] == 1 and len(s["workers"]) == 1 and s,
                      30, 0.05, "one worker again")
    assert snap["workers_target"] == 1
    refused = cli("scale", "-5", "--port", str(server.port), runtime_dir=runtime_dir, check=False)
    assert refused.returncode == 1 and "from 1 to 1024" in refused.stderr


def test_reload_under_load_fails_no_rpc(obs_server, runtime_dir):
    server = obs_server()
    done = threading.Event()
    answers: list = []
    errors: list = []

    def load() -> None:
        with server.client() as client:
            i = 0
            while not done.is_set():
                try:
                    answers.append(client.call("echo", {"i": i}) == {"i": i})
                except RemoteError as exc:
                    errors.append(exc)
                i += 1

    thread = threading.Thread(target=load)
    thread.start()
    try:
        wait_until(lambda: len(answers) > 20, 30, what="load running")
        old = {w["pid"] for w in snapshot(server)["workers"]}
        result = cli("reload", "--port", str(server.port), runtime_dir=runtime_dir)
        assert "reloading" in result.stdout
        wait_until(lambda: (s := snapshot(server))["restarts"]["reload"] == 2
                   and not old & {w["pid"] for w in s["workers"]}, 60, 0.05, "the old workers replaced")
        seen = len(answers)
        wait_until(lambda: len(answers) > seen + 20, 30, what="load after the reload")
    finally:
        done.set()
        thread.join(30)
    assert errors == [] and all(answers)


def test_top_once_prints_every_worker_pid(obs_server, runtime_dir):
    server = obs_server(workers=3)
    with server.client() as client:
        client.call("echo", {})
    result = cli("top", "--once", "--port", str(server.port), runtime_dir=runtime_dir)
    pids = [w["pid"] for w in snapshot(server)["workers"]]
    assert len(pids) == 3
    for pid in pids:
        assert str(pid) in result.stdout
    assert "echo" in result.stdout and "connections" in result.stdout


def test_stop_through_the_control_socket(obs_server, runtime_dir):
    server = obs_server()
    result = cli("stop", "--port", str(server.port), runtime_dir=runtime_dir)
    assert "stopping gracefully" in result.stdout
    assert server.proc.wait(60) == 0
    assert not os.path.exists(server.control_path)  # removed on the way out
    now = obs_server()
    result = cli("stop", "--now", "--port", str(now.port), runtime_dir=runtime_dir)
    assert "stopping now" in result.stdout and now.proc.wait(60) == 0


def test_a_second_server_on_the_same_control_socket_exits_1(obs_server, start_server, runtime_dir):
    first = obs_server()
    second = start_server("--handlers", "tests.handlers.basic", "--control-socket", first.control_path, ready=False,
                          env={"XDG_RUNTIME_DIR": runtime_dir})
    assert second.proc.wait(60) == 1
    assert "in use by another server" in second.log()
    assert snapshot(first)["pid"] == first.pid


# -- /metrics ------------------------------------------------------------------------------------

ISSUE_METRICS = (
    "simplerpc_rpcs_total", "simplerpc_rpc_duration_seconds", "simplerpc_connections",
    "simplerpc_connections_accepted_total", "simplerpc_connections_closed_total", "simplerpc_inflight_rpcs",
    "simplerpc_workers", "simplerpc_worker_restarts_total", "simplerpc_worker_rss_bytes",
    "simplerpc_worker_cpu_seconds_total", "simplerpc_pushes_total", "simplerpc_pushes_dropped_total",
    "simplerpc_output_buffer_bytes",
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scrape(port: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return response.read().decode("utf-8")


def samples(text: str) -> dict:
    """{(name, frozenset(labels)): value} parsed by prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture
def metrics_server(obs_server):
    def start(*args: str, workers: int = 2):
        port = _free_port()
        server = obs_server("--metrics-port", str(port), *args, workers=workers)
        server.metrics_port = port
        return server

    return start


def test_metrics_parse_and_carry_every_name_and_count(metrics_server):
    server = metrics_server()
    with server.client() as client:
        for i in range(5):
            client.call("echo", {"i": i})
        with pytest.raises(RemoteError):
            client.call("custom_fail", {})
        text = scrape(server.metrics_port)
    values = samples(text)
    names = {name for name, _ in values}
    for name in ISSUE_METRICS:
        assert name in names or name + "_bucket" in names, name
    assert values[("simplerpc_rpcs_total", frozenset({("op", "echo"), ("result", "OKAY")}))] == 5
    assert values[("simplerpc_rpcs_total", frozenset({("op", "custom_fail"), ("result", "Custom")}))] == 1
    assert values[("simplerpc_rpc_duration_seconds_count", frozenset({("op", "echo")}))] == 5
    assert values[("simplerpc_rpc_duration_seconds_bucket", frozenset({("op", "echo"), ("le", "+Inf")}))] == 5
    assert values[("simplerpc_connections", frozenset())] == 1
    assert values[("simplerpc_connections_accepted_total", frozenset())] == 1
    assert values[("simplerpc_workers", frozenset({("state", "idle")}))] == 2
    assert values[("simplerpc_pushes_total", frozenset())] == 1
    rss = [v for (name, labels), v in values.items() if name == "simplerpc_worker_rss_bytes"]
    assert len(rss) == 2 and all(v > 0 for v in rss)


def test_refused_authentications_show_in_stats_and_metrics(metrics_server, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("alice:s3cret-token-for-tests\n")
    os.chmod(tokens, 0o600)
    server = metrics_server("--auth-tokens-file", str(tokens))
    for _ in range(2):
        with socket.create_connection((server.host, server.port)) as guesser:
            guesser.settimeout(30)
            guesser.sendall(b'auth{"token":"wrong"}\n')
            assert b"Unauthorized" in guesser.makefile("rb").readline()
    assert snapshot(server)["auth_failures"] == 2
    assert samples(scrape(server.metrics_port))[("simplerpc_auth_failures_total", frozenset())] == 2


def test_a_refusal_overtaken_by_auth_timeout_is_one_auth_failure(obs_server, tmp_path):
    """A wrong token's answer is held back a second; an auth_timeout shorter than that closed the
    connection first and counted the same failure a second time."""
    tokens = tmp_path / "tokens"
    tokens.write_text("alice:s3cret-token-for-tests\n")
    os.chmod(tokens, 0o600)
    server = obs_server("--auth-tokens-file", str(tokens), "--auth-timeout", "0.5")
    with socket.create_connection((server.host, server.port)) as guesser:
        guesser.settimeout(30)
        guesser.sendall(b'auth{"token":"wrong"}\n')
        guesser.makefile("rb").readline()  # the FAIL, or the close at auth_timeout
        snap = wait_until(lambda: (s := snapshot(server)) and sum(s["closed"].values()) and s, 30, 0.05,
                          "the close counted")
    assert snap["auth_failures"] == 1, snap["closed"]


def test_kill_9_shows_in_worker_restarts_total(metrics_server):
    server = metrics_server()
    victim = snapshot(server)["workers"][1]["pid"]
    os.kill(victim, signal.SIGKILL)
    crashed = ("simplerpc_worker_restarts_total", frozenset({("reason", "crashed")}))
    wait_until(lambda: samples(scrape(server.metrics_port))[crashed] == 1, 30, 0.1, "the crash in /metrics")


def test_ten_thousand_unknown_op_names_leave_the_metrics_bounded(metrics_server):
    server = metrics_server()
    before = scrape(server.metrics_port)
    names = 10_000
    with socket.create_connection((server.host, server.port)) as sock:
        reader = sock.makefile("rb")
        sock.sendall(b"".join(b"made_up_%d{}\n" % i for i in range(names)))
        answers = [reader.readline() for _ in range(names + 1)]  # the welcome push, then every answer
        assert sum(a.startswith(b"FAIL") for a in answers) == names
    key = ("simplerpc_rpcs_total", frozenset({("op", "<other>"), ("result", "UnknownOpcode")}))
    # (a scrape within a second of the last one gets the same text: wait for a fresh one)
    after = wait_until(lambda: (text := scrape(server.metrics_port)) and samples(text).get(key) == names and text,
                       30, 0.2, "a scrape with every answer counted")
    assert b"made_up" not in after.encode()
    assert len(after) < len(before) + 2000  # the same series, with other numbers
    other = samples(after)[("simplerpc_rpcs_total", frozenset({("op", "<other>"), ("result", "UnknownOpcode")}))]
    assert other == names
    assert not [op for op in snapshot(server)["ops"] if op.startswith("made_up")]


def test_scrapes_within_a_second_share_one_build():
    """A build takes ~10 ms with 64 workers: scrapers in a tight loop, or 64 at once, held the
    loop for a build each. Now at most one per MIN_BUILD_INTERVAL_S (a clock the test drives)."""
    import selectors

    from prometheus_client.core import GaugeMetricFamily

    from simplerpc_mp.metrics import MIN_BUILD_INTERVAL_S, MetricsServer
    from simplerpc_mp.timers import Timers

    class Counting:
        builds = 0

        def collect(self):
            Counting.builds += 1
            yield GaugeMetricFamily("simplerpc_builds", "Builds.", value=Counting.builds)

    now = [100.0]
    selector = selectors.DefaultSelector()
    server = MetricsServer("127.0.0.1", 0, selector, Timers(), Counting(), clock=lambda: now[0])

    def get() -> bytes:
        with socket.create_connection(server.address) as sock:
            sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            sock.shutdown(socket.SHUT_WR)
            sock.setblocking(False)
            data = b""
            for _ in range(1000):
                for key, mask in selector.select(10):
                    key.data.on_event(mask)
                try:
                    chunk = sock.recv(65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    return data
                data += chunk
            raise AssertionError("no answer")

    try:
        answers = [get() for _ in range(5)]
        assert Counting.builds == 1 and all(b"simplerpc_builds 1.0" in a for a in answers)
        now[0] += MIN_BUILD_INTERVAL_S
        assert b"simplerpc_builds 2.0" in get() and Counting.builds == 2
    finally:
        server.close()
        selector.close()


def test_a_hostile_scraper_does_not_stall_the_loop(metrics_server):
    server = metrics_server()
    with socket.create_connection(("127.0.0.1", server.metrics_port)) as silent, \
            socket.create_connection(("127.0.0.1", server.metrics_port)) as huge:
        silent.sendall(b"GET /metr")  # and nothing more
        huge.sendall(b"GET /metrics HTTP/1.1\r\n" + b"X: " + b"y" * 20000)
        huge.settimeout(30)
        assert huge.recv(100).startswith(b"HTTP/1.0 431")
        with server.client() as client:
            assert client.call("echo", {"x": 1}) == {"x": 1}
        assert "simplerpc_rpcs_total" in scrape(server.metrics_port)
    with socket.create_connection(("127.0.0.1", server.metrics_port)) as post:
        post.sendall(b"POST /metrics HTTP/1.0\r\n\r\n")
        post.settimeout(30)
        assert post.recv(100).startswith(b"HTTP/1.0 405")


def test_metrics_without_prometheus_client_is_one_line_and_exit_2(start_server, tmp_path):
    fake = tmp_path / "prometheus_client"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('No module named prometheus_client')\n")
    server = start_server("--metrics-port", str(_free_port()), "--control-socket", "", ready=False,
                          env={"PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])})
    assert server.proc.wait(60) == 2
    log = server.log()
    assert "prometheus_client is not installed" in log and "Traceback" not in log
    assert log.strip().count("\n") == 0


# -- structured logs -------------------------------------------------------------------------

def _records(server) -> list[dict]:
    records = []
    for line in server.log().splitlines():
        if line.strip():
            records.append(json.loads(line))  # every line is one JSON object: no raw stack text
    return records


def test_json_logs_carry_fields_and_a_timed_out_worker_stack_is_one_record(obs_server):
    server = obs_server("--log-format", "json", "--access-log")
    with server.client() as client:
        assert client.call("echo", {}) == {}
        with pytest.raises(RemoteError, match="Timeout"):
            client.call("hang_short", {})
        assert client.call("echo", {}) == {}
    server.wait_log(r'"stack": ', 30)
    records = wait_until(lambda: (r := _records(server)) and any(x.get("reason") == "timeout" and "stack" in x for x in r)
                         and r, 30, what="the stack record")
    stack = [r for r in records if "stack" in r]
    assert len(stack) == 1
    record = stack[0]
    assert record["op"] == "hang_short" and isinstance(record["net_id"], int) and record["level"] == "ERROR"
    assert isinstance(record["worker_id"], int) and record["worker_pid"] != server.pid
    assert "hang_short" in record["stack"] and "File " in record["stack"]  # faulthandler's frames
    timed_out = [r for r in records if r.get("reason") == "timeout" and "ran past" in r["message"]]
    assert timed_out and timed_out[0]["op"] == "hang_short" and timed_out[0]["net_id"] == record["net_id"]
    access = [r for r in records if r["message"].startswith("access ")]
    assert access and access[0]["op"] == "echo" and access[0]["reason"] == "OKAY" and "worker_id" in access[0]
    booted = [r for r in records if "booted" in r["message"]]
    assert booted and all("worker_id" in r and "worker_pid" in r for r in booted)
    assert snapshot(server)["restarts"]["timeout"] == 1


def test_top_frame_stays_readable_with_64_workers():
    from rich.console import Console

    from simplerpc_mp.dashboard import Rates, top_frame

    workers = [{"worker_id": i, "pid": 1000 + i, "state": "busy" if i % 8 == 0 else "idle", "op": "slow" if i % 8 == 0 else None,
                "net_id": i if i % 8 == 0 else None, "running_s": i / 10 if i % 8 == 0 else None, "rpcs": i * 100,
                "cpu_percent": 50.0, "rss_bytes": 20 << 20, "age_s": 60.0} for i in range(1, 65)]
    snap = {"version": "x", "pid": 1, "uptime_s": 60.0, "connections": 10_000, "inflight": 500, "rpcs_total": 10**6,
            "pushes_total": 0, "pushes_dropped": 0, "output_buffer_bytes": 0, "workers": workers,
            "ops": {"slow": {"count": 10**6, "fail": 0, "p50_ms": 1.0, "p99_ms": 2.0, "fails": {}}},
            "restarts": {"crashed": 0}, "recent_restarts": []}
    console = Console(width=160, record=True)
    console.print(top_frame(snap, Rates().update(snap), height=40))
    text = console.export_text()
    assert len(text.splitlines()) <= 45
    assert "more: 50 idle" in text  # the 8 busy workers shown first, the idle ones that fit, the rest summed up
    assert all(str(1000 + i) in text for i in range(8, 65, 8))


def test_top_and_stats_show_no_control_characters_a_client_chose():
    """An op name is the bytes a client sent before "{": an ESC in it reached the operator's
    terminal through top and stats (rich strips only BEL, BS, VT, FF and CR)."""
    from rich.console import Console

    from simplerpc_mp.dashboard import Rates, stats_tables, top_frame

    evil = "x\x1b]0;pwned\x07\x1b[2J\x9b"
    snap = {"version": "t", "pid": 1, "uptime_s": 1.0, "connections": 1, "inflight": 1, "rpcs_total": 1,
            "pushes_total": 0, "pushes_dropped": 0, "output_buffer_bytes": 0,
            "workers": [{"worker_id": 1, "pid": 2, "state": "busy", "op": evil, "net_id": 3, "running_s": 1.0,
                         "rpcs": 1, "cpu_percent": 1.0, "rss_bytes": 1, "age_s": 1.0}],
            "ops": {"echo": {"count": 1, "fail": 1, "p50_ms": 1.0, "p99_ms": 1.0, "fails": {evil: 1}}},
            "restarts": {"crashed": 0}, "closed": {evil: 1}, "recent_restarts": [], "cluster": {evil: evil}}
    for view in (top_frame(snap, Rates().update(snap), height=40), stats_tables(snap)):
        console = Console(width=200, record=True, force_terminal=False)
        console.print(view)
        text = console.export_text()
        assert "x?]0;pwned??[2J?" in text and not any(ord(c) < 0x20 and c != "\n" or 0x7F <= ord(c) < 0xA0 for c in text)


def test_closed_counts_by_reason(obs_server):
    server = obs_server("--idle-timeout", "0.3", "--max-connections", "1")
    with socket.create_connection((server.host, server.port)) as first:
        first.settimeout(30)
        with socket.create_connection((server.host, server.port)) as refused:
            refused.settimeout(30)
            assert b"TooManyConnections" in refused.makefile("rb").readline()
        assert first.makefile("rb").readline().startswith(b"welcome{")  # on_connect's push
        while first.recv(4096):  # the server closes it once idle
            pass
    closed = wait_until(lambda: (c := snapshot(server)["closed"])["idle_timeout"] == 1 and c, 30, 0.05, "the idle close")
    assert closed["max_connections"] == 1 and closed["output_hard_limit"] == 0


def test_a_refused_authentication_counts_as_unauthorized_not_client_closed(obs_server, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("alice:s3cret-token-for-tests\n")
    os.chmod(tokens, 0o600)
    server = obs_server("--auth-tokens-file", str(tokens))
    with socket.create_connection((server.host, server.port)) as guesser:
        guesser.settimeout(30)
        guesser.sendall(b'auth{"token":"wrong"}\n')
        assert b"Unauthorized" in guesser.makefile("rb").readline()
        assert guesser.recv(10) == b""  # the server closed it after the FAIL
    closed = wait_until(lambda: (c := snapshot(server)["closed"]) and sum(c.values()) and c, 30, 0.05,
                        "the close counted")
    assert closed.get("unauthorized") == 1 and closed["client_closed"] == 0, closed


def test_rooms_are_a_section_of_stats_and_metrics(start_server, runtime_dir):
    port = _free_port()
    server = start_server("--handlers", "tests.handlers.rooms_ops", "--metrics-port", str(port),
                          env={"XDG_RUNTIME_DIR": runtime_dir})
    server.control_path = os.path.join(runtime_dir, "simplerpc-mp", f"control-{server.port}.sock")
    with server.client() as a, server.client() as b:
        a.call("join", {"room": "lobby"})
        b.call("join", {"room": "lobby"})
        stats = snapshot(server)
        # The rooms issue's keys at the top level: how many, the memberships, the largest rooms.
        assert stats["rooms"] == 1 and stats["room_members"] == 2
        assert stats["largest_rooms"] == [{"room": "lobby", "members": 2}]
        assert stats["room_stats"]["room_joins"] == 2
        values = samples(scrape(port))
    assert values[("simplerpc_rooms", frozenset())] == 1
    assert values[("simplerpc_room_joins_total", frozenset())] == 2


def test_cluster_section_becomes_metrics():
    from prometheus_client.core import Metric

    from simplerpc_mp.metrics import _provided

    section = {"node_name": "a", "node_number": 3, "broker": "up", "url": "redis://x", "outages": 1, "outage_s": 0.0,
               "pushes_forwarded": 5, "broadcasts_published": 1, "room_pushes_published": 0, "pushes_received": 4,
               "pushes_dropped": {"redis_down": 2, "buffer_full": 0, "no_node": 1}, "buffered_bytes": 0,
               "links": {"cmd": {"state": "up"}}, "nodes": [{"name": "a"}, {"name": "b"}]}
    families = {f.name: f for f in _provided("cluster", section)}
    assert all(isinstance(f, Metric) for f in families.values())
    assert families["simplerpc_cluster_broker_up"].samples[0].value == 1
    assert families["simplerpc_cluster_nodes"].samples[0].value == 2
    assert families["simplerpc_cluster_pushes_forwarded"].type == "counter"
    dropped = {s.labels["reason"]: s.value for s in families["simplerpc_cluster_pushes_dropped"].samples}
    assert dropped == {"redis_down": 2, "buffer_full": 0, "no_node": 1}


def test_refused_authentications_are_counted_in_stats_and_metrics(obs_server, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("alice:right-token\n")
    tokens.chmod(0o600)
    port = _free_port()
    server = obs_server("--auth-tokens-file", str(tokens), "--metrics-port", str(port))
    assert snapshot(server)["security"] == {"tls": False, "auth": True, "tls_failures": 0}
    for frame in (b'auth{"token": "wrong"}\n', b"echo{}\n"):  # a wrong token, a frame before auth
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(frame)
            answer = sock.makefile("rb").readline()
            assert answer.startswith(b"FAIL") and b"Unauthorized" in answer
    stats = wait_until(lambda: (s := snapshot(server))["auth_failures"] == 2 and s, 30, 0.05, "both refusals counted")
    assert "right-token" not in json.dumps(snapshot(server))  # a token never reaches stats
    values = samples(scrape(port))
    assert values[("simplerpc_auth_failures_total", frozenset())] == stats["auth_failures"]
    assert values[("simplerpc_tls_handshake_failures_total", frozenset())] == 0
