"""End-to-end tests of the core server: real ``simplerpc-mp serve`` processes on 127.0.0.1 with real
worker processes, driven over plain sockets so that what is checked is the bytes on the wire.

Covers issue 2: the seed's messenger flow against the built-in demo, FIFO answers under parallel
workers with pipelining, execution order (serial vs concurrent), pushes, sessions across workers,
every FAIL reason, framing across TCP reads, on_connect/on_disconnect order, and the CLI serving
``workers.cpu``.
"""

from __future__ import annotations

import json
import selectors
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

from simplerpc_mp import Client, RemoteError
from tests.conftest import REPO, RunningServer, wait_until

ANSWER_TIMEOUT_S = 30.0


# -- a client made of plain sockets -----------------------------------------------------------


def parse_line(line: bytes) -> tuple[str, dict]:
    """Our own reading of one frame (not the package's): OPNAME before the first '{', then JSON."""
    text = line.decode("utf-8")
    brace = text.find("{")
    assert brace > 0, f"the server sent a line that is not OPNAME{{object}}: {line[:200]!r}"
    data = json.loads(text[brace:])
    assert isinstance(data, dict), f"the server sent a line that is not OPNAME{{object}}: {line[:200]!r}"
    return text[:brace], data


class RawConn:
    """A blocking socket that sends raw bytes and collects answers and pushes separately."""

    def __init__(self, server: RunningServer):
        self.sock = socket.create_connection((server.host, server.port), timeout=ANSWER_TIMEOUT_S)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""
        self.answers: list[tuple[str, dict]] = []
        self.pushes: list[tuple[str, dict]] = []
        self.raw_lines: list[bytes] = []
        self.eof = False

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _read_some(self, timeout: float) -> bool:
        """One recv, waiting up to ``timeout``; False if nothing came."""
        self.sock.settimeout(timeout)
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout:
            return False
        if not chunk:
            self.eof = True
            return False
        self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            self.raw_lines.append(line)
            op, data = parse_line(line)
            (self.answers if op in ("OKAY", "FAIL") else self.pushes).append((op, data))
        return True

    def wait(self, predicate, timeout: float = ANSWER_TIMEOUT_S, what: str = "frames"):
        deadline = time.monotonic() + timeout
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.eof:
                raise AssertionError(f"no {what} after {timeout}s (eof={self.eof}); answers so far: {self.answers[-5:]}")
            self._read_some(remaining)
        return True

    def answers_n(self, count: int, timeout: float = ANSWER_TIMEOUT_S) -> list[tuple[str, dict]]:
        self.wait(lambda: len(self.answers) >= count, timeout, f"{count} answers")
        return self.answers[:count]

    def nothing_within(self, seconds: float) -> bool:
        """True if no byte arrives within ``seconds`` (used to show a partial frame is not answered)."""
        deadline = time.monotonic() + seconds
        got = False
        while (remaining := deadline - time.monotonic()) > 0:
            if self._read_some(remaining):
                got = True
        return not got

    def call(self, op: str, data: dict) -> tuple[str, dict]:
        index = len(self.answers)
        self.send(f"{op}{json.dumps(data)}\n".encode())
        self.answers_n(index + 1)
        return self.answers[index]

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "RawConn":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def frame(op: str, data: dict) -> bytes:
    return f"{op}{json.dumps(data, separators=(',', ':'))}\n".encode()


def worker_pids(server: RunningServer) -> set[int]:
    return {p.pid for p in server.workers()}


@pytest.fixture(scope="module")
def disconnect_log(tmp_path_factory):
    path = tmp_path_factory.mktemp("core") / "disconnects.log"
    path.touch()
    return path


def serve(*args: str, env: dict | None = None):
    """A server for a whole module: started, yielded once both workers booted, killed at the end."""
    server = RunningServer(["--host", "127.0.0.1", "--port", "0", "--workers", "2", *args], env=env)
    try:
        server.wait_ready()
        # Both workers up, so that tests about two workers don't race the second one's boot.
        server.wait_log(r"worker \d+ booted", count=2)
        wait_until(lambda: len(server.workers()) == 2, what="two workers")
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="module")
def core(disconnect_log):
    """tests/handlers/core_ops.py (basic.py's ops and more), shared by the tests of this module
    that need neither its log to themselves nor a server without other connections."""
    yield from serve("--handlers", "tests.handlers.core_ops", env={"SIMPLERPC_TEST_DISCONNECT_LOG": str(disconnect_log)})


