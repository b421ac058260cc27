"""The pipe's record framing, and the worker journal's record format on real shared memory (the
crash tests cover its use)."""

import itertools
import multiprocessing
import pickle
import random
import threading

from hypothesis import given
from hypothesis import strategies as st

from simplerpc_mp import ipc

MiB = 1024 * 1024


# -- RecordReader ---------------------------------------------------------------------------

def test_a_read_of_whole_records_returns_views_into_it_and_copies_nothing():
    data = b"".join(ipc.frame_record(p) for p in (b"one", b"", b"three" * 1000))
    reader = ipc.RecordReader()
    records = reader.feed(data)
    assert [bytes(r) for r in records] == [b"one", b"", b"three" * 1000]
    assert all(r.obj is data for r in records) and reader.copied_bytes == 0


@given(st.lists(st.binary(max_size=300), max_size=8), st.lists(st.integers(min_value=0, max_value=3000), max_size=12))
def test_any_split_of_the_stream_gives_the_same_records(payloads, cuts):
    stream = b"".join(ipc.frame_record(p) for p in payloads)
    bounds = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
    reader = ipc.RecordReader()
    got = []
    for start, end in zip(bounds, bounds[1:]):
        got += [bytes(r) for r in reader.feed(stream[start:end])]
    assert got == payloads
    assert reader.copied_bytes <= len(stream)


def test_a_32_mib_record_in_64_kib_reads_is_copied_once_not_once_per_read():
    """Regression: each read re-joined the partial record with the new bytes, so a record of
    n bytes in reads of 64 KiB cost n**2 / 128 KiB of copying (16 MB took over a second, 70 MB
    timed out). Now it is copied once, into a buffer allocated when its header arrives."""
    payload = bytes(range(256)) * (32 * MiB // 256)
    stream = ipc.frame_record(payload) + ipc.frame_record(b"after")
    reader = ipc.RecordReader()
    got = []
    for start in range(0, len(stream), 64 * 1024):
        got += reader.feed(stream[start : start + 64 * 1024])
    assert len(got) == 2 and got[0] == payload and got[1] == b"after"
    assert reader.copied_bytes <= len(payload) + 4 + len(b"after") + 4


def make_journal(size=ipc.JOURNAL_BYTES):
    ctx = multiprocessing.get_context("spawn")
    raw_board = ctx.RawArray("q", ipc.BOARD_SLOTS)
    shared = ctx.RawArray("c", size)
    board = ipc.board_view(raw_board)
    return ipc.Journal(shared, board), shared, board


def test_records_read_back_as_pipe_replies_with_pushes_and_sessions_only_where_given():
    journal, shared, board = make_journal()
    assert ipc.read_journal(shared, board) == []
    assert journal.append(7, 0, 1, b"OKAY{}\n", [], ipc.UNCHANGED)
    assert journal.append(7, 1, 1, b'OKAY{"a":1}\n', [(3, b"note{}\n")], b"pickled-session")
    assert journal.append(8, 0, 0, b"", [], None)  # a hook that emptied the session
    assert ipc.read_journal(shared, board) == [
        (7, 0, 1, b"OKAY{}\n", (), ipc.UNCHANGED),
        (7, 1, 1, b'OKAY{"a":1}\n', [(3, b"note{}\n")], b"pickled-session"),
        (8, 0, 0, b"", [], None),
    ]


def test_a_full_journal_refuses_and_a_clear_empties_it_and_bumps_the_generation():
    journal, shared, board = make_journal(size=100)
    assert journal.append(1, 0, 1, b"x" * 40 + b"\n", [], ipc.UNCHANGED)
    assert not journal.append(1, 1, 1, b"y" * 40 + b"\n", [], ipc.UNCHANGED)
    assert [r[1] for r in ipc.read_journal(shared, board)] == [0]
    generation = board[ipc.BOARD_JOURNAL_GEN]
    journal.clear()
    assert board[ipc.BOARD_JOURNAL_GEN] == generation + 1
    assert ipc.read_journal(shared, board) == []
    assert journal.append(1, 1, 1, b"y" * 40 + b"\n", [], ipc.UNCHANGED)
    assert ipc.read_journal(shared, board) == [(1, 1, 1, b"y" * 40 + b"\n", (), ipc.UNCHANGED)]


def test_the_board_view_writes_what_the_ctypes_array_reads():
    raw = multiprocessing.get_context("spawn").RawArray("q", ipc.BOARD_SLOTS)
    view = ipc.board_view(raw)
    view[ipc.BOARD_START_NS] = 1 << 60
    assert raw[ipc.BOARD_START_NS] == 1 << 60 and len(view) == ipc.BOARD_SLOTS


class Lockstep:
    """Runs a writer thread one shared-slot store at a time, so a reader can be placed between
    any two stores: each store waits until the test allows it (the writer parks before it)."""

    def __init__(self):
        self.cond = threading.Condition()
        self.allowed = 0  # stores the writer may make
        self.done = 0
        self.parked = False
        self.finished = False

    def before_store(self):
        with self.cond:
            self.parked = True
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.done < self.allowed)
            self.parked = False

    def after_store(self):
        with self.cond:
            self.done += 1
            self.cond.notify_all()

    def finish(self):
        with self.cond:
            self.finished = True
            self.cond.notify_all()

    def let_writer_make(self, stores: int):
        with self.cond:
            self.allowed = max(self.allowed, stores)
            self.cond.notify_all()
            assert self.cond.wait_for(lambda: self.finished or (self.done >= stores and self.parked), timeout=10)


