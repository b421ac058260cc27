"""The original pjsdev/simplerpc client, unchanged in behaviour, talks to this server.

``SeedClient`` below is our own few lines that behave as the seed's ``Client`` did (it was an
asyncore dispatcher): it reads with ``recv(1024)``, splits the stream on "\\n" keeping the
dangling rest, takes everything before the first "{" of a frame as the opcode and
``json.loads(rest.strip())`` as the data, sends ``OPNAME + json.dumps(args) + "\\n"`` (default
separators, with spaces), hands "FAIL" to its fail callback and every other frame, "OKAY"
included, to its handler ``handler(client, opcode, data)``. ``MessageHandler`` is the seed's
op table: ``on(op, fn)`` and ``fn(conn, data)``; ops without an entry are ignored.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from simplerpc_mp import Client
from tests.conftest import REPO, RunningServer, kill_process_tree


class MessageHandler:
    def __init__(self):
        self.msg_table = {}

    def on(self, msg, func):
        self.msg_table[msg] = func

    def __call__(self, conn, opcode, data):
        if opcode in self.msg_table:
            self.msg_table[opcode](conn, data)


class SeedClient:
    """The seed's Client: connect, then a loop of handle_read / handle_close."""

    def __init__(self, host: str, port: int, handler: MessageHandler):
        self.handler = handler
        self.connect_callback = lambda: None
        self.disconnect_callback = lambda: None
        self.fail_callback = lambda data: None
        self.dangling = b""
        self.sock = socket.create_connection((host, port))
        self.connected_reported = False
        self.closed = False

    # the seed's registration methods
    def on_connect(self, func):
        self.connect_callback = func

    def on_disconnect(self, func):
        self.disconnect_callback = func

    def on_fail(self, func):
        self.fail_callback = func

    def rpc(self, opcode, args):
        self.sock.sendall("{}{}\n".format(opcode, json.dumps(args)).encode("utf-8"))

    # the seed's Payload
    def packages(self, buf: bytes):
        while True:
            eof = buf.find(b"\n")
            if eof == -1:
                self.dangling += buf
                break
            pkg = self.dangling + buf[:eof]
            buf = buf[eof + 1 :]
            self.dangling = b""
            yield pkg

    @staticmethod
    def from_string(data: str):
        json_start = data.index("{")  # the seed raised MalformedPayload here: a frame it can't read
        opcode = data[:json_start]
        assert opcode != "", "Could not find opcode"
        return opcode, json.loads(data[json_start:].strip())

    def handle_read(self):
        buf = self.sock.recv(1024)
        if not buf:
            self.handle_close()
            return
        for pkg in self.packages(buf):
            opcode, data = self.from_string(pkg.decode("utf-8"))
            if opcode == "FAIL":
                self.fail_callback(data)
            else:
                self.handler(self, opcode, data)

    def handle_close(self):
        self.disconnect_callback()
        self.sock.close()
        self.closed = True

    def loop(self, until, timeout: float = 20.0):
        """asyncore.loop(), but returning once ``until()`` holds (or the socket closed)."""
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(self.sock, selectors.EVENT_READ)
            if not self.connected_reported:  # asyncore reported the connect from inside the loop
                self.connected_reported = True
                self.connect_callback()
            while not until() and not self.closed:
                remaining = deadline - time.monotonic()
                assert remaining > 0, "timed out in the seed client's loop"
                if selector.select(remaining):
                    self.handle_read()


# -- against the built-in demo -----------------------------------------------------------------


@pytest.fixture(scope="module")
def demo():
    """The built-in demo (no --handlers), shared by the tests that leave it running."""
    server = RunningServer(["--host", "127.0.0.1", "--port", "0", "--workers", "2"])
    try:
        yield server.wait_ready()
    finally:
        server.kill()


