"""A cluster of servers over a real Redis (tests/redis_fixture.py): pushes across nodes, Redis
outages, a node killed, a duplicate node_name, a node started before Redis.

Every node is a real ``simplerpc-mp serve`` with worker processes; tests wait on answers, pushes
and log lines with deadlines, never on sleeps.
"""

from __future__ import annotations

import itertools
import re
import signal
import threading

import pytest

from simplerpc_mp import RemoteError
from tests.conftest import RunningServer, kill_process_tree, wait_until
from tests.redis_fixture import RedisServer, free_port, redis_server  # noqa: F401 (a fixture)

pytest.importorskip("hiredis")

HANDLERS = "tests.handlers.cluster_ops"
TTL = "1"  # cluster_node_ttl: a killed node leaves within a second
LOCAL_ID_LIMIT = 2**32  # net_ids below it are a node's own, before it joins
_FENCES = itertools.count()


class Nodes:
    """Nodes started by a test (or a module), killed at teardown."""

    def __init__(self):
        self.started: list[RunningServer] = []

    def start(self, url: str, *args: str, workers: int = 2, ready: bool = True, name: str = "") -> RunningServer:
        full = ["--host", "127.0.0.1", "--port", "0", "--workers", str(workers), "--handlers", HANDLERS,
                "--cluster", url, "--cluster-node-ttl", TTL, *args]
        if name:
            full += ["--node-name", name]
        server = RunningServer(full)
        self.started.append(server)
        if ready:
            server.wait_ready()
        return server

    def joined(self, server: RunningServer, count: int = 1) -> None:
        server.wait_log(r"joined the cluster|is back after", timeout=20, count=count)

    def kill_all(self) -> None:
        for server in self.started:
            server.kill()


@pytest.fixture
def nodes():
    started = Nodes()
    yield started
    started.kill_all()


class Listener:
    """A client that collects the pushes it gets, by op."""

    def __init__(self, server: RunningServer):
        self.client = server.client()
        self.got: dict[str, list] = {}
        for op in ("told", "shouted", "said"):
            self.client.on(op, lambda data, op=op: self.got.setdefault(op, []).append(data))
        self.net_id = self.client.call("whoami")["net_id"]

    def wait(self, op: str, count: int, timeout: float = 10.0) -> list:
        def enough():
            self.client.poll(0.05)
            return len(self.got.get(op, ())) >= count

        wait_until(enough, timeout, what=f"{count} {op} pushes to net_id {self.net_id}")
        return self.got[op]

    def close(self) -> None:
        self.client.close()


def fence(listeners: list[Listener], servers: list[RunningServer]) -> None:
    """Wait until every listener has everything pushed to it so far: each node sends an
    ``rpc_all`` fence, and pushes from one node to one connection keep their order."""
    tag = f"fence {next(_FENCES)}"
    for server in servers:
        with server.client() as client:
            client.call("shout", {"msg": tag})

    for listener in listeners:
        def arrived(listener=listener):
            listener.client.poll(0.05)
            return sum(p["msg"] == tag for p in listener.got.get("shouted", ())) >= len(servers)

        wait_until(arrived, 10, what=f"the fences at net_id {listener.net_id}")
        listener.got["shouted"] = [p for p in listener.got["shouted"] if p["msg"] != tag]


@pytest.fixture(scope="module")
def three():
    """Redis and three nodes of two workers each, for the tests that don't break anything."""
    redis = RedisServer().start()
    started = Nodes()
    try:
        servers = [started.start(redis.url) for _ in range(3)]
        for server in servers:
            started.joined(server)
        yield redis, servers
    finally:
        started.kill_all()
        redis.stop()


def test_net_ids_are_unique_across_the_cluster_and_json_safe(three):
    _, servers = three
    listeners = [Listener(server) for server in servers for _ in range(3)]
    ids = [listener.net_id for listener in listeners]
    assert len(set(ids)) == len(ids)
    assert all(LOCAL_ID_LIMIT < net_id < 2**53 for net_id in ids)
    for listener in listeners:
        listener.close()


def test_rpc_to_across_nodes_both_ways_in_order(three):
    _, servers = three
    a, b = Listener(servers[0]), Listener(servers[1])
    a.client.call("tell", {"to": b.net_id, "msg": "a->b", "n": 50})
    b.client.call("tell", {"to": a.net_id, "msg": "b->a", "n": 50})
    assert [p["i"] for p in b.wait("told", 50)] == list(range(50))
    assert [p["i"] for p in a.wait("told", 50)] == list(range(50))
    assert {p["from"] for p in b.got["told"]} == {a.net_id}
    assert {p["msg"] for p in a.got["told"]} == {"b->a"}
    a.close()
    b.close()


