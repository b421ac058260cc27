"""The simplerpc wire protocol, with no I/O: bytes in, frames out; frames in, bytes out.

Grammar (wire-compatible with pjsdev/simplerpc)::

    stream  = *frame
    frame   = opname json-object LF
    opname  = 1*(any byte but "{" and LF)      ; everything before the first "{"
    answer  = "OKAY" json-object LF | "FAIL" {"reason": str, "message": str} LF

A frame is malformed when it has no ``{``, its OPNAME is empty, it is not UTF-8, or the text
from the first ``{`` on is not one JSON object (surrounding white space, such as a CR before
the LF, is allowed, as the original strips it). NaN and the infinities are not JSON: neither the
literals nor a number past the double range (``1e999``) is read, and none is written. A line
longer than ``max_frame_bytes`` is dropped by the decoder and reported as ``None`` in its
place, so the caller can answer it.

The JSON codec is orjson when it is installed and writes as json does (``JSON_CODEC ==
"orjson"``), else the standard library (``"stdlib"``); ``SIMPLERPC_MP_JSON=stdlib`` in the
environment at import forces the latter. Both give json's results: the same objects, the same
bytes (compact, ASCII only), the same errors with the same messages, because the orjson path
hands every frame or answer where orjson could differ to json. What remains: orjson encodes
``enum.Enum`` and ``enum.Flag`` members (as their values), ``uuid.UUID`` and ``orjson.Fragment``,
which json refuses; and the nesting depth at which the recursion limit cuts in moves a little
(orjson's path reads up to ``_ORJSON_MAX_DEPTH`` levels however deep the caller's stack is, and
both call json's C scanner and encoder from a frame or two higher than ``JSONDecoder.decode`` and
``JSONEncoder.encode`` did).

Used by the acceptor (framing only), the workers (decode/encode) and both clients.
"""

from __future__ import annotations

import json
import math
import os
import struct
from json.decoder import WHITESPACE
from json.encoder import c_make_encoder, encode_basestring_ascii

from .errors import MalformedPayload

# Set to "stdlib" (read once, at import), it makes the standard library the codec.
JSON_CODEC_ENV = "SIMPLERPC_MP_JSON"

_orjson = None
if os.environ.get(JSON_CODEC_ENV) != "stdlib":
    try:
        import orjson as _orjson
    except ImportError:  # no wheel for this platform: the standard library does it all
        pass

__all__ = [
    "FrameDecoder",
    "decode_frame",
    "encode_frame",
    "encode_fail",
    "encode_okay",
    "split_lines",
    "loads_untrusted",
    "DEFAULT_MAX_FRAME_BYTES",
    "JSON_CODEC",
    "JSON_CODEC_ENV",
]

# 1 MiB, the default message cap of NATS: large enough for any sane RPC, small enough that a
# client can't make the acceptor buffer much for it (it holds at most this per connection).
DEFAULT_MAX_FRAME_BYTES = 1024 * 1024

_NL = b"\n"
_OPEN = b"{"


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


def loads_untrusted(data: bytes):
    """``json.loads`` for bytes from outside the server (an auth frame, a control request, a
    value in Redis): ``ValueError`` for anything that is not JSON, nesting past the parser's
    recursion limit included. Its RecursionError is not a ValueError: caught as one, a few KiB
    of "[" sent by anyone ended the acceptor's loop."""
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("JSON nested deeper than the parser's recursion limit") from None


# -- the standard-library codec ----------------------------------------------------------------


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    """A JSON number with a fraction or exponent, refused if a double can't hold it: json would
    read ``1e999`` as Infinity, which no answer could then carry (and other parsers refuse)."""
    value = float(text)
    if value - value != 0.0:  # inf - inf is NaN
        shown = text if len(text) <= 40 else text[:37] + "..."
        raise ValueError(f"number {shown} is out of the range of a double")
    return value


# parse_float costs a Python call per float (json's C scanner special-cases float itself); the
# orjson path refuses such numbers on its own and sends the frame here only for the error.
_decoder = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float)
_loads = _decoder.decode
_scan_once = _decoder.scan_once
_skip_white_space = WHITESPACE.match  # what JSONDecoder.decode allows after the value

