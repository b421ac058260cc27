"""A non-blocking Redis connection that lives in the acceptor's selector loop.

Runs in the acceptor process only (``cluster.py`` owns two of these: one for commands and
PUBLISH, one subscribed to the node's channels). It never blocks the loop:

- the socket is non-blocking and registered with the loop's selector (``on_event(mask)``);
  connecting, the TLS handshake (``rediss://``), AUTH and SELECT are steps of a small state
  machine, bounded by ``CONNECT_TIMEOUT_S``; the one blocking call, the name lookup, runs in a
  thread of its own (``_Lookup``);
- replies are parsed by ``hiredis.Reader`` (sans-IO: feed bytes, take replies); commands are
  encoded here as RESP arrays, which is all a request is;
- what waits to be sent is capped (``max_buffer_bytes``): past it, and whenever the link is not
  up, ``command()`` returns False and the caller counts a dropped message, so a slow or gone
  Redis costs dropped pushes, never memory;
- a lost connection is retried with exponential back-off (``BACKOFF_MIN_S`` .. ``BACKOFF_MAX_S``,
  with jitter); a subscriber link subscribes to its channels again each time it is up.

The owner is told through ``on_up()``, ``on_down(reason)`` (an up link was lost) and
``on_fail(reason)`` (an attempt failed; logging an outage once is the owner's job), and a
subscriber link hands each pub/sub message to ``on_message(kind, channel, data)``.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import selectors
import socket
import ssl
import threading
from collections import deque
from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis

from .config import redact_url

log = logging.getLogger("simplerpc_mp.broker")

__all__ = [
    "RedisURL", "RedisURLError", "RedisLink", "parse_url", "tls_context", "encode_command", "probe", "DOWN", "CONNECTING", "UP",
]

READ, WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
DEFAULT_PORT = 6379
# From the first connect() to the last handshake reply (AUTH, SELECT): a Redis that takes longer
# is treated as down, and the attempt is made again after the back-off.
CONNECT_TIMEOUT_S = 5.0
# Reconnect delays double from the first to the last; each is jittered by +-20% so the nodes of a
# cluster don't all reconnect in the same millisecond after Redis comes back.
BACKOFF_MIN_S = 0.1
BACKOFF_MAX_S = 2.0
RECV_BYTES = 256 * 1024
# How often the loop looks whether a name lookup running in its thread has ended.
LOOKUP_POLL_S = 0.05

DOWN, CONNECTING, UP = "down", "connecting", "up"


class RedisURLError(ValueError):
    """The ``cluster`` setting is not a Redis URL we can use; the message is one line."""


@dataclass(frozen=True)
class RedisURL:
    host: str
    port: int
    username: str = ""
    password: str = ""
    db: int = 0
    tls: bool = False
    ca_certs: str = ""  # rediss:// ?ssl_ca_certs=FILE (redis-py's name); default: the system's CAs
    verify: bool = True  # rediss:// ?ssl_cert_reqs=none turns verification off
    text: str = field(default="", compare=False)

    @property
    def safe(self) -> str:
        """The URL without its password, for logs."""
        scheme = "rediss" if self.tls else "redis"
        user = f"{self.username}:***@" if self.password else ""
        return f"{scheme}://{user}{self.host}:{self.port}/{self.db}"


def parse_url(text: str) -> RedisURL:
    """``redis://[user:password@]host[:port][/db]`` or ``rediss://...``; raises ``RedisURLError``
    (whose message shows the URL without its password)."""
    parts = urlsplit(text)
    shown = redact_url(text)
    if parts.scheme not in ("redis", "rediss"):
        raise RedisURLError(f"cluster: expected a redis:// or rediss:// URL, got {shown!r}")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise RedisURLError(f"cluster: bad port in {shown!r}") from None
    if not parts.hostname:
        raise RedisURLError(f"cluster: no host in {shown!r}")
    try:
        parts.hostname.encode("idna")  # as getaddrinfo will: an empty or too long label can't be looked up
    except UnicodeError:
        raise RedisURLError(f"cluster: bad host name in {shown!r}") from None
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise RedisURLError(f"cluster: the path of {shown!r} must be a database number, got {path!r}")
    query = parse_qs(parts.query)
    return RedisURL(
        host=parts.hostname,
        port=port,
        username=unquote(parts.username or ""),
        password=unquote(parts.password or ""),
        db=int(path or 0),
        tls=parts.scheme == "rediss",
        ca_certs=query.get("ssl_ca_certs", [""])[0],
        verify=query.get("ssl_cert_reqs", ["required"])[0].lower() != "none",
        text=text,
    )


def tls_context(url: RedisURL) -> ssl.SSLContext | None:
    """The TLS context of a ``rediss://`` URL (None for ``redis://``). Raises ``OSError`` (an
    ``ssl.SSLError`` included) when its ``ssl_ca_certs`` file can't be loaded: a setting to fix,
    checked at start, since a link builds its context once."""
    if not url.tls:
        return None
    context = ssl.create_default_context(cafile=url.ca_certs or None)
    if not url.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def encode_command(args) -> bytes:
    """A command as a RESP array of bulk strings (str is sent as UTF-8, int as its digits)."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, str):
            arg = arg.encode("utf-8")
        elif isinstance(arg, int):
            arg = b"%d" % arg
        out.append(b"$%d\r\n" % len(arg))
        out.append(arg)
        out.append(b"\r\n")
    return b"".join(out)


