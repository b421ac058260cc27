"""The client library against a real server: the blocking ``Client`` (``call``, push callbacks, the
seed's callback style) and the asyncio ``AsyncClient``. pytest-asyncio is not used: async tests
are sync tests that call ``asyncio.run``.
"""

from __future__ import annotations

import asyncio
import gc
import json
import signal
import socket
import threading
import time

import pytest

from simplerpc_mp import AsyncClient, Client, ClientHandler, RemoteError
from simplerpc_mp.errors import FrameTooLarge, MalformedPayload
from tests.conftest import RunningServer, wait_until


@pytest.fixture(scope="module")
def server():
    """One server with tests/handlers/basic.py, shared by the tests that leave it as they found it."""
    running = RunningServer(["--host", "127.0.0.1", "--port", "0", "--workers", "2", "--handlers", "tests.handlers.basic"])
    try:
        yield running.wait_ready()
    finally:
        running.kill()


def poll_until(client: Client, predicate, timeout: float = 10.0, what: str = "frames"):
    """Let ``client`` process incoming frames until ``predicate()`` holds."""
    return wait_until(lambda: client.poll(0.05) or predicate(), timeout, what=what)


# -- Client.call -------------------------------------------------------------------------------


def test_call_returns_the_okay_dict(server):
    with Client(server.host, server.port) as client:
        assert client.call("echo", {"a": [1, {"b": None}], "s": "ü€"}) == {"a": [1, {"b": None}], "s": "ü€"}
        assert client.call("echo") == {}
        assert client.call("scalar", {"value": 7}) == {"result": 7}
        assert client.pending() == 0


def test_call_raises_remote_error_with_reason_and_message(server):
    with Client(server.host, server.port) as client:
        with pytest.raises(RemoteError) as info:
            client.call("custom_fail", {"msg": "bad input"})
        assert (info.value.reason, info.value.message) == ("Custom", "bad input")
        with pytest.raises(RemoteError) as info:
            client.call("boom")
        assert (info.value.reason, info.value.message) == ("Unknown", "Unknown Server Error")
        with pytest.raises(RemoteError) as info:
            client.call("no_such_op", {})
        assert info.value.reason == "UnknownOpcode"
        # A FAIL does not break the connection.
        assert client.call("echo", {"ok": 1}) == {"ok": 1}


def test_call_timeout_raises_and_the_connection_stays_usable(server):
    with Client(server.host, server.port) as client:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            client.call("slow", {"s": 0.5, "i": "late"}, timeout=0.1)
        assert time.monotonic() - started < 0.45
        # The late answer belongs to the timed-out call: it is dropped, not given to the next one.
        assert client.call("echo", {"i": "next"}) == {"i": "next"}
        assert client.call("echo", {"i": "after"}) == {"i": "after"}
        assert client.pending() == 0


def test_push_callbacks_with_on(server):
    with Client(server.host, server.port) as client:
        welcomes, notes = [], []
        client.on("welcome", welcomes.append)  # basic.py pushes welcome{"net_id"} on connect
        client.on("note", notes.append)
        net_id = client.call("whoami")["net_id"]
        assert welcomes == [{"net_id": net_id}]  # it came before the answer, so it is here already
        client.call("push_self", {"n": 1})
        client.call("push_self", {"n": 2})
        poll_until(client, lambda: len(notes) == 2, what="two notes")
        assert notes == [{"to": "self", "n": 1}, {"to": "self", "n": 2}]


def test_pipelined_rpcs_with_callbacks_are_answered_in_order(server):
    with Client(server.host, server.port) as client:
        answers = []
        count = 400  # more than the server's max_inflight (128): sending must not deadlock
        for i in range(count):
            op = "custom_fail" if i % 50 == 7 else ("cecho" if i % 2 else "echo")
            client.rpc(op, {"i": i, "msg": f"m{i}"}, lambda answer_op, data, i=i: answers.append((i, answer_op, data)))
        poll_until(client, lambda: len(answers) == count, what="every answer")
        for i, answer_op, data in answers:
            if i % 50 == 7:
                assert (answer_op, data) == ("FAIL", {"reason": "Custom", "message": f"m{i}"})
            else:
                assert (answer_op, data) == ("OKAY", {"i": i, "msg": f"m{i}"})
        assert [i for i, _, _ in answers] == list(range(count))