# allow_nan=False: NaN and Infinity are not JSON, and other clients' parsers refuse them.
_encoder = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
_dumps_checked = _encoder.encode
if c_make_encoder is not None:
    # The C encoder that JSONEncoder.encode makes on every call, made once. Without markers it
    # keeps no state between calls (nor threads); a circular reference then ends in
    # RecursionError, and the checking encoder, run again, turns it into the ValueError it was.
    _dumps_unchecked = c_make_encoder(
        None, _encoder.default, encode_basestring_ascii, None, ":", ",", False, False, False
    )
else:  # an interpreter without the _json accelerator

    def _dumps_unchecked(data, _indent_level):
        return (_dumps_checked(data),)


def _decode_frame_reference(line: bytes) -> tuple[str, dict]:
    """The plain decoding: its errors, and their messages, are those of every path."""
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


def _decode_frame_stdlib(line: bytes) -> tuple[str, dict]:
    """Parse one line (without its LF) into ``(op, data)``; raise ``MalformedPayload``.

    ``_decode_frame_reference`` without its copies: json scans the object where it starts. A
    frame that fails goes to the reference for its error, whose positions count from the ``{``.
    """
    brace = line.find(_OPEN)
    if brace > 0:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            return _decode_frame_reference(line)
        # In an all-ASCII line characters and bytes have the same offsets.
        start = brace if len(text) == len(line) else text.index("{")
        try:
            data, end = _scan_once(text, start)
        except (ValueError, StopIteration, RecursionError):  # StopIteration: a value is missing
            return _decode_frame_reference(line)
        if end == len(text) or _skip_white_space(text, end).end() == len(text):
            return text[:start], data
    return _decode_frame_reference(line)


def _frame_stdlib(prefix: bytes, data) -> bytes:
    """``prefix``, the JSON of ``data`` and an LF. Raises TypeError/ValueError as json does."""
    try:
        text = "".join(_dumps_unchecked(data, 0))
    except RecursionError:
        text = None
    if text is None:  # outside the except clause, so its ValueError comes unchained
        text = _dumps_checked(data)
    return prefix + (text + "\n").encode("utf-8")


# -- the orjson codec: orjson's answer wherever it is sure to be json's --------------------------
#
# Each check is a cheap filter (a byte search, or a walk over a few values) and an exact test only
# when the filter hits. ``data.replace(pattern, b"") is data`` is the cheapest test that bytes lack
# a pattern of several bytes: CPython's ``replace`` hands back the object itself when there is
# nothing to replace (were it to copy, the exact test would run), at half the cost of ``find``
# and a quarter of ``pattern in data`` (which first tries the pattern as an int). For one byte,
# ``find`` is cheapest: it is a memchr. The hot paths are inlined: a call costs ~0.1 us.

if _orjson is not None:
    _orjson_loads = _orjson.loads
    _orjson_dumps = _orjson.dumps
    _ORJSON_DECODE_ERROR = _orjson.JSONDecodeError
    # Subclasses (of str, int, dict, list), dataclasses and datetimes go to ``default``, which is
    # None, so orjson raises TypeError and json decides. The newline ends the frame.
    _ORJSON_OPTIONS = (
        _orjson.OPT_PASSTHROUGH_SUBCLASS
        | _orjson.OPT_PASSTHROUGH_DATACLASS
        | _orjson.OPT_PASSTHROUGH_DATETIME
        | _orjson.OPT_APPEND_NEWLINE
    )

_UNLIMITED = float("inf")

# Decoding. orjson reads an integer beyond 64 bits as a float of 2**63 or more in magnitude (the
# integer takes 19 digits or more in a row), and nests 1023 levels deep where json goes as deep as
# the recursion limit allows (~990 levels from the top of the stack): such frames go to json.
_WIDE_FLOAT = float(2**63)
_DIGIT_RUN = b"0" * 19
_DIGIT_CLASSES = bytes(48 if 48 <= byte <= 57 else 46 for byte in range(256))  # digit -> "0", else "."
_ORJSON_MAX_DEPTH = 256
_SHORT_LINE_BYTES = 2 * _ORJSON_MAX_DEPTH  # a shorter line cannot nest deeper: a level takes 2 bytes


