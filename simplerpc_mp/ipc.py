"""Messages between the acceptor and its workers, and their framing. Pure: no sockets here.

Each message is a pickled tuple sent as one length-prefixed record (a 4-byte big-endian length,
then the bytes) over a socketpair: blocking in the worker, non-blocking in the acceptor, both
framed with ``frame_record`` and split with ``RecordReader``. (A raw socketpair beat
``multiprocessing`` Pipe, Queue and SimpleQueue in ``bench/ipc_compare.py``.) Pickle only ever
crosses between processes of one server, never from clients.

acceptor -> worker::

    (BATCH, [job, ...])   job = (job_id, kind, net_id, payload, session, rooms, identity)
    (STOP,)               finish what you have, then exit 0

worker -> acceptor::

    (HELLO, pid, info)            booted; info = Handlers.describe()
    (BOOT_ERROR, message)         the handler module cannot be used; exit follows
    (REPLY, [reply, ...])         reply = (job_id, first, count, answers, pushes, session)
    (GIVE_BACK, job_id, line)     lines ``line ..`` of the job will not run here (a time slice
                                  ended while others wait); sent after the replies of the lines before

Taking jobs back: a worker *claims* each job before it starts it, under its claim lock (a
process-shared semaphore): it skips a job whose id is at most ``BOARD_REVOKED``, and otherwise
writes the id to ``BOARD_CLAIMED``. The acceptor, holding the same lock (never blocking on it),
can then take back every job above ``BOARD_CLAIMED`` by raising ``BOARD_REVOKED`` to the last job
it sent: those jobs will never start on that worker, whatever it is doing (a hung handler
included). Job ids only grow, so one number says it all.

``payload`` is one or more complete lines, each ending in LF, exactly as the client sent them.
``answers`` are the encoded answer lines for lines ``first .. first+count-1`` of the job, in
order. ``session`` is a pickled dict, ``None`` for an empty one; in a reply, ``UNCHANGED``
means the job left it as it was. ``rooms`` is the frozenset of the connection's rooms (None for
none) when the job was sent, or ``HELD`` (cached like sessions, in a ``SessionCache`` of its own
per worker: a connection in many rooms does not ship them with every job). ``pushes`` is a list of ``(net_id or BROADCAST, frame)`` and of
room actions (joins, leaves, room pushes: see ``handlers``), in the order the handler made them.
A reply for several lines carries the pushes and session change of its first line only (they
go out before its answers): the worker starts a new reply at any later line that pushes or
changes the session, so one reply per job is the common case, not one per line.

The journal (below) is read by the acceptor while its worker writes it, with no lock and no
memory barrier. A torn read is made detectable on any memory model, not only x86's ordered
stores: every record carries a CRC-32, checked before the record is used; a live read that meets
a record failing it keeps what came before and leaves the rest to the next sweep.

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
import zlib
from collections import OrderedDict

__all__ = [
    "BATCH", "STOP", "HELLO", "BOOT_ERROR", "REPLY", "GIVE_BACK",
    "SERIAL", "CONCURRENT", "CONNECT", "DISCONNECT", "AUTH", "UNCHANGED", "HELD", "SessionCache",
    "RecordReader", "frame_record", "pack", "unpack",
    "EXIT_BOOT_ERROR", "BOARD_SLOTS", "board_view", "JOURNAL_BYTES", "Journal", "read_journal",
]

# message tags
BATCH, STOP, HELLO, BOOT_ERROR, REPLY, GIVE_BACK = range(6)
# job kinds
SERIAL, CONCURRENT, CONNECT, DISCONNECT, AUTH = range(5)  # AUTH: the auth frame, for @handlers.on_auth
UNCHANGED = False
HELD = True  # a job's session: the one this worker was last sent for the net_id (see above)

# A worker that cannot load its handlers exits with this code (gunicorn's APP_LOAD_ERROR idea):
# the supervisor then stops instead of respawning it in a loop.
EXIT_BOOT_ERROR = 4

_HEADER = struct.Struct("!i")
_PROTOCOL = pickle.HIGHEST_PROTOCOL
_crc32 = zlib.crc32

# The progress board: a few int64 slots in shared memory per worker that the worker updates
# before each RPC, so the acceptor can tell, without a message, which RPC a worker is running
# (for per-RPC timeouts, and to know after a crash which RPCs had not started).
BOARD_JOB, BOARD_LINE, BOARD_START_NS, BOARD_TIMEOUT_MS, BOARD_JOURNAL_BYTES, BOARD_JOURNAL_GEN = range(6)
# Written by the worker under its claim lock: the last job it started (never goes down).
# Written by the acceptor under that lock: jobs up to this id must not start (taken back).
# Written by the acceptor: 1 while others wait for a worker (the worker then cuts a long job's
# lines at a time slice and gives the rest back).
BOARD_CLAIMED, BOARD_REVOKED, BOARD_YIELD = 6, 7, 8
BOARD_SLOTS = 9

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
#
# A record is a fixed header (checksum, job_id, first line, line count, answer bytes, extra
# bytes), the answer line(s), then the pickled (pushes, session) only if the RPC pushed or
# changed the session: the common record costs one struct pack, one copy and one crc32, no
# pickling.
#
# Reading a live journal, on any memory model. The worker's stores carry no memory barrier, so
# on a weakly ordered CPU (ARM64: Graviton, Ampere, Apple silicon) the acceptor may see the size
# slot, the generation slot and the record bytes change in any order: a new size with some of a
# record's bytes still old, or a record half overwritten after a clear. The generation counter
# (bumped at each clear; a read that overlapped one is thrown away, a seqlock) is only enough
# where stores stay in order (x86). So each record also carries a CRC-32 of the rest of it,
# written after its other bytes, and read_journal checks it before it uses the record: a torn record
# fails the check (but for a 2**-32 chance), and the read stops there, keeping the whole records
# before it (each checked on its own; an old but whole record is a true reply, which the
# acceptor applies at most once). The sweep comes back 5 ms later and finds the rest. After the
# worker died nothing writes any more and every record the size slot covers is complete, so
# there every check passes. Cost: ~0.2 us per RPC in the worker (bench figure in the commit).
JOURNAL_BYTES = 1024 * 1024
_RECORD = struct.Struct("=Iqiiii")  # crc, job_id, first, count, answer bytes, extra bytes
_RECORD_SIZE = _RECORD.size
_CRC_SIZE = 4  # the checksum covers the record from here on
_pack_record = _RECORD.pack_into
_pack_fields = struct.Struct("=qiiii").pack  # the header after its checksum
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
        view[body:answer_end] = answer
        crc = _crc32(answer, _crc32(_pack_fields(job_id, first, count, answer_end - body, end - answer_end)))
        if extra:
            view[answer_end:end] = extra
            crc = _crc32(extra, crc)
        # The header last: its checksum covers the fields after it and the bytes above.
        _pack_record(view, start, crc, job_id, first, count, answer_end - body, end - answer_end)
        self.offset = end
        self.board[BOARD_JOURNAL_BYTES] = end  # after the bytes (what makes a dead worker's read whole)
        return True

    def clear(self) -> None:
        if self.offset:
            # Size first, then generation: a reader that saw the old size sees the generation
            # change by the time it re-checks (the other order let a reader pair the new
            # generation with the old size and accept a copy torn by the next appends). Where
            # stores may be seen out of order, the checksums catch what this cannot.
            self.offset = 0
            self.board[BOARD_JOURNAL_BYTES] = 0
            self.board[BOARD_JOURNAL_GEN] += 1


def read_journal(shared, board) -> list:
    """The acceptor's side: the replies the worker has not sent (yet), as pipe REPLY items.

    Only records whose checksum holds: a live read that meets a torn record returns the records
    before it (see above), and the next read finds the rest.
    """
    generation = board[BOARD_JOURNAL_GEN]
    size = board[BOARD_JOURNAL_BYTES]
    if size <= 0:
        return []
    data = bytes(memoryview(shared).cast("B")[:size])
    if board[BOARD_JOURNAL_GEN] != generation:
        return []  # cleared while we copied: all of it went down the pipe
    size = len(data)
    view = memoryview(data)
    replies = []
    offset = 0
    while offset + _RECORD_SIZE <= size:
        crc, job_id, first, count, answer_len, extra_len = _RECORD.unpack_from(data, offset)
        body = offset + _RECORD_SIZE
        answer_end = body + answer_len
        end = answer_end + extra_len
        # Lengths first (a torn header may hold any), then the checksum, then unpickling.
        if answer_len < 0 or extra_len < 0 or end > size or _crc32(view[offset + _CRC_SIZE : end]) != crc:
            break  # torn: a live read saw this record before all of its bytes
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
    common case, a read holding whole records, copies nothing. A record split over reads is
    copied once into a buffer of its full size, allocated when its header is known: a 30 MB
    answer arriving 64 KiB at a time costs one copy of 30 MB, not one of the partial record per
    read (that was quadratic: 16 MB took over a second). ``copied_bytes`` counts those copies.
    """

    __slots__ = ("_head", "_record", "_filled", "copied_bytes")

    def __init__(self) -> None:
        self._head = b""  # the start of a header split over reads (under 4 bytes)
        self._record: bytearray | None = None  # the record being filled, once its size is known
        self._filled = 0  # bytes of _record received so far
        self.copied_bytes = 0

    def feed(self, data: bytes) -> list:
        records = []
        start = 0
        end = len(data)
        view = memoryview(data)
        if self._head or self._record is not None:
            start = self._fill(view, records)
            if start == end:
                return records
        unpack_from = _HEADER.unpack_from
        while end - start >= 4:
            (size,) = unpack_from(data, start)
            if end - start - 4 < size:
                break
            records.append(view[start + 4 : start + 4 + size])
            start += 4 + size
        if start < end:
            self._fill(view[start:], records)
        return records

    def _fill(self, data, records: list) -> int:
        """Add the start of ``data`` to the record split over reads; returns how much it took.

        (Takes all of ``data`` unless that completes the record; a completed one joins ``records``.)
        """
        taken = 0
        if self._record is None:
            taken = min(4 - len(self._head), len(data))
            self._head += bytes(data[:taken])
            self.copied_bytes += taken
            if len(self._head) < 4:
                return taken
            (size,) = _HEADER.unpack(self._head)
            self._head = b""
            self._record = bytearray(size)
            self._filled = 0
        record = self._record
        filled = self._filled
        chunk = min(len(record) - filled, len(data) - taken)
        record[filled : filled + chunk] = data[taken : taken + chunk]
        self.copied_bytes += chunk
        self._filled = filled + chunk
        if self._filled == len(record):
            records.append(memoryview(record))
            self._record = None
        return taken + chunk
