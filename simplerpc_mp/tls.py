"""TLS for the acceptor: the server's ``SSLContext``, and the TLS layer of one connection.

Runs in the acceptor process, inside the selector loop; nothing here blocks. (Also used by the
clients and the CLI for their contexts: ``client_context``.)

Theory of operation:

1. An accepted socket is wrapped with ``do_handshake_on_connect=False``, so the handshake is
   driven by the selector: each readiness event calls ``do_handshake()`` once, and
   ``SSLWantReadError`` / ``SSLWantWriteError`` say which event to wait for next. A deadline
   timer (``tls_handshake_timeout``) closes a connection that has not finished by then, however
   slowly it trickles bytes; a peer speaking plain text fails the handshake at once.
2. After the handshake the acceptor sees a ``TLSStream`` where a plain connection has its
   socket: ``recv``/``send`` with the socket's contract (``BlockingIOError`` for "not now",
   ``b""`` for the end), so framing, limits and the answer order are the plain code, unchanged.
3. ``TLSStream.recv(size)`` drains the TLS layer: it calls ``SSLSocket.recv`` until the layer
   wants more input or ``size`` bytes are in hand. Decrypted bytes left inside the ``SSLSocket``
   are invisible to the selector (the ``pending()`` pitfall: websockify #504, pynetdicom #528),
   so when ``size`` (the acceptor's request budget) stops a drain early with bytes pending, the
   connection goes on the acceptor's ``read_ready`` list, which the loop serves without waiting
   for the socket (and again whenever reading the connection resumes, see ``read_resumed``).
4. ``TLSStream.send`` passes the whole output buffer to ``SSLSocket.send``: the SSL layer
   writes records until the kernel buffer is full. A retry after ``SSLWantWriteError`` passes
   the same bytes first (the buffer only grows at its end), as OpenSSL requires; CPython sets
   ``SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER``, so the bytearray may move between tries.

Plain connections never touch this module: a ``TLSConnection`` is dispatched by the loop
through its ``on_event`` (the loop's path for "other" descriptors), so plain reads and writes
pay nothing for TLS.
"""

from __future__ import annotations

import logging
import ssl

from .acceptor import CLOSED, READ, WRITE, Connection

log = logging.getLogger("simplerpc_mp.tls")

__all__ = ["TLSError", "server_context", "client_context", "check_readable", "TLSConnection", "TLSStream", "peer_common_name"]

# SSLError subclasses raised for "the peer closed": a clean close_notify, or the TCP end without one.
_EOF_ERRORS = (ssl.SSLZeroReturnError, ssl.SSLEOFError)


class TLSError(Exception):
    """A TLS setting cannot be used (a file missing, unreadable, not PEM, key not matching)."""


