"""Messages between the acceptor and its workers, and their framing. Pure: no sockets here.

Each message is a pickled tuple sent as one length-prefixed record (a 4-byte big-endian length,
then the bytes) over a socketpair: blocking in the worker, non-blocking in the acceptor, both
framed with ``frame_record`` and split with ``RecordReader``. (A raw socketpair beat
``multiprocessing`` Pipe, Queue and SimpleQueue in ``bench/ipc_compare.py``.) Pickle only ever
crosses between processes of one server, never from clients.

acceptor -> worker::

    (BATCH, [job, ...])   job = (job_id, kind, net_id, payload, session)
    (STOP,)               finish what you have, then exit 0

worker -> acceptor::

    (HELLO, pid, info)            booted; info = Handlers.describe()
    (BOOT_ERROR, message)         the handler module cannot be used; exit follows
    (REPLY, [reply, ...])         reply = (job_id, first, count, answers, pushes, session)

``payload`` is one or more complete lines, each ending in LF, exactly as the client sent them.
``answers`` are the encoded answer lines for lines ``first .. first+count-1`` of the job, in
order. ``session`` is a pickled dict, ``None`` for an empty one; in a reply, ``UNCHANGED``
means the job left it as it was. ``pushes`` is a list of ``(net_id or BROADCAST, frame)``.
A reply for several lines carries the pushes and session change of its first line only (they
go out before its answers): the worker starts a new reply at any later line that pushes or
changes the session, so one reply per job is the common case, not one per line.

A job's ``session`` may also be ``HELD``: "the session you were last sent for this net_id is
still the connection's" (a session may be megabytes, and most RPCs leave it as it is). Each side
keeps a ``SessionCache`` per worker: the pool one of the version it shipped (``Connection.
session_version`` counts the changes applied), the worker one of the blob it received. Both
apply the same operations to it, in the same order: the pool as it builds a batch, the worker
as it receives it, for every job of the batch whether or not it then runs there, so both evict
the same entries and ``HELD`` is only sent for what the worker still has. A ``DISCONNECT`` job
carries no session and drops the net_id's entry on both sides. A new worker starts empty, as
its handle's cache does; a job sent again (requeued, taken back) is shipped afresh for its new
worker. A session the worker changes itself is not kept: the next job ships it once more.
"""

from __future__ import annotations

import pickle
import struct
from collections import OrderedDict

__all__ = [
    "BATCH", "STOP", "HELLO", "BOOT_ERROR", "REPLY",
    "SERIAL", "CONCURRENT", "CONNECT", "DISCONNECT", "UNCHANGED", "HELD", "SessionCache",
    "RecordReader", "frame_record", "pack", "unpack",
    "EXIT_BOOT_ERROR", "BOARD_SLOTS", "board_view", "JOURNAL_BYTES", "Journal", "read_journal",
]

# message tags
BATCH, STOP, HELLO, BOOT_ERROR, REPLY = range(5)
# job kinds
SERIAL, CONCURRENT, CONNECT, DISCONNECT = range(4)
UNCHANGED = False
HELD = True  # a job's session: the one this worker was last sent for the net_id (see above)

# A worker that cannot load its handlers exits with this code (gunicorn's APP_LOAD_ERROR idea):
# the supervisor then stops instead of respawning it in a loop.
EXIT_BOOT_ERROR = 4

_HEADER = struct.Struct("!i")
_PROTOCOL = pickle.HIGHEST_PROTOCOL

# The progress board: a few int64 slots in shared memory per worker that the worker updates
# before each RPC, so the acceptor can tell, without a message, which RPC a worker is running
# (for per-RPC timeouts, and to know after a crash which RPCs had not started).
BOARD_JOB, BOARD_LINE, BOARD_START_NS, BOARD_TIMEOUT_MS, BOARD_JOURNAL_BYTES, BOARD_JOURNAL_GEN = range(6)
BOARD_SLOTS = 6

def board_view(shared) -> memoryview:
    """The board's slots as a memoryview of int64: a slot read or write costs a tenth of what
    indexing the ctypes array does, and the worker writes two per RPC."""
    return memoryview(shared).cast("B").cast("q")


# The journal: a shared-memory area per worker where it records each finished RPC's reply
# (one record per RPC) until those replies have been sent on the pipe. Sending every answer at
# once would cost a pipe write and an acceptor wake-up per RPC (it halved echo throughput); with
# the journal, the worker sends in batches, and when it dies the acceptor still finds every
# finished answer, push and session change here. While a worker runs a long RPC, the acceptor
# also reads the journal of the live worker, so answers finished before it are not held back.
# Replies delivered twice (journal, then pipe) are recognised by their line index and skipped.
# A generation counter, bumped at each clear, makes a read of a live journal safe: a read that
# overlapped a clear is thrown away (seqlock).
#
# A record is a fixed header (job_id, first line, line count, answer bytes, extra bytes), the
# answer line(s), then the pickled (pushes, session) only if the RPC pushed or changed the
# session: the common record costs one struct pack and one copy, no pickling.
JOURNAL_BYTES = 1024 * 1024
_RECORD = struct.Struct("=qiiii")
_RECORD_SIZE = _RECORD.size
_pack_record = _RECORD.pack_into
_NO_EXTRA = ((), UNCHANGED)


