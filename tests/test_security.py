"""TLS, client certificates and authentication, against real servers (issue 13).

Certificates are made here with trustme; none are kept in the repository. Each server runs
one worker; the ones several tests share are module-scoped.
"""

from __future__ import annotations

import asyncio
import json
import os
import pty
import selectors
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
import weakref
from types import SimpleNamespace

import pytest
import trustme

from simplerpc_mp import AsyncClient, Client, ClientHandler, RemoteError
from simplerpc_mp import ipc
from simplerpc_mp.acceptor import OPEN, Acceptor
from simplerpc_mp.config import Settings
from simplerpc_mp.timers import Timers
from tests.conftest import REPO, RunningServer, wait_until

GOOD_TOKEN = "s3cret-alice"
BARE_TOKEN = "bare-token-42"


def _write(path, data: bytes, mode: int = 0o600) -> str:
    path.write_bytes(data)
    os.chmod(path, mode)
    return str(path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca, other_ca = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    alice = ca.issue_cert("alice.example", common_name="alice")
    mallory = other_ca.issue_cert("mallory.example", common_name="mallory")
    server2 = other_ca.issue_cert("127.0.0.1")
    return SimpleNamespace(
        dir=d,
        ca=_write(d / "ca.pem", ca.cert_pem.bytes(), 0o644),
        other_ca=_write(d / "other-ca.pem", other_ca.cert_pem.bytes(), 0o644),
        cert=_write(d / "server.pem", b"".join(c.bytes() for c in server.cert_chain_pems), 0o644),
        key=_write(d / "server.key", server.private_key_pem.bytes()),
        cert2=server2.cert_chain_pems[0].bytes(),
        key2=server2.private_key_pem.bytes(),
        alice_cert=_write(d / "alice.pem", b"".join(c.bytes() for c in alice.cert_chain_pems), 0o644),
        alice_key=_write(d / "alice.key", alice.private_key_pem.bytes()),
        mallory=_write(d / "mallory.pem", mallory.private_key_and_cert_chain_pem.bytes()),
        tokens=_write(d / "tokens", f"# who may call\nalice:{GOOD_TOKEN}\n\n{BARE_TOKEN}\n".encode()),
    )


def context(pki, cafile=None, client=None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=cafile or pki.ca)
    if client is not None:
        ctx.load_cert_chain(*client)
    return ctx


class _Servers:
    def __init__(self):
        self.started: list[RunningServer] = []

    def start(self, *args: str, env=None, workers: int = 1) -> RunningServer:
        server = RunningServer(["--host", "127.0.0.1", "--port", "0", "--workers", str(workers), *args], env=env)
        self.started.append(server)
        return server.wait_ready()


@pytest.fixture(scope="module")
def servers():
    started = _Servers()
    yield started
    for server in started.started:
        server.kill()


@pytest.fixture
def fresh_servers():
    started = _Servers()
    yield started
    for server in started.started:
        server.kill()


@pytest.fixture(scope="module")
def tls_server(servers, pki):
    return servers.start("--handlers", "tests.handlers.sec_ops", "--certfile", pki.cert, "--keyfile", pki.key,
                         "--tls-handshake-timeout", "1.5")


@pytest.fixture(scope="module")
def mtls_server(servers, pki):
    return servers.start("--handlers", "tests.handlers.sec_ops", "--certfile", pki.cert, "--keyfile", pki.key,
                         "--ca-certs", pki.ca)


@pytest.fixture(scope="module")
def token_server(servers, pki):
    return servers.start("--handlers", "tests.handlers.sec_ops", "--auth-tokens-file", pki.tokens, "--auth-timeout", "1.5")


@pytest.fixture(scope="module")
def on_auth_server(servers):
    return servers.start("--handlers", "tests.handlers.sec_auth")


def raw(server, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection((server.host, server.port), timeout=timeout)


_unread: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # bytes read past the lines asked for


def read_lines(sock, count: int, timeout: float = 20.0) -> list[bytes]:
    """``count`` lines from a blocking socket (or fewer if it closes); what came after them is
    kept for the next call."""
    deadline = time.monotonic() + timeout
    data = _unread.pop(sock, b"")
    while data.count(b"\n") < count:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        more = sock.recv(65536)
        if not more:
            break
        data += more
    lines = data.split(b"\n")
    _unread[sock] = b"\n".join(lines[count:]) if len(lines) > count else b""
    return lines[:min(count, len(lines) - 1)]


def closed_by_server(sock, timeout: float = 15.0) -> bytes:
    """Read until the server closes the connection; returns what came before."""
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"connection not closed by the server within {timeout}s (got {data[:200]!r})"
        sock.settimeout(remaining)
        try:
            more = sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError):
            return data
        if not more:
            return data
        data += more


# -- TLS ------------------------------------------------------------------------------------


def test_tls_echo_pipelining_pushes_and_large_frames(tls_server, pki):
    welcomes, items = [], []
    with Client(tls_server.host, tls_server.port, ssl=context(pki)) as client:
        client.on("welcome", welcomes.append)
        client.on("item", items.append)
        assert client.call("echo", {"x": 1}) == {"x": 1}
        answers = []
        for n in range(300):  # pipelined: all sent before the first answer is read
            client.rpc("echo", {"n": n}, lambda op, data: answers.append((op, data)))
        wait_until(lambda: client.poll(0.05) or len(answers) == 300, what="300 pipelined answers")
        assert answers == [("OKAY", {"n": n}) for n in range(300)]
        assert client.call("pushes", {"count": 200, "pad": 100}) == {"pushed": 200}
        wait_until(lambda: client.poll(0.05) or len(items) == 200, what="200 pushes")
        assert [item["index"] for item in items] == list(range(200))
        big = "y" * 300_000  # many TLS records (at most 16 KiB each) one way and the other
        assert client.call("echo", {"big": big}) == {"big": big}
    assert welcomes and welcomes[0]["identity"] is None  # TLS without client certificates: no identity


def test_many_small_frames_in_one_tls_write_are_all_answered(tls_server, pki):
    """The pending() case: 2000 frames in one write (records of 16 KiB, each holding hundreds of
    frames) and nothing after it: every one is answered without the client sending more."""
    sock = context(pki).wrap_socket(raw(tls_server), server_hostname="127.0.0.1")
    with sock:
        read_lines(sock, 1)  # the welcome push
        sock.sendall(b"".join(b'echo{"n":%d}\n' % n for n in range(2000)))
        lines = read_lines(sock, 2000)
        assert lines == [b'OKAY{"n":%d}' % n for n in range(2000)]


def test_bytes_left_in_the_tls_layer_by_the_request_budget_are_read_without_more_input(fresh_servers, pki, tmp_path):
    """Past max_total_request_bytes a read takes a few KiB: the rest of a 16 KiB TLS record stays
    decrypted inside the SSL socket, where no selector event announces it (the pending() case
    with the budget stopping the drain). It must be read anyway, here and after a pause."""
    server = fresh_servers.start("--handlers", "tests.handlers.sec_ops", "--certfile", pki.cert, "--keyfile", pki.key,
                                 "--max-total-request-bytes", "1024", workers=2)
    release = tmp_path / "release"
    with Client(server.host, server.port, ssl=context(pki)) as holder:
        holder.rpc("hold", {"until": str(release), "pad": "p" * 4000})  # holds 4 KB: over the budget
        sock = context(pki).wrap_socket(raw(server), server_hostname="127.0.0.1")
        with sock:
            read_lines(sock, 1)  # the welcome push
            # One TLS record (< 16 KiB), nothing after it: the kernel holds nothing more to read.
            sock.sendall(b"".join(b'echo{"n":%d}\n' % n for n in range(1000)))
            assert read_lines(sock, 1000) == [b'OKAY{"n":%d}' % n for n in range(1000)]
        release.touch()
        wait_until(lambda: holder.poll(0.05) or holder.pending() == 0, what="the hold answered")


def test_plain_text_to_the_tls_port_is_closed_at_once(tls_server):
    with raw(tls_server) as sock:
        sock.sendall(b'echo{"x":1}\n')
        assert b"OKAY" not in closed_by_server(sock, timeout=10)
    tls_server.wait_log(r"TLS handshake with .* failed")


def _client_hello() -> bytes:
    out = ssl.MemoryBIO()
    hello = ssl.create_default_context().wrap_bio(ssl.MemoryBIO(), out, server_hostname="127.0.0.1")
    with pytest.raises(ssl.SSLWantReadError):
        hello.do_handshake()
    return out.read()


def test_silent_and_trickling_handshakes_are_closed_at_the_timeout_while_others_are_served(tls_server, pki):
    hello = _client_hello()
    silent = raw(tls_server)
    trickle = raw(tls_server)
    served = 0
    with silent, trickle, Client(tls_server.host, tls_server.port, ssl=context(pki)) as client:
        trickle.setblocking(False)
        deadline = time.monotonic() + 30
        for byte in hello:  # one byte at a time, each a few tenths of a second apart
            try:
                trickle.send(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            assert client.call("echo", {"served": served}) == {"served": served}  # never held up
            served += 1
            with selectors.DefaultSelector() as waiter:
                waiter.register(trickle, selectors.EVENT_READ)
                if waiter.select(0.3):  # (paces the trickle; readable = closed by the server)
                    break
            assert time.monotonic() < deadline, "the trickling handshake was never closed"
        assert served < len(hello)  # closed long before the ClientHello was complete
        trickle.setblocking(True)
        closed_by_server(trickle)
        closed_by_server(silent)
        assert client.call("echo", {"after": True}) == {"after": True}
    tls_server.wait_log(r"not finished within 1\.5s \(tls_handshake_timeout\)", count=2)


def test_connections_reset_before_they_are_accepted_do_not_end_a_tls_server(fresh_servers, pki):
    """wrap_socket looks at the peer: for a connection reset while it waited in the listen queue
    it raised ConnectionResetError, which ended the acceptor (a port scan, a client timing out)."""
    server = fresh_servers.start("--handlers", "tests.handlers.sec_ops", "--certfile", pki.cert, "--keyfile", pki.key)
    server.send(signal.SIGSTOP)  # nothing is accepted meanwhile: every reset comes first
    try:
        for n in range(20):
            sock = raw(server)
            if n % 2:
                sock.sendall(b"\x16\x03\x01")  # (some bytes of a ClientHello before the reset)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # a reset (RST), not a FIN
        raw(server).close()  # and one closed the usual way
    finally:
        server.send(signal.SIGCONT)
    with Client(server.host, server.port, ssl=context(pki)) as client:
        assert client.call("echo", {"after": "resets"}) == {"after": "resets"}
    assert server.proc.poll() is None


# -- mutual TLS -------------------------------------------------------------------------------


def test_mutual_tls_accepts_a_good_client_certificate_and_names_its_identity(mtls_server, pki):
    welcomes = []
    with Client(mtls_server.host, mtls_server.port, ssl=context(pki, client=(pki.alice_cert, pki.alice_key))) as client:
        client.on("welcome", welcomes.append)
        assert client.call("whoami") == {"identity": "alice"}
        client.poll(0.01)
    assert welcomes[0]["identity"] == "alice"


@pytest.mark.parametrize("client_cert", [None, "mallory"], ids=["no certificate", "other CA"])
def test_mutual_tls_refuses_no_certificate_and_one_from_another_ca(mtls_server, pki, client_cert):
    ctx = context(pki, client=(pki.mallory,) if client_cert else None)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        with Client(mtls_server.host, mtls_server.port, ssl=ctx) as client:
            client.call("whoami", timeout=10)
    mtls_server.wait_log(r"TLS handshake with .* failed")


# -- token authentication ---------------------------------------------------------------------


def test_a_good_token_authenticates_and_names_the_identity(token_server):
    with Client(token_server.host, token_server.port, token=GOOD_TOKEN) as client:
        assert client.identity == "alice"
        assert client.call("whoami") == {"identity": "alice"}
    with Client(token_server.host, token_server.port, token=BARE_TOKEN) as client:
        assert client.identity == "token-4"  # a bare token is named by its line
    assert GOOD_TOKEN not in token_server.log() and BARE_TOKEN not in token_server.log()


def test_nothing_reaches_a_connection_before_it_authenticates_then_on_connect_runs(token_server):
    with raw(token_server) as waiting, Client(token_server.host, token_server.port, token=GOOD_TOKEN) as other:
        other.call("broadcast", {"to": "everyone"})  # not to the unauthenticated connection
        waiting.sendall(b'auth{"token":"%s"}\n' % GOOD_TOKEN.encode())
        okay, welcome = read_lines(waiting, 2)
        assert json.loads(okay[4:]) == {"identity": "alice"} and okay.startswith(b"OKAY")
        assert welcome.startswith(b"welcome") and json.loads(welcome[7:])["identity"] == "alice"


@pytest.mark.parametrize("server_name", ["token_server", "on_auth_server"])
def test_frames_pipelined_behind_a_good_auth_frame_run_after_it(request, server_name):
    server = request.getfixturevalue(server_name)
    auth = b'auth{"token":"%s"}\n' % GOOD_TOKEN.encode() if server_name == "token_server" else (
        b'auth{"user":"bob","password":"builder"}\n')
    with raw(server) as sock:
        sock.sendall(auth + b"".join(b'echo{"n":%d}\n' % n for n in range(3)))  # one write, one read
        okay, welcome, *answers = read_lines(sock, 5)
    assert okay.startswith(b'OKAY{"identity":') and welcome.startswith(b"welcome")
    assert answers == [b'OKAY{"n":%d}' % n for n in range(3)]


@pytest.mark.parametrize("first", [b'auth{"token":"wrong"}\n', b"auth{}\n", b'echo{"x":1}\n', b"auth\n", b"a" * 16385,
                                   b'auth{"token":' + b"[" * 16000 + b"\n"],
                         ids=["wrong token", "no token", "frame before auth", "auth without data", "no line end in 16 KiB",
                              "JSON nested deeper than the parser's recursion limit"])
def test_a_bad_or_missing_token_gets_unauthorized_and_the_connection_is_closed(token_server, first):
    with raw(token_server) as sock:
        sock.sendall(first + b'echo{"x":2}\n')
        answer = closed_by_server(sock)
    assert answer.count(b"\n") == 1 and answer.startswith(b"FAIL"), answer
    assert json.loads(answer[4:])["reason"] == "Unauthorized"
    token_server.wait_log(r"authentication failed from \('127\.0\.0\.1', \d+\)")


def test_an_auth_frame_nested_past_the_recursion_limit_is_refused_and_the_server_goes_on(token_server):
    """json.loads raises RecursionError, not ValueError, for deep nesting: one unauthenticated
    frame of a few KiB ended the acceptor (and every connection with it)."""
    with raw(token_server) as sock:
        sock.sendall(b'auth{"token":' + b"[" * 5000 + b"\n")
        answer = closed_by_server(sock)
    assert answer.startswith(b"FAIL") and json.loads(answer[4:])["reason"] == "Unauthorized", answer
    with Client(token_server.host, token_server.port, token=GOOD_TOKEN) as client:
        assert client.call("echo", {"after": 1}) == {"after": 1}


def test_the_client_raises_unauthorized_for_a_wrong_token_and_for_a_call_without_one(token_server):
    with pytest.raises(RemoteError) as refused:
        Client(token_server.host, token_server.port, token="guess")
    assert refused.value.reason == "Unauthorized"
    with Client(token_server.host, token_server.port) as client:
        with pytest.raises(RemoteError) as refused:
            client.call("echo", {})
        assert refused.value.reason == "Unauthorized"
        with pytest.raises(ConnectionError):
            client.call("echo", {}, timeout=10)


def test_a_wrong_tokens_answer_is_held_back_without_delaying_anyone_else(token_server):
    with raw(token_server) as guesser:
        guesser.sendall(b'auth{"token":"guess"}\n')
        with Client(token_server.host, token_server.port, token=GOOD_TOKEN) as client:
            for n in range(5):
                assert client.call("echo", {"n": n}) == {"n": n}
        with selectors.DefaultSelector() as waiter:
            waiter.register(guesser, selectors.EVENT_READ)
            assert not waiter.select(0), "the refusal came before another client was served"
        answer = closed_by_server(guesser)
    assert json.loads(answer[4:])["reason"] == "Unauthorized"


def test_a_connection_that_does_not_authenticate_is_closed_at_auth_timeout(token_server):
    with raw(token_server) as silent:
        assert closed_by_server(silent) == b""
    token_server.wait_log(r"not authenticated within 1\.5s \(auth_timeout\)")


def test_unauthenticated_connections_count_against_max_connections(fresh_servers, pki):
    server = fresh_servers.start("--handlers", "tests.handlers.sec_ops", "--auth-tokens-file", pki.tokens,
                                 "--max-connections", "2")
    with raw(server) as first, raw(server):
        with pytest.raises(RemoteError) as refused:
            Client(server.host, server.port, token=GOOD_TOKEN)
        assert refused.value.reason == "TooManyConnections"
        first.sendall(b'auth{"token":"%s"}\n' % GOOD_TOKEN.encode())
        assert read_lines(first, 1)[0].startswith(b"OKAY")


def test_an_authenticated_connection_is_idle_from_its_authentication_not_from_its_accept(tmp_path):
    """The idle sweep counted from the accept: a client that took longer than idle_timeout to
    authenticate (a TLS handshake, then its token; a slow on_auth) was closed by the next sweep,
    right after its OKAY. Driven by hand, with the acceptor's clock set."""
    tokens = _write(tmp_path / "tokens", f"alice:{GOOD_TOKEN}\n".encode())
    settings = Settings().with_changes(idle_timeout=1.0, auth_tokens_file=tokens)
    with selectors.DefaultSelector() as selector:
        acceptor = Acceptor(settings, selector, Timers())
        acceptor.set_handler_info({"concurrent": [], "connect": False, "disconnect": False})
        acceptor.now = 100.0
        with socket.create_server(("127.0.0.1", 0)) as listener:
            client = socket.create_connection(listener.getsockname())
            sock, peer = listener.accept()
        conn = acceptor.add_connection(sock, peer)
        with client:
            acceptor.now = 105.0  # its token comes 5 s later (within auth_timeout)
            client.sendall(b'auth{"token":"%s"}\n' % GOOD_TOKEN.encode())
            wait_until(lambda: acceptor.on_read(conn) or conn.gate is None, what="the auth frame read")
            acceptor.flush()
            assert read_lines(client, 1)[0].startswith(b"OKAY")
            acceptor.now = 105.5
            acceptor._sweep_idle()
            assert conn.state == OPEN
            acceptor.close(conn, "test")


def test_a_refusal_held_back_is_still_sent_when_auth_timeout_comes_first(tmp_path):
    """A wrong token sent in auth_timeout's last second: the answer, held back a second, was lost
    to the auth_timeout close (no answer at all). Driven by hand, the timers run as if later."""
    tokens = _write(tmp_path / "tokens", f"alice:{GOOD_TOKEN}\n".encode())
    settings = Settings().with_changes(auth_timeout=0.5, auth_tokens_file=tokens)
    with selectors.DefaultSelector() as selector:
        acceptor = Acceptor(settings, selector, Timers())
        acceptor.set_handler_info({"concurrent": [], "connect": False, "disconnect": False})
        with socket.create_server(("127.0.0.1", 0)) as listener:
            client = socket.create_connection(listener.getsockname())
            sock, peer = listener.accept()
        conn = acceptor.add_connection(sock, peer)
        with client:
            client.sendall(b'auth{"token":"guess"}\n')
            wait_until(lambda: acceptor.on_read(conn) or conn.gate.taken, what="the auth frame read")
            acceptor.timers.run_due(time.monotonic() + 0.6)  # auth_timeout has passed
            acceptor.timers.run_due(time.monotonic() + 1.1)  # and the refusal's second
            acceptor.flush()
            answer = closed_by_server(client)
        assert answer.startswith(b"FAIL") and json.loads(answer[4:])["reason"] == "Unauthorized", answer


def test_a_replay_read_by_a_selector_event_before_its_read_ready_turn_does_not_end_the_acceptor():
    """on_auth's OKAY can come from a timer (sweep_journal, a worker holding it back behind a slow
    RPC): the bytes pipelined behind the auth frame wait in read_ready for the next loop pass,
    and a selector event of the connection can read them first. read_ready then held a plain
    connection whose socket had no ``queued``: AttributeError in the acceptor's loop."""
    with selectors.DefaultSelector() as selector:
        acceptor = Acceptor(Settings(), selector, Timers())
        acceptor.set_handler_info({"concurrent": [], "connect": False, "disconnect": False, "auth": True})
        with socket.create_server(("127.0.0.1", 0)) as listener:
            client = socket.create_connection(listener.getsockname())
            sock, peer = listener.accept()
        conn = acceptor.add_connection(sock, peer)
        with client:
            client.sendall(b'auth{"user":"bob"}\necho{"n":1}\n')
            wait_until(lambda: acceptor.on_read(conn) or conn.gate.taken, what="the auth frame read")
            [job] = acceptor.scheduler.take_batch(10)
            acceptor.on_reply(job, 0, 1, b'OKAY{"identity":"bob"}\n', [], ipc.UNCHANGED)  # (as from a timer)
            acceptor.job_done(job)
            assert acceptor.read_ready == [conn]
            acceptor.on_read(conn)  # a selector event first: it reads echo{"n":1}
            assert conn.next_seq == 2
            acceptor.serve_read_ready()
            client.sendall(b'echo{"n":2}\n')
            wait_until(lambda: acceptor.on_read(conn) or conn.next_seq == 3, what="the next frame read")
            acceptor.close(conn, "test")


# -- @handlers.on_auth ---------------------------------------------------------------------------


def test_on_auth_accepts_and_its_identity_reaches_handlers(on_auth_server):
    welcomes = []
    with Client(on_auth_server.host, on_auth_server.port) as client:
        client.on("welcome", welcomes.append)
        answer = client.call("auth", {"user": "alice", "password": "wonderland"})
        assert answer == {"identity": {"user": "alice", "role": "admin"}}
        assert client.call("whoami") == answer
        client.poll(0.01)
    assert welcomes == [{"net_id": welcomes[0]["net_id"], "identity": {"user": "alice", "role": "admin"}}]


def test_on_auth_sees_the_client_certificate_name_with_mutual_tls(fresh_servers, pki):
    server = fresh_servers.start("--handlers", "tests.handlers.sec_auth", "--certfile", pki.cert, "--keyfile", pki.key,
                                 "--ca-certs", pki.ca)
    with Client(server.host, server.port, ssl=context(pki, client=(pki.alice_cert, pki.alice_key))) as client:
        answer = client.call("auth", {"user": "bob", "password": "builder"})
        assert answer == {"identity": {"user": "bob", "role": "user", "cert": "alice"}}
        assert client.call("whoami") == answer  # on_auth's value replaces the certificate's name


def test_on_auth_refuses_with_its_own_reason_then_closes(on_auth_server):
    leaks = []
    with Client(on_auth_server.host, on_auth_server.port) as client:
        client.on("leak", leaks.append)
        with pytest.raises(RemoteError) as refused:
            client.call("auth", {"user": "alice", "password": "guess"})
        assert refused.value.reason == "BadPassword"
        with pytest.raises(ConnectionError):
            client.call("echo", {}, timeout=10)
    assert leaks == []  # on_auth's pushes never reach an unauthenticated client
    with raw(on_auth_server) as sock:
        sock.sendall(b'echo{"x":1}\n')
        assert json.loads(closed_by_server(sock)[4:])["reason"] == "Unauthorized"


def test_an_identity_nested_too_deep_for_the_acceptor_is_refused_and_the_server_goes_on(on_auth_server):
    """The acceptor decodes on_auth's identity and pickles it into every job, deeper in its stack
    than the worker that encoded it: an identity nested ~900 levels ended the acceptor."""
    socks = [raw(on_auth_server) for _ in range(12)]
    for depth, sock in zip(range(850, 1000, 13), socks):
        sock.sendall(b'auth{"nest":%d}\nwhoami{}\n' % depth)
    for sock in socks:
        with sock:
            answer = closed_by_server(sock)
        assert answer.count(b"\n") == 1 and json.loads(answer[4:])["reason"] == "Unknown", answer
    with raw(on_auth_server) as sock:  # 100 levels is still an identity
        sock.sendall(b'auth{"nest":100}\n')
        assert read_lines(sock, 1)[0].startswith(b'OKAY{"identity":[[[')
    with Client(on_auth_server.host, on_auth_server.port) as client:
        assert client.call("auth", {"user": "bob", "password": "builder"})["identity"]["user"] == "bob"


# -- clients, CLI, reload, warnings -----------------------------------------------------------------


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "simplerpc_mp", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def full_server(fresh_servers, pki, tmp_path):
    """Mutual TLS and tokens, files of its own (a test may rotate them)."""
    cert = _write(tmp_path / "server.pem", open(pki.cert, "rb").read(), 0o644)
    key = _write(tmp_path / "server.key", open(pki.key, "rb").read())
    tokens = _write(tmp_path / "tokens", f"ci:{GOOD_TOKEN}\n".encode())
    server = fresh_servers.start("--handlers", "tests.handlers.sec_ops", "--certfile", cert, "--keyfile", key,
                                 "--ca-certs", pki.ca, "--auth-tokens-file", tokens)
    server.files = SimpleNamespace(cert=cert, key=key, tokens=tokens)
    return server


def test_clients_and_cli_connect_with_every_option(full_server, pki, tmp_path):
    address = f"{full_server.host}:{full_server.port}"
    alice = (pki.alice_cert, pki.alice_key)
    token_file = _write(tmp_path / "client-token", f"# mine\n{GOOD_TOKEN}\n".encode())
    wrong_file = _write(tmp_path / "wrong-token", b"nope\n")
    # the blocking client: the token's name wins over the certificate's
    with Client(full_server.host, full_server.port, ssl=context(pki, client=alice), token=GOOD_TOKEN) as client:
        assert client.call("whoami") == {"identity": "ci"}
    # the seed's callback style on the same client: ClientHandler, rpc with a callback
    handler, seen = ClientHandler(), []
    handler.on("OKAY", lambda client, data: seen.append(data))
    with Client(full_server.host, full_server.port, handler, ssl=context(pki, client=alice), token=GOOD_TOKEN) as client:
        client.rpc("echo", {"seed": 1}, lambda op, data: seen.append((op, data)))
        wait_until(lambda: client.poll(0.05) or len(seen) >= 3, what="the callbacks")
    assert seen[-2:] == [{"seed": 1}, ("OKAY", {"seed": 1})]
    # ssl=True verifies against the system's CAs, which do not know this server's
    with pytest.raises(ssl.SSLCertVerificationError):
        Client(full_server.host, full_server.port, ssl=True, token=GOOD_TOKEN)

    async def with_asyncio():
        async with AsyncClient(full_server.host, full_server.port, ssl=context(pki, client=alice), token=GOOD_TOKEN) as client:
            assert client.identity == "ci"
            assert await client.call("echo", {"a": 1}) == {"a": 1}
        with pytest.raises(RemoteError) as refused:
            await AsyncClient(full_server.host, full_server.port, ssl=context(pki, client=alice), token="nope").connect()
        assert refused.value.reason == "Unauthorized"

    asyncio.run(with_asyncio())
    tls_args = ["--ca-certs", pki.ca, "--certfile", pki.alice_cert, "--keyfile", pki.alice_key]
    done = _cli("call", address, "whoami", "--tls", *tls_args, "--token-file", token_file)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"identity": "ci"}
    done = _cli("call", address, "whoami", *tls_args, "--token-file", wrong_file)
    assert done.returncode == 1 and json.loads(done.stdout)["FAIL"]["reason"] == "Unauthorized"
    done = _cli("call", address, "whoami", "--tls", "--token-file", token_file)  # the system's CAs: refused
    assert done.returncode == 3 and "CERTIFICATE_VERIFY_FAILED" in done.stderr.upper().replace(" ", "_")
    done = _cli("bench", address, "--duration", "0.5", "--conns", "2", "--depth", "4", "--json", *tls_args,
                "--token-file", token_file)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["answered"] > 0 and not summary["fails"], summary


def test_hup_rotates_tokens_and_the_certificate(full_server, pki):
    alice = (pki.alice_cert, pki.alice_key)
    before = Client(full_server.host, full_server.port, ssl=context(pki, client=alice), token=GOOD_TOKEN)
    with before:
        files = full_server.files
        with open(files.tokens, "w") as f:
            f.write("ci:rotated-token\n")
        with open(files.cert, "wb") as f:
            f.write(pki.cert2)
        with open(files.key, "wb") as f:
            f.write(pki.key2)
        full_server.send(signal.SIGHUP)
        full_server.wait_log(r"reload: TLS certificate loaded")
        full_server.wait_log(r"reload: 1 tokens loaded")
        assert before.call("echo", {"still": "open"}) == {"still": "open"}  # keeps its TLS session
    new_ca = context(pki, cafile=pki.other_ca, client=alice)
    with Client(full_server.host, full_server.port, ssl=new_ca, token="rotated-token") as client:
        assert client.call("whoami") == {"identity": "ci"}
    with pytest.raises(RemoteError):
        Client(full_server.host, full_server.port, ssl=new_ca, token=GOOD_TOKEN)
    with pytest.raises(ssl.SSLCertVerificationError):  # the old certificate is no longer served
        Client(full_server.host, full_server.port, ssl=context(pki, client=alice), token="rotated-token")
    assert "rotated-token" not in full_server.log()


def test_an_encrypted_key_at_hup_is_refused_without_waiting_for_a_pass_phrase(pki, tmp_path):
    """OpenSSL asks for an encrypted key's pass phrase on the controlling terminal: a server run
    from a shell blocked its whole loop there at the HUP. It is logged, the old context kept."""
    from cryptography.hazmat.primitives import serialization

    cert = _write(tmp_path / "server.pem", open(pki.cert, "rb").read(), 0o644)
    key = _write(tmp_path / "server.key", open(pki.key, "rb").read())
    master, slave = pty.openpty()
    terminal = os.ttyname(slave)

    def with_a_terminal():  # as a server started from a shell has
        os.setsid()
        os.open(terminal, os.O_RDWR)  # a session leader's first terminal becomes its controlling one

    server = RunningServer(["--host", "127.0.0.1", "--port", "0", "--workers", "1", "--handlers", "tests.handlers.sec_ops",
                            "--certfile", cert, "--keyfile", key], preexec_fn=with_a_terminal)
    try:
        server.wait_ready()
        with Client(server.host, server.port, ssl=context(pki)) as client:
            private = serialization.load_pem_private_key(open(pki.key, "rb").read(), None)
            _write(tmp_path / "server.key", private.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"pass phrase")))
            server.send(signal.SIGHUP)
            server.wait_log(r"reload: TLS context not changed: .*the private key is encrypted")
            assert client.call("echo", {"after": "hup"}, timeout=10) == {"after": "hup"}
        with Client(server.host, server.port, ssl=context(pki)) as client:  # the old context serves
            assert client.call("echo", {"new": "connection"}, timeout=10) == {"new": "connection"}
    finally:
        server.kill()  # (before the terminal goes: its hang-up would be a SIGHUP)
        os.close(master)
        os.close(slave)


