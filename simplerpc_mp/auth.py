"""Authentication: the tokens file, and the state of a connection that has not authenticated yet.

Runs in the acceptor process (and in ``simplerpc-mp check``, which loads the tokens file to
validate it). The acceptor's gate (``Acceptor._gate_input``) uses what is here:

- ``Tokens``: the accepted tokens of ``auth_tokens_file``, one per line, ``name:token`` or a
  bare token (its identity is then ``token-<line number>``); blank lines and ``#`` comments are
  skipped. A token is checked against *every* entry with ``hmac.compare_digest`` over SHA-256
  digests (equal lengths, so neither the position of a match nor a token's length shows in the
  time taken). Tokens are kept only as digests, and no message here ever contains one.
- ``Gate``: per connection until it authenticates: the bytes read so far (at most
  ``MAX_AUTH_FRAME_BYTES`` before a line end), the ``auth_timeout`` timer, and the bytes that
  came after the auth frame, replayed once it has succeeded (``Replay``).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import stat

__all__ = [
    "Tokens", "TokensFileError", "load_tokens", "Gate", "Replay", "is_loopback", "world_readable",
    "MAX_AUTH_FRAME_BYTES", "GATED_RECV_BYTES", "REFUSAL_DELAY_S", "AUTH_OP",
]

AUTH_OP = b"auth"
# An auth frame carries a token or a signed credential (a JWT is a few KiB): more before the
# first line end is not an auth frame. An unauthenticated connection is read this much at a time
# and not at all once its auth frame is in, so it holds at most about 20 KiB: 10,000 of them
# (max_connections) about what max_total_request_bytes lets authenticated ones hold.
MAX_AUTH_FRAME_BYTES = 16 * 1024
GATED_RECV_BYTES = 4096
# A refused auth frame is answered this much later (a timer, nobody else waits): guessing tokens
# then costs a connection-second per guess.
REFUSAL_DELAY_S = 1.0


class TokensFileError(Exception):
    """The tokens file cannot be used; the message is one line and never contains a token."""


class Tokens:
    __slots__ = ("path", "entries")

    def __init__(self, path: str, entries: list[tuple[str, bytes]]):
        self.path = path
        self.entries = entries  # (identity, sha256 of the token)

    def __len__(self) -> int:
        return len(self.entries)

    def match(self, token: str) -> str | None:
        """The identity of ``token``, or None; the same work whichever entry matches, or none."""
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        found = None
        for name, expected in self.entries:
            if hmac.compare_digest(digest, expected) and found is None:
                found = name
        return found


def load_tokens(path: str) -> Tokens:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise TokensFileError(f"auth_tokens_file {path!r}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise TokensFileError(f"auth_tokens_file {path!r}: not UTF-8 text") from None
    entries = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, colon, token = line.partition(":")
        if not colon:
            name, token = f"token-{number}", line
        name, token = name.strip(), token.strip()
        if not token:
            raise TokensFileError(f"auth_tokens_file {path!r}: line {number}: no token after {name!r}:")
        if not name:
            raise TokensFileError(f"auth_tokens_file {path!r}: line {number}: empty name before ':'")
        entries.append((name, hashlib.sha256(token.encode("utf-8")).digest()))
    if not entries:
        raise TokensFileError(f"auth_tokens_file {path!r}: no tokens in it (every client would be refused)")
    return Tokens(path, entries)


def world_readable(path: str) -> bool:
    try:
        return bool(os.stat(path).st_mode & stat.S_IROTH)
    except OSError:
        return False


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


class Gate:
    """A connection's state until it authenticates (``Connection.gate``; None once it has)."""

    __slots__ = ("buf", "timer", "taken", "refused")

    def __init__(self):
        self.buf = bytearray()  # bytes read before the auth frame's line end
        self.timer = None  # auth_timeout
        self.taken = False  # the auth frame was read; nothing more is read until it is decided
        self.refused = False  # answered (or about to be) FAIL: counted once in auth_failures


class Replay:
    """Stands in for a connection's socket to hand its next ``recv`` the bytes that came after
    its auth frame, then puts the socket back."""

    __slots__ = ("sock", "data", "conn", "queued")
    hidden = True  # (as a TLS stream's flag: bytes are waiting that no selector event announces)

    def __init__(self, sock, data: bytes, conn):
        self.sock = sock
        self.data = data
        self.conn = conn
        self.queued = False  # on the acceptor's read_ready list

    def recv(self, size: int) -> bytes:
        self.conn.sock = self.sock
        return self.data

    def send(self, data) -> int:
        return self.sock.send(data)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()