def server_context(certfile: str, keyfile: str = "", ca_certs: str = "") -> ssl.SSLContext:
    """The server's context from the files: the standard library's modern defaults for a server,
    TLS 1.2 at least, and with ``ca_certs`` a client certificate signed by it required."""
    for name, path in (("certfile", certfile), ("keyfile", keyfile), ("ca_certs", ca_certs)):
        check_readable(name, path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    what = f"certfile {certfile}" + (f" / keyfile {keyfile}" if keyfile else "")
    try:
        context.load_cert_chain(certfile, keyfile or None, password=_no_pass_phrase)
    except _EncryptedKey:
        raise TLSError(f"{what}: the private key is encrypted, and the server has no way to ask for its pass phrase "
                       "(store it unencrypted, readable by the server's user only)") from None
    except (ssl.SSLError, OSError) as exc:
        raise TLSError(f"{what}: not a usable PEM certificate chain and matching private key "
                       f"({getattr(exc, 'reason', None) or exc.strerror or exc})") from None
    if ca_certs:
        try:
            context.load_verify_locations(cafile=ca_certs)
        except (ssl.SSLError, OSError) as exc:
            raise TLSError(f"ca_certs {ca_certs}: no usable PEM certificate "
                           f"({getattr(exc, 'reason', None) or exc.strerror or exc})") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class _EncryptedKey(Exception):
    pass


def _no_pass_phrase():
    # Without a password callback OpenSSL asks for the pass phrase on the controlling terminal:
    # a server started from a shell would block its loop there, at start and at every SIGHUP.
    raise _EncryptedKey


def check_readable(name: str, path: str) -> None:
    """Raise ``TLSError`` naming the setting if ``path`` is set and cannot be read."""
    if not path:
        return
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise TLSError(f"{name} {path}: cannot read: {exc.strerror or exc}") from None


def client_context(ca_certs: str = "", certfile: str = "", keyfile: str = "") -> ssl.SSLContext:
    """A verifying client context: the system's CAs, or ``ca_certs`` instead; with ``certfile``,
    the client certificate (mutual TLS)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_certs or None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if certfile:
        context.load_cert_chain(certfile, keyfile or None)
    return context


def peer_common_name(sock: ssl.SSLSocket) -> str | None:
    """The subject commonName of the peer's (verified) certificate, or None."""
    cert = sock.getpeercert()
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


class TLSStream:
    """An ``SSLSocket`` with the plain socket's non-blocking contract, for the acceptor.

    It calls the socket's ``_sslobj`` (CPython's C-level SSL object, there since 3.7) directly:
    ``SSLSocket.recv`` and ``send`` add two Python calls each on top of it, per read and per write.
    """

    __slots__ = ("ssl", "conn", "hidden", "queued", "_read", "_write", "_pending")

    def __init__(self, ssl_sock: ssl.SSLSocket, conn: "TLSConnection"):
        self.ssl = ssl_sock
        self.conn = conn
        self.hidden = False  # decrypted bytes wait inside the SSL layer (the selector can't see them)
        self.queued = False  # on the acceptor's read_ready list
        sslobj = ssl_sock._sslobj
        self._read = sslobj.read
        self._write = sslobj.write
        self._pending = sslobj.pending

    def fileno(self) -> int:
        return self.ssl.fileno()

    def close(self) -> None:
        self.ssl.close()

    def recv(self, size: int) -> bytes:
        """Up to ``size`` decrypted bytes: everything the TLS layer has, unless ``size`` stops it.

        A record's bytes not taken by one read are what ``pending()`` counts; bytes still in the
        kernel are announced by the selector, so the drain stops when ``pending()`` is 0 (reading
        on would only raise ``SSLWantReadError``, which costs more than the read).
        """
        try:
            data = self._read(size)
        except ssl.SSLWantReadError:
            self.hidden = False
            raise BlockingIOError from None
        except ssl.SSLWantWriteError:  # (TLS wants to write first: a key update into a full buffer)
            self.hidden = False
            self.conn.want_write_to_read()
            raise BlockingIOError from None
        except _EOF_ERRORS:
            return b""
        pending = self._pending()
        if not pending:
            self.hidden = False
            return data
        got = len(data)
        if got < size:
            parts = [data]
            while pending and got < size:
                more = self._read(min(pending, size - got))  # decrypted already: cannot block
                parts.append(more)
                got += len(more)
                pending = self._pending()
            data = b"".join(parts)
        if pending:
            self.hidden = True
            if not self.queued:
                self.queued = True
                self.conn.acceptor.read_ready.append(self.conn)
        else:
            self.hidden = False
        return data

    def send(self, data) -> int:
        try:
            return self._write(data)
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
            # WantRead: the layer waits for the peer (renegotiation). Our read interest stays
            # on whenever we may read, and the next read lets the layer go on.
            raise BlockingIOError from None


class TLSConnection(Connection):
    """A connection over TLS: the handshake state, then a plain ``Connection`` over a ``TLSStream``."""

    __slots__ = ("acceptor", "handshaking", "handshake_timer", "read_wants_write")

    def __init__(self, acceptor, net_id: int, ssl_sock: ssl.SSLSocket, peer, max_frame_bytes: int, now: float):
        super().__init__(net_id, None, peer, max_frame_bytes, now)
        self.sock = TLSStream(ssl_sock, self)
        self.acceptor = acceptor
        self.handshaking = True
        self.handshake_timer = None
        self.read_wants_write = False

    def on_event(self, mask: int) -> None:
        """Called by the server loop for this connection's readiness events."""
        acceptor = self.acceptor
        if self.handshaking:
            acceptor.tls_handshake(self)
            return
        if mask & READ:
            acceptor.on_read(self)
        if mask & WRITE:
            if self.read_wants_write:
                self.read_wants_write = False
                if not self.wbuf:
                    acceptor._set_events(self, self.events & ~WRITE)
                acceptor.on_read(self)
            if self.wbuf:
                acceptor.on_write(self)

    def want_write_to_read(self) -> None:
        """The TLS layer must write before it can read more: wait for the socket to be writable."""
        self.read_wants_write = True
        if not self.events & WRITE and self.state != CLOSED:
            self.acceptor._set_events(self, self.events | WRITE)