# -- the seed's callback style -----------------------------------------------------------------


def test_seed_callback_style(server):
    events = []
    with Client(server.host, server.port) as client:
        client.handler.on("welcome", lambda c, data: events.append(("welcome", c is client, data["net_id"])))
        client.handler.on("OKAY", lambda c, data: events.append(("OKAY", data)))
        client.handler.on("FAIL", lambda c, data: events.append(("FAIL", data["reason"])))
        client.on_fail(lambda data: events.append(("on_fail", data["reason"])))
        client.rpc("echo", {"i": 1})
        client.rpc("custom_fail", {"msg": "x"})
        client.send("echo", {"i": 2})  # the seed's other spelling
        poll_until(client, lambda: len(events) == 5, what="the answers")
    assert events[0][:2] == ("welcome", True)
    assert events[1] == ("OKAY", {"i": 1})
    assert sorted(events[2:4]) == [("FAIL", "Custom"), ("on_fail", "Custom")]  # both hooks see the FAIL
    assert events[4] == ("OKAY", {"i": 2})


def test_seed_handler_object_passed_to_the_constructor(server):
    handler = ClientHandler()
    seen = []
    handler.on("welcome", lambda c, data: seen.append(data))
    with Client(server.host, server.port, handler) as client:
        assert client.handler is handler
        net_id = client.call("whoami")["net_id"]
        assert seen == [{"net_id": net_id}]


def test_connect_and_disconnect_callbacks_with_connect_false(server):
    events = []
    client = Client(server.host, server.port, connect=False)
    client.on_connect(lambda: events.append("connect"))
    client.on_disconnect(lambda: events.append("disconnect"))
    client.connect()
    assert events == ["connect"]
    assert client.call("echo", {"x": 1}) == {"x": 1}
    client.close()
    assert events == ["connect", "disconnect"]
    client.close()  # idempotent
    assert events == ["connect", "disconnect"]


def test_seed_sample_on_connect_registered_after_construction(server):
    """The seed's sample builds the client, then registers on_connect, then runs start(): its
    on_connect callback ran (asyncore reported the connection from inside the loop)."""
    events = []
    client = Client(server.host, server.port)
    try:
        client.on_connect(lambda: events.append("connect"))
        client.handler.on("welcome", lambda c, data: events.append("welcome"))
        poll_until(client, lambda: "welcome" in events, what="welcome")
    finally:
        client.close()
    assert events[0] == "connect" and events.count("connect") == 1


def test_start_returns_when_the_server_closes(start_server):
    """The seed's blocking loop: callbacks run inside ``start()``, which returns once the server
    has closed the connection (here: a graceful stop asked for from a callback)."""
    running = start_server("--handlers", "tests.handlers.basic")
    events = []
    client = Client(running.host, running.port)
    client.on_disconnect(lambda: events.append("disconnect"))

    def on_welcome(c, data):
        events.append("welcome")
        c.rpc("echo", {"last": True})

    def on_okay(c, data):
        events.append(("OKAY", data))
        running.send(signal.SIGTERM)  # the server answers what it has, then closes

    client.handler.on("welcome", on_welcome)
    client.handler.on("OKAY", on_okay)
    client.start()
    assert events == ["welcome", ("OKAY", {"last": True}), "disconnect"]
    assert not client.connected
    with pytest.raises(ConnectionError):
        client.call("echo")
    assert running.proc.wait(30) == 0


def test_call_on_a_closed_connection_raises(start_server):
    running = start_server("--handlers", "tests.handlers.basic")
    with Client(running.host, running.port) as client:
        client.call("echo")
        running.stop(signal.SIGTERM)
        with pytest.raises(ConnectionError):
            client.call("echo", {}, timeout=10)


