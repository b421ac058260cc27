"""The control socket: ``simplerpc-mp stats/top/reload/scale/stop`` talk to a running server.

Runs in the acceptor process, in its selector loop (the listener and each connection are
registered with an object whose ``on_event(mask)`` the loop calls); ``request`` is the client
side, run by the CLI. gunicorn's control socket is the model: a Unix socket, mode 0600, in a
directory only its user can enter (``$XDG_RUNTIME_DIR/simplerpc-mp``, else ``~/.simplerpc-mp``),
named after the server's port so that several servers on one host don't collide. RPC clients
never reach it (it is no TCP port).

The protocol, one JSON object per line each way (``ControlProtocol``, no I/O)::

    -> {"cmd": "stats"}                      <- {"ok": true, "stats": {...}}
    -> {"cmd": "reload"}                     <- {"ok": true, "message": "..."}
    -> {"cmd": "scale", "n": "+1"}           <- {"ok": true, "message": "...", "target": 3}
    -> {"cmd": "stop", "now": false}         <- {"ok": true, "message": "..."}
    anything else                            <- {"ok": false, "error": "..."} (and the socket closes)

A client that misbehaves costs the loop little and holds nothing for long: a request line is at
most ``MAX_REQUEST_BYTES``; garbage gets one error line and the connection closes; at most
``MAX_REQUESTS_PER_READ`` requests may wait for their turn; one request is served per loop
pass, and none while its answer is unsent (the socket is not read meanwhile: a stats of 64
workers takes milliseconds, and 64 of them from one write held the loop for all of them); a
client that does not read its answers is dropped once ``MAX_OUTPUT_BYTES`` wait for it, or when
an answer has waited ``WRITE_TIMEOUT_S``; at most ``MAX_CLIENTS`` are connected at once.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import selectors
import socket
import stat
from collections import deque

from .protocol import loads_untrusted

__all__ = [
    "ControlProtocol", "ControlError", "ControlServer", "default_path", "default_paths", "find_default", "control_path",
    "request",
    "NoServer", "MAX_REQUEST_BYTES",
]

log = logging.getLogger("simplerpc_mp.control")

READ, WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
# The longest request: a command and a few arguments fit in far less.
MAX_REQUEST_BYTES = 16 * 1024
# Unread answers held for one client before it is dropped (a stats answer of 1,024 workers is
# about 400 KiB).
MAX_OUTPUT_BYTES = 2 * 1024 * 1024
WRITE_TIMEOUT_S = 10.0
MAX_REQUESTS_PER_READ = 64
MAX_CLIENTS = 32
RECV_BYTES = 16 * 1024
AUTO = "auto"


class ControlError(Exception):
    """A request the server refuses (the message is sent back)."""


class NoServer(Exception):
    """No server listens on the control socket (the CLI prints one line, exits 1)."""


class ControlProtocol:
    """Request lines in, request dicts out; a bad or too long line raises ``ControlError``."""

    def __init__(self, max_request_bytes: int = MAX_REQUEST_BYTES):
        self.max_request_bytes = max_request_bytes
        self._buffer = b""

    def feed(self, data: bytes) -> list[dict]:
        buffer = self._buffer + data
        lines = buffer.split(b"\n")
        self._buffer = lines.pop()
        if len(self._buffer) > self.max_request_bytes:
            raise ControlError(f"request longer than {self.max_request_bytes} bytes")
        requests = []
        for line in lines:
            if len(line) > self.max_request_bytes:
                raise ControlError(f"request longer than {self.max_request_bytes} bytes")
            requests.append(parse_request(line))
        return requests


def parse_request(line: bytes) -> dict:
    try:
        value = loads_untrusted(line)
    except ValueError:  # (UnicodeDecodeError and too deep nesting included)
        raise ControlError("not a JSON object; expected one per line, like {\"cmd\": \"stats\"}") from None
    if not isinstance(value, dict) or not isinstance(value.get("cmd"), str):
        raise ControlError('expected a JSON object with a "cmd" string, like {"cmd": "stats"}')
    return value


def encode(message: dict) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode("utf-8") + b"\n"


# -- where the socket is -----------------------------------------------------------------------

def default_path(port: int) -> str:
    """The socket of the server on ``port``: under $XDG_RUNTIME_DIR (a per-user tmpfs, 0700 by
    the systemd spec) if set, else in the home directory."""
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    base = os.path.join(runtime, "simplerpc-mp") if runtime and os.path.isdir(runtime) else os.path.expanduser("~/.simplerpc-mp")
    return os.path.join(base, f"control-{port}.sock")


def default_paths(port: int) -> list[str]:
    """Where a server on ``port`` may have put its default socket, ``default_path`` first: the
    server's environment may differ from the CLI's (a service or cron job without
    $XDG_RUNTIME_DIR puts it in the home directory; a login shell has it set), so the CLI looks
    in each. The systemd runtime directory of this user is tried when $XDG_RUNTIME_DIR is unset."""
    paths = [default_path(port)]
    for base in (os.path.expanduser("~/.simplerpc-mp"), f"/run/user/{os.getuid()}/simplerpc-mp"):
        path = os.path.join(base, f"control-{port}.sock")
        if path not in paths:
            paths.append(path)
    return paths


def find_default(port: int) -> str:
    """The first of ``default_paths`` where a socket exists, else ``default_path``."""
    for path in default_paths(port):
        try:
            if stat.S_ISSOCK(os.stat(path).st_mode):
                return path
        except OSError:
            continue
    return default_path(port)


def control_path(setting: str, port: int) -> str:
    """The path the ``control_socket`` setting names ("" = off, "auto" = ``default_path``)."""
    if not setting:
        return ""
    return default_path(port) if setting == AUTO else os.path.expanduser(setting)


# -- the client side (CLI) ---------------------------------------------------------------------

def request(path: str, message: dict, timeout: float = 10.0) -> dict:
    """Send one request, return the answer; ``NoServer`` if nothing listens at ``path``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError) as exc:
            raise NoServer(f"no server at control socket {path} ({exc.strerror or exc})") from None
        except PermissionError as exc:
            raise NoServer(f"cannot use control socket {path}: {exc.strerror or exc} (another user's server?)") from None
        sock.sendall(encode(message))
        buffer = b""
        while b"\n" not in buffer:
            chunk = sock.recv(65536)
            if not chunk:
                raise NoServer(f"the server at {path} closed the control connection without answering")
            buffer += chunk
    finally:
        sock.close()
    return json.loads(buffer.partition(b"\n")[0])