def _check_decoded(data: dict, budget: float) -> bool | None:
    """Whether orjson's ``data`` may differ from json's: it holds a float of 2**63 or more in
    magnitude, or nests deeper than ``_ORJSON_MAX_DEPTH``. None: more than ``budget`` values."""
    stack = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        values = node.values() if type(node) is dict else node
        budget -= len(values)
        if budget < 0:
            return None
        for value in values:
            kind = type(value)
            if kind is float:
                if not -_WIDE_FLOAT < value < _WIDE_FLOAT:
                    return True
            elif kind is dict or kind is list:
                if depth >= _ORJSON_MAX_DEPTH:
                    return True
                stack.append((value, depth + 1))
    return False


def _long_line_may_misread(line: bytes, data: dict) -> bool:
    # Walking a few values is cheaper than scanning a long string, scanning cheaper than walking many.
    verdict = _check_decoded(data, len(line) >> 5)
    if verdict is None:
        classes = line.translate(_DIGIT_CLASSES)
        if classes.replace(_DIGIT_RUN, b"") is classes and (
            line.count(b"[") + line.count(b"{") <= _ORJSON_MAX_DEPTH
        ):
            return False
        verdict = _check_decoded(data, _UNLIMITED)
    return verdict


def _decode_frame_orjson(line: bytes) -> tuple[str, dict]:
    """Parse one line (without its LF) into ``(op, data)``; raise ``MalformedPayload``.

    orjson's reading where it is json's. A frame orjson refuses goes to ``_decode_frame_reference``:
    mostly malformed ones (floats past the double range among them), for the usual error, but json
    also takes lone surrogates and 1024 levels of nesting. A frame orjson may misread goes to json too.
    """
    brace = line.find(_OPEN)
    if brace > 0:
        try:
            # No UTF-8 sequence holds a "{": both halves are valid UTF-8 iff the line is.
            op = line[:brace].decode()
            data = _orjson_loads(line[brace:])
        except (UnicodeDecodeError, _ORJSON_DECODE_ERROR):
            return _decode_frame_reference(line)
        if len(line) > _SHORT_LINE_BYTES:
            if not _long_line_may_misread(line, data):
                return op, data
        else:
            classes = line.translate(_DIGIT_CLASSES)
            if classes.replace(_DIGIT_RUN, b"") is classes or not _check_decoded(data, _UNLIMITED):
                return op, data
        return _decode_frame_stdlib(line)
    return _decode_frame_reference(line)


# Encoding. json escapes DEL and every non-ASCII character (ensure_ascii), and refuses NaN and the
# infinities, which orjson writes as null. orjson spells floats below 1e-4 its own way (0.00001
# and 1e-7 for json's 1e-05 and 1e-07) and the others as repr() does, from 3.11.7 on (3.11.6 wrote
# 1e16 for 1e+16): ``_orjson_writes_like_json`` checks this orjson at import.
_SHORT_JSON_BYTES = 512


def _check_encoded(data, budget: float) -> bool | None:
    """Whether ``data`` holds a float orjson writes otherwise than json: NaN, an infinity, or one
    below 1e-4 in magnitude but 0. None: more than ``budget`` values."""
    stack = [(data,)]
    while stack:
        node = stack.pop()
        values = node.values() if type(node) is dict else node
        budget -= len(values)
        if budget < 0:
            return None
        for value in values:
            kind = type(value)
            if kind is float:
                if not (1e-4 <= abs(value) < _UNLIMITED or value == 0.0):
                    return True
            elif kind is dict or kind is list or kind is tuple:
                stack.append(value)
    return False


def _may_spell_floats_otherwise(out: bytes) -> bool:
    """The byte filter for ``_check_encoded``: False if ``out`` has no such float."""
    return not (
        out.replace(b"null", b"") is out and out.replace(b"e-", b"") is out and out.replace(b"0.0000", b"") is out
    )


def _long_json_may_misspell(out: bytes, data) -> bool:
    verdict = _check_encoded(data, len(out) >> 5)
    if verdict is None:
        verdict = _may_spell_floats_otherwise(out) and _check_encoded(data, _UNLIMITED)
    return verdict