class OneConnectionServer:
    """A plain listening socket in a thread that answers each line it reads with the next canned
    bytes: a stand-in for a misbehaving server, which the real one must never be."""

    def __init__(self, replies: list[bytes]):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()
        self.replies = replies
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            buffer = b""
            for reply in self.replies:
                while b"\n" not in buffer:
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    buffer += chunk
                buffer = buffer.split(b"\n", 1)[1]
                conn.sendall(reply)
            conn.recv(4096)  # until the client closes

    def close(self) -> None:
        self.listener.close()
        self.thread.join(10)


def test_client_stays_in_step_after_a_malformed_frame_from_the_server():
    peer = OneConnectionServer([b'note"not an object"\nOKAY{"n":1}\n', b'OKAY{"n":2}\n'])
    try:
        with Client(*peer.address) as client:
            assert client.call("a", {}, timeout=5) == {"n": 1}  # the line before it is skipped
            assert client.call("b", {}, timeout=5) == {"n": 2}
    finally:
        peer.close()


def test_client_stays_in_step_when_a_push_callback_raises(server):
    with Client(server.host, server.port) as client:
        def buggy(data):
            raise RuntimeError("bug in the user's callback")

        client.on("note", buggy)
        try:
            first = client.call("push_self", {"n": 1}, timeout=5)
        except RuntimeError:
            first = None  # surfacing the callback's error is fine; losing the answer after it is not
        assert first in (None, {})
        assert client.call("echo", {"x": 1}, timeout=5) == {"x": 1}


# -- AsyncClient -------------------------------------------------------------------------------


def test_async_call_and_remote_error(server):
    async def main():
        async with AsyncClient(server.host, server.port) as client:
            assert await client.call("echo", {"x": "ü"}) == {"x": "ü"}
            assert await client.call("scalar") == {"result": 42}
            with pytest.raises(RemoteError) as info:
                await client.call("custom_fail", {"msg": "async no"})
            assert (info.value.reason, info.value.message) == ("Custom", "async no")
            with pytest.raises(RemoteError) as info:
                await client.call("nope")
            assert info.value.reason == "UnknownOpcode"
            assert await client.call("echo", {"after": True}) == {"after": True}

    asyncio.run(main())


def test_async_pipelined_calls_with_gather_come_back_in_order(server):
    async def main():
        async with AsyncClient(server.host, server.port) as client:
            count = 600
            calls = []
            for i in range(count):
                op = ("echo", "cecho", "cslow")[i % 3]
                data = {"i": i, "s": 0.001} if op == "cslow" else {"i": i}
                calls.append(client.call(op, data))
            return await asyncio.gather(*calls)

    results = asyncio.run(main())
    assert [r["i"] for r in results] == list(range(600))
    assert all(r == {"i": i} for i, r in enumerate(results) if i % 3 != 2)


def test_async_gather_with_failures_mixed_in(server):
    async def main():
        async with AsyncClient(server.host, server.port) as client:
            calls = [
                client.call("custom_fail", {"msg": str(i)}) if i % 4 == 0 else client.call("echo", {"i": i})
                for i in range(40)
            ]
            return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(main())
    for i, result in enumerate(results):
        if i % 4 == 0:
            assert isinstance(result, RemoteError) and (result.reason, result.message) == ("Custom", str(i))
        else:
            assert result == {"i": i}


def test_async_push_callbacks(server):
    async def main():
        async with AsyncClient(server.host, server.port) as client:
            welcomes, notes = [], asyncio.Queue()

            async def on_note(data):
                await notes.put(data)

            client.on("welcome", welcomes.append)
            client.on("note", on_note)
            net_id = (await client.call("whoami"))["net_id"]
            await client.call("push_self", {"n": 1})
            note = await asyncio.wait_for(notes.get(), 10)
            return welcomes, net_id, note

    welcomes, net_id, note = asyncio.run(main())
    assert welcomes == [{"net_id": net_id}]
    assert note == {"to": "self", "n": 1}


def test_async_timeout_keeps_the_connection_usable(server):
    async def main():
        async with AsyncClient(server.host, server.port) as client:
            with pytest.raises(asyncio.TimeoutError):
                await client.call("slow", {"s": 0.4, "i": "late"}, timeout=0.05)
            assert await client.call("echo", {"i": "next"}) == {"i": "next"}

    asyncio.run(main())