def test_rpc_all_from_each_node_reaches_every_client_once(three):
    _, servers = three
    listeners = [Listener(server) for server in servers for _ in range(2)]
    for index, server in enumerate(servers):
        with server.client() as shouter:
            shouter.call("shout", {"msg": f"from node {index}"})
    fence(listeners, servers)  # a second copy would have come before the fence
    for listener in listeners:
        assert sorted(p["msg"] for p in listener.got["shouted"]) == [f"from node {i}" for i in range(3)]
        listener.close()


def test_a_push_to_a_net_id_no_node_holds_is_dropped(three):
    _, servers = three
    gone = Listener(servers[1])
    gone_id = gone.net_id
    gone.close()
    a = Listener(servers[0])
    a.client.call("tell", {"to": gone_id, "msg": "lost"})  # its node is alive, the connection is not
    a.client.call("tell", {"to": (12345 << 32) | 1, "msg": "lost"})  # no node holds that number
    a.client.call("tell", {"to": a.net_id, "msg": "here"})
    assert [p["msg"] for p in a.wait("told", 1)] == ["here"]
    a.close()


def test_rpc_to_minus_one_is_not_rpc_all(three):
    """A client naming net_id -1 (the messenger's tell{"to": -1}) must not reach every client of
    every node: no connection has that net_id, so the push is dropped."""
    _, servers = three
    sender, here, there = Listener(servers[0]), Listener(servers[0]), Listener(servers[1])
    sender.client.call("tell", {"to": -1, "msg": "to everyone?"})
    fence([sender, here, there], servers)
    for listener in (sender, here, there):
        assert "told" not in listener.got
        listener.close()


def test_a_room_with_members_on_three_nodes(three):
    _, servers = three
    members = [Listener(server) for server in servers for _ in range(2)]
    outsider = Listener(servers[1])
    for member in members:
        member.client.call("join", {"room": "hall"})
    members[0].client.call("say", {"room": "hall", "msg": "hello"})
    members[3].client.call("say", {"room": "hall", "msg": "quiet", "exclude_self": True})
    fence([*members, outsider], servers)
    for index, member in enumerate(members):
        expected = ["hello"] if index == 3 else ["hello", "quiet"]
        assert sorted(p["msg"] for p in member.got["said"]) == expected
    assert "said" not in outsider.got
    for listener in (*members, outsider):
        listener.close()


def test_join_to_and_leave_to_across_nodes(three):
    _, servers = three
    mover = Listener(servers[0])
    moved = Listener(servers[2])
    # join_to then rpc_room in one handler: the other node applies them in that order.
    mover.client.call("join_to", {"who": moved.net_id, "room": "game", "say": "you are in"})
    assert [p["msg"] for p in moved.wait("said", 1)] == ["you are in"]
    assert moved.client.call("rooms") == {"rooms": ["game"]}  # membership is its own node's
    mover.client.call("leave_to", {"who": moved.net_id, "room": "game", "say": "after leaving"})
    mover.client.call("join", {"room": "game"})
    mover.client.call("say", {"room": "game", "msg": "mover only"})
    fence([mover, moved], servers)
    assert [p["msg"] for p in mover.got["said"]] == ["mover only"]
    assert [p["msg"] for p in moved.got["said"]] == ["you are in"]
    assert moved.client.call("rooms") == {"rooms": []}
    mover.close()
    moved.close()


def test_malformed_messages_on_the_channels_are_dropped(three):
    """Anyone who can publish on the Redis can send anything: the nodes drop it and go on."""
    redis, servers = three
    listener = Listener(servers[0])
    number = listener.net_id >> 32
    for channel, message in [
        ("simplerpc-mp:all", "garbage"), ("simplerpc-mp:all", "A1 told{}"), ("simplerpc-mp:all", "A1 a\nb\n"),
        ("simplerpc-mp:all", "R1 0 999 x"), ("simplerpc-mp:all", "Z1 x{}\n"), (f"simplerpc-mp:to:{number}", "Tnope x{}\n"),
        (f"simplerpc-mp:to:{number}", f"J{listener.net_id} "), (f"simplerpc-mp:to:{number}", "J"),
    ]:
        assert redis.command("PUBLISH", channel, message) >= 1  # some node got it
    servers[0].wait_log("malformed message on")
    redis.command("PUBLISH", f"simplerpc-mp:to:{number}", f'T{listener.net_id} told{{"msg":"valid"}}\n')
    assert [p["msg"] for p in listener.wait("told", 1)] == ["valid"]
    assert listener.client.call("rooms") == {"rooms": []}
    listener.close()


