"""Worker.run_batch in this process, on a real socketpair and real shared memory: when replies go
out while a batch runs, and what the progress board says at that moment."""

import multiprocessing
import socket
import time

from simplerpc_mp import ipc
from simplerpc_mp.handlers import Handlers
from simplerpc_mp.worker import Worker

handlers = Handlers()


@handlers.on_connect
def slow_hello(conn):
    time.sleep(0.0015)  # under the acceptor's 2 ms hold-back threshold: no journal sweep reads it
    conn.session["hello"] = True


@handlers.on("echo")
def echo(conn, data):
    return data


def make_worker():
    ctx = multiprocessing.get_context("spawn")
    board = ipc.board_view(ctx.RawArray("q", ipc.BOARD_SLOTS))
    shared = ctx.RawArray("c", ipc.JOURNAL_BYTES)
    ours, theirs = socket.socketpair()
    return Worker(theirs, board, ipc.Journal(shared, board), handlers, 30.0, False), board, ours, theirs


def test_replies_go_out_every_2_ms_through_a_batch_of_hooks_with_the_board_on_the_finished_job():
    """A batch of one echo and 40 connect hooks of 1.5 ms each: the echo's answer must not wait
    for the whole batch (60 ms), and at each send the board must still name the job that
    finished, not the next one (a death in the send would fail an RPC that never started)."""
    worker, board, ours, theirs = make_worker()
    sends = []
    send_replies = worker.send_replies

    def spy():
        if worker.replies:
            sends.append(([reply[0] for reply in worker.replies], board[ipc.BOARD_JOB]))
        send_replies()

    worker.send_replies = spy
    worker.send_replies()  # the clock of the 2 ms window starts now
    jobs = [(1, ipc.SERIAL, 1, b"echo{}\n", None, None, None)] + [(i, ipc.CONNECT, i, b"", None, None, None) for i in range(2, 42)]
    try:
        worker.run_batch(jobs)
        during = list(sends)
        worker.send_replies()
        assert len(during) >= 2, during
        assert 1 in during[0][0], during  # the echo went out in the first send, long before the end
        for job_ids, on_board in during:
            assert on_board == job_ids[-1], (job_ids, on_board)
        sent = sorted(job for job_ids, _ in sends for job in job_ids)
        assert sent == list(range(1, 42))  # every reply exactly once
    finally:
        ours.close()
        theirs.close()