@pytest.fixture(scope="module")
def demo():
    """The built-in demo, served when there is no --handlers."""
    yield from serve()


# -- the seed's messenger flow against the built-in demo ----------------------------------------


def test_demo_messenger_flow_without_handlers_option(demo):
    server = demo  # no --handlers: the built-in demo (echo + the seed's messenger sample)
    assert "simplerpc_mp.demo" in server.banner
    with RawConn(server) as conn:
        # The welcome push comes on connect, before we send anything.
        conn.wait(lambda: conn.pushes, what="welcome push")
        assert conn.pushes[0] == ("welcome", {"msg": "Welcome to simplerpc"})
        # The seed client sent json.dumps() output (spaces after separators): accepted as is.
        conn.send(b'thanks{"msg": "Thanks for having me simple"}\n')
        assert conn.answers_n(1) == [("OKAY", {"Custom OKAY data": 123})]
        assert conn.raw_lines[-1] == b'OKAY{"Custom OKAY data":123}'
        assert conn.call("echo", {"x": [1, "two", None]}) == ("OKAY", {"x": [1, "two", None]})
        assert conn.call("nope", {})[0] == "FAIL"
    server.wait_log(r"showed gratitude: Thanks for having me simple")


def test_demo_sample_client_flow(demo):
    """The seed's sample client: on welcome it sends thanks; FAILs go to its fail callback."""
    server = demo
    events = []
    with Client(server.host, server.port) as client:
        def handle_welcome(c, data):
            events.append(("welcome", data["msg"]))
            c.rpc("thanks", {"msg": "Thanks for having me simple"})

        client.handler.on("welcome", handle_welcome)
        client.handler.on("OKAY", lambda c, data: events.append(("OKAY", data)))
        client.on_fail(lambda data: events.append(("FAIL", data["reason"])))
        wait_until(lambda: client.poll(0.05) or ("OKAY", {"Custom OKAY data": 123}) in events, what="thanks answered")
        client.rpc("tell", {"msg": "no 'to'"})  # the demo raises ArgumentMissing
        wait_until(lambda: client.poll(0.05) or len(events) == 3, what="FAIL")
    assert events == [
        ("welcome", "Welcome to simplerpc"),
        ("OKAY", {"Custom OKAY data": 123}),
        ("FAIL", "ArgumentMissing"),
    ]


def test_demo_tell_and_shout_between_clients(demo):
    server = demo
    with Client(server.host, server.port) as alice, Client(server.host, server.port) as bob:
        heard = {"alice": [], "bob": []}
        alice.on("message", heard["alice"].append)
        bob.on("message", heard["bob"].append)
        bob_id = bob.call("whoami")["net_id"]
        alice_id = alice.call("whoami")["net_id"]
        assert alice.call("tell", {"to": bob_id, "msg": "psst"}) == {}
        wait_until(lambda: bob.poll(0.05) or heard["bob"], what="tell")
        assert heard["bob"] == [{"from": alice_id, "msg": "psst"}]
        bob.call("shout", {"msg": "hey all"})
        wait_until(lambda: alice.poll(0.05) or heard["alice"], what="shout to alice")
        wait_until(lambda: bob.poll(0.05) or len(heard["bob"]) == 2, what="shout to bob")
        assert heard["alice"] == [{"from": bob_id, "msg": "hey all"}]
        assert heard["bob"][1] == {"from": bob_id, "msg": "hey all"}


# -- FIFO order under parallel workers with pipelining -------------------------------------------

OPS_CYCLE = ("echo", "cecho", "cslow", "mark", "cecho", "echo", "cslow", "cmark")


def _request(conn_index: int, i: int) -> tuple[str, dict]:
    op = OPS_CYCLE[(i * 7 + conn_index) % len(OPS_CYCLE)]
    data = {"i": i, "c": conn_index}
    if op in ("cslow", "cmark"):
        data["s"] = 0.001
    return op, data