def test_a_duplicate_node_name_exits_2(three, nodes):
    redis, _ = three
    name = "twin"
    first = nodes.start(redis.url, name=name)
    nodes.joined(first)
    second = nodes.start(redis.url, name=name, ready=False)
    assert second.proc.wait(60) == 2
    log = second.log()
    assert "node_name 'twin' is held by another live node of the cluster" in log
    assert "Traceback" not in log
    with first.client() as client:  # the first is unaffected
        assert client.call("echo", {"x": 1}) == {"x": 1}


def test_the_name_of_a_node_just_killed_is_taken_once_its_key_expires(redis_server, nodes):
    """A pod replaced under the same name (a StatefulSet): the dead node's key is still there,
    but nobody refreshes it, so the new node waits for it to expire instead of exiting 2."""
    key = "simplerpc-mp:node:pod-0"
    redis_server.command("SET", key, "f" * 32 + ' {"connections": 0}', "PX", 60_000)  # a holder that died

    def claims() -> int:
        stats = redis_server.command("INFO", "commandstats").decode()
        match = re.search(r"cmdstat_eval:calls=(\d+)", stats)
        return int(match.group(1)) if match else 0

    new = nodes.start(redis_server.url, name="pod-0")
    new.wait_log("waiting to see whether that node is alive")
    seen = claims()
    wait_until(lambda: claims() >= seen + 3, timeout=10, what="three more claims of the name")
    assert new.proc.poll() is None  # the holder never refreshed its key: no reason to give up
    redis_server.command("PEXPIRE", key, 1)  # its TTL ends
    nodes.joined(new)
    assert redis_server.command("GET", key).startswith(b"f" * 32) is False


def test_a_bad_cluster_url_exits_2(nodes):
    server = nodes.start("http://127.0.0.1:1", ready=False)
    assert server.proc.wait(60) == 2
    assert "expected a redis:// or rediss:// URL" in server.log()


