"""The Acceptor's gate: TLS handshakes and authentication, before a connection may run handlers.

Runs in the acceptor process, in its selector loop: ``Gatekeeper`` is a base class of
``acceptor.Acceptor`` (its methods use the acceptor's state), kept here so that the plain path
reads in acceptor.py alone.

A connection that must do a TLS handshake or authenticate is *gated*: it is in
``Acceptor.gated``, not in ``conns`` (the push routing table), so it counts against
``max_connections`` but receives no push, runs no handler and is not idle-swept.

1. TLS (``tls.py``): the handshake is stepped on each readiness event (``tls_handshake``), with a
   ``tls_handshake_timeout`` timer. Done, the connection is authenticated next, or admitted.
2. Authentication (``auth.py``), when ``auth_tokens_file`` or ``@handlers.on_auth`` is set: the
   bytes read go to ``_gate_input`` (never to the decoder) until the first line end. That frame
   must be ``auth{...}``; it is RPC 0 of the connection, answered at ``write_seq`` 0. A token of
   the file is decided here; otherwise an ``AUTH`` job asks ``on_auth`` in a worker, and its
   answer comes back through ``_auth_answer``. Nothing more is read until it is decided.
   Success: the ``OKAY{"identity": ...}`` answer, then ``_admit`` (on_connect queued), then the
   bytes that came after the auth frame are read as if just received (``auth.Replay``). Refusal:
   the FAIL (1 s later for a refused credential, by a timer) and the close once it is written.
3. ``read_ready``: connections whose bytes are already out of the socket (decrypted and held by
   a TLS layer, or replayed after authentication) are read by the loop without waiting for a
   selector event (``serve_read_ready``), and queued again when reading them resumes.
"""

from __future__ import annotations

import json
import logging
import socket

from . import auth, ipc
from .acceptor import CLOSED, EOF, OPEN, READ, WRITE, Connection, Job
from .errors import Unauthorized
from .protocol import encode_fail, encode_okay, loads_untrusted

log = logging.getLogger("simplerpc_mp.acceptor")

__all__ = ["Gatekeeper"]

_UNAUTHORIZED = Unauthorized.__name__