def test_fifo_answers_many_pipelined_connections(core):
    """16 connections each pipeline 300 RPCs (serial and concurrent ops mixed) without waiting:
    every answer comes back in request order, matched by the sequence number it carries."""
    n_conns, per_conn = 16, 300
    socks, outgoing, incoming, lines = [], [], [], []
    requests = []
    for c in range(n_conns):
        sock = socket.create_connection((core.host, core.port))
        sock.setblocking(False)
        socks.append(sock)
        reqs = [_request(c, i) for i in range(per_conn)]
        requests.append(reqs)
        outgoing.append(bytearray(b"".join(frame(op, data) for op, data in reqs)))
        incoming.append(b"")
        lines.append([])
    deadline = time.monotonic() + 60
    with selectors.DefaultSelector() as selector:
        for c, sock in enumerate(socks):
            selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, c)
        open_conns = n_conns
        while open_conns:
            assert time.monotonic() < deadline, f"answers missing: {[len(x) for x in lines]}"
            for key, mask in selector.select(1.0):
                c, sock = key.data, key.fileobj
                if mask & selectors.EVENT_WRITE and outgoing[c]:
                    sent = sock.send(outgoing[c])
                    del outgoing[c][:sent]
                    if not outgoing[c]:
                        selector.modify(sock, selectors.EVENT_READ, c)
                if mask & selectors.EVENT_READ:
                    chunk = sock.recv(262144)
                    assert chunk, f"connection {c} closed early"
                    *complete, incoming[c] = (incoming[c] + chunk).split(b"\n")
                    lines[c].extend(parse_line(line) for line in complete)
                    answered = sum(1 for op, _ in lines[c] if op in ("OKAY", "FAIL"))
                    if answered == per_conn:
                        selector.unregister(sock)
                        open_conns -= 1
    concurrent_pids_per_conn = []
    for c in range(n_conns):
        answers = [(op, data) for op, data in lines[c] if op in ("OKAY", "FAIL")]
        pushes = [op for op, _ in lines[c] if op not in ("OKAY", "FAIL")]
        assert pushes == ["welcome"]
        assert len(answers) == per_conn
        marks_before = 0
        pids = set()
        for i, ((op, data), (req_op, req)) in enumerate(zip(answers, requests[c])):
            assert op == "OKAY", (c, i, req_op, data)
            assert data["i"] == i, f"connection {c}: answer {i} carries i={data['i']} (request {req_op})"
            if req_op in ("echo", "cecho"):
                assert data == req
            elif req_op in ("mark", "cmark"):
                assert data["serial_count"] == marks_before, (c, i, req_op, data)
                marks_before += req_op == "mark"
            if req_op in ("cslow", "cmark"):
                pids.add(data["pid"])
        concurrent_pids_per_conn.append(pids)
        socks[c].close()
    workers = worker_pids(core)
    assert set().union(*concurrent_pids_per_conn) == workers
    # Concurrent ops of one pipelining connection are spread over the workers.
    assert sum(1 for pids in concurrent_pids_per_conn if len(pids) == 2) >= n_conns // 2, concurrent_pids_per_conn


def test_concurrent_ops_of_one_connection_run_in_parallel(core):
    """One connection pipelines concurrent ops: they run on both workers at the same time."""
    with RawConn(core) as conn:
        count = 12
        conn.send(b"".join(frame("cmark", {"i": i, "s": 0.1}) for i in range(count)))
        answers = conn.answers_n(count)
    results = [data for _, data in answers]
    assert [r["i"] for r in results] == list(range(count))
    assert {r["pid"] for r in results} == worker_pids(core)
    # Two RPCs of this one connection overlapped in time, in two different processes.
    overlapping = [
        (a["i"], b["i"])
        for a in results
        for b in results
        if a["pid"] != b["pid"] and a["start"] < b["end"] and b["start"] < a["end"]
    ]
    assert overlapping
    # And so the whole took clearly less than running them one after another.
    span = max(r["end"] for r in results) - min(r["start"] for r in results)
    assert span < 0.8 * sum(r["end"] - r["start"] for r in results)