class RedisLink:
    """One connection to Redis, kept up for as long as the owner wants it (``start``/``close``).

    ``command(args, callback)`` queues a command; ``callback(reply)`` gets its reply (a
    ``hiredis.ReplyError`` instance for an error reply). On a subscriber link use
    ``subscribe``/``unsubscribe``; replies there are pub/sub messages, not answers.
    """

    def __init__(self, url: RedisURL, selector: selectors.BaseSelector, timers, *, name: str,
                 max_buffer_bytes: int, on_up=None, on_down=None, on_fail=None, on_message=None):
        self.url = url
        self.tls_context = tls_context(url)  # once: a CA file read at each connect could fail in the loop
        self.selector = selector
        self.timers = timers
        self.name = name
        self.max_buffer_bytes = max_buffer_bytes
        self.on_up = on_up or _nothing
        self.on_down = on_down or _nothing
        self.on_fail = on_fail or _nothing
        self.on_message = on_message  # set: a subscriber link
        self.channels: set[bytes] = set()  # what a subscriber link is (to be) subscribed to
        self.state = DOWN
        self.sock: socket.socket | None = None
        self.events = 0
        self.reader = hiredis.Reader()
        self.wbuf = bytearray()
        self.pending: deque = deque()  # callbacks of commands sent, in order (None: no callback)
        self.handshake_left = 0  # replies of AUTH/SELECT still to come
        self.tcp_connecting = False
        self.tls_handshaking = False
        self.addresses: list = []
        self.backoff = BACKOFF_MIN_S
        self.retry_timer = None
        self.connect_timer = None
        self.flush_timer = None
        self.lookup: _Lookup | None = None  # a name lookup running in its thread
        self.lookup_timer = None
        self.address_index = 0  # the address tried next (a name may resolve to several: ::1, 127.0.0.1)
        self.wanted = False
        self.last_error = ""
        self.connects = 0  # times the link came up

    # -- the owner's side ----------------------------------------------------------------------

    def start(self) -> None:
        self.wanted = True
        if self.state == DOWN and self.retry_timer is None:
            self._connect()

    def close(self) -> None:
        """Stop for good (the server stops): what is buffered gets one non-blocking send."""
        self.wanted = False
        if self.state == UP and self.wbuf:
            try:
                self.sock.send(self.wbuf)
            except (OSError, ssl.SSLError):
                pass  # the server is stopping: what did not go out is lost, as the TTL allows
        self._reset("", retry=False)

    def command(self, args, callback=None) -> bool:
        """Queue a command; False (and nothing queued) when the link is not up or its buffer is full."""
        return self.command_bytes(encode_command(args), callback)

    def command_bytes(self, data: bytes, callback=None) -> bool:
        if self.state != UP or len(self.wbuf) + len(data) > self.max_buffer_bytes:
            return False
        self.wbuf += data
        if self.on_message is None:
            self.pending.append(callback)
        self._schedule_flush()
        return True

    @property
    def buffered(self) -> int:
        return len(self.wbuf)

    def subscribe(self, channels) -> None:
        new = [c for c in channels if c not in self.channels]
        self.channels.update(new)
        if new and self.state == UP:
            self._queue_raw(encode_command([b"SUBSCRIBE", *new]))

    def unsubscribe(self, channels) -> None:
        gone = [c for c in channels if c in self.channels]
        self.channels.difference_update(gone)
        if gone and self.state == UP:
            self._queue_raw(encode_command([b"UNSUBSCRIBE", *gone]))

    def ping(self) -> bool:
        """On a subscriber link: a PING (its pong comes to on_message as kind b"pong")."""
        if self.state != UP:
            return False
        self._queue_raw(encode_command([b"PING"]))
        return True

    def reset(self, reason: str) -> None:
        """Drop the connection and connect again after the back-off (the owner saw it hang)."""
        if self.state != DOWN:
            self._reset(reason)

    # -- the loop's side -----------------------------------------------------------------------

    def on_event(self, mask: int) -> None:
        if self.sock is None:
            return
        if self.tcp_connecting:
            self.tcp_connecting = False
            self._connected()
            return
        if self.tls_handshaking:
            self._tls_step()
            return
        if mask & READ:
            self._read()
        if mask & WRITE and self.sock is not None:
            self._send()

    # -- connecting ----------------------------------------------------------------------------

    def _connect(self) -> None:
        self.retry_timer = None
        if not self.wanted:
            return
        self.state = CONNECTING
        self.connect_timer = self.timers.call_later(CONNECT_TIMEOUT_S, self._connect_timed_out)
        if self.addresses:
            self._open()
        else:
            self._wait_lookup()

    def _wait_lookup(self) -> None:
        """Resolve the name once (later attempts reuse the addresses, in turn; a Redis that moves
        to another address needs a restart of the node, or an IP in the URL). An IP literal
        resolves here; a name in a thread of its own, which the loop looks at every
        LOOKUP_POLL_S: a DNS server that does not answer would otherwise hold the loop for its
        timeout, at every retry while the name does not resolve."""
        self.lookup_timer = None
        lookup = self.lookup
        if lookup is None:
            try:
                self.addresses = socket.getaddrinfo(self.url.host, self.url.port, type=socket.SOCK_STREAM,
                                                    flags=socket.AI_NUMERICHOST)
            except (socket.gaierror, UnicodeError):  # a name, not an address (or one idna can't encode)
                lookup = self.lookup = _Lookup(self.url.host, self.url.port)
            else:
                self._open()
                return
        if not lookup.done:
            self.lookup_timer = self.timers.call_later(LOOKUP_POLL_S, self._wait_lookup)
            return
        self.lookup = None
        if lookup.error is not None:
            self._reset(f"cannot resolve {self.url.host}: {getattr(lookup.error, 'strerror', None) or lookup.error}")
            return
        self.addresses = lookup.addresses
        self._open()

    def _open(self) -> None:
        family, kind, proto, _, address = self.addresses[self.address_index % len(self.addresses)]
        try:
            sock = socket.socket(family, kind, proto)
        except OSError as exc:  # out of descriptors (EMFILE, ENFILE) or kernel memory: try again later
            self._reset(f"cannot create a socket: {exc.strerror or exc}")
            return
        sock.setblocking(False)
        if family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        self.sock = sock
        code = sock.connect_ex(address)
        if code not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
            self._reset(f"cannot connect: {_strerror(code)}")
            return
        self.tcp_connecting = True
        self._set_events(WRITE)

    def _connected(self) -> None:
        code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self._reset(f"cannot connect: {_strerror(code)}")
            return
        if self.url.tls:
            self._start_tls()
        else:
            self._start_handshake()

    def _start_tls(self) -> None:
        raw = self.sock
        self._set_events(0)
        self.sock = self.tls_context.wrap_socket(raw, server_hostname=self.url.host, do_handshake_on_connect=False)
        self.tls_handshaking = True
        self._tls_step()

    def _tls_step(self) -> None:
        try:
            self.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._set_events(READ)
            return
        except ssl.SSLWantWriteError:
            self._set_events(WRITE)
            return
        except (ssl.SSLError, OSError) as exc:
            self._reset(f"TLS handshake failed: {exc}")
            return
        self.tls_handshaking = False
        self._start_handshake()

    def _start_handshake(self) -> None:
        commands = []
        if self.url.password:
            commands.append([b"AUTH", self.url.username, self.url.password] if self.url.username else [b"AUTH", self.url.password])
        if self.url.db:
            commands.append([b"SELECT", self.url.db])
        self.reader = hiredis.Reader()
        self.handshake_left = len(commands)
        self.wbuf = bytearray(b"".join(encode_command(c) for c in commands))
        self._set_events(READ | WRITE if self.wbuf else READ)
        if not commands:
            self._up()

    def _up(self) -> None:
        if self.connect_timer is not None:
            self.connect_timer.cancel()
            self.connect_timer = None
        self.state = UP
        # (The back-off is reset by Redis's first good reply, not here: something that accepts
        # and closes at once, or refuses every command, is no reason to retry sooner.)
        self.connects += 1
        self.last_error = ""
        if self.on_message is not None and self.channels:
            self._queue_raw(encode_command([b"SUBSCRIBE", *sorted(self.channels)]))
        self.on_up()

    def _connect_timed_out(self) -> None:
        self.connect_timer = None
        if self.state == CONNECTING:
            self._reset(f"no connection within {CONNECT_TIMEOUT_S:g}s")

    def _reset(self, reason: str, retry: bool = True) -> None:
        was_up = self.state == UP
        if self.sock is not None:
            self._set_events(0)
            self.sock.close()
            self.sock = None
        timers = [self.connect_timer, self.flush_timer, self.lookup_timer] + ([] if retry else [self.retry_timer])
        for timer in timers:
            if timer is not None:
                timer.cancel()
        self.connect_timer = self.flush_timer = self.lookup_timer = None
        if not retry:
            self.retry_timer = None
        self.state = DOWN
        self.tcp_connecting = self.tls_handshaking = False
        self.handshake_left = 0
        self.wbuf = bytearray()
        self.pending.clear()
        if reason:
            self.last_error = reason
        if not was_up:
            self.address_index += 1  # the next attempt tries the name's next address
        if retry and self.wanted:
            delay = self.backoff * random.uniform(0.8, 1.2)
            self.backoff = min(self.backoff * 2, BACKOFF_MAX_S)
            log.debug("redis %s link: %s; next attempt in %.2fs", self.name, reason, delay)
            self.retry_timer = self.timers.call_later(delay, self._connect)
        if not self.wanted:
            return  # closed by its owner, who knows
        if was_up:
            self.on_down(reason)
        elif reason:
            self.on_fail(reason)

    # -- reading and writing -------------------------------------------------------------------

    def _read(self) -> None:
        sock = self.sock
        try:
            data = sock.recv(RECV_BYTES)
            while isinstance(sock, ssl.SSLSocket) and sock.pending():
                data += sock.recv(RECV_BYTES)  # decrypted already: the selector won't tell us
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        except (OSError, ssl.SSLError) as exc:
            self._reset(f"read failed: {exc}")
            return
        if not data:
            self._reset("Redis closed the connection")
            return
        reader = self.reader
        reader.feed(data)
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as exc:
                self._reset(f"bad reply from Redis: {exc}")
                return
            if reply is False:
                return
            if not self.handshake_left and not isinstance(reply, hiredis.ReplyError):
                self.backoff = BACKOFF_MIN_S  # Redis serves this link: the next loss retries soon
            if self.handshake_left:
                self.handshake_left -= 1
                if isinstance(reply, hiredis.ReplyError):
                    self._reset(f"Redis refused the handshake: {reply}")
                    return
                if not self.handshake_left:
                    self._up()
                    if self.sock is None:  # the owner closed it from on_up
                        return
            elif self.on_message is not None:
                if isinstance(reply, list) and len(reply) >= 2:
                    kind = reply[0]
                    if kind == b"message":
                        self.on_message(kind, reply[1], reply[2])
                    else:
                        self.on_message(kind, reply[1], reply[2] if len(reply) > 2 else None)
                elif reply == b"PONG":  # a PING before any SUBSCRIBE took effect
                    self.on_message(b"pong", b"", None)
                elif isinstance(reply, hiredis.ReplyError):
                    log.warning("redis %s link: error reply %s", self.name, reply)
            else:
                callback = self.pending.popleft() if self.pending else None
                if callback is not None:
                    callback(reply)
            if self.sock is None:  # a callback reset or closed the link
                return

    def _queue_raw(self, data: bytes) -> None:
        """Link traffic of its own (SUBSCRIBE, PING): not capped, not answered through pending."""
        self.wbuf += data
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        # Commands made in one loop pass go out in one send: the timer is due at once, so it runs
        # in this pass's timers.run_due, after the events that made them.
        if self.flush_timer is None and not self.events & WRITE:
            self.flush_timer = self.timers.call_at(0.0, self._flush)

    def _flush(self) -> None:
        self.flush_timer = None
        if self.sock is not None and self.wbuf and not self.events & WRITE:
            self._send()

    def _send(self) -> None:
        if not self.wbuf:
            self._set_events(READ)
            return
        try:
            sent = self.sock.send(self.wbuf)
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            sent = 0
        except (OSError, ssl.SSLError) as exc:
            self._reset(f"write failed: {exc}")
            return
        del self.wbuf[:sent]
        self._set_events(READ | WRITE if self.wbuf else READ)

    def _set_events(self, events: int) -> None:
        if events == self.events:
            return
        if self.events and events:
            self.selector.modify(self.sock, events, self)
        elif events:
            self.selector.register(self.sock, events, self)
        else:
            self.selector.unregister(self.sock)
        self.events = events