def test_async_pending_calls_fail_when_the_server_goes(start_server):
    running = start_server("--handlers", "tests.handlers.basic")

    async def main():
        async with AsyncClient(running.host, running.port) as client:
            await client.call("echo")
            pending = asyncio.ensure_future(client.call("hang"))
            await asyncio.sleep(0)  # let the call be sent
            running.send(signal.SIGQUIT)  # stop now: the hanging RPC is answered ShuttingDown
            with pytest.raises((RemoteError, ConnectionError)) as info:
                await asyncio.wait_for(pending, 20)
            await asyncio.wait_for(client.closed.wait(), 20)
            with pytest.raises(ConnectionError):
                await client.call("echo")
            return info.value

    error = asyncio.run(main())
    if isinstance(error, RemoteError):
        assert error.reason == "ShuttingDown"


def test_async_client_survives_a_malformed_frame_from_the_server():
    peer = OneConnectionServer([b'note"not an object"\nOKAY{"n":1}\n', b'OKAY{"n":2}\n'])

    async def main():
        async with AsyncClient(*peer.address) as client:
            first = await client.call("a", {}, timeout=5)
            second = await client.call("b", {}, timeout=5)
            return first, second

    try:
        assert asyncio.run(main()) == ({"n": 1}, {"n": 2})
    finally:
        peer.close()


def test_async_client_survives_a_push_callback_that_raises(server):
    async def main():
        async with AsyncClient(server.host, server.port) as client:
            def buggy(data):
                raise RuntimeError("bug in the user's callback")

            client.on("note", buggy)
            await client.call("push_self", {"n": 1}, timeout=5)
            return await client.call("echo", {"x": 1}, timeout=5)

    assert asyncio.run(main()) == {"x": 1}


# -- the FIFO of answers stays in step on every path -------------------------------------------


class LineServer:
    """A loopback server in a thread that answers line k (counted from 1) with
    ``OKAY{"n": k, "len": <its bytes>, "head": <its first 16 characters>}``, so a test sees which
    request each answer belongs to. ``hold_after``: once that many lines are answered, read no more
    until ``resume`` is set (a server that stops reading). ``batch``: hold answers until that many
    lines were read, then send them in one write. Lines are measured as they stream in, so one of
    32 MiB costs no copies."""

    def __init__(self, hold_after: int | None = None, batch: int = 1, hold_deadline: float = 20.0):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(30)
        self.address = self.listener.getsockname()
        self.hold_after = hold_after
        self.batch = batch
        self.hold_deadline = hold_deadline
        self.resume = threading.Event()
        self.resumed_by_deadline: bool | None = None  # None: it never held
        self.answered = 0
        self._length, self._head, self._held = 0, bytearray(), []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            data = b""
            while True:
                if self.answered == self.hold_after and self.resumed_by_deadline is None:
                    self.resumed_by_deadline = not self.resume.wait(self.hold_deadline)
                if not data:
                    data = conn.recv(1 << 20)
                    if not data:
                        return  # the client closed
                data = self._scan(conn, data)

    def _scan(self, conn: socket.socket, data: bytes) -> bytes:
        """Answer the lines ``data`` completes; return what is left unread when a hold begins."""
        start = 0
        while True:
            end = data.find(b"\n", start)
            piece = data[start:] if end < 0 else data[start:end]
            self._length += len(piece)
            self._head += piece[: max(0, 16 - len(self._head))]
            if end < 0:
                return b""
            self.answered += 1
            self._held.append(json.dumps({"n": self.answered, "len": self._length, "head": self._head.decode()}))
            self._length, self._head = 0, bytearray()
            start = end + 1
            if len(self._held) == self.batch or self.answered == self.hold_after:
                conn.sendall("".join(f"OKAY{answer}\n" for answer in self._held).encode())
                self._held = []
            if self.answered == self.hold_after:
                return data[start:]

    def close(self) -> None:
        self.resume.set()
        self.listener.close()
        self.thread.join(30)