class Journal:
    """The worker's side: append one reply record per finished RPC; clear once sent."""

    __slots__ = ("view", "size", "board", "offset")

    def __init__(self, shared, board):
        self.view = memoryview(shared).cast("B")
        self.size = len(self.view)
        self.board = board  # a board_view
        self.offset = 0

    def append(self, job_id: int, first: int, count: int, answer: bytes, pushes, session) -> bool:
        """Record a reply; False when it does not fit (then send, clear, and go on)."""
        extra = pickle.dumps((pushes, session), _PROTOCOL) if pushes or session is not UNCHANGED else b""
        start = self.offset
        body = start + _RECORD_SIZE
        answer_end = body + len(answer)
        end = answer_end + len(extra)
        if end > self.size:
            return False
        view = self.view
        _pack_record(view, start, job_id, first, count, answer_end - body, end - answer_end)
        view[body:answer_end] = answer
        if extra:
            view[answer_end:end] = extra
        self.offset = end
        self.board[BOARD_JOURNAL_BYTES] = end  # after the bytes: the reader never sees a torn record
        return True

    def clear(self) -> None:
        if self.offset:
            # Size first, then generation: a reader that saw the old size sees the generation
            # change by the time it re-checks (the other order let a reader pair the new
            # generation with the old size and accept a copy torn by the next appends).
            self.offset = 0
            self.board[BOARD_JOURNAL_BYTES] = 0
            self.board[BOARD_JOURNAL_GEN] += 1


def read_journal(shared, board) -> list:
    """The acceptor's side: the replies the worker has not sent (yet), as pipe REPLY items."""
    generation = board[BOARD_JOURNAL_GEN]
    size = board[BOARD_JOURNAL_BYTES]
    if size <= 0:
        return []
    data = bytes(memoryview(shared).cast("B")[:size])
    if board[BOARD_JOURNAL_GEN] != generation:
        return []  # cleared while we copied: all of it went down the pipe
    replies = []
    offset = 0
    while offset + _RECORD_SIZE <= size:
        job_id, first, count, answer_len, extra_len = _RECORD.unpack_from(data, offset)
        body = offset + _RECORD_SIZE
        answer_end = body + answer_len
        end = answer_end + extra_len
        if end > size:
            break  # cannot happen with the seqlock; never parse past what was copied
        pushes, session = pickle.loads(data[answer_end:end]) if extra_len else _NO_EXTRA
        replies.append((job_id, first, count, data[body:answer_end], pushes, session))
        offset = end
    return replies


# What one worker holds: a few hundred connections' sessions, at most 64 MiB of them (16 sessions
# of the default max_session_bytes); a connection that comes back after eviction is shipped again.
SESSION_CACHE_ENTRIES = 256
SESSION_CACHE_BYTES = 64 * 1024 * 1024


class SessionCache:
    """The sessions a worker holds, by net_id, least recently shipped first (see the docstring).

    The pool's copy stores versions, the worker's the pickled sessions; since evictions depend
    only on the net_ids and blob sizes, both evict alike.
    """

    __slots__ = ("entries", "size", "max_entries", "max_bytes")

    def __init__(self, max_entries: int = SESSION_CACHE_ENTRIES, max_bytes: int = SESSION_CACHE_BYTES):
        self.entries: OrderedDict = OrderedDict()  # net_id -> (version or blob, blob size)
        self.size = 0
        self.max_entries = max_entries
        self.max_bytes = max_bytes

    def ship(self, net_id: int, kind: int, version: int, blob):
        """The pool's side: the session field to send in a job for this worker."""
        if kind == DISCONNECT:
            self._discard(net_id)
            return None
        if blob is None:
            return None
        entry = self.entries.get(net_id)
        if entry is not None and entry[0] == version:
            self.entries.move_to_end(net_id)
            return HELD
        self._store(net_id, version, len(blob))
        return blob

    def take(self, net_id: int, kind: int, field):
        """The worker's side: the pickled session (or None) a received job's field stands for."""
        if kind == DISCONNECT:
            self._discard(net_id)
            return None
        if field is HELD:
            self.entries.move_to_end(net_id)  # a KeyError here would be a broken promise: loud
            return self.entries[net_id][0]
        if field is not None:
            self._store(net_id, field, len(field))
        return field

    def _store(self, net_id: int, value, size: int) -> None:
        self._discard(net_id)
        if size > self.max_bytes:
            return
        entries = self.entries
        entries[net_id] = (value, size)
        self.size += size
        while len(entries) > self.max_entries or self.size > self.max_bytes:
            self.size -= entries.popitem(last=False)[1][1]

    def _discard(self, net_id: int) -> None:
        entry = self.entries.pop(net_id, None)
        if entry is not None:
            self.size -= entry[1]


def pack(message: tuple) -> bytes:
    return pickle.dumps(message, _PROTOCOL)


unpack = pickle.loads


def frame_record(payload: bytes) -> bytes:
    return _HEADER.pack(len(payload)) + payload


class RecordReader:
    """Splits the byte stream of a worker pipe into records (the payloads, without headers).

    Records are returned as memoryviews into the data read (``pickle.loads`` takes them), so the
    common case, a read holding whole records, copies nothing.
    """

    __slots__ = ("_partial",)

    def __init__(self) -> None:
        self._partial = bytearray()

    def feed(self, data: bytes) -> list:
        if self._partial:
            self._partial += data
            data = bytes(self._partial)
            self._partial.clear()
        view = memoryview(data)
        records = []
        start = 0
        end = len(data)
        unpack_from = _HEADER.unpack_from
        while end - start >= 4:
            (size,) = unpack_from(data, start)
            if end - start - 4 < size:
                break
            records.append(view[start + 4 : start + 4 + size])
            start += 4 + size
        if start < end:
            self._partial += view[start:]
        return records
