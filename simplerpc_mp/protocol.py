"""The simplerpc wire protocol, with no I/O: bytes in, frames out; frames in, bytes out.

Grammar (wire-compatible with pjsdev/simplerpc)::

    stream  = *frame
    frame   = opname json-object LF
    opname  = 1*(any byte but "{" and LF)      ; everything before the first "{"
    answer  = "OKAY" json-object LF | "FAIL" {"reason": str, "message": str} LF

A frame is malformed when it has no ``{``, its OPNAME is empty, it is not UTF-8, or the text
from the first ``{`` on is not one JSON object (surrounding white space, such as a CR before
the LF, is allowed, as the original strips it). A line longer than ``max_frame_bytes`` is
dropped by the decoder and reported as ``None`` in its place, so the caller can answer it.

Used by the acceptor (framing only), the workers (decode/encode) and both clients.
"""

from __future__ import annotations

import json

from .errors import MalformedPayload

__all__ = [
    "FrameDecoder",
    "decode_frame",
    "encode_frame",
    "encode_fail",
    "encode_okay",
    "split_lines",
    "DEFAULT_MAX_FRAME_BYTES",
]

# 1 MiB, the default message cap of NATS: large enough for any sane RPC, small enough that a
# client can't make the acceptor buffer much for it (it holds at most this per connection).
DEFAULT_MAX_FRAME_BYTES = 1024 * 1024

_NL = b"\n"
_OPEN = b"{"
# allow_nan=False: NaN and Infinity are not JSON, and other clients' parsers refuse them.
_dumps = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


_decoder = json.JSONDecoder(parse_constant=_refuse_constant)
_loads = _decoder.decode


class FrameDecoder:
    """Splits a byte stream into complete lines, without parsing them.

    ``feed(data)`` returns a list whose items are, in stream order, either a bytes chunk of one
    or more complete lines (each ending in LF) or ``None`` for a line that exceeded
    ``max_frame_bytes``. The decoder keeps at most ``max_frame_bytes`` of an incomplete line; the
    rest of an overlong line is discarded up to its LF. Each byte is scanned a bounded number
    of times, so data arriving one byte at a time still costs linear time.
    """

    __slots__ = ("max_frame_bytes", "_partial", "_discarding")

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES):
        self.max_frame_bytes = max_frame_bytes
        self._partial = bytearray()
        self._discarding = False  # inside an overlong line: drop bytes up to the next LF

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete line held right now."""
        return len(self._partial)

    def feed(self, data: bytes) -> list:
        out: list = []
        if self._discarding:
            end = data.find(_NL)
            if end < 0:
                return out
            self._discarding = False
            data = data[end + 1 :]
        last = data.rfind(_NL)
        if last < 0:
            self._keep_partial(data, out)
            return out
        if self._partial:
            self._partial += data[: last + 1]
            complete = bytes(self._partial)
            self._partial.clear()
        else:
            complete = data if last == len(data) - 1 else data[: last + 1]
        # A chunk no longer than the limit cannot hold an overlong line: skip the per-line check.
        if len(complete) > self.max_frame_bytes + 1:
            self._split_overlong(complete, out)
        else:
            out.append(complete)
        self._keep_partial(data[last + 1 :], out)
        return out

    def _keep_partial(self, data: bytes, out: list) -> None:
        if not data:
            return
        if len(self._partial) + len(data) > self.max_frame_bytes:
            self._partial.clear()
            self._discarding = True
            out.append(None)
        else:
            self._partial += data

    def _split_overlong(self, complete: bytes, out: list) -> None:
        limit = self.max_frame_bytes
        run_start = start = 0
        while start < len(complete):
            end = complete.index(_NL, start)
            if end - start > limit:
                if run_start < start:
                    out.append(complete[run_start:start])
                out.append(None)
                run_start = end + 1
            start = end + 1
        if run_start < len(complete):
            out.append(complete[run_start:])


def split_lines(chunk: bytes) -> list[bytes]:
    """The lines of a chunk of complete lines, without their LFs."""
    lines = chunk.split(_NL)
    lines.pop()  # the empty string after the final LF
    return lines


def decode_frame(line: bytes) -> tuple[str, dict]:
    """Parse one line (without its LF) into ``(op, data)``; raise ``MalformedPayload``."""
    brace = line.find(_OPEN)
    if brace < 0:
        raise MalformedPayload("JSON data not found")
    if brace == 0:
        raise MalformedPayload("Could not find opcode")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedPayload(f"frame is not valid UTF-8: {exc.reason} at byte {exc.start}") from None
    op = text[: text.index("{")]
    try:
        data = _loads(text[len(op) :])
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        raise MalformedPayload(f"JSON malformed for opcode: {op}: {exc}") from None
    except RecursionError:
        raise MalformedPayload(f"JSON nested too deeply for opcode: {op}") from None
    if type(data) is not dict:
        raise MalformedPayload(f"JSON payload for opcode {op} is not an object")
    return op, data


def encode_frame(op: str, data: dict) -> bytes:
    """One frame as bytes. Raises ``TypeError``/``ValueError`` for data JSON cannot encode."""
    if not op or "{" in op or "\n" in op:
        raise ValueError(f"invalid op name {op!r}: must be non-empty, without '{{' or newline")
    if not isinstance(data, dict):
        raise TypeError(f"the data of a frame must be a dict (a JSON object), not {type(data).__name__}")
    return b"%s%s\n" % (op.encode("utf-8"), _dumps(data).encode("utf-8"))


def encode_okay(data: dict) -> bytes:
    """An OKAY answer: the hot path of every worker, so without encode_frame's op check."""
    return b"OKAY%s\n" % _dumps(data).encode("utf-8")


def encode_fail(reason: str, message: str) -> bytes:
    return encode_frame("FAIL", {"reason": reason, "message": message})