class Session:
    """A control connection kept open for several requests (``top`` asks once a second)."""

    def __init__(self, path: str, timeout: float = 10.0):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError, PermissionError) as exc:
            self.sock.close()
            raise NoServer(f"no server at control socket {path} ({exc.strerror or exc})") from None
        self._buffer = b""

    def ask(self, message: dict) -> dict:
        self.sock.sendall(encode(message))
        while b"\n" not in self._buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise NoServer(f"the server at {self.path} has gone")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line)

    def close(self) -> None:
        self.sock.close()


# -- the server side (acceptor) ----------------------------------------------------------------

class ControlServer:
    """The listening Unix socket; ``handle(request) -> answer dict`` runs each command."""

    def __init__(self, path: str, selector: selectors.BaseSelector, timers, handle, private_dir: bool = True):
        """``private_dir``: the directory is ours alone (the default path): made 0700 if it is not."""
        self.path = path
        self.selector = selector
        self.timers = timers
        self.handle = handle
        self.clients: set[ControlConnection] = set()
        self.sock = _bind(path, private_dir)
        self._inode = os.stat(path).st_ino
        self.sock.setblocking(False)
        selector.register(self.sock, READ, self)

    def on_event(self, mask: int) -> None:
        for _ in range(MAX_CLIENTS):
            try:
                sock, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors: the RPC listeners have the same problem
                log.warning("control socket: accept failed: %s", exc.strerror or exc)
                return
            if len(self.clients) >= MAX_CLIENTS:
                sock.close()
                log.warning("control socket: more than %d clients at once; closed the newest", MAX_CLIENTS)
                continue
            self.clients.add(ControlConnection(self, sock))

    def close(self) -> None:
        for client in list(self.clients):
            client.close()
        try:
            self.selector.unregister(self.sock)
        except (KeyError, ValueError):
            pass
        self.sock.close()
        try:
            if os.stat(self.path).st_ino == self._inode:  # not a newer server's socket
                os.unlink(self.path)
        except FileNotFoundError:
            pass