def test_a_non_loopback_bind_without_tls_or_auth_logs_one_warning(fresh_servers):
    server = RunningServer(["--host", "0.0.0.0", "--port", "0", "--workers", "1", "--handlers", "tests.handlers.sec_ops"])
    fresh_servers.started.append(server)
    server.wait_ready()
    log = server.wait_log(r"WARNING .*listening on 0\.0\.0\.0 without TLS or authentication")
    assert log.count("without TLS or authentication") == 1


def test_the_start_up_log_says_what_is_on(tls_server, mtls_server, token_server, on_auth_server, pki):
    tls_server.wait_log(r"INFO .*TLS on: certificate \S+server\.pem")
    mtls_server.wait_log(r"TLS on: certificate \S+, client certificates signed by \S+ca\.pem required")
    token_server.wait_log(r"authentication on: 2 tokens from \S+tokens")
    on_auth_server.wait_log(r"authentication on: @handlers\.on_auth")
    for server in (tls_server, mtls_server, token_server, on_auth_server):
        assert "without TLS or authentication" not in server.log()  # (bound to 127.0.0.1 anyway)


def test_check_validates_the_files_one_line_per_problem(pki, tmp_path):
    missing = str(tmp_path / "missing.pem")
    bad_tokens = _write(tmp_path / "bad-tokens", b"alice:\n")
    done = _cli("check", "--certfile", missing, "--auth-tokens-file", bad_tokens)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(errors) == 2, done.stderr
    assert "missing.pem" in errors[0] and "line 1" in errors[1]
    open_tokens = _write(tmp_path / "open-tokens", f"alice:{GOOD_TOKEN}\n".encode(), 0o644)
    done = _cli("check", "--certfile", pki.cert, "--keyfile", pki.key, "--ca-certs", pki.ca,
                "--auth-tokens-file", open_tokens)
    assert done.returncode == 0, done.stderr
    assert "readable by every user" in done.stderr and "open-tokens" in done.stderr
    assert "# tls: on" in done.stdout and "# auth: 1 tokens" in done.stdout
    assert GOOD_TOKEN not in done.stdout + done.stderr