def test_redis_killed_and_restarted_under_traffic(redis_server, nodes):
    a = nodes.start(redis_server.url)
    b = nodes.start(redis_server.url)
    nodes.joined(a)
    nodes.joined(b)
    receiver = Listener(b)
    stop = threading.Event()
    answers = {"okay": 0, "fail": []}

    def local_traffic():
        with a.client() as client:
            while not stop.is_set():
                try:
                    client.call("echo", {"n": 1})
                    answers["okay"] += 1
                except RemoteError as exc:
                    answers["fail"].append(exc)

    threads = [threading.Thread(target=local_traffic) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        with a.client() as pusher:
            pusher.call("tell", {"to": receiver.net_id, "msg": "before"})
            receiver.wait("told", 1)
            redis_server.kill()
            a.wait_log("lost Redis at")
            b.wait_log("lost Redis at")
            pusher.call("tell", {"to": receiver.net_id, "msg": "during"})  # dropped, counted
            okay_during = answers["okay"]
            wait_until(lambda: answers["okay"] > okay_during + 20, what="local RPCs during the outage")
            redis_server.start()
            a.wait_log("is back after", timeout=20)
            b.wait_log("is back after", timeout=20)

            def resumed():
                pusher.call("tell", {"to": receiver.net_id, "msg": "after"})
                receiver.client.poll(0.2)
                return any(p["msg"] == "after" for p in receiver.got["told"])

            wait_until(resumed, timeout=10, what="cross-node pushes after Redis came back")
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert answers["fail"] == []
    assert answers["okay"] > 0
    assert "during" not in [p["msg"] for p in receiver.got["told"]]
    receiver.close()
    # The outage is logged once at its start and once at its end, whatever the retries.
    assert a.log().count("lost Redis at") == 1
    assert a.log().count("is back after") == 1
    a.stop()
    assert "dropped: 1 while Redis was away" in a.log()


def test_a_redis_that_hangs_costs_dropped_pushes_not_memory_nor_rpcs(redis_server, nodes):
    """SIGSTOP: the TCP connection stays open and nothing answers. The outbound buffer stops at
    cluster_buffer_bytes (the rest is dropped and counted), the silence is noticed from the
    heartbeat, and local RPCs go on throughout."""
    a = nodes.start(redis_server.url, "--cluster-buffer-bytes", "65536")
    b = nodes.start(redis_server.url)
    nodes.joined(a)
    nodes.joined(b)
    receiver = Listener(b)
    redis_server.proc.send_signal(signal.SIGSTOP)
    try:
        with a.client() as client:
            client.call("flood", {"to": receiver.net_id, "n": 200, "size": 1000})  # 200 KB > 64 KiB
            a.wait_log("lost Redis at .*no reply from Redis", timeout=10)
            for n in range(50):
                assert client.call("echo", {"n": n}) == {"n": n}
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    a.wait_log("is back after", timeout=20)
    assert a.stop() == 0
    dropped = int(re.search(r"dropped: \d+ while Redis was away, (\d+) over cluster_buffer_bytes", a.log()).group(1))
    assert dropped >= 200 - 65536 // 1000
    receiver.close()


def test_a_node_killed_with_sigkill_leaves_within_the_ttl(redis_server, nodes):
    a = nodes.start(redis_server.url, name="doomed")
    b = nodes.start(redis_server.url, name="survivor")
    nodes.joined(a)
    nodes.joined(b)
    victim = Listener(a)
    survivor = Listener(b)
    assert redis_server.command("EXISTS", "simplerpc-mp:node:doomed") == 1
    kill_process_tree(a.proc)  # SIGKILL, workers too
    wait_until(lambda: redis_server.command("EXISTS", "simplerpc-mp:node:doomed") == 0, timeout=5,
               what="the killed node's heartbeat key to expire")
    assert redis_server.command("EXISTS", "simplerpc-mp:node:survivor") == 1
    survivor.client.call("tell", {"to": victim.net_id, "msg": "to the dead"})  # no one holds it: dropped
    survivor.client.call("shout", {"msg": "still here"})
    assert [p["msg"] for p in survivor.wait("shouted", 1)] == ["still here"]
    survivor.close()
    b.stop()
    assert "1 to a node that has gone" in b.log()
    assert redis_server.command("EXISTS", "simplerpc-mp:node:survivor") == 0  # a graceful stop leaves at once


def test_a_node_started_before_redis_serves_and_joins_later(nodes):
    redis = RedisServer(port=free_port())  # not started yet
    try:
        early = nodes.start(redis.url)
        early.wait_log("cannot reach Redis at")
        old = Listener(early)
        assert old.net_id < LOCAL_ID_LIMIT  # numbered as a single server until it joins
        assert old.client.call("echo", {"x": 1}) == {"x": 1}
        redis.start()
        early.wait_log("is back after", timeout=20)
        late = nodes.start(redis.url)
        nodes.joined(late)
        new = Listener(early)
        assert new.net_id > LOCAL_ID_LIMIT
        other = Listener(late)
        other.client.call("tell", {"to": new.net_id, "msg": "welcome"})
        assert [p["msg"] for p in new.wait("told", 1)] == ["welcome"]
        other.client.call("shout", {"msg": "everyone"})  # reaches the early connection too
        assert [p["msg"] for p in old.wait("shouted", 1)] == ["everyone"]
        for listener in (old, new, other):
            listener.close()
        assert early.stop(signal.SIGTERM) == 0
    finally:
        redis.stop()


def test_exclude_self_of_an_early_connection_skips_no_one_on_other_nodes(nodes):
    """Two nodes started before Redis both number their connections 1, 2, ...: the same net_id
    on each. exclude_self of one must not leave out the other node's connection of that number."""
    redis = RedisServer(port=free_port())  # not started yet
    try:
        a, b = nodes.start(redis.url), nodes.start(redis.url)
        a.wait_log("cannot reach Redis at")
        b.wait_log("cannot reach Redis at")
        pusher = Listener(a)
        others = [Listener(b)]
        while others[-1].net_id < pusher.net_id:
            others.append(Listener(b))
        twin = others[-1]
        assert twin.net_id == pusher.net_id < LOCAL_ID_LIMIT
        redis.start()
        a.wait_log("is back after", timeout=20)
        b.wait_log("is back after", timeout=20)
        for listener in (pusher, twin):
            listener.client.call("join", {"room": "hall"})
        pusher.client.call("say", {"room": "hall", "msg": "not to myself", "exclude_self": True})
        fence([pusher, twin], [a, b])
        assert [p["msg"] for p in twin.got.get("said", ())] == ["not to myself"]
        assert "said" not in pusher.got
        for listener in (pusher, *others):
            listener.close()
    finally:
        redis.stop()


def test_a_password_and_a_database_number_in_the_url(nodes):
    redis = RedisServer(password="s3cret").start()
    try:
        url = f"redis://:s3cret@127.0.0.1:{redis.port}/3"
        a, b = nodes.start(url, name="a"), nodes.start(url, name="b")
        nodes.joined(a)
        nodes.joined(b)
        receiver = Listener(b)
        with a.client() as pusher:
            pusher.call("tell", {"to": receiver.net_id, "msg": "over auth"})
        assert [p["msg"] for p in receiver.wait("told", 1)] == ["over auth"]
        receiver.close()
        in_db = "redis.call('SELECT', ARGV[1]) return redis.call('EXISTS', KEYS[1])"
        assert redis.command("EVAL", in_db, 1, "simplerpc-mp:node:a", 3) == 1
        assert redis.command("EVAL", in_db, 1, "simplerpc-mp:node:a", 0) == 0
        assert "WRONGPASS" not in a.log()
    finally:
        redis.stop()


def test_check_tries_the_redis_connection(redis_server):
    import subprocess
    import sys

    def check(url: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "simplerpc_mp", "check", "--cluster", url, "--handlers", HANDLERS],
                              capture_output=True, text=True, timeout=120)

    done = check(redis_server.url)
    assert done.returncode == 0, done.stderr
    assert f"# cluster redis://127.0.0.1:{redis_server.port}/0: OK (Redis " in done.stdout
    done = check(f"redis://127.0.0.1:{free_port()}")
    assert done.returncode == 0
    assert "cannot use Redis at" in done.stderr and "Connection refused" in done.stderr
    done = check("redis://127.0.0.1:6379/x")
    assert done.returncode == 2
    assert "must be a database number" in done.stderr
    # A password in the URL is never printed: not in the settings dump, not in an error.
    for url in (f"redis://user:s3cret@127.0.0.1:{free_port()}/0", "redis://user:s3cret@127.0.0.1:bad/0"):
        done = check(url)
        assert "s3cret" not in done.stdout + done.stderr
        assert "user:***@" in done.stdout + done.stderr