def test_serial_ops_run_one_at_a_time_in_order_and_hold_back_concurrent_ones(core):
    """A pattern of concurrent and serial ops: each serial op starts after every earlier RPC of the
    connection ended and ends before any later one starts; concurrent ops between two serial ones
    may overlap each other. The session count shows every serial op saw the previous ones."""
    pattern = (["cmark"] * 4 + ["mark"] * 2) * 4 + ["cmark"] * 3
    with RawConn(core) as conn:
        conn.send(b"".join(frame(op, {"i": i, "s": 0.04}) for i, op in enumerate(pattern)))
        results = [data for _, data in conn.answers_n(len(pattern))]
    assert [r["i"] for r in results] == list(range(len(pattern)))
    serial_seen = 0
    for i, (op, r) in enumerate(zip(pattern, results)):
        assert r["serial_count"] == serial_seen, (i, op, r)
        if op == "mark":
            serial_seen += 1
            for j, other in enumerate(results):
                if j < i:
                    assert other["end"] <= r["start"], f"RPC {j} still ran when serial RPC {i} started"
                elif j > i:
                    assert other["start"] >= r["end"], f"RPC {j} started before serial RPC {i} ended"
    # Concurrent ops of a group did run in parallel (else this test proves nothing about holding back).
    groups = [results[start : start + 4] for start in range(0, 24, 6)]
    assert any(
        a["start"] < b["end"] and b["start"] < a["end"] for group in groups for a in group for b in group if a is not b
    )


def call_with_workers_busy_or_not(client: Client, busy: Client, op: str, data: dict, turn: int) -> dict:
    """``client.call(op, data)``; on odd turns another connection keeps one worker busy meanwhile,
    so that, whatever worker an idle pool picks first, the call lands on different workers."""
    if turn % 2:
        busy.rpc("slow", {"s": 0.05})
    answer = client.call(op, data)
    while busy.pending():
        busy.poll(ANSWER_TIMEOUT_S)
    return answer


def test_serial_ops_are_spread_over_workers_yet_keep_order(core):
    """Serial ops of one connection run one at a time, but not necessarily on one worker: the
    session count each one saw proves they still ran in order and saw each other's changes."""
    with Client(core.host, core.port) as client, Client(core.host, core.port) as busy:
        pids = []
        for i in range(20):
            data = call_with_workers_busy_or_not(client, busy, "mark", {"i": i}, i)
            assert (data["i"], data["serial_count"]) == (i, i)
            pids.append(data["pid"])
            if len(set(pids)) == 2 and i >= 5:
                break
        assert set(pids) == worker_pids(core)


# -- pushes ------------------------------------------------------------------------------------


def test_push_to_self(core):
    with Client(core.host, core.port) as client:
        notes = []
        client.on("note", notes.append)
        assert client.call("push_self", {"n": 1}) == {}
        wait_until(lambda: client.poll(0.05) or notes, what="push to self")
        assert notes == [{"to": "self", "n": 1}]


def test_push_to_other_by_net_id(core):
    with Client(core.host, core.port) as a, Client(core.host, core.port) as b:
        got_a, got_b = [], []
        a.on("note", got_a.append)
        b.on("note", got_b.append)
        a_id, b_id = a.call("whoami")["net_id"], b.call("whoami")["net_id"]
        assert a_id != b_id
        assert a.call("push_to", {"to": b_id, "msg": "hi b"}) == {}
        wait_until(lambda: b.poll(0.05) or got_b, what="push to b")
        assert got_b == [{"from": a_id, "msg": "hi b"}]
        # b answers back; a gets exactly its own note, never the one it sent to b.
        b.call("push_to", {"to": a_id, "msg": "hi a"})
        wait_until(lambda: a.poll(0.05) or got_a, what="push to a")
        assert got_a == [{"from": b_id, "msg": "hi a"}]