def test_seed_sample_client_against_the_demo(start_server):
    server = start_server()  # the built-in demo: the seed's messenger sample, server side
    printed = []
    client = SeedClient(server.host, server.port, MessageHandler())

    # sample.py's main_client(), with print replaced by printed.append
    def handle_welcome(client, data):
        printed.append("The server welcomed me: %s" % data["msg"])
        client.rpc("thanks", {"msg": "Thanks for having me simple"})

    def handle_connect():
        printed.append("Client connected")

    def handle_disconnect():
        printed.append("Client disconnected")

    def handle_fail(data):
        printed.append("RCP Failure %s -> %s" % (data["reason"], data["message"]))

    client.handler.on("welcome", handle_welcome)
    client.on_connect(handle_connect)
    client.on_disconnect(handle_disconnect)
    client.on_fail(handle_fail)
    # The seed ignored answers it had no entry for; here we watch them too.
    okays = []
    client.handler.on("OKAY", lambda c, data: okays.append(data))

    client.loop(until=lambda: okays)
    assert printed == ["Client connected", "The server welcomed me: Welcome to simplerpc"]
    assert okays == [{"Custom OKAY data": 123}]

    client.rpc("tell", {"msg": "to nobody"})  # ArgumentMissing, raised the seed's way
    client.rpc("not_an_op", {})
    client.loop(until=lambda: len(printed) == 4)
    assert printed[2:] == [
        "RCP Failure ArgumentMissing -> Expected argument 'to' in RPC: 'tell'",
        "RCP Failure UnknownOpcode -> no handler for op 'not_an_op'",
    ]
    server.stop(signal.SIGTERM)
    client.loop(until=lambda: False)  # until the server closes the connection
    assert printed[-1] == "Client disconnected"


def test_seed_client_reads_long_answers_across_1024_byte_reads(demo):
    server = demo
    client = SeedClient(server.host, server.port, MessageHandler())
    answers = []
    client.handler.on("OKAY", lambda c, data: answers.append(data))
    payloads = [{"i": i, "text": ("ü€😀 " * 400)[: 1000 + 397 * i]} for i in range(6)]
    for data in payloads:  # pipelined, as the seed allowed: no waiting between RPCs
        client.rpc("echo", data)
    client.loop(until=lambda: len(answers) == len(payloads))
    assert answers == payloads
    client.sock.close()


def test_seed_client_pipelines_and_answers_come_in_order(demo):
    server = demo
    client = SeedClient(server.host, server.port, MessageHandler())
    seen = []
    client.handler.on("OKAY", lambda c, data: seen.append(("OKAY", data)))
    client.on_fail(lambda data: seen.append(("FAIL", data["reason"])))
    client.rpc("whoami", {})
    client.rpc("echo", {"step": "login"})
    client.rpc("tell", {})
    client.rpc("echo", {"step": "join"})
    client.loop(until=lambda: len(seen) == 4)
    assert seen[0][0] == "OKAY" and isinstance(seen[0][1]["net_id"], int)
    assert seen[1:] == [("OKAY", {"step": "login"}), ("FAIL", "ArgumentMissing"), ("OKAY", {"step": "join"})]
    client.sock.close()


def test_tell_and_shout_between_seed_clients(demo):
    server = demo
    heard = {"a": [], "b": []}
    ids = {}
    clients = {}
    for name in ("a", "b"):
        handler = MessageHandler()
        handler.on("message", lambda c, data, name=name: heard[name].append(data))
        handler.on("OKAY", lambda c, data, name=name: ids.setdefault(name, data.get("net_id")))
        clients[name] = SeedClient(server.host, server.port, handler)
        clients[name].rpc("whoami", {})
        clients[name].loop(until=lambda name=name: name in ids)
    clients["a"].rpc("tell", {"to": ids["b"], "msg": "hello b"})
    clients["b"].loop(until=lambda: heard["b"])
    assert heard["b"] == [{"from": ids["a"], "msg": "hello b"}]
    clients["b"].rpc("shout", {"msg": "hello all"})
    clients["a"].loop(until=lambda: heard["a"])
    clients["b"].loop(until=lambda: len(heard["b"]) == 2)
    assert heard["a"] == [{"from": ids["b"], "msg": "hello all"}] == heard["b"][1:]
    for client in clients.values():
        client.sock.close()