def test_rediss_tls_to_redis(redis_server, nodes, tmp_path):
    pytest.importorskip("trustme")
    from tests.redis_fixture import TLSProxy

    proxy = TLSProxy(redis_server, str(tmp_path))
    try:
        url = proxy.url(f"ssl_ca_certs={proxy.ca_file}")
        a, b = nodes.start(url), nodes.start(url)
        nodes.joined(a)
        nodes.joined(b)
        receiver = Listener(b)
        with a.client() as pusher:
            pusher.call("tell", {"to": receiver.net_id, "msg": "over TLS", "n": 20})
        assert [p["i"] for p in receiver.wait("told", 20)] == list(range(20))
        receiver.close()
        # Without the CA the certificate is refused: the node serves alone and says why, once.
        alone = nodes.start(proxy.url())
        alone.wait_log("cannot reach Redis at rediss://.*CERTIFICATE_VERIFY_FAILED")
        with alone.client() as client:
            assert client.call("echo", {"x": 1}) == {"x": 1}
    finally:
        proxy.close()


def test_stats_show_the_broker_and_the_live_nodes_with_their_connections(redis_server, nodes):
    from simplerpc_mp import Server
    from tests.test_handlers_api import ServerThread

    other = nodes.start(redis_server.url, name="other")
    nodes.joined(other)
    clients = [other.client() for _ in range(3)]
    for client in clients:
        client.call("whoami")
    server = Server("127.0.0.1", 0, HANDLERS, workers=1, spare_workers=0, cluster=redis_server.url,
                    node_name="here", cluster_node_ttl=0.6)
    with ServerThread(server):
        def seen():
            stats = server.cluster.stats()
            nodes_seen = {node["name"]: node["connections"] for node in stats["nodes"]}
            return stats["broker"] == "up" and nodes_seen.get("other") == 3 and stats

        stats = wait_until(seen, timeout=10, what="the other node's 3 connections in stats")
        assert stats["node_name"] == "here"
        assert {node["name"] for node in stats["nodes"]} == {"here", "other"}
        assert stats["pushes_dropped"] == {"redis_down": 0, "buffer_full": 0, "no_node": 0}
        redis_server.kill()
        wait_until(lambda: server.cluster.stats()["broker"] == "down", timeout=10, what="broker down in stats")
    for client in clients:
        client.close()


def test_the_view_of_the_live_nodes_is_kept_after_redis_hung(redis_server, nodes):
    """A Redis that hangs (SIGSTOP) while a scan of the nodes' keys waits for its reply: the link
    is reset and that reply never comes; once Redis is back the view must still be refreshed."""
    from simplerpc_mp import Server
    from tests.test_handlers_api import ServerThread

    server = Server("127.0.0.1", 0, HANDLERS, workers=1, spare_workers=0, cluster=redis_server.url,
                    node_name="here", cluster_node_ttl=0.6)
    with ServerThread(server):
        wait_until(lambda: server.cluster.stats()["broker"] == "up", timeout=10, what="broker up in stats")
        redis_server.proc.send_signal(signal.SIGSTOP)
        try:
            wait_until(lambda: server.cluster.stats()["broker"] == "down", timeout=10, what="broker down in stats")
        finally:
            redis_server.proc.send_signal(signal.SIGCONT)
        wait_until(lambda: server.cluster.stats()["broker"] == "up", timeout=20, what="broker up again in stats")
        late = nodes.start(redis_server.url, name="late")
        nodes.joined(late)
        wait_until(lambda: "late" in {node["name"] for node in server.cluster.stats()["nodes"]}, timeout=10,
                   what="the node started after the outage in stats")