def test_a_graceful_stop_reads_no_auth_frame_from_a_gated_connection(fresh_servers, pki, tmp_path):
    """TERM stops reading every connection, those at the gate too: an auth frame sent after it
    admits no one (no OKAY, no on_connect); the connection is closed at the stop."""
    from simplerpc_mp import control

    sock_path = str(tmp_path / "control.sock")
    server = fresh_servers.start("--handlers", "tests.handlers.sec_ops", "--auth-tokens-file", pki.tokens,
                                 "--control-socket", sock_path)
    until = tmp_path / "go"
    auth = b'auth{"token":"%s"}\n' % GOOD_TOKEN.encode()
    with raw(server) as busy, raw(server) as gated:
        busy.sendall(auth + b'hold{"until":"%s"}\n' % str(until).encode())
        assert read_lines(busy, 2)[0].startswith(b"OKAY")  # authenticated, welcome pushed; hold runs
        server.send(signal.SIGTERM)
        server.wait_log("stopping gracefully")
        gated.sendall(auth)
        # A round trip through the same loop: it has seen the auth frame's bytes by the time this answers.
        assert control.request(sock_path, {"cmd": "stats"})["ok"]
        until.touch()
        assert read_lines(busy, 1) == [b'OKAY{"held":0}']
        assert closed_by_server(gated) == b""
    assert server.stop() == 0


def test_an_auth_frame_still_being_checked_at_stop_now_gets_shutting_down(fresh_servers, tmp_path):
    """QUIT while on_auth runs: the auth frame (RPC 0) gets FAIL ShuttingDown, as every RPC
    without an answer does, before the connection closes."""
    from simplerpc_mp import control

    sock_path = str(tmp_path / "control.sock")
    server = fresh_servers.start("--handlers", "tests.handlers.sec_auth", "--control-socket", sock_path)
    with raw(server) as sock:
        sock.sendall(b'auth{"user":"bob","password":"builder","until":"%s"}\n' % str(tmp_path / "never").encode())
        wait_until(lambda: any(w.get("op") == "auth" for w in control.request(sock_path, {"cmd": "stats"})["stats"]["workers"]),
                   what="on_auth running")
        server.send(signal.SIGQUIT)
        answer = closed_by_server(sock)
    assert answer.startswith(b"FAIL") and json.loads(answer[4:])["reason"] == "ShuttingDown", answer
    server.stop()