# -- the seed's sample server, written against our Server -------------------------------------

SAMPLE_SERVER = textwrap.dedent(
    '''
    # sample.py's main_server() from pjsdev/simplerpc; only the imports, the port (0: any free
    # one, printed once ready) and the exit code differ.
    import sys

    from simplerpc_mp import Server

    TCP_IP = "127.0.0.1"
    TCP_PORT = 0


    def handle_thanks(connection, data):
        print("The client showed gratitude: %s" % data["msg"], flush=True)


    def handle_connect(connection):
        print("Client connected with net id: %s" % connection.net_id, flush=True)
        connection.rpc("welcome", {"msg": "Welcome to simplerpc"})


    def handle_disconnect(net_id):
        print("Disconnect: %s" % net_id, flush=True)


    def main_server():
        server = Server(TCP_IP, TCP_PORT, workers=2,
                        on_ready=lambda s: print("TCP Server listening on %s:%s" % s.address, flush=True))

        # every connection that sends this rpc, will trigger the CB
        server.handler.on("thanks", handle_thanks)
        server.on_connect(handle_connect)
        server.on_disconnect(handle_disconnect)

        return server


    if __name__ == "__main__":
        dispatcher = main_server()
        code = dispatcher.start()
        print("start() returned %s" % code, flush=True)
        sys.exit(code)
    '''
)


class ScriptOutput:
    """Lines a child process prints, read without blocking past a deadline."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.lines: list[str] = []
        self._partial = b""

    def wait_for(self, predicate, timeout: float = 30.0, what: str = "output"):
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(self.proc.stdout, selectors.EVENT_READ)
            while not predicate(self.lines):
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"no {what} after {timeout}s; output: {self.lines}"
                if selector.select(remaining):
                    chunk = self.proc.stdout.read1(65536)
                    if not chunk:
                        raise AssertionError(f"exited ({self.proc.wait()}) before {what}; output: {self.lines}")
                    *complete, self._partial = (self._partial + chunk).split(b"\n")
                    self.lines.extend(line.decode() for line in complete)
        return self.lines


def run_script(tmp_path, source: str, name: str = "sample.py") -> subprocess.Popen:
    script = tmp_path / name
    script.write_text(source)
    # The package of this checkout, not whichever one is installed (a script's sys.path starts
    # with its own folder, not with the repository).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen(
        [sys.executable, str(script)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, env=env,
    )


def kill_tree(proc: subprocess.Popen) -> None:
    kill_process_tree(proc)
    proc.stdout.close()


def test_seed_sample_server_and_client(tmp_path):
    """sample.py s and sample.py c: the seed's own sample, server written against our Server."""
    proc = run_script(tmp_path, SAMPLE_SERVER)
    try:
        out = ScriptOutput(proc)
        lines = out.wait_for(lambda ls: any(l.startswith("TCP Server listening on") for l in ls), what="listening")
        host, port = next(l for l in lines if l.startswith("TCP Server listening on")).rsplit(" ", 1)[1].split(":")

        printed = []
        client = SeedClient(host, int(port), MessageHandler())

        def handle_welcome(client, data):
            printed.append("The server welcomed me: %s" % data["msg"])
            client.rpc("thanks", {"msg": "Thanks for having me simple"})

        client.handler.on("welcome", handle_welcome)
        client.on_disconnect(lambda: printed.append("Client disconnected"))
        client.on_fail(lambda data: printed.append("RCP Failure %s -> %s" % (data["reason"], data["message"])))
        okays = []
        client.handler.on("OKAY", lambda c, data: okays.append(data))
        client.loop(until=lambda: okays)
        assert printed == ["The server welcomed me: Welcome to simplerpc"]
        assert okays == [{}]  # handle_thanks returns None and sets no okay_data
        out.wait_for(lambda ls: "The client showed gratitude: Thanks for having me simple" in ls, what="gratitude")
        net_id = next(l for l in out.lines if l.startswith("Client connected with net id:")).rsplit(" ", 1)[1]

        client.sock.close()
        out.wait_for(lambda ls: f"Disconnect: {net_id}" in ls, what="on_disconnect")

        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(30) == 0
        out.wait_for(lambda ls: "start() returned 0" in ls, what="start() returning")
    finally:
        kill_tree(proc)


