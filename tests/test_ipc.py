"""The worker journal's record format, on real shared memory (the crash tests cover its use)."""

import multiprocessing

from simplerpc_mp import ipc


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
