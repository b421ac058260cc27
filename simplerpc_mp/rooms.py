"""Room membership: which connections are in which room. Pure: no sockets, no logging.

Runs in the acceptor (main server process), which owns membership: workers only ask for
changes (``conn.join``, ``conn.leave``, ``join_to``, ``leave_to``) and pushes (``rpc_room``),
as actions in the list that carries their pushes (see ``ipc``), applied in the order the handler
made them, before its answer is written. A cluster layer can drive the same table: everything
here is a plain method call on net_ids and room names.

Rules:

1. ``room_members[room]`` is the set of net_ids in the room and ``conn_rooms[net_id]`` the rooms of a
   connection; the two always mirror each other, and neither holds an empty set: a room is freed
   when its last member leaves, a connection's entry when it leaves its last room. Memory follows
   members, not history.
2. ``join`` past ``max_rooms_per_connection`` changes nothing and is counted (``joins_refused``);
   the worker raises ``TooManyRooms`` itself for the joins it can see, this is the backstop for
   concurrent joins that raced (and for ``join_to``, whose target's rooms the worker can't see).
3. ``opened`` / ``freed``, when set, are called with a room's name when it gets its first member
   and when it loses its last (a cluster layer subscribes and unsubscribes there).
4. Room names are validated by ``check_room`` in the handler, never here: the acceptor trusts its
   workers.
"""

from __future__ import annotations

import heapq
from typing import Callable

__all__ = ["Rooms", "check_room", "MAX_ROOM_CHARS", "JOINED", "ALREADY", "FULL"]

# A name is a key in the acceptor's tables and travels with every job of its members: bounded.
MAX_ROOM_CHARS = 200

# What ``Rooms.join`` did.
JOINED, ALREADY, FULL = range(3)

_EMPTY: frozenset = frozenset()


def check_room(room) -> str:
    """The room name, or ``ValueError``: a non-empty ``str`` of at most 200 characters."""
    if type(room) is not str:
        if not isinstance(room, str):
            raise ValueError(f"room name must be a str, got {type(room).__name__}")
        room = str.__str__(room)  # a plain str: a subclass's own methods are not trusted (or pickled)
    if not room:
        raise ValueError("room name must not be empty")
    if len(room) > MAX_ROOM_CHARS:
        raise ValueError(f"room name is {len(room)} characters, over {MAX_ROOM_CHARS}")
    return room


class Rooms:
    """The membership table (see the module docstring) and its counters."""

    __slots__ = (
        "room_members", "conn_rooms", "max_per_connection", "opened", "freed", "_frozen", "_versions",
        "memberships", "joins", "leaves", "joins_refused", "ops_dropped", "pushes", "pushes_empty", "deliveries",
    )

    def __init__(self, max_per_connection: int = 1000):
        self.room_members: dict[str, set[int]] = {}
        self.conn_rooms: dict[int, set[str]] = {}
        self.max_per_connection = max_per_connection
        self.opened: Callable[[str], None] | None = None
        self.freed: Callable[[str], None] | None = None
        # shipped() results, (version, frozenset), dropped on change; versions are never reused,
        # so a worker holding a connection's set (ipc.SessionCache) can be told it is unchanged.
        self._frozen: dict[int, tuple[int, frozenset]] = {}
        self._versions = 0
        self.memberships = 0  # sum of the members of every room
        self.joins = 0
        self.leaves = 0
        self.joins_refused = 0  # past max_per_connection
        self.ops_dropped = 0  # join_to/leave_to/join for a net_id that has gone (counted by the caller)
        self.pushes = 0  # room pushes made, reaching anyone or not
        self.pushes_empty = 0  # of those, to an empty or unknown room
        self.deliveries = 0  # copies appended to members' output

    def join(self, net_id: int, room: str) -> int:
        """Put ``net_id`` in ``room``: ``JOINED``, ``ALREADY`` (a member), or ``FULL`` (refused)."""
        rooms = self.conn_rooms.get(net_id)
        if rooms is not None:
            if room in rooms:
                return ALREADY
            if len(rooms) >= self.max_per_connection:
                self.joins_refused += 1
                return FULL
            rooms.add(room)
        else:
            self.conn_rooms[net_id] = {room}
        self._frozen.pop(net_id, None)
        members = self.room_members.get(room)
        if members is None:
            members = self.room_members[room] = set()
            if self.opened is not None:
                self.opened(room)
        members.add(net_id)
        self.memberships += 1
        self.joins += 1
        return JOINED

    def leave(self, net_id: int, room: str) -> bool:
        """Take ``net_id`` out of ``room``; False if it was not in it."""
        rooms = self.conn_rooms.get(net_id)
        if rooms is None or room not in rooms:
            return False
        rooms.discard(room)
        if not rooms:
            del self.conn_rooms[net_id]
        self._frozen.pop(net_id, None)
        self._drop_member(room, net_id)
        self.memberships -= 1
        self.leaves += 1
        return True

    def leave_all(self, net_id: int) -> list[str]:
        """Take ``net_id`` out of every room (it closed); returns the rooms it left."""
        rooms = self.conn_rooms.pop(net_id, None)
        if rooms is None:
            return []
        self._frozen.pop(net_id, None)
        for room in rooms:
            self._drop_member(room, net_id)
        self.memberships -= len(rooms)
        self.leaves += len(rooms)
        return list(rooms)

    def _drop_member(self, room: str, net_id: int) -> None:
        members = self.room_members[room]
        members.discard(net_id)
        if not members:
            del self.room_members[room]
            if self.freed is not None:
                self.freed(room)

    def members(self, room: str) -> set[int] | frozenset:
        """The net_ids in ``room`` (the live set: copy it before changing membership while
        iterating); an empty frozenset for an unknown room."""
        return self.room_members.get(room, _EMPTY)

    def rooms_of(self, net_id: int) -> frozenset | None:
        """The connection's rooms as a frozenset, None if in none."""
        shipped = self.shipped(net_id)
        return None if shipped is None else shipped[1]

    def shipped(self, net_id: int) -> tuple[int, frozenset] | None:
        """``(version, rooms)``: what a job ships to the worker as ``conn.rooms`` (cached until
        they change; the version changes with them), None if in no room."""
        shipped = self._frozen.get(net_id)
        if shipped is None:
            rooms = self.conn_rooms.get(net_id)
            if rooms is None:
                return None
            self._versions += 1
            shipped = self._frozen[net_id] = (self._versions, frozenset(rooms))
        return shipped

    def largest(self, count: int = 10) -> list[dict]:
        """The ``count`` rooms with the most members, largest first."""
        top = heapq.nlargest(count, self.room_members.items(), key=lambda item: len(item[1]))
        return [{"room": room, "members": len(members)} for room, members in top]

    def stats(self, largest: int = 10) -> dict:
        """Counts for stats/metrics: how many rooms, memberships, the largest rooms and pushes."""
        return {
            "rooms": len(self.room_members),
            "room_members": self.memberships,
            "largest_rooms": self.largest(largest),
            "room_pushes": self.pushes,
            "room_pushes_empty": self.pushes_empty,
            "room_deliveries": self.deliveries,
            "room_joins": self.joins,
            "room_leaves": self.leaves,
            "room_joins_refused": self.joins_refused,
            "room_ops_dropped": self.ops_dropped,
        }

    def __len__(self) -> int:
        return len(self.room_members)