def _frame_orjson(prefix: bytes, data) -> bytes:
    """``prefix``, the JSON of ``data`` and an LF: orjson's bytes where they are json's."""
    try:
        out = _orjson_dumps(data, None, _ORJSON_OPTIONS)
    except TypeError:  # orjson.JSONEncodeError: a type, key or int it won't take, or deep nesting
        out = None
    if out is None:
        # Outside the except clause: json's own error must not come chained to orjson's
        # ("'NoneType' object is not callable", from the default=None it was given).
        return _frame_stdlib(prefix, data)
    # (An orjson.Fragment is written verbatim: a raw LF in it would split the frame.)
    if out.isascii() and out.find(b"\x7f") < 0 and out.find(_NL) == len(out) - 1:
        if len(out) > _SHORT_JSON_BYTES:
            if not _long_json_may_misspell(out, data):
                return prefix + out
        elif (
            out.replace(b"null", b"") is out and out.replace(b"e-", b"") is out and out.replace(b"0.0000", b"") is out
        ) or not _check_encoded(data, _UNLIMITED):  # _may_spell_floats_otherwise, inlined
            return prefix + out
    return _frame_stdlib(prefix, data)


def _float_probes() -> list[float]:
    """Finite floats of every magnitude, and a fixed pseudo-random sample of bit patterns."""
    probes = [0.0, -0.0, 5e-324, 2.2250738585072014e-308, 1.7976931348623157e308, 1e-4, 1e16]
    for exponent in range(-323, 308):  # repr() takes ~2 us here: one float a decade
        probes.append((1.2345678901234567 if exponent % 2 else 9.999999999999998) * 10.0**exponent)
    state = 0x2545F4914F6CDD1D
    words = []
    for _ in range(128):  # xorshift64
        state ^= (state << 13) & 0xFFFFFFFFFFFFFFFF
        state ^= state >> 7
        state ^= (state << 17) & 0xFFFFFFFFFFFFFFFF
        words.append(state)
    probes += struct.unpack("<128d", struct.pack("<128Q", *words))
    return [x for x in probes if x - x == 0.0]  # NaN - NaN and inf - inf are NaN


def _orjson_writes_like_json() -> bool:
    """Whether this orjson writes what the checks above expect: ASCII strings, and floats but those
    ``_check_encoded`` and its byte filter catch, as json does; NaN and the infinities as null.
    About 3 ms, once per process."""
    ascii_text = "".join(map(chr, range(128)))
    if _orjson_dumps(ascii_text) != _dumps_checked(ascii_text).replace("\\u007f", "\x7f").encode():
        return False
    if _orjson_dumps([math.nan, math.inf, -math.inf]) != b"[null,null,null]":
        return False
    probes = _float_probes()
    spelled = _orjson_dumps(probes)[1:-1].split(b",")
    expected = ",".join(map(repr, probes)).encode().split(b",")
    return len(spelled) == len(probes) and all(
        0.0 < abs(value) < 1e-4 and _may_spell_floats_otherwise(ours)
        for value, ours, theirs in zip(probes, spelled, expected)
        if ours != theirs
    )


def _pick_codec() -> str:
    return "orjson" if _orjson is not None and _orjson_writes_like_json() else "stdlib"


# -- the public codec ----------------------------------------------------------------------------

# Each codec's (decode_frame, frame encoder); the tests switch between them.
_CODECS = {
    "stdlib": (_decode_frame_stdlib, _frame_stdlib),
    "orjson": (_decode_frame_orjson, _frame_orjson),
}
JSON_CODEC = _pick_codec()
decode_frame, _frame = _CODECS[JSON_CODEC]


def encode_frame(op: str, data: dict) -> bytes:
    """One frame as bytes. Raises ``TypeError``/``ValueError`` for data JSON cannot encode."""
    if not op or "{" in op or "\n" in op:
        raise ValueError(f"invalid op name {op!r}: must be non-empty, without '{{' or newline")
    if not isinstance(data, dict):
        raise TypeError(f"the data of a frame must be a dict (a JSON object), not {type(data).__name__}")
    return _frame(op.encode("utf-8"), data)


def encode_okay(data: dict) -> bytes:
    """An OKAY answer: the hot path of every worker, so without encode_frame's op check."""
    return _frame(b"OKAY", data)


def encode_fail(reason: str, message: str) -> bytes:
    return encode_frame("FAIL", {"reason": reason, "message": message})
