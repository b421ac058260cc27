"""The acceptor's decisions that need no server: which chunks hold a concurrent op, what the
budgets count, how big a job grows."""

import random
import selectors
import socket

from simplerpc_mp.acceptor import RECV_BYTES, Acceptor
from simplerpc_mp.config import Settings
from simplerpc_mp.handlers import BROADCAST
from simplerpc_mp.timers import Timers

from .conftest import wait_until


def test_a_chunk_holds_a_concurrent_op_exactly_when_one_of_its_lines_calls_one():
    """Both ways of looking (substring search for short chunks, line starts for long ones)
    agree with splitting the chunk into lines, for op names that prefix or extend each other."""
    with selectors.DefaultSelector() as selector:
        acceptor = Acceptor(Settings(), selector, Timers())
        acceptor.set_handler_info({"concurrent": ["primes", "cs"], "connect": False, "disconnect": False})
        names = [b"echo", b"primes", b"xprimes", b"primesx", b"cs", b"c", b"prime", b"s", b"scs"]
        rng = random.Random(5)
        for _ in range(2000):
            lines = [
                rng.choice(names) + b'{"a":"' + b"x" * rng.choice([0, 10, 3000, 70000]) + b'"}'
                for _ in range(rng.randint(1, 5))
            ]
            chunk = b"\n".join(lines) + b"\n"
            expected = any(line.partition(b"{")[0] in (b"primes", b"cs") for line in lines)
            assert acceptor._has_concurrent(chunk) == expected, [line[:12] for line in lines]


# -- what the budgets count (issue 12), on a real TCP connection driven by hand ----------------


def _accepted(acceptor):
    """A client socket and the acceptor's Connection for its other end."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        sock, peer = listener.accept()
    return client, acceptor.add_connection(sock, peer)


def _read(acceptor, conn, total: int) -> None:
    """Let the acceptor read until it holds ``total`` request bytes."""
    wait_until(lambda: acceptor.on_read(conn) or acceptor.request_bytes >= total, what=f"{total} bytes read")
    assert acceptor.request_bytes == total


def test_request_bytes_count_each_job_until_it_is_done_and_the_partial_line():
    with selectors.DefaultSelector() as selector:
        acceptor = Acceptor(Settings(), selector, Timers())
        acceptor.set_handler_info({"concurrent": ["c"], "connect": False, "disconnect": False})
        client, conn = _accepted(acceptor)
        with client:
            partial = b'a{"not yet":'
            sent = b'a{"i":1}\na{"i":2}\na{"i":3}\na{"i":4}\nc{}\n' + partial
            client.sendall(sent)
            _read(acceptor, conn, len(sent))
            assert conn.request_bytes == len(sent) and acceptor.holders == 1
            [serial] = acceptor.scheduler.take_batch(10)
            assert serial.count == 4
            head = serial.split(1)  # (as for a worker due for recycling)
            acceptor.job_done(head)
            assert acceptor.request_bytes == len(sent) - len(b'a{"i":1}\n')
            acceptor.give_back(serial, 1)  # a worker ran a{"i":2} and gave back the rest
            assert acceptor.request_bytes == len(sent) - len(b'a{"i":1}\na{"i":2}\n')
            [rest] = acceptor.scheduler.take_batch(10)
            acceptor.job_done(rest)
            [concurrent] = acceptor.scheduler.take_batch(10)
            acceptor.job_done(concurrent)
            assert acceptor.request_bytes == conn.request_bytes == len(partial)
            acceptor.close(conn, "test")
            assert acceptor.request_bytes == 0 and acceptor.holders == 0


def test_output_bytes_count_the_write_buffer_and_answers_waiting_for_their_turn():
    with selectors.DefaultSelector() as selector:
        acceptor = Acceptor(Settings(), selector, Timers())
        client, conn = _accepted(acceptor)
        other_client, other = _accepted(acceptor)
        with client, other_client:
            acceptor.complete(conn, 1, b"OKAY{}\n", 1)  # ahead of seq 0: kept in conn.done
            assert acceptor.output_bytes == conn.done_bytes == 7 and not conn.wbuf
            acceptor.complete(conn, 0, b'OKAY{"a":1}\n', 1)
            assert conn.done_bytes == 0 and len(conn.wbuf) == acceptor.output_bytes == 19
            acceptor.push(BROADCAST, b"note{}\n")
            assert acceptor.output_bytes == 19 + 2 * 7
            acceptor.flush()  # both take everything
            assert acceptor.output_bytes == 0
            acceptor.complete(other, 0, b"OKAY{}\n", 1)
            acceptor.close(other, "test")
            assert acceptor.output_bytes == 0


def test_a_serial_backlog_is_cut_into_jobs_of_about_max_job_bytes():
    """16 pipelined RPCs of 300 KiB: not one job of 4.5 MiB, copied again at each time slice."""
    with selectors.DefaultSelector() as selector:
        acceptor = Acceptor(Settings(), selector, Timers())
        client, conn = _accepted(acceptor)
        with client:
            line = b'a{"p":"' + b"x" * (300 * 1024) + b'"}\n'
            client.setblocking(False)
            view = memoryview(line * 16)
            while view or acceptor.request_bytes < 16 * len(line):
                if view:
                    try:
                        view = view[client.send(view) :]
                    except BlockingIOError:
                        pass
                acceptor.on_read(conn)
            jobs = list(conn.runnable) + list(conn.queue)
            assert sum(job.count for job in jobs) == 16
            # A job grows while under the cap (1 MiB), by at most what one read completes.
            assert max(len(job.payload) for job in jobs) < 1024 * 1024 + len(line) + RECV_BYTES