def test_a_heartbeat_key_that_is_not_a_node_s_is_left_out_of_stats(redis_server):
    """Anyone who can write to the Redis can leave any value under a node key: stats skip it."""
    from simplerpc_mp import Server
    from tests.test_handlers_api import ServerThread

    redis_server.command("SET", "simplerpc-mp:node:odd", "token 5")  # JSON, but not an object
    redis_server.command("SET", "simplerpc-mp:node:odder", "token [1, 2]")
    redis_server.command("SET", "simplerpc-mp:node:deep", "token " + "[" * 100000)  # deeper than the parser's stack
    server = Server("127.0.0.1", 0, HANDLERS, workers=1, spare_workers=0, cluster=redis_server.url,
                    node_name="here", cluster_node_ttl=0.6)
    with ServerThread(server):
        wait_until(lambda: "here" in server.cluster.nodes, timeout=10, what="a scan that read the nodes' keys")
        assert {node["name"] for node in server.cluster.stats()["nodes"]} == {"here"}


@pytest.mark.parametrize("text, expected", [
    ("redis://localhost", dict(host="localhost", port=6379, db=0, tls=False)),
    ("redis://u:p%40ss@h:7000/2", dict(host="h", port=7000, username="u", password="p@ss", db=2)),
    ("redis://:pw@h", dict(username="", password="pw")),
    ("rediss://h?ssl_ca_certs=/ca.pem", dict(tls=True, port=6379, ca_certs="/ca.pem", verify=True)),
    ("rediss://h?ssl_cert_reqs=none", dict(tls=True, verify=False)),
])
def test_redis_urls(text, expected):
    from simplerpc_mp.broker import parse_url

    url = parse_url(text)
    for name, value in expected.items():
        assert getattr(url, name) == value, name
    assert "p@ss" not in url.safe and ":pw@" not in url.safe


@pytest.mark.parametrize("text, message", [
    ("http://h", "expected a redis:// or rediss:// URL"),
    ("redis://", "no host"),
    ("redis://h:notaport", "bad port"),
    ("redis://h/zero", "must be a database number"),
    ("redis://" + "a" * 64 + ".example", "bad host name"),  # a DNS label is at most 63 characters
    ("redis://redis..internal", "bad host name"),
])
def test_bad_redis_urls(text, message):
    from simplerpc_mp.broker import RedisURLError, parse_url

    with pytest.raises(RedisURLError, match=message):
        parse_url(text)


def test_commands_are_resp_arrays():
    import hiredis

    from simplerpc_mp.broker import encode_command

    data = encode_command(["SET", b"k\r\n", 12, "é"])
    assert data == b"*4\r\n$3\r\nSET\r\n$3\r\nk\r\n\r\n$2\r\n12\r\n$2\r\n\xc3\xa9\r\n"
    if hasattr(hiredis, "pack_command"):  # (hiredis 2.1+): the library's own encoder agrees
        assert data == hiredis.pack_command(("SET", b"k\r\n", 12, "é"))


