"""Rooms: join, leave and push to a room, routed by the acceptor (issue 14).

Real servers with two workers, started in the seed's ``Server(...)`` style from a script that
also prints the acceptor's room counts (``acceptor.rooms.stats()``) on stdout whenever they
change, so the tests can wait for membership to settle. Tests wait on answers, pushes, log lines
and those counts, never on a sleep.
"""

from __future__ import annotations

import json
import os
import re
import resource
import selectors
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from simplerpc_mp import Client, RemoteError
from simplerpc_mp.handlers import Conn
from simplerpc_mp.rooms import ALREADY, FULL, JOINED, Rooms

from .conftest import REPO, START_TIMEOUT_S, kill_process_tree, wait_until

SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {repo!r})
    from simplerpc_mp import Server
    from tests.handlers.rooms_ops import handlers


    def seed_join(conn, data):  # registered the seed's way, on server.handler
        conn.join(data["room"])
        return {{"rooms": sorted(conn.rooms)}}


    last = None
    ticks = [0]


    def ready(server):
        print("listening on %s:%s" % server.address, flush=True)

        def tick():
            global last
            rooms = server.acceptor.rooms
            stats = rooms.stats()
            stats["connections"] = len(server.acceptor.conns)
            stats["conn_entries"] = len(rooms.conn_rooms)
            stats["cached"] = len(rooms._frozen)
            stats["output_bytes"] = server.acceptor.output_bytes
            if stats != last:
                last = dict(stats)
                stats["tick"] = ticks[0]
                print(json.dumps(stats), flush=True)
            elif ticks[0] % 5 == 0:  # now and then, so a reader can tell "no change" from "not yet"
                print(json.dumps(dict(stats, tick=ticks[0])), flush=True)
            ticks[0] += 1
            server.timers.call_later(0.02, tick)

        tick()


    def main():
        server = Server("127.0.0.1", 0, handlers, on_ready=ready, **json.loads(sys.argv[1]))
        server.handler.on("seed_join", seed_join)
        return server.start()


    if __name__ == "__main__":
        sys.exit(main())
    """
)


class RoomsServer:
    """The script above as a child process: its address, its log, and its room counts."""

    def __init__(self, tmp_path, env: dict | None = None, **settings):
        script = tmp_path / "rooms_server.py"
        script.write_text(SCRIPT.format(repo=str(REPO)))
        settings.setdefault("workers", 2)
        settings.setdefault("spare_workers", 0)
        self.log_path = tmp_path / "server.log"
        self.proc = subprocess.Popen(
            [sys.executable, str(script), json.dumps(settings)], cwd=tmp_path, stdout=subprocess.PIPE,
            stderr=open(self.log_path, "w"), stdin=subprocess.DEVNULL, env=dict(os.environ, **(env or {})),
        )
        self.buffer = b""
        self.last: dict = {}
        line = self._line(START_TIMEOUT_S)
        match = re.search(r"listening on (\S+):(\d+)", line)
        assert match, (line, self.log())
        self.host, self.port = match.group(1), int(match.group(2))

    def _line(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(self.proc.stdout, selectors.EVENT_READ)
            while b"\n" not in self.buffer:
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"no line from the server in {timeout}s; log:\n{self.log()}"
                if selector.select(remaining):
                    chunk = os.read(self.proc.stdout.fileno(), 65536)
                    assert chunk, f"server exited with {self.proc.wait(10)}; log:\n{self.log()}"
                    self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode()

    def stats(self) -> dict:
        """The latest room counts the server printed (reads what has arrived, without waiting)."""
        os.set_blocking(self.proc.stdout.fileno(), False)
        try:
            while True:
                chunk = os.read(self.proc.stdout.fileno(), 1 << 20)
                if not chunk:
                    break
                self.buffer += chunk
        except BlockingIOError:
            pass
        finally:
            os.set_blocking(self.proc.stdout.fileno(), True)
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            if line.startswith(b"{"):
                self.last = json.loads(line)
        return self.last

    def wait_stats(self, timeout: float = 20.0, **expected) -> dict:
        def settled():
            stats = self.stats()
            return stats if all(stats.get(key) == value for key, value in expected.items()) else None

        try:
            return wait_until(settled, timeout, what=f"room counts {expected}")
        except AssertionError:
            raise AssertionError(f"room counts never became {expected}; last: {self.last}") from None

    def client(self) -> Client:
        return Client(self.host, self.port)

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_log(self, pattern: str, timeout: float = 20.0) -> None:
        wait_until(lambda: re.search(pattern, self.log()), timeout, what=f"log line {pattern!r}")

    def kill(self) -> None:
        kill_process_tree(self.proc)
        self.proc.stdout.close()


@pytest.fixture
def rooms_server(tmp_path):
    started = []

    def start(env: dict | None = None, **settings) -> RoomsServer:
        server = RoomsServer(tmp_path, env, **settings)
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()


class Member:
    """A client that records the ``message`` pushes it gets."""

    def __init__(self, server: RoomsServer):
        self.client = server.client()
        self.messages: list[dict] = []
        self.client.on("message", self.messages.append)
        self.net_id = self.client.call("whoami")["net_id"]

    def call(self, op: str, data: dict | None = None) -> dict:
        return self.client.call(op, data)

    def wait_messages(self, count: int) -> "Member":
        deadline = time.monotonic() + 20
        while len(self.messages) < count:
            assert time.monotonic() < deadline, f"net_id {self.net_id} got {self.messages}, expected {count}"
            self.client.poll(0.05)
        return self

    def close(self) -> None:
        self.client.close()


def _msgs(member: Member) -> list:
    return [m["msg"] for m in member.messages]


# -- the membership table alone (sans-IO) -------------------------------------------------------


def test_rooms_table_mirrors_and_frees():
    rooms = Rooms(max_per_connection=2)
    opened, freed = [], []
    rooms.opened, rooms.freed = opened.append, freed.append
    assert rooms.join(1, "a") == JOINED and rooms.join(1, "a") == ALREADY
    assert rooms.join(1, "b") == JOINED and rooms.join(1, "c") == FULL and rooms.joins_refused == 1
    assert rooms.join(2, "a") == JOINED
    assert rooms.members("a") == {1, 2} and rooms.rooms_of(1) == frozenset({"a", "b"})
    assert rooms.rooms_of(3) is None and rooms.members("nowhere") == frozenset()
    assert rooms.leave(1, "b") and not rooms.leave(1, "b")
    assert rooms.rooms_of(1) == frozenset({"a"})  # the cached frozenset was dropped on change
    assert sorted(rooms.leave_all(2)) == ["a"] and rooms.leave_all(2) == []
    assert rooms.leave(1, "a")
    assert opened == ["a", "b"] and sorted(freed) == ["a", "b"]
    assert rooms.room_members == {} and rooms.conn_rooms == {} and rooms._frozen == {}
    stats = rooms.stats()
    assert stats["rooms"] == 0 and stats["room_members"] == 0 and stats["largest_rooms"] == []


def test_rooms_travel_once_per_worker_until_they_change():
    """The pool's and the worker's copies of a connection's rooms stay in step (as sessions do):
    a set already sent to a worker goes as HELD, a changed one afresh."""
    from types import SimpleNamespace

    from simplerpc_mp import ipc
    from simplerpc_mp.dispatch import Dispatch
    from simplerpc_mp.worker import Worker

    rooms = Rooms()
    handle = SimpleNamespace(room_sets=ipc.SessionCache())
    worker = Worker.__new__(Worker)
    worker.held, worker.held_rooms = ipc.SessionCache(), ipc.SessionCache()

    def ship(kind=ipc.SERIAL):
        job = SimpleNamespace(conn=SimpleNamespace(net_id=1), kind=kind)
        field = Dispatch._rooms_for(handle, job, rooms.shipped(1))
        return field, worker.take_sessions([(1, kind, 1, b"", None, field, None)])[0][5]

    assert ship() == (None, None)
    rooms.join(1, "a")
    assert ship() == (frozenset({"a"}), frozenset({"a"}))
    assert ship() == (ipc.HELD, frozenset({"a"}))
    rooms.join(1, "b")
    assert ship() == (frozenset({"a", "b"}), frozenset({"a", "b"}))
    assert ship() == (ipc.HELD, frozenset({"a", "b"}))
    rooms.leave_all(1)
    assert ship(ipc.DISCONNECT) == (None, None)
    assert not handle.room_sets.entries and not worker.held_rooms.entries
    rooms.join(1, "a")  # a set equal to one sent before still travels: its version is new
    assert ship() == (frozenset({"a"}), frozenset({"a"}))


def test_check_room():
    from simplerpc_mp.rooms import check_room

    class Sneaky(str):  # a subclass's own methods are not trusted: the plain string is used
        def __len__(self):
            return 0

    assert check_room("é" * 200) == "é" * 200
    plain = check_room(Sneaky("abc"))
    assert type(plain) is str and plain == "abc"
    for bad in ("", "x" * 201, Sneaky("x" * 201), b"bytes", 3, None):
        with pytest.raises(ValueError):
            check_room(bad)


def test_conn_rooms_reflect_own_joins_and_leaves_in_order():
    pushes: list = []
    conn = Conn(7, {}, pushes, rooms=frozenset({"a"}), max_rooms=3)
    assert conn.rooms == frozenset({"a"})
    conn.join("b")
    conn.rpc_room("b", "hi", {"x": 1}, exclude_self=True)
    conn.leave("a")
    conn.join_to(8, "c")
    conn.leave_to(8, "c")
    conn.rpc("direct", {})
    assert conn.rooms == frozenset({"b"})
    kinds = [item[0] if len(item) > 2 else "push" for item in pushes]
    from simplerpc_mp.handlers import JOIN, LEAVE, ROOM_PUSH

    assert kinds == [JOIN, ROOM_PUSH, LEAVE, JOIN, LEAVE, "push"]
    assert pushes[1] == (ROOM_PUSH, "b", b'hi{"x":1}\n', 7)


def test_acceptor_applies_room_actions_in_order_and_enforces_the_cap():
    """The acceptor's side alone: actions applied in order, the cap held for joins the worker
    could not see (a race, join_to), gone net_ids ignored and counted, one frame per member."""
    import selectors as _selectors

    from simplerpc_mp.acceptor import Acceptor, Connection
    from simplerpc_mp.config import Settings
    from simplerpc_mp.handlers import JOIN, LEAVE, ROOM_PUSH
    from simplerpc_mp.timers import Timers

    acceptor = Acceptor(Settings().with_changes(max_rooms_per_connection=2), _selectors.DefaultSelector(), Timers())
    conns = []
    for net_id in (1, 2, 3):
        conn = Connection.__new__(Connection)  # only what the push path reads
        conn.net_id, conn.wbuf, conn.events = net_id, bytearray(), _selectors.EVENT_READ
        acceptor.conns[net_id] = conn
        conns.append(conn)
    frame = b'm{"x":1}\n'
    for action in [(JOIN, 1, "a"), (JOIN, 1, "b"), (JOIN, 1, "c"), (JOIN, 2, "a"), (JOIN, 3, "a"),
                   (ROOM_PUSH, "a", frame, 3), (LEAVE, 2, "a"), (ROOM_PUSH, "a", frame, None),
                   (JOIN, 99, "a"), (LEAVE, 99, "a"), (ROOM_PUSH, "nowhere", frame, None)]:
        acceptor.room_action(action)
    rooms = acceptor.rooms
    assert rooms.rooms_of(1) == frozenset({"a", "b"}) and rooms.joins_refused == 1
    assert [bytes(conn.wbuf) for conn in conns] == [frame * 2, frame, frame]
    assert acceptor.output_bytes == 4 * len(frame) and acceptor.dirty == conns  # each once, to be flushed
    assert rooms.ops_dropped == 2 and rooms.pushes == 3 and rooms.pushes_empty == 1 and rooms.deliveries == 4
    with pytest.raises(ValueError):
        acceptor.room_action((7, 1, "a"))


# -- real servers --------------------------------------------------------------------------------


def test_join_and_push_across_workers(rooms_server, tmp_path):
    """The joiner's join runs on one worker, the pusher's rpc_room on the other; the push still
    reaches the joiner (membership is the acceptor's). Busy workers force the placement."""
    server = rooms_server()
    joiner, pusher = Member(server), Member(server)
    holders = [server.client(), server.client()]
    held: list[dict] = []

    def hold(index: int) -> None:
        started = tmp_path / f"started{index}"
        holders[index].rpc("hold", {"started": str(started), "release": str(tmp_path / f"release{index}")},
                           lambda op, data: held.append(data))
        wait_until(started.exists, 20, what=f"hold {index} running")

    hold(0)  # one worker busy: the join runs on the other
    joined = joiner.call("join", {"room": "r"})
    assert joined["rooms"] == ["r"]
    hold(1)  # now that other one is busy too
    (tmp_path / "release0").touch()
    wait_until(lambda: (holders[0].poll(0.05), held)[1], 20, what="hold 0 answered")
    said = pusher.call("say", {"room": "r", "msg": "across"})  # on the worker freed by hold 0
    (tmp_path / "release1").touch()
    assert said["pid"] != joined["pid"], (said, joined)
    assert _msgs(joiner.wait_messages(1)) == ["across"]
    assert pusher.messages == []  # not a member
    # A later serial RPC of the joiner sees its membership, wherever it runs.
    assert joiner.call("rooms")["rooms"] == ["r"]
    assert joiner.call("leave", {"room": "r"})["rooms"] == []
    pusher.call("say", {"room": "r", "msg": "after leave"})
    assert joiner.call("join", {"room": "r2"})["rooms"] == ["r2"]  # its pushes would come first
    assert _msgs(joiner) == ["across"]
    server.wait_stats(rooms=1, room_members=1, room_pushes=2, room_pushes_empty=1)


def test_later_rpcs_see_membership_with_the_workers_caches(rooms_server):
    """Each worker keeps the rooms it was sent per connection (shipped again only when they
    change): whatever worker runs the next RPC, and whoever changed them, it sees them as they are."""
    server = rooms_server()
    a, moderator = Member(server), Member(server)
    expected: set[str] = set()
    pids = set()
    for step in range(40):
        if step % 4 == 3:
            room = f"r{step - 2}"
            a.call("leave", {"room": room})
            expected.discard(room)
        elif step % 4 == 2:
            room = f"m{step}"
            moderator.call("join_to", {"net_id": a.net_id, "room": room})  # not by a's own RPC
            expected.add(room)
        else:
            room = f"r{step}"
            a.call("join", {"room": room})
            expected.add(room)
        for _ in range(2):
            seen = a.call("rooms")
            pids.add(seen["pid"])
            assert set(seen["rooms"]) == expected, (step, seen)
    # Pipelined: one job of several lines, each line seeing the ones before it.
    for index in range(5):
        a.client.rpc("join", {"room": f"p{index}"}, None)
    assert set(a.call("rooms")["rooms"]) == expected | {f"p{index}" for index in range(5)}


def test_exclude_self(rooms_server):
    server = rooms_server()
    a, b = Member(server), Member(server)
    a.call("join", {"room": "r"})
    b.call("join", {"room": "r"})
    a.call("say", {"room": "r", "msg": "not to me", "exclude_self": True})
    # Pushes to a connection go out before its answer: none came, so none was sent.
    assert a.messages == []
    assert _msgs(b.wait_messages(1)) == ["not to me"]
    a.call("say", {"room": "r", "msg": "to all"})
    assert _msgs(a) == ["to all"]
    assert _msgs(b.wait_messages(2)) == ["not to me", "to all"]


def test_join_then_push_and_push_then_leave_in_one_handler(rooms_server):
    server = rooms_server()
    a, b = Member(server), Member(server)
    b.call("join", {"room": "r"})
    a.call("join_say", {"room": "r", "msg": "hello"})
    assert _msgs(a) == ["hello"]  # its own join came first: it is a member
    assert _msgs(b.wait_messages(1)) == ["hello"]
    assert a.call("say_leave", {"room": "r", "msg": "bye"})["rooms"] == []
    assert _msgs(a) == ["hello", "bye"]  # the push came before the leave
    b.call("say", {"room": "r", "msg": "gone?"})
    assert _msgs(b.wait_messages(3)) == ["hello", "bye", "gone?"]
    assert a.call("rooms")["rooms"] == []
    assert _msgs(a) == ["hello", "bye"]


def test_join_to_and_leave_to(rooms_server):
    server = rooms_server()
    moderator, a, b = Member(server), Member(server), Member(server)
    b.call("join", {"room": "r"})
    moderator.call("join_to", {"net_id": a.net_id, "room": "r"})
    assert a.call("rooms")["rooms"] == ["r"]  # the acceptor's membership, seen by a's next RPC
    b.call("say", {"room": "r", "msg": "one"})
    assert _msgs(a.wait_messages(1)) == ["one"]
    moderator.call("leave_to", {"net_id": a.net_id, "room": "r"})
    assert a.call("rooms")["rooms"] == []
    b.call("say", {"room": "r", "msg": "two"})
    assert _msgs(b.wait_messages(2)) == ["one", "two"]
    assert a.call("rooms")["rooms"] == [] and _msgs(a) == ["one"]
    # A gone net_id is ignored and counted, not an error.
    moderator.call("join_to", {"net_id": 999999, "room": "r"})
    moderator.call("leave_to", {"net_id": 999999, "room": "r"})
    server.wait_stats(room_ops_dropped=2, rooms=1, room_members=1)


def test_leave_on_disconnect(rooms_server):
    server = rooms_server()
    a, b, c = Member(server), Member(server), Member(server)
    for member in (a, b, c):
        member.call("join", {"room": "r"})
        member.call("join", {"room": f"own{member.net_id}"})
    server.wait_stats(rooms=4, room_members=6)
    a.close()
    server.wait_stats(rooms=3, room_members=4, connections=2)  # its own room was freed
    b.call("say", {"room": "r", "msg": "after"})
    assert _msgs(b) == ["after"]
    assert _msgs(c.wait_messages(1)) == ["after"]
    stats = server.wait_stats(room_deliveries=2)
    assert stats["largest_rooms"][0] == {"room": "r", "members": 2}


def test_on_connect_join_and_seed_style_registration(rooms_server):
    server = rooms_server(env={"SIMPLERPC_TEST_LOBBY": "1"})
    a, b = Member(server), Member(server)
    assert a.call("rooms")["rooms"] == ["lobby"]
    assert b.call("seed_join", {"room": "x"})["rooms"] == ["lobby", "x"]
    a.call("say", {"room": "lobby", "msg": "hi all"})
    assert _msgs(b.wait_messages(1)) == ["hi all"]


def test_max_rooms_per_connection(rooms_server):
    server = rooms_server(max_rooms_per_connection=5)
    a, moderator = Member(server), Member(server)
    with pytest.raises(RemoteError) as failed:
        a.call("join_many", {"prefix": "r", "n": 6})
    assert failed.value.reason == "TooManyRooms"
    assert len(a.call("rooms")["rooms"]) == 5  # the joins before the failing one took effect
    caught = a.call("join_many", {"prefix": "r", "n": 6, "catch": True})  # 5 already: joining them again is fine
    assert caught == {"joined": 5, "reason": "TooManyRooms", "count": 5}
    a.call("leave", {"room": "r0"})
    # join_to can't be checked by the worker: the acceptor refuses it and counts it.
    moderator.call("join_to", {"net_id": a.net_id, "room": "m1"})
    moderator.call("join_to", {"net_id": a.net_id, "room": "m2"})
    assert sorted(a.call("rooms")["rooms"]) == ["m1", "r1", "r2", "r3", "r4"]
    server.wait_stats(room_joins_refused=1)
    # Concurrent joins see the rooms as of their own start and may race past the worker's
    # check: the acceptor holds the line.
    b = Member(server)
    for index in range(12):
        b.client.rpc("cjoin", {"room": f"c{index}"})
    while b.client.pending():
        b.client.poll(0.05)
    assert len(b.call("rooms")["rooms"]) == 5


def test_bad_room_names(rooms_server):
    server = rooms_server()
    a = Member(server)
    names = ["", "x" * 201, 5, None, ["r"], "x" * 200, "é" * 200]
    results = a.call("bad_name", {"names": names})["results"]
    for name, outcome in zip(names[:5], results[:5]):
        assert outcome == ["ValueError"] * 5, (name, outcome)
    assert results[5] == results[6] == ["ok"] * 5
    with pytest.raises(RemoteError) as failed:  # not caught by the handler: its bug, Unknown
        a.call("join", {"room": ""})
    assert failed.value.reason == "Unknown"
    assert sorted(a.call("rooms")["rooms"]) == []  # bad_name left what it joined, then left


def _raise_nofile(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"needs {need} open files, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _connect_members(server: RoomsServer, count: int, line: bytes, batch: int = 500) -> list[socket.socket]:
    """``count`` raw sockets that each sent ``line`` and got its OKAY (in batches, so the
    listen backlog never overflows into SYN retries)."""
    socks: list[socket.socket] = []
    with selectors.DefaultSelector() as selector:
        while len(socks) < count:
            waiting = {}
            for _ in range(min(batch, count - len(socks))):
                sock = socket.create_connection((server.host, server.port))
                sock.sendall(line)
                sock.setblocking(False)
                waiting[sock] = b""
                selector.register(sock, selectors.EVENT_READ)
                socks.append(sock)
            deadline = time.monotonic() + 60
            while waiting:
                assert time.monotonic() < deadline, f"{len(waiting)} joins unanswered; log:\n{server.log()[-3000:]}"
                for key, _ in selector.select(1.0):
                    sock = key.fileobj
                    data = waiting[sock] + sock.recv(65536)
                    if b"\n" in data:
                        assert data.startswith(b"OKAY"), data[:200]
                        del waiting[sock]
                        selector.unregister(sock)
                    else:
                        waiting[sock] = data
    return socks


def test_ten_thousand_members_one_slow_member_cut_off(rooms_server):
    """A 10,000-member room: each push is one worker message and one frame appended to every
    member; one member that never reads is cut off at its output limit (output_hard_limit),
    and the 9,999 others get every push.

    The kernel buffers megabytes for a reader that stops (the sender's buffer grows to
    tcp_wmem's maximum), and filling that with room pushes would send 10,000 times as much to
    the others: so the slow member's buffers are filled first with pushes of its own, until the
    acceptor holds output for it (``output_bytes``), then topped up to just under its limit;
    the room's pushes take it over."""
    members = 10_000
    hard_limit = 256 * 1024
    _raise_nofile(members + 200)
    server = rooms_server(max_connections=members + 100, output_hard_limit=hard_limit, output_soft_limit=hard_limit)
    join = b'join{"room":"big"}\n'
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # the kernel's least
    slow.connect((server.host, server.port))
    slow.sendall(b"whoami{}\n" + join)
    slow.settimeout(20)
    answers = b""
    while answers.count(b"\n") < 2:
        answers += slow.recv(4096)
    slow_id = json.loads(answers.split(b"\n")[0][4:])["net_id"]
    fast = _connect_members(server, members - 1, join)
    server.wait_stats(timeout=60, room_members=members)
    pusher = server.client()

    def settled_output() -> int:
        """The acceptor's unsent output once a tick after now has been printed (the fast
        members are idle then: only the slow one can hold any)."""
        tick = server.stats().get("tick", -1)
        return wait_until(lambda: server.stats().get("tick", -1) > tick + 1 and server.stats(), 20)["output_bytes"]

    for _ in range(200):
        pusher.call("flood", {"net_id": slow_id, "size": 64 * 1024})
        held = settled_output()
        if held:
            break
    else:
        raise AssertionError("the slow member's kernel buffers never filled")
    if hard_limit - held > 12 * 1024:
        pusher.call("flood", {"net_id": slow_id, "size": hard_limit - held - 10 * 1024})
        held = settled_output()
    assert 0 < held <= hard_limit, held
    text = "x" * 4000
    received = dict.fromkeys(fast, 0)
    partial = dict.fromkeys(fast, b"")
    with selectors.DefaultSelector() as selector:
        for sock in fast:
            selector.register(sock, selectors.EVENT_READ)
        rounds = 0
        cut_at = None
        while cut_at is None or rounds < cut_at + 2:
            assert rounds < 20, f"the slow member was never cut off; log:\n{server.log()[-3000:]}"
            pusher.call("say", {"room": "big", "msg": text})
            rounds += 1
            pending = set(fast)
            deadline = time.monotonic() + 60
            while pending:
                assert time.monotonic() < deadline, f"{len(pending)} members did not get push {rounds}"
                for key, _ in selector.select(1.0):
                    sock = key.fileobj
                    data = partial[sock] + sock.recv(1 << 16)
                    *lines, partial[sock] = data.split(b"\n")
                    for line in lines:
                        if line.startswith(b"message{"):
                            received[sock] += 1
                    if received[sock] >= rounds:
                        pending.discard(sock)
            if cut_at is None and "output_hard_limit" in server.log():
                cut_at = rounds
    assert f"net_id {slow_id} closed: output buffer over output_hard_limit" in server.log()
    assert all(count == rounds for count in received.values())
    stats = server.wait_stats(room_members=members - 1, connections=members)  # the fast ones and the pusher
    assert stats["room_pushes"] == rounds and stats["room_deliveries"] >= rounds * (members - 1)
    for sock in fast:
        sock.close()
    slow.close()
    server.wait_stats(timeout=60, rooms=0, room_members=0, connections=1)


def test_join_leave_storm_returns_to_empty(rooms_server):
    """1,000 clients join shared and own rooms, leave some, and disconnect (half of them with
    RPCs still in flight, whose joins then find the connection gone): the acceptor's membership
    tables are empty afterwards, nothing cached, no room left behind."""
    clients = 1000
    _raise_nofile(clients + 200)
    server = rooms_server()
    baseline = server.wait_stats(rooms=0, room_members=0)
    socks = []
    for index in range(clients):
        sock = socket.create_connection((server.host, server.port))
        lines = [f'join{{"room":"s{index % 10}"}}\n', f'join{{"room":"own{index}"}}\n', f'join{{"room":"s{(index + 1) % 10}"}}\n',
                 f'leave{{"room":"s{index % 10}"}}\n', f'cjoin{{"room":"c{index % 7}"}}\n', 'say{"room":"s3","msg":"storm"}\n']
        sock.sendall("".join(lines).encode())
        if index % 2:
            sock.close()  # at once, its RPCs not yet run
        else:
            socks.append(sock)
    for sock in socks:  # the others read their answers first
        sock.settimeout(30)
        data = b""
        while data.count(b"OKAY") < 6:
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
        assert b"FAIL" not in data, data
    stats = server.wait_stats(timeout=60, connections=len(socks))
    assert stats["rooms"] > 0
    for sock in socks:
        sock.close()
    stats = server.wait_stats(timeout=60, rooms=0, room_members=0, connections=0, conn_entries=0, cached=0)
    assert stats["largest_rooms"] == [] and baseline["largest_rooms"] == []
    assert stats["room_joins"] == stats["room_leaves"]


def test_demo_messenger_rooms(start_server):
    """The built-in demo (and workers/messenger.py): join, leave, say, rooms."""
    server = start_server()
    with server.client() as a, server.client() as b:
        got_a, got_b = [], []
        a.on("message", got_a.append)
        b.on("message", got_b.append)
        assert a.call("join", {"room": "general"}) == {"rooms": ["general"]}
        assert b.call("join", {"room": "general"}) == {"rooms": ["general"]}
        assert b.call("join", {"room": "dev"}) == {"rooms": ["dev", "general"]}
        assert b.call("rooms") == {"rooms": ["dev", "general"]}
        a_id = a.call("whoami")["net_id"]
        a.call("say", {"room": "general", "msg": "hello"})
        assert got_a == [{"room": "general", "from": a_id, "msg": "hello"}]
        wait_until(lambda: (b.poll(0.05), got_b)[1], what="b's message")
        assert got_b == got_a
        assert b.call("leave", {"room": "general"}) == {"rooms": ["dev"]}
        a.call("say", {"room": "general", "msg": "only me"})
        assert [m["msg"] for m in got_a] == ["hello", "only me"]
        for bad in ({}, {"room": ""}, {"room": 3}):
            with pytest.raises(RemoteError) as failed:
                a.call("join", bad)
            assert failed.value.reason in ("ArgumentMissing", "ArgumentValueError"), failed.value
        assert b.call("rooms") == {"rooms": ["dev"]} and got_b == got_a[:1]