def test_push_to_all(core):
    clients = [Client(core.host, core.port) for _ in range(3)]
    try:
        got = [[] for _ in clients]
        for client, box in zip(clients, got):
            client.on("note", lambda data, box=box: box.append(data) if data.get("msg") == "to all" else None)
        sender_id = clients[0].call("whoami")["net_id"]
        for client in clients[1:]:
            client.call("echo", {})  # each is connected and registered before the broadcast
        assert clients[0].call("push_all", {"msg": "to all"}) == {}
        for client, box in zip(clients, got):
            wait_until(lambda: client.poll(0.05) or box, what="broadcast")
            assert box == [{"from": sender_id, "msg": "to all"}]
    finally:
        for client in clients:
            client.close()


def test_push_to_gone_net_id_is_dropped_not_an_error(core, disconnect_log):
    with Client(core.host, core.port) as a:
        notes = []
        a.on("note", notes.append)
        gone = Client(core.host, core.port)
        gone_id = gone.call("whoami")["net_id"]
        gone.close()
        # The server has noticed: basic.py's on_disconnect wrote the net_id down.
        wait_until(lambda: str(gone_id) in disconnect_log.read_text().split(), what="on_disconnect of the gone client")
        assert a.call("push_to", {"to": gone_id, "msg": "anyone?"}) == {}
        assert a.call("push_to", {"to": 10**9, "msg": "never existed"}) == {}
        assert a.call("echo", {"still": "fine"}) == {"still": "fine"}
        assert notes == []


# -- sessions ----------------------------------------------------------------------------------


def test_session_follows_the_connection_across_workers(core):
    """A serial op's change to the session is seen by later RPCs that run in the other worker."""
    with Client(core.host, core.port) as client, Client(core.host, core.port) as busy:
        turn = 0
        for round_ in range(3):
            set_pid = call_with_workers_busy_or_not(client, busy, "session_set", {"k": round_, f"key{round_}": "v"}, turn)["pid"]
            for _ in range(20):
                turn += 1
                got = call_with_workers_busy_or_not(client, busy, "session_get", {}, turn)
                assert got["session"]["k"] == round_
                assert all(got["session"][f"key{r}"] == "v" for r in range(round_ + 1))
                if got["pid"] != set_pid:
                    break
            else:
                raise AssertionError("session_get never ran in another worker than session_set")
        # Sessions are per connection.
        assert "k" not in busy.call("session_get")["session"]


def test_concurrent_ops_see_the_session_read_only(core):
    with Client(core.host, core.port) as client:
        client.call("session_set", {"color": "blue"})
        seen = client.call("csession_get")["session"]
        assert seen["color"] == "blue"
        with pytest.raises(RemoteError) as info:
            client.call("csession_set")
        assert info.value.reason == "SessionReadOnly"
        assert "read-only" in info.value.message
        # The failed write changed nothing, and the connection goes on.
        session = client.call("session_get")["session"]
        assert session["color"] == "blue" and "x" not in session


# -- FAIL reasons ------------------------------------------------------------------------------


def test_custom_exception_gives_its_class_name_and_message(core):
    with RawConn(core) as conn:
        assert conn.call("custom_fail", {"msg": "not today"}) == ("FAIL", {"reason": "Custom", "message": "not today"})
        assert conn.call("echo", {"after": 1}) == ("OKAY", {"after": 1})


def test_other_exception_is_unknown_with_traceback_in_log(basic_server):
    with RawConn(basic_server) as conn:
        unknown = ("FAIL", {"reason": "Unknown", "message": "Unknown Server Error"})
        assert conn.call("boom", {}) == unknown
        assert conn.call("echo", {"after": "boom"}) == ("OKAY", {"after": "boom"})
        # Data JSON cannot encode, in the answer or in a push, is the handler's bug too.
        assert conn.call("bad_result", {}) == unknown
        assert conn.call("bad_push", {}) == unknown
        assert conn.call("echo", {"after": "bad"}) == ("OKAY", {"after": "bad"})
        assert [op for op, _ in conn.pushes] == ["welcome"]  # the bad push went nowhere
    log = basic_server.wait_log(r"ValueError: a handler bug")
    assert "Traceback (most recent call last)" in log
    assert "'boom'" in log  # the log names the op
    # Details of the error never reach the client.
    assert all(b"a handler bug" not in line for line in conn.raw_lines)