BIG = 32 * 1024 * 1024  # more than loopback's socket buffers hold: writing it blocks while the peer isn't reading


def test_rpc_from_a_callback_while_a_frame_is_half_written_goes_after_it():
    """The server stops reading in the middle of a big frame, after answering the RPC before it;
    that answer's callback sends an RPC. Its frame must follow the big one, not land inside it."""
    peer = LineServer(hold_after=1)
    answers = []
    try:
        with Client(*peer.address) as client:
            def on_first(op, data):
                answers.append(data)
                peer.resume.set()
                client.rpc("inner", {}, lambda op, data: answers.append(data))

            client.rpc("first", {}, on_first)
            client.rpc("big", {"s": "x" * BIG}, lambda op, data: answers.append(data))
            poll_until(client, lambda: len(answers) == 3, timeout=60, what="three answers")
            assert client.pending() == 0
    finally:
        peer.close()
    assert peer.resumed_by_deadline is False
    big_len = len(b'big{"s":""}') + BIG
    assert answers == [
        {"n": 1, "len": len(b"first{}"), "head": "first{}"},
        {"n": 2, "len": big_len, "head": 'big{"s":"xxxxxxx'},
        {"n": 3, "len": len(b"inner{}"), "head": "inner{}"},
    ]


def test_call_from_a_callback_takes_the_answers_in_order():
    """Two answers arrive in one read; the first one's callback makes a blocking call. The second
    answer, already read, belongs to the second RPC, not to the call made in the callback."""
    peer = LineServer(batch=2)
    seen = []
    try:
        with Client(*peer.address) as client:
            def on_a(op, data):
                seen.append(("a", data["n"]))
                seen.append(("c", client.call("c", {}, timeout=10)["n"]))

            client.rpc("a", {}, on_a)
            client.rpc("b", {}, lambda op, data: seen.append(("b", data["n"])))
            client.rpc("pad", {})  # completes the second batch, which holds c's answer
            poll_until(client, lambda: len(seen) == 3, what="three answers")
    finally:
        peer.close()
    assert seen == [("a", 1), ("b", 2), ("c", 4)]


def test_call_timeout_while_the_frame_is_still_being_written():
    """A call whose frame the server does not read yet times out (its timeout covers the write);
    the rest of its frame goes out before the next call's, and its late answer is dropped."""
    peer = LineServer(hold_after=0)
    try:
        with Client(*peer.address) as client:
            with pytest.raises(TimeoutError):
                client.call("big", {"s": "x" * BIG}, timeout=0.5)
            assert client.pending() == 1
            held = peer.resumed_by_deadline is None  # the server has not read a byte yet
            peer.resume.set()
            assert client.call("next", {}, timeout=30) == {"n": 2, "len": len(b"next{}"), "head": "next{}"}
            assert client.pending() == 0
    finally:
        peer.close()
    assert held and peer.resumed_by_deadline is False


def test_answer_longer_than_the_client_line_limit_fails_the_call_and_closes(server):
    big = {"s": "x" * 10_000}
    with Client(server.host, server.port, max_frame_bytes=4096) as client:
        assert client.call("echo", {"i": 1}, timeout=10) == {"i": 1}
        with pytest.raises(FrameTooLarge, match="max_frame_bytes"):
            client.call("echo", big, timeout=10)
        assert not client.connected and client.pending() == 0
        with pytest.raises(ConnectionError, match="longer than max_frame_bytes"):
            client.call("echo", {"i": 2}, timeout=10)
    # Pipelined: the answer before the long one still reaches its RPC; every later one fails.
    answers = []
    with Client(server.host, server.port, max_frame_bytes=4096) as client:
        client.rpc("echo", {"i": 1}, lambda op, data: answers.append(data))
        client.rpc("echo", big, lambda op, data: answers.append(data))
        with pytest.raises(ConnectionError, match="longer than max_frame_bytes"):
            client.call("echo", {"i": 2}, timeout=10)
        assert client.pending() == 0
    assert answers == [{"i": 1}]