class SteppedBoard:
    def __init__(self, board, step: Lockstep):
        self.board, self.step = board, step

    def __getitem__(self, slot):
        return self.board[slot]

    def __setitem__(self, slot, value):
        self.step.before_store()
        self.board[slot] = value
        self.step.after_store()


def test_a_live_read_overlapping_a_clear_and_the_next_append_is_whole_or_nothing():
    """Regression: clear() bumped the generation before zeroing the size, so a reader that read
    the new generation and the old size accepted a copy torn by the next append (the acceptor
    then crashed unpickling garbage). The real clear() and append() run one store at a time
    against read_journal, with the reader's slot reads and its copy placed between every pair."""
    outcomes = set()
    # Stores made before the reader's generation read, its size read, its copy, its re-check.
    for cuts in itertools.combinations_with_replacement(range(4), 4):
        journal, shared, board = make_journal()
        for line in range(4):
            journal.append(7, line, 1, b'OKAY{"i":%d}\n' % line, [(1, b"n{}\n")] if line == 2 else [], ipc.UNCHANGED)
        step = Lockstep()
        journal.board = SteppedBoard(board, step)

        def writer():
            try:
                journal.clear()  # two stores: size, generation
                # As long as line 0's record: a torn copy then parses as line 4 and old lines 1-3.
                journal.append(7, 4, 1, b'OKAY{"i":4}\n', [], ipc.UNCHANGED)
            finally:
                step.finish()

        reads = iter(cuts)

        class ReaderBoard:
            def __getitem__(self, slot):
                step.let_writer_make(next(reads))
                value = board[slot]
                if slot == ipc.BOARD_JOURNAL_BYTES:
                    step.let_writer_make(next(reads))  # the writer goes on before the copy
                return value

        thread = threading.Thread(target=writer)
        thread.start()
        try:
            replies = ipc.read_journal(shared, ReaderBoard())
        finally:
            step.let_writer_make(3)
            thread.join(10)
        outcomes.add(tuple(reply[1] for reply in replies))
    assert outcomes <= {(), (0, 1, 2, 3), (4,)}, outcomes
    assert (0, 1, 2, 3) in outcomes and () in outcomes


# -- torn live reads on a weakly ordered CPU --------------------------------------------------

def _record_tuples(journal_records):
    return {(job_id, first, count, answer, tuple(pushes), session)
            for job_id, first, count, answer, pushes, session in journal_records}


def _mixed(old: bytes, new: bytes, rng: random.Random, grain: int) -> bytearray:
    """What a reader may see on ARM64 while the writer goes from ``old`` to ``new``: each
    aligned piece of memory in its old or its new state, in any combination."""
    out = bytearray(old)
    for start in range(0, len(new), grain):
        if rng.random() < 0.5:
            out[start : start + grain] = new[start : start + grain]
    return out