class Gatekeeper:
    """The TLS and authentication methods of ``Acceptor`` (see the module docstring)."""

    def load_security(self, settings) -> None:
        """Build the TLS context and read the tokens file (at start; raises ``tls.TLSError`` or
        ``auth.TokensFileError``, one line each)."""
        if settings.certfile:
            from . import tls

            self.tls_context = tls.server_context(settings.certfile, settings.keyfile, settings.ca_certs)
            self._tls_connection = tls.TLSConnection
        self.tokens = auth.load_tokens(settings.auth_tokens_file) if settings.auth_tokens_file else None

    def reload_security(self) -> None:
        """SIGHUP: a new TLS context from the files (connections already open keep theirs) and
        the tokens file read again; on an error, log it and keep what we have."""
        settings = self.settings
        if settings.certfile:
            from . import tls

            try:
                self.tls_context = tls.server_context(settings.certfile, settings.keyfile, settings.ca_certs)
                self._tls_connection = tls.TLSConnection
                log.info("reload: TLS certificate loaded from %s", settings.certfile)
            except tls.TLSError as exc:
                log.error("reload: TLS context not changed: %s", exc)
        elif self.tls_context is not None:
            log.warning("reload: certfile cannot be turned off while running; restart to serve plain text")
        if settings.auth_tokens_file:
            try:
                self.tokens = auth.load_tokens(settings.auth_tokens_file)
                log.info("reload: %d tokens loaded from %s", len(self.tokens), settings.auth_tokens_file)
            except auth.TokensFileError as exc:
                log.error("reload: tokens not changed: %s", exc)
        elif self.tokens is not None:
            log.warning("reload: auth_tokens_file is now empty: token authentication is off for new connections")
            self.tokens = None

    @property
    def auth_required(self) -> bool:
        return self.tokens is not None or self.has_auth_fn

    def _log_security(self) -> None:
        """At start (the workers have said whether there is an on_auth): one line for what is
        on, and the WARNING when a public address has neither TLS nor authentication."""
        if self._security_logged:
            return
        self._security_logged = True
        settings = self.settings
        if self.tls_context is not None:
            log.info("TLS on: certificate %s%s", settings.certfile,
                     f", client certificates signed by {settings.ca_certs} required" if settings.ca_certs else "")
        if self.auth_required:
            how = ([f"{len(self.tokens)} tokens from {settings.auth_tokens_file}"] if self.tokens is not None else []) + (
                ["@handlers.on_auth"] if self.has_auth_fn else [])
            log.info("authentication on: %s", " and ".join(how))
        elif self.tls_context is None and not auth.is_loopback(settings.host):
            log.warning(
                "listening on %s without TLS or authentication: anyone who can reach the port can run every op "
                "and read the traffic (set certfile/keyfile and auth_tokens_file, or register @handlers.on_auth)",
                settings.host,
            )

    def _gate(self, conn: Connection) -> None:
        """Hold a connection at the gate until it authenticates (auth on), else admit it."""
        if not self.auth_required:
            self._admit(conn)
            return
        gate = conn.gate = auth.Gate()
        gate.timer = self.timers.call_later(self.settings.auth_timeout, self._auth_timed_out, conn)
        conn.disconnect_queued = True  # no on_disconnect for a connection that never connected
        self.gated[conn.net_id] = conn

    def _admit(self, conn: Connection) -> None:
        """The connection may run handlers now: a push target, on_connect queued."""
        self.gated.pop(conn.net_id, None)
        self.conns[conn.net_id] = conn
        conn.disconnect_queued = False
        conn.last_active = self.now  # idle from here: the TLS handshake and authentication took their own time
        if self.has_connect:
            conn.queue.append(Job(conn, ipc.CONNECT, conn.next_seq, 0, b""))
            self.advance(conn)

    def _read_gated(self, conn: Connection) -> None:
        """Read a connection that has not authenticated: at most ``auth.GATED_RECV_BYTES`` at a
        time, and nothing once its auth frame is in, so it holds at most the auth frame plus one
        read however many connections do this at once."""
        try:
            data = conn.sock.recv(auth.GATED_RECV_BYTES)
        except BlockingIOError:
            return
        except OSError as exc:
            self.close(conn, f"read failed: {exc.strerror or exc}", kind="read failed")
            return
        if not data:
            self.on_eof(conn)
            return
        self._gate_input(conn, data)

    def _gate_input(self, conn: Connection, data: bytes) -> None:
        """Bytes from a connection that has not authenticated: find its first frame."""
        gate = conn.gate
        if gate.taken:  # (the same read's rest, or a replay raced the verdict): keep it for later
            gate.buf += data
            if len(gate.buf) > auth.MAX_AUTH_FRAME_BYTES:
                self._set_events(conn, conn.events & ~READ)
            return
        gate.buf += data
        end = gate.buf.find(b"\n")
        if end < 0:
            if len(gate.buf) > auth.MAX_AUTH_FRAME_BYTES:
                self._refuse_auth(conn, f"no auth frame within the first {auth.MAX_AUTH_FRAME_BYTES} bytes", delay=False)
            return
        line = bytes(gate.buf[:end])
        del gate.buf[: end + 1]
        gate.taken = True
        conn.next_seq = 1  # the auth frame is RPC 0: its answer is written at write_seq 0
        self._set_events(conn, conn.events & ~READ)  # nothing more is read until it is decided
        op, brace, body = line.partition(b"{")
        if op != auth.AUTH_OP or not brace:
            self._refuse_auth(conn, 'authenticate first: the first frame must be auth{"token": "..."}', delay=False)
            return
        try:
            data = loads_untrusted(brace + body)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            self._refuse_auth(conn, "the auth frame's data is not a JSON object")
            return
        token = data.get("token")
        if self.tokens is not None and isinstance(token, str):
            identity = self.tokens.match(token)
            if identity is not None:
                self._authenticated(conn, encode_okay({"identity": identity}), identity)
                return
        if self.has_auth_fn:  # the worker decides: @handlers.on_auth
            payload = line + b"\n"
            conn.queue.append(Job(conn, ipc.AUTH, 0, 1, payload))
            self._hold(conn, len(payload))
            self.advance(conn)
            return
        self._refuse_auth(conn, "wrong token" if isinstance(token, str) else 'no "token" given')

    def _auth_answer(self, conn: Connection, answer: bytes) -> None:
        """The answer of @handlers.on_auth (or a FAIL for it: a crash, a timeout)."""
        if conn.state == CLOSED or conn.gate is None:
            return
        if answer.startswith(b"OKAY"):
            identity = json.loads(answer[4:])["identity"]
            self._authenticated(conn, answer, identity)
            return
        try:
            failure = json.loads(answer[4:])
            reason, message = str(failure["reason"]), str(failure["message"])
        except (ValueError, KeyError, TypeError):
            reason, message = _UNAUTHORIZED, "refused"
        self._refuse_auth(conn, message, reason=reason)

    def _authenticated(self, conn: Connection, answer: bytes, identity) -> None:
        gate = conn.gate
        gate.timer.cancel()
        conn.gate = None
        conn.identity = identity
        log.debug("net_id %s authenticated as %r", conn.net_id, identity)
        self._write_verdict(conn, answer)
        self._admit(conn)
        if gate.buf:  # frames the client sent after its auth frame: read them next
            conn.sock = auth.Replay(conn.sock, bytes(gate.buf), conn)
        if self.reading and conn.state == OPEN:
            self._read_again(conn)

    def _refuse_auth(self, conn: Connection, message: str, reason: str = _UNAUTHORIZED, delay: bool = True) -> None:
        """Answer FAIL and close after it; a refused credential's answer is held back a second
        (a timer: the loop goes on serving everyone else)."""
        self.auth_failures += 1
        conn.gate.refused = True
        self.log_limit.log(
            log, "auth failed", logging.WARNING, "authentication failed from %s (net_id %s): %s: %s",
            conn.peer, conn.net_id, reason, message,
        )
        conn.next_seq = 1
        self._set_events(conn, conn.events & ~READ)
        frame = encode_fail(reason, message)
        if delay:
            # The answer is decided: it goes out a second later even if auth_timeout would come
            # first (which then still closes a connection whose answer cannot be written).
            gate = conn.gate
            gate.timer.cancel()
            gate.timer = self.timers.call_later(auth.REFUSAL_DELAY_S + self.settings.auth_timeout, self._auth_timed_out, conn)
            self.timers.call_later(auth.REFUSAL_DELAY_S, self._send_refusal, conn, frame)
        else:
            self._send_refusal(conn, frame)

    def _send_refusal(self, conn: Connection, frame: bytes) -> None:
        if conn.state == CLOSED:
            return
        self._write_verdict(conn, frame)
        conn.state = EOF  # closed once the answer is out (_send), or at auth_timeout if never read

    def _write_verdict(self, conn: Connection, frame: bytes) -> None:
        self.output_bytes += len(frame)
        if not conn.wbuf or conn.events & WRITE:
            self.dirty.append(conn)
        conn.wbuf += frame
        conn.write_seq = 1

    def _auth_timed_out(self, conn: Connection) -> None:
        if conn.state != CLOSED and conn.gate is not None:
            if conn.gate.refused:  # (its refusal, held back a second or unread, was counted then)
                self.close(conn, f"refused, and auth_timeout ({self.settings.auth_timeout:g}s) passed", counted_as="unauthorized")
                return
            self.auth_failures += 1
            self.close(conn, f"not authenticated within {self.settings.auth_timeout:g}s (auth_timeout) from {conn.peer}",
                       logging.INFO, kind="auth_timeout")

    def tls_handshake(self, conn) -> None:
        """One step of a TLS handshake, on a readiness event (see tls.py)."""
        import ssl

        try:
            conn.sock.ssl.do_handshake()
        except ssl.SSLWantReadError:
            self._set_events(conn, READ)
            return
        except ssl.SSLWantWriteError:
            self._set_events(conn, WRITE)
            return
        except (ssl.SSLError, OSError) as exc:  # plain text, no or a bad client certificate, a reset
            self.tls_failures += 1
            reason = getattr(exc, "reason", None) or exc.strerror or exc
            self.close(conn, f"TLS handshake with {conn.peer} failed: {reason}", logging.INFO, kind="tls handshake failed")
            return
        conn.handshaking = False
        conn.handshake_timer.cancel()
        conn.handshake_timer = None
        if self.settings.ca_certs:  # (authentication, if on, replaces it; on_auth sees it)
            from .tls import peer_common_name

            conn.identity = peer_common_name(conn.sock.ssl)
        self._set_events(conn, READ if self.reading else 0)
        self._gate(conn)
        if self.reading:
            self.on_read(conn)  # application data may have come with the handshake's last flight

    def _tls_timed_out(self, conn) -> None:
        if conn.state != CLOSED and conn.handshaking:
            self.tls_failures += 1
            self.close(conn, f"TLS handshake with {conn.peer} not finished within {self.settings.tls_handshake_timeout:g}s "
                       "(tls_handshake_timeout)", logging.INFO, kind="tls_handshake_timeout")

    def serve_read_ready(self) -> None:
        """Read the connections whose bytes are already out of the socket (the loop calls this
        while ``read_ready`` is not empty, with a zero select timeout). One not read now (paused,
        at max_inflight) is queued again when reading it resumes (``_read_again``)."""
        ready = self.read_ready[:]
        self.read_ready.clear()
        for conn in ready:
            stream = conn.sock
            if type(stream) is socket.socket:
                continue  # its Replay was read already (a selector event came first): nothing is hidden
            stream.queued = False
            if conn.state == OPEN and conn.events & READ:
                self.on_read(conn)
                if conn.sock is not stream and conn.state == OPEN:  # a Replay gave back a TLS stream
                    self._queue_hidden(conn)

    def _read_again(self, conn: Connection) -> None:
        self._set_events(conn, conn.events | READ)
        if type(conn.sock) is not socket.socket:  # bytes a TLS layer (or a Replay) holds: no event says so
            self._queue_hidden(conn)

    def _queue_hidden(self, conn: Connection) -> None:
        stream = conn.sock
        if type(stream) is not socket.socket and stream.hidden and not stream.queued:
            stream.queued = True
            self.read_ready.append(conn)

    def _add_tls_connection(self, net_id: int, sock: socket.socket, peer) -> Connection | None:
        try:
            ssl_sock = self.tls_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        except OSError as exc:
            # wrap_socket looks at the peer: a connection reset while it waited to be accepted
            # raises here (ECONNRESET; SSLError for one that sent bytes before it went).
            self._gone_before_handshake(peer, exc)
            return None
        if ssl_sock._sslobj is None:  # (the same, when the reset left no error to report)
            ssl_sock.close()
            self._gone_before_handshake(peer, "not connected")
            return None
        conn = self._tls_connection(self, net_id, ssl_sock, peer, self.settings.max_frame_bytes, self.now)
        conn.disconnect_queued = True  # until admitted
        self.gated[net_id] = conn
        conn.handshake_timer = self.timers.call_later(self.settings.tls_handshake_timeout, self._tls_timed_out, conn)
        self.selector.register(conn.sock, READ, conn)
        log.debug("net_id %s connected from %s (TLS)", net_id, peer)
        self.tls_handshake(conn)
        return conn

    def _gone_before_handshake(self, peer, why) -> None:
        self.tls_failures += 1
        self.log_limit.log(log, "tls handshake failed", logging.INFO,
                           "connection from %s gone before its TLS handshake: %s", peer, why)

    def _close_gated(self, conn: Connection) -> None:
        if conn.gate is not None:
            conn.gate.timer.cancel()
        timer = getattr(conn, "handshake_timer", None)
        if timer is not None:
            timer.cancel()