class ControlConnection:
    __slots__ = ("server", "sock", "protocol", "wbuf", "events", "closing", "write_timer", "pending")

    def __init__(self, server: ControlServer, sock: socket.socket):
        self.server = server
        self.sock = sock
        sock.setblocking(False)
        self.protocol = ControlProtocol()
        self.wbuf = bytearray()
        self.events = READ
        self.closing = False  # answered an error: close once it is sent
        self.write_timer = None
        self.pending: deque[dict] = deque()  # requests read and not served yet (one per loop pass)
        server.selector.register(sock, READ, self)

    def on_event(self, mask: int) -> None:
        if mask & WRITE:
            if self.wbuf:
                self._send()
            else:
                self._serve_one()
        elif mask & READ and self.sock.fileno() >= 0 and not self.closing:
            self._read()

    def _read(self) -> None:
        try:
            data = self.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        try:
            requests = self.protocol.feed(data)
        except ControlError as exc:
            self._answer({"ok": False, "error": str(exc)})
            self.closing = True
            self._send()
            return
        if len(self.pending) + len(requests) > MAX_REQUESTS_PER_READ:
            log.warning("control socket: a client sent more than %d requests at once; dropped", MAX_REQUESTS_PER_READ)
            self.pending.clear()
            self._answer({"ok": False, "error": f"more than {MAX_REQUESTS_PER_READ} requests at once"})
            self.closing = True
            self._send()
            return
        self.pending.extend(requests)
        self._serve_one()

    def _serve_one(self) -> None:
        """Answer the oldest waiting request (the others wait for the next loop pass)."""
        if self.pending and not self.closing:
            message = self.pending.popleft()
            try:
                answer = self.server.handle(message)
            except ControlError as exc:
                answer = {"ok": False, "error": str(exc)}
            self._answer(answer)
            if len(self.wbuf) > MAX_OUTPUT_BYTES:
                log.warning("control socket: a client does not read its answers (%d bytes held); dropped", len(self.wbuf))
                self.close()
                return
        self._send()

    def _answer(self, message: dict) -> None:
        self.wbuf += encode(message)

    def _send(self) -> None:
        if self.sock.fileno() < 0:
            return
        if self.wbuf:
            try:
                sent = self.sock.send(self.wbuf)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self.close()
                return
            del self.wbuf[:sent]
        if self.wbuf:
            self._set_events(WRITE)  # nothing more is read until the answer is out
            if self.write_timer is None:
                self.write_timer = self.server.timers.call_later(WRITE_TIMEOUT_S, self._write_timed_out)
            return
        if self.write_timer is not None:
            self.write_timer.cancel()
            self.write_timer = None
        if self.closing:
            self.close()
        elif self.pending:
            self._set_events(WRITE)  # writable at once: the next request is served next loop pass
        else:
            self._set_events(READ)

    def _write_timed_out(self) -> None:
        self.write_timer = None
        if self.wbuf and self.sock.fileno() >= 0:
            log.warning("control socket: a client left an answer unread for %gs; dropped", WRITE_TIMEOUT_S)
            self.close()

    def _set_events(self, events: int) -> None:
        if events != self.events:
            self.server.selector.modify(self.sock, events, self)
            self.events = events

    def close(self) -> None:
        if self.sock.fileno() < 0:
            return
        if self.write_timer is not None:
            self.write_timer.cancel()
            self.write_timer = None
        try:
            self.server.selector.unregister(self.sock)
        except (KeyError, ValueError):
            pass
        self.sock.close()
        self.server.clients.discard(self)


def _bind(path: str, private_dir: bool) -> socket.socket:
    """A listening socket at ``path``, mode 0600, its directory made 0700 if we create it (and,
    for the default path, if it exists with more); ``OSError`` with a clear message when that
    cannot be. A path the user chose sits where they put it: the socket's own 0600 guards it."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o700, exist_ok=True)
    if private_dir:
        info = os.stat(directory)
        if info.st_uid != os.getuid():
            raise OSError(errno.EPERM, f"directory {directory} of the control socket belongs to another user")
        if info.st_mode & 0o077:
            os.chmod(directory, 0o700)  # ours, and meant for nothing else
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(mode):
            raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)  # left by a server that died: nobody listens
        else:
            raise OSError(errno.EADDRINUSE, f"control socket {path} is in use by another server")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # created 0600: no moment where others may connect
    try:
        sock.bind(path)
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(16)
    return sock


# -- the commands --------------------------------------------------------------------------

class Commands:
    """What each control command does to the running ``server.Server`` (called in its loop)."""

    def __init__(self, server, sampler):
        self.server = server
        self.sampler = sampler

    def __call__(self, message: dict) -> dict:
        cmd = message["cmd"]
        method = getattr(self, "cmd_" + cmd, None) if cmd.isidentifier() else None
        if method is None:
            raise ControlError(f"unknown command {cmd[:40]!r}; expected stats, reload, scale or stop")
        return method(message)

    def cmd_stats(self, message: dict) -> dict:
        from .stats import build_snapshot

        server = self.server
        return {"ok": True, "stats": build_snapshot(server, self.sampler, server.stats_providers)}

    def cmd_reload(self, message: dict) -> dict:
        server = self.server
        if server._stopping:
            raise ControlError("the server is stopping")
        server.handle_hup()
        pool = server.pool
        return {"ok": True, "message": f"reloading: {pool.target} workers of generation {pool.generation} "
                                       f"start, each old one retires once a new one has booted"}

    def cmd_scale(self, message: dict) -> dict:
        server = self.server
        if server._stopping:
            raise ControlError("the server is stopping")
        text = str(message.get("n", "")).strip()
        try:
            number = int(text)
        except ValueError:
            raise ControlError(f"scale: expected N, +N or -N, got {text[:20]!r}") from None
        pool = server.pool
        before = pool.target
        target = before + number if text[0] in "+-" else number
        limit = 1024  # as the workers setting
        if not 1 <= target <= limit:
            raise ControlError(f"scale: the worker target must stay from 1 to {limit}, {text} would make it {target}")
        pool.scale(target - before)
        return {"ok": True, "message": f"worker target {before} -> {pool.target}", "target": pool.target,
                "previous": before}

    def cmd_stop(self, message: dict) -> dict:
        server = self.server
        now = bool(message.get("now"))
        # After the answer has gone out (the stop closes this socket).
        server.timers.call_later(0, server.handle_quit if now else server.handle_term)
        if now:
            return {"ok": True, "message": f"stopping now (pid {os.getpid()}): unanswered RPCs get FAIL ShuttingDown"}
        return {"ok": True, "message": f"stopping gracefully (pid {os.getpid()}): RPCs in progress get up to "
                                       f"{server.settings.graceful_timeout:g}s"}