def test_return_values_and_okay_data(core):
    with Client(core.host, core.port) as client:
        assert client.call("scalar") == {"result": 42}
        assert client.call("scalar", {"value": [1, "x"]}) == {"result": [1, "x"]}
        assert client.call("scalar", {"value": "text"}) == {"result": "text"}
        assert client.call("scalar", {"value": None}) == {}  # None: conn.okay_data, or {}
        assert client.call("okay_data") == {"Custom OKAY data": 123}
        # okay_data belongs to one RPC: the next op that returns None answers {}.
        assert client.call("push_self", {"n": 2}) == {}


def test_dict_subclass_returned_is_the_payload(core):
    with RawConn(core) as conn:
        assert conn.call("ordered", {}) == ("OKAY", {"b": 1, "a": 2})


def test_okay_data_that_is_not_an_object_still_gives_a_valid_frame(core):
    with RawConn(core) as conn:
        conn.send(frame("okay_data_scalar", {"value": "done"}) + frame("okay_data_scalar", {"value": [1]}))
        conn.send(frame("echo", {"after": 1}))
        answers = conn.answers_n(3)  # RawConn fails on any frame that is not OPNAME{object}
    assert answers == [("OKAY", {"result": "done"}), ("OKAY", {"result": [1]}), ("OKAY", {"after": 1})]


def test_push_data_that_is_not_an_object_never_reaches_the_wire(core):
    with RawConn(core) as conn:
        conn.send(frame("push_scalar", {"value": "text"}) + frame("echo", {"after": 1}))
        answers = conn.answers_n(2)  # RawConn fails on any frame that is not OPNAME{object}
    assert answers == [("FAIL", {"reason": "Unknown", "message": "Unknown Server Error"}), ("OKAY", {"after": 1})]
    assert [op for op, _ in conn.pushes] == ["welcome"]