def test_malformed_answer_fails_its_call_and_keeps_the_rest_in_step():
    peer = OneConnectionServer([b'OKAY{"n":1,\n', b'FAIL{"reason":\n', b'OKAY{"n":3}\n'])
    try:
        with Client(*peer.address) as client:
            with pytest.raises(MalformedPayload):
                client.call("a", {}, timeout=5)
            with pytest.raises(MalformedPayload):
                client.call("b", {}, timeout=5)
            assert client.call("c", {}, timeout=5) == {"n": 3}
    finally:
        peer.close()


def test_async_call_that_cannot_be_encoded_takes_no_slot(server):
    async def main():
        async with AsyncClient(server.host, server.port) as client:
            with pytest.raises(TypeError):
                await client.call("echo", {"bad": {1, 2}})
            with pytest.raises(ValueError):
                await client.call("echo", {"nan": float("nan")})
            with pytest.raises(ValueError):
                await client.call("bad{op", {})
            with pytest.raises(TypeError):
                await client.call("echo", [1])
            assert await client.call("echo", {"n": 2}, timeout=10) == {"n": 2}
            return await asyncio.gather(*(client.call("echo", {"n": n}, timeout=10) for n in (3, 4)))

    assert asyncio.run(main()) == [{"n": 3}, {"n": 4}]


def test_async_calls_that_give_up_keep_later_answers_in_step(server):
    async def main():
        loop = asyncio.get_running_loop()
        unhandled = []
        loop.set_exception_handler(lambda loop, context: unhandled.append(context["message"]))
        async with AsyncClient(server.host, server.port) as client:
            never_ran = asyncio.ensure_future(client.call("echo", {"i": "never"}))
            never_ran.cancel()  # before it ran: nothing sent, no slot
            sent = asyncio.ensure_future(client.call("slow", {"s": 0.3, "i": "cancelled"}))
            await asyncio.sleep(0)  # one step of the task: its frame is written
            sent.cancel()
            with pytest.raises(asyncio.TimeoutError):
                await client.call("slow", {"s": 0.3, "i": "timed out"}, timeout=0.01)
            results = await asyncio.gather(*(client.call("echo", {"i": i}, timeout=20) for i in range(3)))
            # Given up, not yet answered: closing must not leave an error nobody retrieves.
            with pytest.raises(asyncio.TimeoutError):
                await client.call("slow", {"s": 0.3, "i": "left"}, timeout=0.01)
        for task in (never_ran, sent):
            assert task.cancelled()
        gc.collect()
        return results, unhandled

    results, unhandled = asyncio.run(main())
    assert results == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert unhandled == []


def test_async_answer_longer_than_the_client_line_limit_fails_the_call_and_closes(server):
    async def main():
        async with AsyncClient(server.host, server.port, max_frame_bytes=4096) as client:
            assert await client.call("echo", {"i": 1}, timeout=10) == {"i": 1}
            results = await asyncio.gather(
                client.call("echo", {"s": "x" * 10_000}, timeout=10),
                client.call("echo", {"i": 2}, timeout=10),
                return_exceptions=True,
            )
            await asyncio.wait_for(client.closed.wait(), 10)
            with pytest.raises(ConnectionError, match="longer than max_frame_bytes"):
                await client.call("echo", {"i": 3}, timeout=10)
            return results

    too_large, later = asyncio.run(main())
    assert isinstance(too_large, FrameTooLarge) and "max_frame_bytes (4096 bytes)" in str(too_large)
    assert type(later) is ConnectionError and "longer than max_frame_bytes" in str(later)


def test_async_malformed_answer_fails_its_call_and_keeps_the_rest_in_step():
    peer = OneConnectionServer([b'OKAY{"n":1,\n', b'OKAY{"n":2}\n'])

    async def main():
        async with AsyncClient(*peer.address) as client:
            with pytest.raises(MalformedPayload):
                await client.call("a", {}, timeout=5)
            return await client.call("b", {}, timeout=5)

    try:
        assert asyncio.run(main()) == {"n": 2}
    finally:
        peer.close()