def test_a_live_read_never_returns_a_torn_record_whatever_order_the_stores_are_seen_in():
    """Item 25: on a weakly ordered CPU the acceptor can see the new size (and an unchanged
    generation) with some of a record's bytes still old, or the records of one generation half
    overwritten by the next. Every record read_journal returns must be one the worker wrote (the
    old code parsed such bytes and returned garbage replies, or failed unpickling them)."""
    rng = random.Random(25)
    size = 4096
    written = []

    def append(journal, job_id, first, answer, pushes=(), session=ipc.UNCHANGED):
        assert journal.append(job_id, first, 1, answer, list(pushes), session)
        written.append((job_id, first, 1, answer, tuple(pushes) if pushes or session is not ipc.UNCHANGED else (), session))

    journal, shared, board = make_journal(size)
    for line in range(3):
        append(journal, 7, line, b'OKAY{"i":%d}\n' % line)
    before = bytes(shared), board[ipc.BOARD_JOURNAL_BYTES]
    append(journal, 7, 3, b'OKAY{"push":true}\n', [(1, b"note{}\n")], pickle.dumps({"n": 3}))
    append(journal, 8, 0, b'OKAY{"long":"' + b"z" * 50 + b'"}\n')
    appended = bytes(shared), board[ipc.BOARD_JOURNAL_BYTES]
    journal.clear()  # then a new generation over the same bytes, with other record bounds
    append(journal, 9, 0, b'OKAY{"after_clear":"' + b"y" * 30 + b'"}\n', [(2, b"n{}\n")])
    append(journal, 9, 1, b"OKAY{}\n")
    cleared = bytes(shared), board[ipc.BOARD_JOURNAL_BYTES]
    genuine = set(written)

    seen = set()
    for (old, old_size), (new, new_size) in ((before, appended), (appended, cleared), (before, cleared)):
        for trial in range(600):
            grain = rng.choice((1, 4, 8, 64))
            memory = _mixed(old, new, rng, grain)
            shown_size = rng.choice((old_size, new_size))
            slots = [0] * ipc.BOARD_SLOTS
            slots[ipc.BOARD_JOURNAL_BYTES] = shown_size  # the generation reads the same twice
            replies = ipc.read_journal(memory, slots)
            for reply in replies:
                job_id, first, count, answer, pushes, session = reply
                assert (job_id, first, count, answer, tuple(pushes), session) in genuine, reply
            seen.add(len(replies))
    assert 0 in seen and max(seen) >= 3  # some reads were torn early, some got whole journals


def test_a_read_whose_size_slot_runs_ahead_of_the_bytes_keeps_the_records_before():
    journal, shared, board = make_journal(4096)
    journal.append(1, 0, 1, b"OKAY{}\n", [], ipc.UNCHANGED)
    first_end = board[ipc.BOARD_JOURNAL_BYTES]
    journal.append(1, 1, 1, b'OKAY{"b":2}\n', [], ipc.UNCHANGED)
    memory = bytearray(shared)
    memory[first_end:] = bytes(len(memory) - first_end)  # the second record's bytes not seen yet
    assert ipc.read_journal(memory, board) == [(1, 0, 1, b"OKAY{}\n", (), ipc.UNCHANGED)]
    memory[first_end + 20] ^= 1  # one field of its header landed, and nothing else
    assert ipc.read_journal(memory, board) == [(1, 0, 1, b"OKAY{}\n", (), ipc.UNCHANGED)]
    assert len(ipc.read_journal(shared, board)) == 2  # all of it seen: both


# -- through a real server --------------------------------------------------------------------

def test_a_30_mb_answer_comes_through_the_worker_pipe_whole(start_server):
    """Regression: the acceptor re-joined a partial pipe record on every 64 KiB read, so a 30 MB
    answer took seconds of copying and 70 MB timed out."""
    server = start_server(
        "--handlers", "tests.handlers.ipc_big", "--max-answer-bytes", str(64 * MiB), "--output-hard-limit", str(128 * MiB),
        workers=1,
    )
    size = 30 * 1000 * 1000
    with server.client() as client:
        assert client.call("big", {"bytes": size}, timeout=120) == {"result": "x" * size}
        assert client.call("big", {"bytes": 3}, timeout=60) == {"result": "xxx"}  # the pipe is still in step
