"""The Acceptor's fan-out: pushes to one connection, to all, and to rooms; joins and leaves.

Runs in the acceptor process, in its selector loop: ``Fanout`` is a base class of
``acceptor.Acceptor`` (its methods use the acceptor's state), kept here so that acceptor.py holds
reading, answer order and writing, and this file everything a handler's pushes and room actions do.

1. A push appends the worker's encoded frame to the target's ``wbuf`` (``_append_push``); the
   loop's ``flush`` sends it with the answers. Output limits apply per connection as for answers.
2. A broadcast or room push is one frame appended to every target. One that could pass
   ``max_total_output_bytes`` goes through ``_broadcast_within_budget``, which sends as it goes
   and closes the largest outputs first.
3. Room membership is ``self.rooms`` (``rooms.Rooms``). Joins, leaves and room pushes arrive as
   actions among a reply's pushes, applied in the order the handler made them (``room_action``).
4. With ``cluster`` set, what is not for a local connection goes to ``self.cluster``: a push to
   a net_id of another node, every broadcast and room push (once, for the other nodes' members),
   and joins/leaves of another node's connection.
"""

from __future__ import annotations

import logging

from .acceptor import CLOSED, WRITE, Connection
from .handlers import BROADCAST, JOIN, LEAVE, ROOM_PUSH
from .rooms import FULL

log = logging.getLogger("simplerpc_mp.acceptor")

__all__ = ["Fanout"]


class Fanout:
    """The push and room methods of ``Acceptor`` (see the module docstring)."""

    def push(self, target: int, frame: bytes) -> None:
        if target == BROADCAST:
            if self.cluster is not None:
                self.cluster.publish_all(frame)
            self.broadcast(frame)
            return
        conn = self.conns.get(target)
        if conn is None:
            # Not here: on another node of the cluster (published to it), or gone.
            if self.cluster is None or not self.cluster.forward(target, frame):
                self._drop_push(target)
        else:
            self._append_push(conn, frame)

    def deliver(self, target: int, frame: bytes) -> None:
        """A push to a connection of this node (from another node: never forwarded again)."""
        conn = self.conns.get(target)
        if conn is None:
            self._drop_push(target)
        else:
            self._append_push(conn, frame)

    def _drop_push(self, target: int) -> None:
        self.pushes_dropped += 1
        self.log_limit.log(log, "push dropped", logging.DEBUG, "push to gone net_id %s dropped", target)

    def broadcast(self, frame: bytes) -> None:
        """A push to every connection of this node."""
        if self.output_bytes + len(frame) * len(self.conns) > self.max_total_output:
            self._broadcast_within_budget(frame)
            return
        for conn in self.conns.values():
            self._append_push(conn, frame)

    # -- rooms -------------------------------------------------------------------------------

    def room_action(self, action: tuple) -> None:
        """A join, leave or room push a handler made (see handlers' docstring)."""
        tag = action[0]
        if tag == ROOM_PUSH:
            if self.cluster is not None:  # once to the other nodes, each delivers to its members
                self.cluster.publish_room(action[1], action[2], action[3])
            self.push_room(action[1], action[2], action[3])
        elif tag == JOIN:
            self.join_room(action[1], action[2])
        elif tag == LEAVE:
            self.leave_room(action[1], action[2])
        else:
            raise ValueError(f"unknown room action {action!r}")  # a worker out of step: loud

    def join_room(self, net_id: int, room: str) -> None:
        conn = self.conns.get(net_id)
        if conn is None:  # gone (it left all its rooms as it closed): as for a push to it
            if self.cluster is not None and self.cluster.forward_room_op(b"J", net_id, room):
                return  # on another node: its acceptor holds its membership
            self.rooms.ops_dropped += 1
            self.log_limit.log(log, "room op dropped", logging.DEBUG, "join of room %r by gone net_id %s ignored", room, net_id)
            return
        if self.rooms.join(net_id, room) == FULL:
            # The worker refuses the joins it can see (TooManyRooms); this one raced with
            # another RPC's, or came from join_to.
            self.log_limit.log(
                log, "room join refused", logging.WARNING,
                "net_id %s not joined to room %r: it is in max_rooms_per_connection (%d) rooms",
                net_id, room, self.rooms.max_per_connection,
            )

    def leave_room(self, net_id: int, room: str) -> None:
        if net_id not in self.conns:
            if self.cluster is not None and self.cluster.forward_room_op(b"L", net_id, room):
                return
            self.rooms.ops_dropped += 1
            self.log_limit.log(log, "room op dropped", logging.DEBUG, "leave of room %r by gone net_id %s ignored", room, net_id)
            return
        self.rooms.leave(net_id, room)

    def push_room(self, room: str, frame: bytes, exclude: int | None = None) -> None:
        """Append one frame (encoded once, by the worker) to every member's output but
        ``exclude``'s; each member's output limits apply as for any push."""
        rooms = self.rooms
        members = rooms.members(room)
        rooms.pushes += 1
        count = len(members) - (exclude in members)
        if count <= 0:
            rooms.pushes_empty += 1
            return
        size = len(frame)
        if self.output_bytes + size * count > self.max_total_output:
            conns = self.conns
            targets = [conns[n] for n in members if n != exclude and n in conns]
            rooms.deliveries += len(targets)
            self._broadcast_within_budget(frame, targets)
            return
        # The common case inlines _append_push: this loop is the whole cost of a 10,000-member push.
        # (Members not among this acceptor's connections are skipped: a cluster layer may keep
        # other nodes' members in the same table.)
        conns = self.conns
        dirty = self.dirty
        for net_id in members:
            if net_id == exclude:
                continue
            conn = conns.get(net_id)
            if conn is None:
                count -= 1
                continue
            wbuf = conn.wbuf
            if not wbuf or conn.events & WRITE:
                dirty.append(conn)
            wbuf += frame
        self.output_bytes += size * count
        self.pushes_total += count
        rooms.deliveries += count

    def _append_push(self, conn: Connection, frame: bytes) -> None:
        if not conn.wbuf or conn.events & WRITE:
            self.dirty.append(conn)
        conn.wbuf += frame
        self.output_bytes += len(frame)
        self.pushes_total += 1

    def _broadcast_within_budget(self, frame: bytes, targets: list | None = None) -> None:
        """A broadcast (or room push, to ``targets``) that could pass max_total_output_bytes. A
        connection that takes its copy is sent it at once, so readers hold nothing; once the
        total passes the budget, the largest outputs are closed, with room left for the copies
        still to go to blocked connections, so the connections that come last are not closed
        merely for coming last."""
        if targets is None:
            targets = list(self.conns.values())
        blocked = [bool(conn.events & WRITE) for conn in targets]
        to_come = sum(blocked)
        for conn, was_blocked in zip(targets, blocked):
            to_come -= was_blocked
            if conn.state == CLOSED:  # closed for the budget a moment ago
                continue
            self._append_push(conn, frame)
            if not conn.events & WRITE:
                self._send(conn)
            if self.output_bytes > self.max_total_output:
                self._shed_output(max(self.max_total_output - to_come * len(frame), 0))