def test_cluster_without_hiredis_is_one_line_and_exit_2(tmp_path):
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    fake = tmp_path / "hiredis"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'hiredis'\", name='hiredis')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO)]))
    for command in ("serve", "check"):
        done = subprocess.run([sys.executable, "-m", "simplerpc_mp", command, "--port", "0", "--cluster", "redis://127.0.0.1:1"],
                              capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
        assert done.returncode == 2, (command, done.stderr)
        assert "the cluster setting needs hiredis, which is not installed" in done.stderr
        assert "Traceback" not in done.stderr


def test_a_link_tries_each_address_of_its_name_in_turn(redis_server):
    """One RedisLink in a selector loop of this process: a name that resolves to an address
    where nothing listens and then Redis's (``localhost`` as ::1 and 127.0.0.1) gets up."""
    import selectors
    import socket
    import time

    from simplerpc_mp.broker import UP, RedisLink, parse_url
    from simplerpc_mp.timers import Timers

    selector, timers = selectors.DefaultSelector(), Timers()
    failures, replies = [], []
    link = RedisLink(parse_url(redis_server.url), selector, timers, name="test", max_buffer_bytes=1024,
                     on_fail=failures.append)
    link.addresses = [(socket.AF_INET, socket.SOCK_STREAM, 0, "", ("127.0.0.1", free_port())),
                      (socket.AF_INET, socket.SOCK_STREAM, 0, "", ("127.0.0.1", redis_server.port))]

    def turn():
        for key, mask in selector.select(timers.timeout(time.monotonic())):
            key.data.on_event(mask)
        timers.run_due(time.monotonic())

    try:
        link.start()
        wait_until(lambda: turn() or link.state == UP, timeout=10, what="the link up on the second address")
        assert len(failures) == 1 and "refused" in failures[0]
        assert link.command(["SET", "k", "v"], replies.append)
        assert not link.command(["SET", "k", "x" * 2000], replies.append)  # over max_buffer_bytes: refused
        assert link.command(["GET", "k"], replies.append)
        wait_until(lambda: turn() or len(replies) == 2, timeout=10, what="two replies")
        assert replies == [b"OK", b"v"]
    finally:
        link.close()
        selector.close()


def test_a_link_backs_off_when_redis_accepts_and_closes_at_once():
    """Something that accepts the TCP connection and closes it (a proxy whose Redis is down, a
    Redis at maxclients): the link is up for a moment each time, yet its retries must still back
    off, not come every BACKOFF_MIN_S forever."""
    import selectors
    import socket
    import time

    from simplerpc_mp.broker import BACKOFF_MIN_S, RedisLink, parse_url
    from simplerpc_mp.timers import Timers

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    selector, timers = selectors.DefaultSelector(), Timers()
    selector.register(listener, selectors.EVENT_READ, None)
    downs: list = []
    link = RedisLink(parse_url(f"redis://127.0.0.1:{port}"), selector, timers, name="test", max_buffer_bytes=1024,
                     on_down=downs.append)

    def turn():
        for key, mask in selector.select(timers.timeout(time.monotonic())):
            if key.data is None:
                sock, _ = listener.accept()
                sock.close()
            else:
                key.data.on_event(mask)
        timers.run_due(time.monotonic())

    try:
        link.start()
        wait_until(lambda: turn() or len(downs) >= 4, timeout=30, what="four connections closed by the peer")
        assert link.backoff >= 8 * BACKOFF_MIN_S  # doubled at each of the 4 failures
    finally:
        link.close()
        selector.close()
        listener.close()


def test_a_missing_ca_file_for_rediss_exits_2_with_one_line(redis_server, nodes, tmp_path):
    """The CA file is read once, at start: a missing one is a setting to fix (serve and check
    exit 2), not an exception in the loop when the first connection to Redis comes up."""
    import subprocess
    import sys

    missing = tmp_path / "no-such-ca.pem"
    url = f"rediss://127.0.0.1:{redis_server.port}/0?ssl_ca_certs={missing}"
    server = nodes.start(url, ready=False)
    assert server.proc.wait(60) == 2
    log = server.log()
    assert str(missing) in log
    assert "Traceback" not in log
    done = subprocess.run([sys.executable, "-m", "simplerpc_mp", "check", "--cluster", url, "--handlers", HANDLERS],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert str(missing) in done.stderr and "Traceback" not in done.stderr


def test_a_link_out_of_descriptors_retries_instead_of_raising(redis_server):
    """socket() failing with EMFILE (a node full of clients) is a failed attempt, retried after
    the back-off: raised, it would escape into the server's loop and stop the server."""
    import os
    import resource
    import selectors
    import socket
    import time

    from simplerpc_mp.broker import UP, RedisLink, parse_url
    from simplerpc_mp.timers import Timers

    selector, timers = selectors.DefaultSelector(), Timers()
    failures: list = []
    link = RedisLink(parse_url(redis_server.url), selector, timers, name="test", max_buffer_bytes=1024,
                     on_fail=failures.append)
    link.addresses = [(socket.AF_INET, socket.SOCK_STREAM, 0, "", ("127.0.0.1", redis_server.port))]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held: list = []
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(int(fd) for fd in os.listdir("/proc/self/fd")) + 16, hard))
        try:
            while True:
                held.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            pass  # every descriptor is taken
        link.start()
        assert len(failures) == 1 and "Too many open files" in failures[0]
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    def turn():
        for key, mask in selector.select(timers.timeout(time.monotonic())):
            key.data.on_event(mask)
        timers.run_due(time.monotonic())

    try:
        wait_until(lambda: turn() or link.state == UP, timeout=10, what="the link up once descriptors are free")
    finally:
        link.close()
        selector.close()


