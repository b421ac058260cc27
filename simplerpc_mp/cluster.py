"""A cluster of servers over Redis pub/sub: node identity, heartbeat, net_ids and push routing.

Runs in the acceptor process only, and only when the ``cluster`` setting names a Redis URL;
workers know nothing of it. Its two ``broker.RedisLink`` connections live in the acceptor's
selector loop, so Redis never blocks local serving.

Theory of operation:

1. **Identity.** Each node claims two keys with a TTL (``cluster_node_ttl``) in one Lua script:
   ``simplerpc-mp:node:<node_name>`` (its heartbeat, which also carries its connection count) and
   ``simplerpc-mp:number:<n>``, a node number drawn at random from 1 .. 2**21-1. The script
   refreshes keys that hold this process's token and refuses ones another node holds: a second
   node under the ``node_name`` of a live node exits 2 (live: its key was refreshed while this
   one waited; the name of a node that died is taken once its key expires); a number taken is
   drawn again. The claim is
   repeated every third of the TTL, so a node killed with SIGKILL leaves within the TTL.
2. **net_ids.** A joined node numbers its connections ``n << 32 | counter``: unique across the
   cluster and below 2**53 (JSON-safe for JavaScript clients). A single server (no ``cluster``)
   keeps 1, 2, 3, ... So does a node until it first joins (Redis down at start): those
   connections keep ids below 2**32, which are local to their node, so a push from another node
   can't name them (``rpc_all`` and rooms still reach them: each node delivers those to its own
   clients). Numbers are random, not an INCR counter, because a Redis restarted without
   persistence forgets counters while the live nodes still hold their numbers.
3. **Routing.** A push whose net_id is not on this node is published once to the owner's channel
   ``simplerpc-mp:to:<n>`` (the number is in the net_id: no lookup). ``rpc_all`` and room pushes
   are published once to ``simplerpc-mp:all``; every node delivers them to its own clients and
   skips its own messages. A PUBLISH that reached no node (the owner is gone) counts as dropped.
   Redis writes a publisher's messages to each subscriber in the order it received them, over one
   connection each way, so the pushes from one node to one connection keep their order.
4. **Outages.** Without Redis (or past ``cluster_buffer_bytes`` of unsent messages) cross-node
   pushes are dropped and counted; local RPCs and pushes are untouched. The links reconnect with
   back-off, the node claims its keys again and subscribes again. The outage is logged once at
   its start and once at its end. Delivery is at most once: Redis pub/sub keeps nothing for a
   subscriber that is not connected.

Message layout on the channels (one byte of kind, a header, then the push frame as the worker
encoded it, ``OP{json}\\n``):  ``T<net_id> <frame>`` to one connection; ``A<origin> <frame>`` to
every client; ``R<origin> <excluded net_id or 0> <length> <room><frame>`` to a room's members
(the room's UTF-8 name, ``length`` bytes); ``J<net_id> <room>`` / ``L<net_id> <room>``, a
``join_to`` / ``leave_to`` sent to the node holding the connection.

Room membership stays with the node holding the connection (its acceptor's ``rooms.Rooms``):
a room push goes once to every node, and each delivers it to its own members. Ordering holds
here too: a ``join_to`` then an ``rpc_room`` from one handler reach the other node in that order.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import time

import hiredis

from .broker import CONNECTING, DOWN, UP, RedisLink, parse_url
from .protocol import loads_untrusted
from .rooms import check_room
from .supervisor import FatalError

log = logging.getLogger("simplerpc_mp.cluster")

__all__ = ["Cluster", "node_key", "PREFIX", "MAX_NODE_NUMBER", "NET_ID_BITS"]

PREFIX = "simplerpc-mp:"
NET_ID_BITS = 32  # the per-node counter; the node number sits above it
MAX_NODE_NUMBER = 2**21 - 1  # so that a net_id stays below 2**53
EXIT_CONFIG = 2  # as server.EXIT_CONFIG (server imports this module, not the other way round)
# Heartbeat replies missed in a row before a link that looks up is dropped and reconnected (a
# Redis that hangs keeps its TCP connection open: only silence tells).
MAX_MISSED_BEATS = 2

# KEYS: node key, number key; ARGV: token, ttl_ms, info. 1 claimed (or refreshed), {0, its PTTL}
# the name is held by another node, -1 the number is.
_CLAIM = """
local function held_by_other(key)
  local v = redis.call('GET', key)
  return v and string.sub(v, 1, #ARGV[1]) ~= ARGV[1]
end
if held_by_other(KEYS[1]) then return {0, redis.call('PTTL', KEYS[1])} end
if held_by_other(KEYS[2]) then return -1 end
redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. ARGV[3], 'PX', ARGV[2])
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return 1
"""
# KEYS: node key, number key; ARGV: token. Deletes the keys this process holds (a graceful stop).
_RELEASE = """
for _, key in ipairs(KEYS) do
  local v = redis.call('GET', key)
  if v and string.sub(v, 1, #ARGV[1]) == ARGV[1] then redis.call('DEL', key) end
end
return 1
"""


def node_key(name: str) -> str:
    return PREFIX + "node:" + name


def default_node_name(port: int) -> str:
    return f"{socket.gethostname()}:{port}"


class Cluster:
    """This node's membership of the cluster; ``acceptor.cluster`` while ``cluster`` is set."""

    def __init__(self, settings, selector, timers, acceptor, port: int):
        self.url = parse_url(settings.cluster)
        self.name = settings.node_name or default_node_name(port)
        self.ttl_s = settings.cluster_node_ttl
        self.acceptor = acceptor
        self.timers = timers
        self.token = os.urandom(16).hex()
        self.number = _draw_number()
        self.numbered = False  # connections were numbered n << 32: the number is in use
        self.claimed = False  # the keys are ours (the command link is up)
        self.confirmed: set[bytes] = set()  # channels Redis confirmed (the subscriber link)
        self.joined = False
        self.ever_joined = False
        self.outage_since = 0.0  # 0: no outage logged now
        self.missed_beats = 0
        self.missed_pongs = 0
        self.held_seen: tuple | None = None  # (when, PTTL) of the key of another node holding our name
        self.conflict_logged = False
        self.scanning = False
        self.nodes: dict[str, dict] = {}  # the live nodes, as of the last heartbeat
        self.beat_timer = None
        # Counters (stats).
        self.forwarded = 0  # pushes published to another node
        self.broadcasts = 0  # rpc_all published
        self.room_pushes = 0  # rpc_room published
        self.received = 0  # messages from other nodes delivered here
        self.dropped_down = 0  # cross-node pushes dropped: Redis not reachable
        self.dropped_buffer = 0  # cross-node pushes dropped: over cluster_buffer_bytes
        self.dropped_no_node = 0  # published to a node number nobody holds
        self.dropped_at_outage = 0
        self.outages = 0
        self.all_channel = (PREFIX + "all").encode()
        self.cmd = RedisLink(self.url, selector, timers, name="command", max_buffer_bytes=settings.cluster_buffer_bytes,
                             on_up=self._cmd_up, on_down=self._link_down, on_fail=self._attempt_failed)
        self.sub = RedisLink(self.url, selector, timers, name="subscriber", max_buffer_bytes=settings.cluster_buffer_bytes,
                             on_up=self._sub_up, on_down=self._link_down, on_fail=self._attempt_failed,
                             on_message=self._on_message)
        self.sub.subscribe([self.all_channel, self._channel(self.number)])

    # -- life --------------------------------------------------------------------------------

    def start(self) -> None:
        log.info("cluster: node %s connecting to Redis at %s", self.name, self.url.safe)
        self.cmd.start()
        self.sub.start()
        self.beat_timer = self.timers.call_later(self.ttl_s / 3, self._beat)

    def close(self) -> None:
        """The server stops: give up the keys (one non-blocking try; else the TTL does it)."""
        if self.beat_timer is not None:
            self.beat_timer.cancel()
        if self.claimed:
            self.cmd.command(["EVAL", _RELEASE, 2, node_key(self.name), self._number_key(), self.token])
        self.cmd.close()
        self.sub.close()
        log.info(
            "cluster: node %s left (pushes to other nodes: %d, rpc_all published: %d, rpc_room published: %d, "
            "messages received: %d; dropped: %d while Redis was away, %d over cluster_buffer_bytes, %d to a node "
            "that has gone)",
            self.name, self.forwarded, self.broadcasts, self.room_pushes, self.received, self.dropped_down,
            self.dropped_buffer, self.dropped_no_node,
        )

    # -- routing (called by the acceptor) ----------------------------------------------------

    def forward(self, net_id: int, frame: bytes) -> bool:
        """A push to a net_id this node does not hold: publish it to the owner. False when the
        net_id would be this node's (the acceptor drops and counts it as a gone connection)."""
        number = net_id >> NET_ID_BITS
        if number == 0 or number == self.number or number > MAX_NODE_NUMBER or net_id < 0:
            return False
        if not self.claimed:
            self.dropped_down += 1
            return True
        if self.cmd.command([b"PUBLISH", self._channel(number), b"T%d " % net_id + frame], self._published):
            self.forwarded += 1
        else:
            self.dropped_buffer += 1
        return True

    def publish_all(self, frame: bytes) -> None:
        """An ``rpc_all``: once to every other node (this node delivers to its own clients)."""
        if not self.claimed:
            self.dropped_down += 1
        elif self.cmd.command([b"PUBLISH", self.all_channel, b"A%d " % self.number + frame]):
            self.broadcasts += 1
        else:
            self.dropped_buffer += 1

    def publish_room(self, room: str, frame: bytes, exclude: int | None) -> None:
        """An ``rpc_room``: once to every other node, each delivering to its own members
        (``exclude``, the pusher's net_id with ``exclude_self``, is skipped wherever it is)."""
        if not self.claimed:
            self.dropped_down += 1
            return
        name = room.encode("utf-8", "surrogatepass")  # (a handler may build any str)
        # The pusher is this node's, so no other node holds its net_id, unless it was numbered
        # before this node joined (or under a number given up since): such ids are each node's
        # own, and another node's connection of the same number must not be left out.
        if exclude is not None and exclude >> NET_ID_BITS != self.number:
            exclude = None
        message = b"R%d %d %d " % (self.number, exclude or 0, len(name)) + name + frame
        if self.cmd.command([b"PUBLISH", self.all_channel, message]):
            self.room_pushes += 1
        else:
            self.dropped_buffer += 1

    def forward_room_op(self, tag: bytes, net_id: int, room: str) -> bool:
        """A ``join_to``/``leave_to`` (``tag`` J or L) for a net_id not on this node: to its
        node, whose acceptor holds that connection's membership. False as for ``forward``."""
        number = net_id >> NET_ID_BITS
        if number == 0 or number == self.number or number > MAX_NODE_NUMBER or net_id < 0:
            return False
        if not self.claimed:
            self.dropped_down += 1
        elif self.cmd.command([b"PUBLISH", self._channel(number), tag + b"%d " % net_id + room.encode("utf-8", "surrogatepass")],
                              self._published):
            self.forwarded += 1
        else:
            self.dropped_buffer += 1
        return True

    def _published(self, receivers) -> None:
        if receivers == 0:  # no node subscribes to that number: it has gone
            self.dropped_no_node += 1

    def _on_message(self, kind: bytes, channel: bytes, data) -> None:
        if kind == b"message":
            try:
                self._deliver(data)
            except (ValueError, IndexError) as exc:  # (UnicodeDecodeError is a ValueError)
                # Anyone who can publish on this Redis can send anything: drop it, don't crash.
                self.acceptor.log_limit.log(log, "cluster message", logging.WARNING,
                                            "cluster: malformed message on %s dropped: %s", channel, exc)
        elif kind == b"subscribe":
            self.confirmed.add(channel)
            self._check_joined()
        elif kind == b"pong":
            self.missed_pongs = 0

    def _deliver(self, data: bytes) -> None:
        head, _, frame = data.partition(b" ")
        tag = head[:1]
        if tag in (b"J", b"L"):
            self.received += 1
            net_id, room = int(head[1:]), check_room(frame.decode("utf-8", "surrogatepass"))
            if net_id not in self.acceptor.conns:
                self.acceptor.rooms.ops_dropped += 1  # gone, as for a push to it
            elif tag == b"J":
                self.acceptor.join_room(net_id, room)
            else:
                self.acceptor.leave_room(net_id, room)
            return
        origin_or_target = int(head[1:])
        if tag == b"R":
            exclude, _, rest = frame.partition(b" ")
            size, _, rest = rest.partition(b" ")
            size = int(size)
            room, frame = check_room(rest[:size].decode("utf-8", "surrogatepass")), rest[size:]
        # What goes into a client's output must be one protocol line, whoever published it.
        if frame[-1:] != b"\n" or frame.find(b"\n") != len(frame) - 1:
            raise ValueError("the push is not one line")
        if tag == b"T":
            self.received += 1
            self.acceptor.deliver(origin_or_target, frame)
        elif origin_or_target == self.number:
            return  # this node's own rpc_all or room push: delivered here when it was made
        elif tag == b"A":
            self.received += 1
            self.acceptor.broadcast(frame)
        elif tag == b"R":
            self.received += 1
            self.acceptor.push_room(room, frame, int(exclude) or None)
        else:
            raise ValueError(f"unknown kind {tag!r} (a newer version in the cluster?)")

    @staticmethod
    def _channel(number: int) -> bytes:
        return b"%sto:%d" % (PREFIX.encode(), number)

    def _number_key(self) -> str:
        return f"{PREFIX}number:{self.number}"

    # -- joining -----------------------------------------------------------------------------

    def _cmd_up(self) -> None:
        self.missed_beats = 0
        # A scan whose reply was lost with the old connection (its callbacks are dropped) must
        # not keep the view of the nodes from ever being refreshed again.
        self.scanning = False
        self._claim()

    def _sub_up(self) -> None:
        self.missed_pongs = 0

    def _claim(self) -> None:
        info = json.dumps({"number": self.number, "connections": len(self.acceptor.conns), "pid": os.getpid()})
        args = ["EVAL", _CLAIM, 2, node_key(self.name), self._number_key(), self.token, int(self.ttl_s * 1000), info]
        if self.cmd.command(args, self._claimed):
            self.missed_beats += 1  # until its reply comes

    def _claimed(self, reply) -> None:
        self.missed_beats = 0
        if isinstance(reply, hiredis.ReplyError):
            log.error("cluster: Redis refused the heartbeat script: %s", reply)
            self.cmd.reset(f"heartbeat refused: {reply}")
            return
        if reply == 1:
            self.held_seen = None
            self.conflict_logged = False
            if not self.claimed:
                self.claimed = True
                self._check_joined()
            return
        if isinstance(reply, list) and reply and reply[0] == 0:
            if not self._holder_alive(reply[1]):
                return  # the next heartbeat claims again
            message = (
                f"node_name {self.name!r} is held by another live node of the cluster at {self.url.safe} "
                f"(its heartbeat key {node_key(self.name)} is refreshed): give each node its own node_name"
            )
            if not self.ever_joined:
                raise FatalError(message, EXIT_CONFIG)
            # We were away longer than the TTL and another node took the name: stay out and retry
            # (logged once: the outage line may have been written already).
            if not self.conflict_logged:
                self.conflict_logged = True
                log.error("cluster: %s; this node stays out of the cluster until the name is free", message)
            self.claimed = False
            self.cmd.reset(message)
            return
        # -1: the number is taken. Before connections use it, draw another; after, too (those
        # connections can't be reached from other nodes any more, which beats reaching two).
        old = self.number
        if self.numbered:
            log.warning("cluster: node number %d was taken by another node while this one was away; "
                        "connections accepted before can't be reached from other nodes any more", old)
        self.number = _draw_number()
        self.numbered = False
        self.claimed = False
        self.sub.unsubscribe([self._channel(old)])
        self.confirmed.discard(self._channel(old))
        self.sub.subscribe([self._channel(self.number)])
        self._claim()

    def _holder_alive(self, held_ms: int) -> bool:
        """Is the node holding our name alive? A node killed a moment ago (a pod replaced under
        the same name) still holds it until its TTL ends, so wait for the evidence: a live
        holder refreshes the key every third of the TTL, so its PTTL jumps back up between two
        of our heartbeats; a dead one's only falls until the key expires and the claim succeeds."""
        now = time.monotonic()
        if self.held_seen is None:
            self.held_seen = (now, held_ms)
            log.info("cluster: node_name %r is held by another node (its heartbeat key expires in %.1fs unless "
                     "refreshed): waiting to see whether that node is alive", self.name, held_ms / 1000)
            return False
        seen_at, seen_ms = self.held_seen
        expected_ms = seen_ms - (now - seen_at) * 1000
        # A refresh puts back about a third of the TTL (the holder's period); half of that is the
        # slack for the delays of our own two readings.
        if held_ms > expected_ms + self.ttl_s * 1000 / 6:
            self.held_seen = None
            return True
        return False

    def _check_joined(self) -> None:
        if self.joined or not self.claimed or not {self.all_channel, self._channel(self.number)} <= self.confirmed:
            return
        self.joined = True
        if not self.numbered:
            self.numbered = True
            # From now on this node's connections are numbered n << 32 | counter (see above).
            self.acceptor.next_net_id = (self.number << NET_ID_BITS) | 1
        if self.outage_since:
            log.warning(
                "cluster: Redis at %s is back after %.1fs: node %s joined (number %d); %d cross-node pushes dropped meanwhile",
                self.url.safe, time.monotonic() - self.outage_since, self.name, self.number,
                self._dropped() - self.dropped_at_outage,
            )
            self.outage_since = 0.0
        else:
            log.info("cluster: node %s joined the cluster at %s (node number %d)", self.name, self.url.safe, self.number)
        self.ever_joined = True
        self._scan_nodes()

    def _link_down(self, reason: str) -> None:
        self.claimed = self.claimed and self.cmd.state == UP
        if self.sub.state != UP:
            self.confirmed.clear()
        if self.joined:
            self.joined = False
            self.outages += 1
            self._outage_starts(f"lost Redis at {self.url.safe} ({reason}): serving this node's clients only, "
                                "cross-node pushes are dropped until it is back")

    def _attempt_failed(self, reason: str) -> None:
        if not self.joined and not self.outage_since:
            self._outage_starts(f"cannot reach Redis at {self.url.safe} ({reason}): serving this node's clients "
                                "only, joining the cluster when it is reachable")

    def _outage_starts(self, message: str) -> None:
        if not self.outage_since:
            self.outage_since = time.monotonic()
            self.dropped_at_outage = self._dropped()
            log.warning("cluster: %s", message)

    # -- heartbeat and the view of the cluster ------------------------------------------------

    def _beat(self) -> None:
        self.beat_timer = self.timers.call_later(self.ttl_s / 3, self._beat)
        if self.cmd.state == UP:
            if self.missed_beats >= MAX_MISSED_BEATS:
                self.cmd.reset(f"no reply from Redis for {self.ttl_s * MAX_MISSED_BEATS / 3:.1f}s")
            else:
                self._claim()
                if self.joined:
                    self._scan_nodes()
        if self.sub.state == UP:
            if self.missed_pongs >= MAX_MISSED_BEATS:
                self.sub.reset(f"no reply from Redis for {self.ttl_s * MAX_MISSED_BEATS / 3:.1f}s")
            elif self.sub.ping():
                self.missed_pongs += 1

    def _scan_nodes(self, cursor: bytes = b"0", keys: list | None = None) -> None:
        if self.scanning and keys is None:
            return
        self.scanning = True
        keys = keys if keys is not None else []

        def scanned(reply) -> None:
            if isinstance(reply, hiredis.ReplyError):
                self.scanning = False
                return
            next_cursor, found = reply
            keys.extend(found)
            if next_cursor != b"0":
                self._scan_nodes(next_cursor, keys)
            elif keys:
                if not self.cmd.command([b"MGET", *keys], lambda values: self._nodes_read(keys, values)):
                    self.scanning = False
            else:
                self._nodes_read([], [])

        if not self.cmd.command([b"SCAN", cursor, b"MATCH", node_key("*"), b"COUNT", 1000], scanned):
            self.scanning = False

    def _nodes_read(self, keys: list, values) -> None:
        self.scanning = False
        if isinstance(values, hiredis.ReplyError):
            return
        nodes = {}
        prefix = len(node_key(""))
        for key, value in zip(keys, values):
            if value is None:
                continue  # expired between SCAN and MGET
            _, _, info = value.partition(b" ")
            try:
                info = loads_untrusted(info)
            except ValueError:
                continue
            if isinstance(info, dict):  # (anyone who can write to the Redis can put anything there)
                nodes[key[prefix:].decode("utf-8", "replace")] = info
        self.nodes = nodes

    # -- stats -------------------------------------------------------------------------------

    def _dropped(self) -> int:
        return self.dropped_down + self.dropped_buffer + self.dropped_no_node

    @property
    def broker_state(self) -> str:
        if self.joined:
            return UP
        if CONNECTING in (self.cmd.state, self.sub.state) and not self.outage_since:
            return CONNECTING
        return DOWN

    def stats(self) -> dict:
        """The numbers for ``stats``: the broker's state and the live nodes with their connections.

        ``nodes`` is as of the last heartbeat (every third of ``cluster_node_ttl``); this node's
        own entry is current.
        """
        nodes = dict(self.nodes)
        nodes[self.name] = {"number": self.number, "connections": len(self.acceptor.conns), "pid": os.getpid()}
        return {
            "node_name": self.name,
            "node_number": self.number,
            "broker": self.broker_state,
            "url": self.url.safe,
            "outages": self.outages,
            "outage_s": round(time.monotonic() - self.outage_since, 3) if self.outage_since else 0.0,
            "pushes_forwarded": self.forwarded,
            "broadcasts_published": self.broadcasts,
            "room_pushes_published": self.room_pushes,
            "pushes_received": self.received,
            "pushes_dropped": {"redis_down": self.dropped_down, "buffer_full": self.dropped_buffer,
                               "no_node": self.dropped_no_node},
            "buffered_bytes": self.cmd.buffered,
            "links": {link.name: {"state": link.state, "connects": link.connects, "last_error": link.last_error}
                      for link in (self.cmd, self.sub)},
            "nodes": [{"name": name, **info} for name, info in sorted(nodes.items())],
        }


def _draw_number() -> int:
    return random.randint(1, MAX_NODE_NUMBER)