class _Lookup:
    """``getaddrinfo`` in a daemon thread: it has no non-blocking form. (A daemon, so that a
    lookup that never ends can't hold up the process's exit; at most one runs per link.)"""

    def __init__(self, host: str, port: int):
        self.addresses: list = []
        self.error: Exception | None = None
        self.done = False
        try:
            threading.Thread(target=self._run, args=(host, port), name="redis-name-lookup", daemon=True).start()
        except RuntimeError as exc:  # "can't start new thread": an attempt that failed, tried again later
            self.error = exc
            self.done = True

    def _run(self, host: str, port: int) -> None:
        try:
            self.addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:  # (gaierror; UnicodeError: a label idna can't encode)
            self.error = exc
        self.done = True  # last: the loop reads the fields above once it sees this


def _strerror(code: int) -> str:
    return os.strerror(code)


def _nothing(*args) -> None:
    pass


def probe(url: RedisURL, commands, timeout: float = CONNECT_TIMEOUT_S) -> list:
    """Connect as a link does (TLS, AUTH, SELECT), send ``commands`` and return their replies.

    Blocking, for ``simplerpc-mp check`` (never in the server's loop). Raises ``OSError`` (or
    ``ssl.SSLError``) when Redis can't be reached, ``hiredis.ReplyError`` when it refuses.
    """
    handshake = []
    if url.password:
        handshake.append([b"AUTH", url.username, url.password] if url.username else [b"AUTH", url.password])
    if url.db:
        handshake.append([b"SELECT", url.db])
    sock = socket.create_connection((url.host, url.port), timeout=timeout)
    try:
        if url.tls:
            sock = tls_context(url).wrap_socket(sock, server_hostname=url.host)
        sock.sendall(b"".join(encode_command(c) for c in [*handshake, *commands]))
        reader = hiredis.Reader()
        replies: list = []
        while len(replies) < len(handshake) + len(commands):
            data = sock.recv(RECV_BYTES)
            if not data:
                raise ConnectionError("Redis closed the connection")
            reader.feed(data)
            while (reply := reader.gets()) is not False:
                if isinstance(reply, hiredis.ReplyError):
                    raise reply
                replies.append(reply)
        return replies[len(handshake):]
    finally:
        sock.close()