def test_the_redis_fixture_leaves_no_server_running_when_its_start_fails(monkeypatch):
    """A redis-server that did not answer in time (a loaded machine) is killed and reaped, not
    left running after the test session."""
    import tests.redis_fixture as fixture

    def never_answers(self, *args, **kwargs):
        raise OSError("no answer")

    monkeypatch.setattr(fixture, "READY_TIMEOUT_S", 0.2)
    monkeypatch.setattr(fixture.RedisServer, "command", never_answers)
    server = fixture.RedisServer()
    with pytest.raises(AssertionError, match="did not answer PING"):
        server.start()
    assert server.proc.poll() is not None


def test_a_slow_name_lookup_does_not_block_the_loop(redis_server, monkeypatch):
    """getaddrinfo() has no non-blocking form: a DNS server that does not answer (each retry
    while Redis's name does not resolve) must not hold the acceptor's loop for its timeout."""
    import selectors
    import socket
    import threading
    import time

    from simplerpc_mp import broker
    from simplerpc_mp.broker import UP, RedisLink, parse_url
    from simplerpc_mp.timers import Timers

    real_getaddrinfo = socket.getaddrinfo
    release = threading.Event()

    def slow_getaddrinfo(host, port, *args, **kwargs):
        if kwargs.get("flags", 0) & socket.AI_NUMERICHOST:  # no DNS asked
            return real_getaddrinfo(host, port, *args, **kwargs)
        if host == "redis.test" and not release.wait(10):
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real_getaddrinfo("127.0.0.1", port, *args, **kwargs)

    monkeypatch.setattr(broker.socket, "getaddrinfo", slow_getaddrinfo)
    selector, timers = selectors.DefaultSelector(), Timers()
    failures: list = []
    link = RedisLink(parse_url(f"redis://redis.test:{redis_server.port}"), selector, timers, name="test",
                     max_buffer_bytes=1024, on_fail=failures.append)

    def turn():
        for key, mask in selector.select(timers.timeout(time.monotonic())):
            key.data.on_event(mask)
        timers.run_due(time.monotonic())

    try:
        link.start()
        turn()
        assert not release.is_set() and failures == []  # start() and the loop went on: the lookup waits
        release.set()
        wait_until(lambda: turn() or link.state == UP, timeout=10, what="the link up once the name resolved")
        assert failures == []
    finally:
        release.set()
        link.close()
        selector.close()


def test_the_redis_fixture_leaves_no_server_running_when_the_tests_are_killed(tmp_path):
    """A test run killed outright (`timeout` sends SIGTERM, a CI job is cancelled) runs no
    teardown: the redis-server it started must die with it, not stay on the machine."""
    import os
    import subprocess
    import sys

    import psutil

    from tests.conftest import REPO

    script = tmp_path / "start_redis.py"
    script.write_text("import sys, time\n"
                      "from tests.redis_fixture import RedisServer\n"
                      "server = RedisServer().start()\n"
                      "print(server.proc.pid, flush=True)\n"
                      "sys.stdin.read()\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    runner = subprocess.Popen([sys.executable, str(script)], cwd=REPO, env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    redis_pid = 0
    try:
        redis_pid = int(runner.stdout.readline())
        runner.kill()
        runner.wait(10)

        def gone() -> bool:
            try:
                return psutil.Process(redis_pid).status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        wait_until(gone, timeout=10, what="the redis-server of a killed test process to exit")
    finally:
        runner.kill()
        if redis_pid and psutil.pid_exists(redis_pid):
            try:
                psutil.Process(redis_pid).kill()
            except psutil.NoSuchProcess:
                pass


def test_a_name_lookup_that_cannot_start_a_thread_is_a_failed_attempt(monkeypatch):
    """No thread for the lookup (a process at its thread limit) is an attempt that failed, retried
    after the back-off: raised, it would escape into the server's loop and stop the server."""
    import selectors
    import threading
    import time

    from simplerpc_mp.broker import CONNECTING, DOWN, RedisLink, parse_url
    from simplerpc_mp.timers import Timers

    def no_thread(self):
        raise RuntimeError("can't start new thread")

    selector, timers = selectors.DefaultSelector(), Timers()
    failures: list = []
    link = RedisLink(parse_url("redis://redis.test:6379"), selector, timers, name="test", max_buffer_bytes=1024,
                     on_fail=failures.append)
    monkeypatch.setattr(threading.Thread, "start", no_thread)
    try:
        link.start()
        assert link.state in (DOWN, CONNECTING)
        wait_until(lambda: timers.run_due(time.monotonic()) or failures, timeout=10, what="the failed attempt")
        assert "can't start new thread" in failures[0]
    finally:
        monkeypatch.undo()
        link.close()
        selector.close()