# -- seed-style scripts: logging, and the main guard ---------------------------------------------

SEED_SCRIPT = textwrap.dedent(
    '''
    import sys
    {logging}
    from simplerpc_mp import Server


    def handle_echo(connection, data):
        return data


    def main_server():
        server = Server("127.0.0.1", {port}, workers=2)
        server.handler.on("echo", handle_echo)
        return server

    {start}
    '''
)
GUARDED = 'if __name__ == "__main__":\n    sys.exit(main_server().start())'
UNGUARDED = "sys.exit(main_server().start())"  # the seed's sample had the guard; a quick script may not


def _seed_script(start: str, port: int = 0, logging: str = "") -> str:
    return SEED_SCRIPT.format(port=port, logging=logging, start=start)


@pytest.mark.parametrize("own_logging", [False, True], ids=["default", "script_configured"])
def test_seed_style_script_logs_as_serve_does(tmp_path, own_logging):
    """A script that calls Server(...).start() and sets up no logging gets serve's log lines
    (the ready line with the address, the workers booting, the stop), and a script that set
    up logging itself keeps its own format. It used to print nothing at all."""
    setup = 'import logging\nlogging.basicConfig(level=logging.INFO, format="APP %(name)s: %(message)s")' if own_logging else ""
    proc = run_script(tmp_path, _seed_script(GUARDED, logging=setup))
    try:
        out = ScriptOutput(proc)
        ready = re.compile(r"simplerpc_mp\.server: listening on 127\.0\.0\.1:(\d+) \(workers: 2, pid \d+\)")
        lines = out.wait_for(lambda ls: any(ready.search(line) for line in ls), what="the ready line")
        port = int(next(ready.search(line) for line in lines if ready.search(line)).group(1))
        with Client("127.0.0.1", port) as client:
            assert client.call("echo", {"x": 1}) == {"x": 1}
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        out.wait_for(lambda ls: any("stopped (worker crashes: 0" in line for line in ls), what="the stop line")
        ours = [line for line in out.lines if "simplerpc_mp." in line]
        assert any(re.search(r"simplerpc_mp\.supervisor: worker \d+ booted", line) for line in ours), out.lines
        if own_logging:  # the script's format, and our lines once each (no handler of ours added)
            assert all(line.startswith("APP ") for line in ours), out.lines
        else:
            assert all(re.match(r"\S+ \S+ \[\d+\] (INFO|WARNING) simplerpc_mp\.", line) for line in ours), out.lines
    finally:
        kill_tree(proc)


@pytest.mark.parametrize("fixed_port", [False, True], ids=["port_0", "fixed_port"])
def test_script_without_main_guard_stops_with_one_line_saying_so(tmp_path, fixed_port):
    """Workers are spawned: each imports the script again, and a script that starts its server
    at import, without the main guard, would start one more server in every worker (a wall of
    tracebacks, "Address already in use"). It stops instead, exit 3, with one line that says to
    add the guard."""
    port = 0
    if fixed_port:
        with socket.create_server(("127.0.0.1", 0)) as probe:
            port = probe.getsockname()[1]
    proc = run_script(tmp_path, _seed_script(UNGUARDED, port=port))
    try:
        code = proc.wait(60)
        lines = [line.decode() for line in proc.stdout.read().splitlines()]
        assert code == 3, lines
        guard = [line for line in lines if 'if __name__ == "__main__":' in line]
        assert len(guard) == 1, lines
        assert guard[0].startswith(f"simplerpc-mp: error: {tmp_path / 'sample.py'} starts the server when it is imported"), guard
        text = "\n".join(lines)
        assert "Traceback" not in text and "Address already in use" not in text, text
        assert len(lines) <= 4, text  # the line, and at most a few log lines
    finally:
        kill_tree(proc)