MALFORMED = [
    pytest.param(b"no brace at all", id="no-brace"),
    pytest.param(b"op[1]", id="json-array-no-brace"),
    pytest.param(b'{"a": 1}', id="empty-opname"),
    pytest.param(b'op{"a": 1', id="truncated-json"),
    pytest.param(b"op{bad json}", id="bad-json"),
    pytest.param(b'op{"a":1}junk', id="object-then-junk"),
    pytest.param(b'op{"a":1}[2]', id="object-then-array"),
    pytest.param(b'op{"a": "\xff"}', id="bad-utf8-in-json"),
    pytest.param(b'\xc3(op{"a": 1}', id="bad-utf8-in-opname"),
    pytest.param(b'op{"a": "\xed\xa0\x80"}', id="utf8-surrogate"),
    pytest.param(b'op{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", id="nested-too-deep"),
    pytest.param(b'op{"a": 1' + b"0" * 5000 + b"}", id="int-too-long"),
]


@pytest.mark.parametrize("line", MALFORMED)
def test_malformed_frame_fails_and_connection_goes_on(core, line):
    with RawConn(core) as conn:
        conn.send(frame("echo", {"before": 1}) + line + b"\n" + frame("echo", {"after": 1}))
        answers = conn.answers_n(3)
    assert answers[0] == ("OKAY", {"before": 1})
    assert answers[1][0] == "FAIL"
    assert answers[1][1]["reason"] == "MalformedPayload"
    assert isinstance(answers[1][1]["message"], str) and answers[1][1]["message"]
    assert answers[2] == ("OKAY", {"after": 1})


def test_every_fail_reason_in_one_pipelined_stream(core):
    """All failures in one send, between good frames: each gets its own answer, in order."""
    stream = [
        (b'echo{"i":0}', ("OKAY", "")),
        (b"garbage", ("FAIL", "MalformedPayload")),
        (b'{"i":2}', ("FAIL", "MalformedPayload")),
        (b'nope{"i":3}', ("FAIL", "UnknownOpcode")),
        (b'custom_fail{"msg":"m"}', ("FAIL", "Custom")),
        (b"boom{}", ("FAIL", "Unknown")),
        (b"csession_set{}", ("FAIL", "SessionReadOnly")),
        (b'cecho{"i":7}', ("OKAY", "")),
        (b'op{"a":1}junk', ("FAIL", "MalformedPayload")),
        (b'echo{"i":9}\r', ("OKAY", "")),  # CRLF: the seed stripped white space around the JSON
    ]
    with RawConn(core) as conn:
        conn.send(b"".join(line + b"\n" for line, _ in stream))
        answers = conn.answers_n(len(stream))
    assert [(op, data.get("reason", "")) for op, data in answers] == [want for _, want in stream]
    assert answers[0][1] == {"i": 0} and answers[7][1] == {"i": 7} and answers[9][1] == {"i": 9}


def test_unknown_opcode(core):
    with RawConn(core) as conn:
        op, data = conn.call("no_such_op", {"x": 1})
        assert op == "FAIL" and data["reason"] == "UnknownOpcode"
        assert "no_such_op" in data["message"]
        assert conn.call("echo", {"ok": True}) == ("OKAY", {"ok": True})


def test_on_any_receives_unknown_ops(start_server):
    server = start_server("--handlers", "tests.handlers.core_any")
    with RawConn(server) as conn:
        net_id = None
        op, data = conn.call("whatever", {"x": 1})
        assert op == "OKAY"
        net_id = data["net_id"]
        assert data == {"op": "whatever", "data": {"x": 1}, "net_id": net_id}
        assert conn.call("echo", {"y": 2}) == ("OKAY", {"echo": {"y": 2}})  # own handler wins
        assert conn.call("any_okay_data", {}) == ("OKAY", {"via": "okay_data", "op": "any_okay_data"})
        assert conn.call("any_fail", {}) == ("FAIL", {"reason": "AnyFailed", "message": "generic handler refused any_fail"})
        # Still a MalformedPayload when there is no op at all.
        assert conn.call("", {})[1]["reason"] == "MalformedPayload"


# -- framing across TCP reads ------------------------------------------------------------------


def test_frame_split_into_one_byte_sends(core):
    payload = {"text": "héllo wörld € 😀", "n": 12345, "nested": {"a": [1, 2, 3]}}
    data = frame("echo", payload) + frame("cecho", {"second": True})
    with RawConn(core) as conn:
        conn.wait(lambda: conn.pushes, what="welcome")
        half = data.index(b"\n") // 2
        for i in range(half):
            conn.send(data[i : i + 1])
        # Half a frame is not an RPC: nothing is answered yet.
        assert conn.nothing_within(0.2)
        for i in range(half, len(data)):
            conn.send(data[i : i + 1])
        answers = conn.answers_n(2)
    assert answers == [("OKAY", payload), ("OKAY", {"second": True})]


def test_many_frames_in_one_send(core):
    count = 1000
    with RawConn(core) as conn:
        conn.send(b"".join(frame("echo" if i % 3 else "cecho", {"i": i}) for i in range(count)))
        answers = conn.answers_n(count)
    assert answers == [("OKAY", {"i": i}) for i in range(count)]


def test_frames_cut_at_odd_places(core):
    """Sends that end mid-frame, mid-UTF-8 character and right after a newline."""
    stream = b"".join(frame("echo", {"i": i, "s": "ü" * (i % 5)}) for i in range(60))
    cuts = sorted({7, 8, 9, 100, 101, 333, 500, 501, 502, len(stream) - 1})
    with RawConn(core) as conn:
        start = 0
        for cut in cuts + [len(stream)]:
            conn.send(stream[start:cut])
            start = cut
        answers = conn.answers_n(60)
    assert answers == [("OKAY", {"i": i, "s": "ü" * (i % 5)}) for i in range(60)]


# -- on_connect and on_disconnect --------------------------------------------------------------


def test_on_connect_completes_before_the_first_rpc(start_server):
    """on_connect sleeps, then sets a session key: RPCs sent at once after connecting, serial and
    concurrent, all see it, and the welcome push it sends comes before their answers."""
    server = start_server("--handlers", "tests.handlers.core_slow_connect")
    wait_until(lambda: len(server.workers()) == 2, what="two workers")
    with RawConn(server) as first, RawConn(server) as second:
        for conn in (first, second):
            conn.send(frame("cseen_connect", {}) + frame("seen_connect", {}) + frame("cseen_connect", {}))
        for conn in (first, second):
            answers = conn.answers_n(3)
            assert all(op == "OKAY" and data["hello"] for op, data in answers), answers
            assert conn.raw_lines[0].startswith(b"welcome{")


def test_on_disconnect_runs_after_the_last_rpc(core, disconnect_log):
    """The client sends two slow RPCs and goes away at once: both run, then on_disconnect."""
    with RawConn(core) as conn:
        net_id = conn.call("whoami", {})[1]["net_id"]
        conn.send(frame("slow_log", {"i": 1, "s": 0.3}) + frame("slow_log", {"i": 2, "s": 0.05}))
        conn.sock.shutdown(socket.SHUT_WR)
    wait_until(lambda: str(net_id) in disconnect_log.read_text().split("\n"), what="on_disconnect")
    ours = (str(net_id), f"rpc {net_id} 1", f"rpc {net_id} 2")
    lines = [line for line in disconnect_log.read_text().splitlines() if line in ours]
    assert lines == [f"rpc {net_id} 1", f"rpc {net_id} 2", str(net_id)]


def test_on_disconnect_runs_without_other_activity(start_server, tmp_path):
    """A client half-closes while its RPC runs: the server answers, closes, and runs on_disconnect
    even when nothing else happens on the server afterwards."""
    log = tmp_path / "disconnects.log"
    server = start_server("--handlers", "tests.handlers.basic", env={"SIMPLERPC_TEST_DISCONNECT_LOG": str(log)})
    server.wait_log(r"worker \d+ booted", count=2)  # a late boot message would wake the loop too
    with RawConn(server) as conn:
        net_id = conn.call("whoami", {})[1]["net_id"]
        # Longer than basic.py's shortest op timeout (0.5 s), whose deadline timer would wake the loop.
        conn.send(frame("slow", {"s": 0.7, "i": "last"}))
        conn.sock.shutdown(socket.SHUT_WR)
        conn.wait(lambda: conn.eof, what="the server closing after the last answer")
        assert conn.answers[-1][1]["i"] == "last"
    wait_until(lambda: log.exists() and str(net_id) in log.read_text().split(), timeout=3, what="on_disconnect")


# -- the CLI serving workers.cpu ---------------------------------------------------------------


def test_cli_serves_workers_cpu_from_repository_root(start_server):
    from workers.cpu import count_primes

    server = start_server("--handlers", "workers.cpu")
    with Client(server.host, server.port) as client:
        for n in (0, 2, 3, 10, 1000, 10000):
            assert client.call("primes", {"n": n}) == {"n": n, "count": count_primes(n)}
        assert count_primes(10000) == 1229
        with pytest.raises(RemoteError) as info:
            client.call("primes", {"n": -1})
        assert info.value.reason == "ArgumentValueError"


def test_console_script_serve_and_call(tmp_path):
    """The installed ``simplerpc-mp`` command, run from the repository root: serve workers.cpu, then
    ``simplerpc-mp call`` prints the answer."""
    exe = shutil.which("simplerpc-mp")
    if exe is None:
        pytest.skip("the simplerpc-mp console script is not installed (pip install -e .)")
    from workers.cpu import count_primes

    server = _ConsoleScriptServer(exe, ["--port", "0", "--workers", "2", "--handlers", "workers.cpu"])
    try:
        server.wait_ready()
        out = subprocess.run(
            [exe, "call", f"{server.host}:{server.port}", "primes", '{"n": 5000}'],
            cwd=tmp_path, capture_output=True, text=True, timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == {"n": 5000, "count": count_primes(5000)}
        assert server.stop() == 0
    finally:
        server.kill()


class _ConsoleScriptServer(RunningServer):
    """RunningServer, but started as the ``simplerpc-mp`` console script instead of ``python -m``."""

    def __init__(self, exe: str, args: list[str]):  # noqa: super().__init__ would start `python -m`
        self.log_file = tempfile.NamedTemporaryFile("w+", prefix="simplerpc-test-", suffix=".log", delete=False)
        self.args = args
        self.proc = subprocess.Popen(
            [exe, "serve", *args], cwd=REPO, stdout=subprocess.PIPE, stderr=self.log_file, stdin=subprocess.DEVNULL
        )
        self.pid = self.proc.pid
        self.host, self.port, self.banner = "", 0, ""
