"""Baseline (a), single process: an asyncio server speaking the simplerpc protocol that runs each
handler in its event loop, as the original simplerpc does. Honest and idiomatic: an
``asyncio.Protocol`` (no per-line coroutine), the answers of one read written in one
``transport.write``, the same handler modules as simplerpc-mp, and the JSON a user's server
uses: ``json.loads`` and ``json.dumps`` of the standard library, as the original does (with
compact separators, so answers are byte for byte what simplerpc-mp sends and the load
generator checks both alike). ``--codec mp`` uses simplerpc-mp's own codec instead
(``simplerpc_mp.protocol``, orjson when installed): the row that isolates the architecture.

    python -m bench.baseline_single --port 0 --handlers bench.handlers [--codec mp]

Prints ``listening on HOST:PORT`` once it accepts connections; stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

from simplerpc_mp import protocol
from simplerpc_mp.errors import UNKNOWN_MESSAGE, UNKNOWN_REASON, MalformedPayload, SimpleRPCException, UnknownOpcode
from simplerpc_mp.handlers import BROADCAST, Conn, Handlers, load_handlers


def stdlib_decode(line: bytes) -> tuple[str, dict]:
    """The original's Payload.from_string, on bytes: the op is what precedes the first ``{``."""
    op, brace, rest = line.partition(b"{")
    if not brace:
        raise MalformedPayload("JSON data not found")
    if not op:
        raise MalformedPayload("Could not find opcode")
    try:
        data = json.loads(brace + rest)
    except ValueError:
        raise MalformedPayload(f"JSON malformed for opcode: {op!r}") from None
    if type(data) is not dict:
        raise MalformedPayload("JSON payload is not an object")
    return op.decode(), data


def stdlib_encode(op: str, data: dict) -> bytes:
    return b"%s%s\n" % (op.encode(), json.dumps(data, separators=(",", ":")).encode())


CODECS = {"stdlib": (stdlib_decode, stdlib_encode), "mp": (protocol.decode_frame, protocol.encode_frame)}
decode, encode = CODECS["stdlib"]


def use_codec(name: str) -> None:
    global decode, encode
    decode, encode = CODECS[name]


def answer_line(handlers: Handlers, conn: Conn, line: bytes) -> bytes:
    """Run one RPC line (without its LF) and return its encoded answer, as a worker does."""
    try:
        op, data = decode(line)
        entry = handlers.ops.get(op)
        if entry is not None:
            result = entry.fn(conn, data)
        elif handlers.any_fn is not None:
            result = handlers.any_fn(conn, op, data)
        else:
            raise UnknownOpcode(f"no handler for op {op!r}")
        if type(result) is not dict:
            result = (conn.okay_data or {}) if result is None else {"result": result}
        return encode("OKAY", result)
    except SimpleRPCException as exc:
        return encode("FAIL", {"reason": exc.reason, "message": str(exc)})
    except Exception:
        return encode("FAIL", {"reason": UNKNOWN_REASON, "message": UNKNOWN_MESSAGE})


class Hub:
    """The connections by net_id, to route pushes."""

    def __init__(self, handlers: Handlers):
        self.handlers = handlers
        self.conns: dict[int, "RPCProtocol"] = {}
        self.next_net_id = 1

    def push(self, target: int, frame: bytes) -> None:
        if target == BROADCAST:
            for proto in self.conns.values():
                proto.transport.write(frame)
        elif target in self.conns:
            self.conns[target].transport.write(frame)


class RPCProtocol(asyncio.Protocol):
    def __init__(self, hub: Hub):
        self.hub = hub
        self.partial = b""
        self.session: dict = {}

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.net_id = self.hub.next_net_id
        self.hub.next_net_id += 1
        self.hub.conns[self.net_id] = self

    def connection_lost(self, exc) -> None:
        self.hub.conns.pop(self.net_id, None)

    def data_received(self, data: bytes) -> None:
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        self.send_answers(self.run(line) for line in lines)  # each RPC runs when its turn comes

    def run(self, line: bytes) -> tuple[bytes, list]:
        pushes: list = []
        return answer_line(self.hub.handlers, Conn(self.net_id, self.session, pushes), line), pushes

    def send_answers(self, answered) -> None:
        """Write ``(answer, pushes)`` pairs in order: an RPC's pushes go out before its answer,
        and the answers between pushes in one write."""
        out = []
        for answer, pushes in answered:
            if pushes:
                if out:
                    self.transport.write(b"".join(out))
                    out = []
                for target, frame in pushes:
                    self.hub.push(target, frame)
            out.append(answer)
        if out and not self.transport.is_closing():
            self.transport.write(b"".join(out))


async def serve(host: str, port: int, make_protocol, ready_note: str = "") -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(make_protocol, host, port, backlog=1024)
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    bound = server.sockets[0].getsockname()
    print(f"listening on {bound[0]}:{bound[1]}{ready_note}", flush=True)
    async with server:
        await stop


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--handlers", default="bench.handlers")
    parser.add_argument("--workers", type=int, default=0, help="pool size (baseline_pool only; 0 = cores)")
    parser.add_argument("--codec", choices=sorted(CODECS), default="stdlib", help="JSON codec (see the module docstring)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    use_codec(args.codec)
    hub = Hub(load_handlers(args.handlers))
    asyncio.run(serve(args.host, args.port, lambda: RPCProtocol(hub)))


if __name__ == "__main__":
    sys.exit(main())
