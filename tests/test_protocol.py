"""The protocol module alone (``simplerpc_mp/protocol.py``): framing and codec, no sockets.

Example tests feed each stream whole, one byte at a time, several frames per chunk and with a
trailing partial frame; ``hypothesis`` checks the same properties on generated streams and
splits; a corpus of bad frames sits beside the reason each must give.

Every codec test runs with both codecs (the ``codec`` fixture), and the orjson path is checked
against plain ``json`` on generated texts and values: same result or same error, byte for byte.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import enum
import functools
import json
import math
import os
import reprlib
import subprocess
import sys
import time
import uuid

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from simplerpc_mp import protocol
from simplerpc_mp.errors import MalformedPayload
from simplerpc_mp.protocol import DEFAULT_MAX_FRAME_BYTES, FrameDecoder, split_lines

try:
    import orjson
except ImportError:  # the standard-library codec alone is tested
    orjson = None

# The orjson path is there to test unless SIMPLERPC_MP_JSON=stdlib kept protocol from importing
# orjson, or this orjson writes otherwise than the checks expect (test_orjson_is_the_codec_when_installed fails).
ORJSON_PATH = protocol._orjson is not None and protocol._orjson_writes_like_json()

# -- helpers ---------------------------------------------------------------------------------


def feed_all(decoder: FrameDecoder, pieces) -> list:
    """Feed every piece; return the lines seen (without LF) and ``None`` for each overlong line.

    Also checks, after every feed, the decoder's promise to hold at most ``max_frame_bytes``.
    """
    lines: list = []
    for piece in pieces:
        for chunk in decoder.feed(piece):
            if chunk is None:
                lines.append(None)
            else:
                assert chunk.endswith(b"\n"), chunk
                lines.extend(split_lines(chunk))
        assert decoder.buffered <= decoder.max_frame_bytes
    return lines


def split_at(data: bytes, cuts) -> list[bytes]:
    """``data`` cut at the given offsets (any order, duplicates allowed: empty pieces too)."""
    points = sorted(min(max(c, 0), len(data)) for c in cuts)
    pieces, start = [], 0
    for point in points:
        pieces.append(data[start:point])
        start = point
    pieces.append(data[start:])
    return pieces


def expected_lines(stream: bytes, limit: int) -> tuple[list, int]:
    """The model: what a decoder with ``limit`` must report for ``stream``, and what it keeps.

    Each complete line is itself, or ``None`` when longer than ``limit`` (LF not counted); a
    trailing partial line longer than ``limit`` is reported as ``None`` (once) and not kept.
    """
    *complete, tail = stream.split(b"\n")
    lines = [None if len(line) > limit else line for line in complete]
    if len(tail) > limit:
        lines.append(None)
        return lines, 0
    return lines, len(tail)


# -- strategies ------------------------------------------------------------------------------

# OPNAMEs: any text but "{" and LF, and no lone surrogates (they have no UTF-8 encoding).
op_names = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="{\n"), min_size=1, max_size=20
)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)  # NaN and Infinity are not JSON: encode_frame refuses them
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=12,
)
json_objects = st.dictionaries(st.text(max_size=10), json_values, max_size=6)
# Streams for the framing tests: flat payloads are enough there, and much faster to generate.
frames = st.lists(
    st.tuples(op_names, st.dictionaries(st.text(max_size=8), json_scalars, max_size=4)), min_size=1, max_size=8
)
# Generating nested JSON is the slow part of these tests: fewer examples keep the file fast.
JSON_EXAMPLES = settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
# Lines for the framing model: any bytes but LF, short and overlong for a small limit.
raw_lines = st.lists(st.binary(max_size=200).map(lambda b: b.replace(b"\n", b"")), min_size=1, max_size=15)


# -- framing: any split of a valid stream gives the same frames --------------------------------

STREAM = b'echo{"a":1}\nping{}\nsay{"msg":"hi there","n":[1,2,3]}\nOKAY{"x":{"y":null}}\n'
STREAM_LINES = split_lines(STREAM)


def test_stream_whole():
    decoder = FrameDecoder()
    assert feed_all(decoder, [STREAM]) == STREAM_LINES
    assert decoder.buffered == 0


def test_stream_whole_is_one_chunk():
    """Several frames in one read come back as one chunk: the acceptor forwards it as is."""
    assert FrameDecoder().feed(STREAM) == [STREAM]


def test_stream_byte_by_byte():
    decoder = FrameDecoder()
    assert feed_all(decoder, [STREAM[i : i + 1] for i in range(len(STREAM))]) == STREAM_LINES
    assert decoder.buffered == 0


def test_stream_several_frames_per_chunk():
    cut = STREAM.index(b"say") + 5  # two frames and a half, then the rest
    decoder = FrameDecoder()
    first = feed_all(decoder, [STREAM[:cut]])
    assert first == STREAM_LINES[:2]
    assert decoder.buffered == 5
    assert feed_all(decoder, [STREAM[cut:]]) == STREAM_LINES[2:]


def test_trailing_partial_frame_is_kept_until_its_newline():
    decoder = FrameDecoder()
    assert feed_all(decoder, [STREAM + b'echo{"b":']) == STREAM_LINES
    assert decoder.buffered == len(b'echo{"b":')
    assert decoder.feed(b"") == []
    assert feed_all(decoder, [b"2}\n"]) == [b'echo{"b":2}']
    assert decoder.buffered == 0


def test_empty_lines_are_lines():
    """An empty line is a (malformed) frame of its own: the caller must answer it."""
    assert feed_all(FrameDecoder(), [b"\n\na{}\n"]) == [b"", b"", b"a{}"]


@JSON_EXAMPLES
@given(frames, st.lists(st.integers(min_value=0, max_value=10_000), max_size=30))
def test_any_split_of_a_valid_stream_gives_the_same_frames(items, cuts):
    encoded = [protocol.encode_frame(op, data) for op, data in items]
    stream = b"".join(encoded)
    lines = feed_all(FrameDecoder(), split_at(stream, cuts))
    assert lines == [frame[:-1] for frame in encoded]
    assert [protocol.decode_frame(line) for line in lines] == items


@JSON_EXAMPLES
@given(frames, st.binary(max_size=50).map(lambda b: b.replace(b"\n", b"")))
def test_byte_by_byte_with_trailing_partial(items, tail):
    encoded = [protocol.encode_frame(op, data) for op, data in items]
    stream = b"".join(encoded) + tail
    decoder = FrameDecoder()
    lines = feed_all(decoder, [stream[i : i + 1] for i in range(len(stream))])
    assert lines == [frame[:-1] for frame in encoded]
    assert decoder.buffered == len(tail)


# -- framing: overlong lines --------------------------------------------------------------------


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(
    raw_lines,
    st.booleans(),
    st.integers(min_value=1, max_value=120),
    st.lists(st.integers(min_value=0, max_value=3000), max_size=40),
)
@example([b"x" * 10, b"y" * 11, b"z" * 50], True, 10, [])  # exactly at the limit, one past, far past
@example([b"a" * 30], False, 10, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12])  # partial overlong, bytewise
def test_overlong_lines_are_reported_once_and_memory_stays_bounded(lines, last_complete, limit, cuts):
    stream = b"\n".join(lines) + (b"\n" if last_complete else b"")
    want, kept = expected_lines(stream, limit)
    decoder = FrameDecoder(limit)
    assert feed_all(decoder, split_at(stream, cuts)) == want  # feed_all checks buffered <= limit
    assert decoder.buffered == kept
    # After an overlong line the decoder frames normally again.
    assert feed_all(decoder, [b"\nx\n"])[-1] == b"x"


def test_overlong_line_streamed_in_pieces_is_one_none_and_no_memory():
    """A 5 MB line with no newline: one ``None`` as soon as it passes the limit, nothing kept."""
    limit = 1024
    decoder = FrameDecoder(limit)
    reports = []
    for _ in range(5 * 1024):
        reports.extend(decoder.feed(b"x" * 1024))
        assert decoder.buffered <= limit
    assert reports == [None]
    assert decoder.buffered == 0
    assert decoder.feed(b'xx\nnext{"a":1}\n') == [b'next{"a":1}\n']


def test_overlong_line_in_the_middle_of_a_chunk():
    decoder = FrameDecoder(16)
    chunk = b"a{}\n" + b"b" * 40 + b"\n" + b'c{"k":1}\n'
    assert decoder.feed(chunk) == [b"a{}\n", None, b'c{"k":1}\n']


def test_line_of_exactly_the_limit_passes_byte_by_byte():
    decoder = FrameDecoder(8)
    line = b"op{\"a\":1}"[:8]
    assert len(line) == 8
    assert feed_all(decoder, [bytes([b]) for b in line + b"\n"]) == [line]


def test_default_limit_is_one_mebibyte():
    assert DEFAULT_MAX_FRAME_BYTES == 1024 * 1024
    assert FrameDecoder().max_frame_bytes == DEFAULT_MAX_FRAME_BYTES


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=3000), st.integers(min_value=1, max_value=300), st.lists(st.integers(0, 3000), max_size=20))
def test_decoder_never_raises_on_arbitrary_bytes(data, limit, cuts):
    decoder = FrameDecoder(limit)
    want, kept = expected_lines(data, limit)
    assert feed_all(decoder, split_at(data, cuts)) == want
    assert decoder.buffered == kept


# -- framing: byte-at-a-time input costs linear time -------------------------------------------


def _bytewise_feed_seconds(size: int, line_bytes: int) -> float:
    """Best of three: the time to feed ``size`` bytes of lines of ``line_bytes``, one byte per call."""
    line = b"x" * (line_bytes - 3) + b"{}\n"
    data = (line * (size // len(line) + 1))[:size]
    pieces = [data[i : i + 1] for i in range(len(data))]
    best = math.inf
    for _ in range(3):
        decoder = FrameDecoder(max(line_bytes, 64))
        feed = decoder.feed
        started = time.perf_counter()
        for piece in pieces:
            feed(piece)
        best = min(best, time.perf_counter() - started)
    return best


@pytest.mark.parametrize("line_bytes", [200, 400_000])
def test_byte_at_a_time_costs_linear_time(line_bytes):
    """8x the bytes must cost well under 64x the time (quadratic) — the bound allows 3x noise.

    The 400 KB lines are the case that matters: a decoder that re-scanned or re-copied its
    partial line on every byte would be quadratic in the line length.
    """
    small = _bytewise_feed_seconds(50_000, line_bytes)
    large = _bytewise_feed_seconds(400_000, line_bytes)
    assert large / small < 24, (small, large)


# -- codec: both of them --------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["stdlib", "orjson"])
def codec(request):
    """The protocol module with one codec switched in, for the tests of this module only."""
    if request.param == "orjson" and not ORJSON_PATH:
        pytest.skip("no orjson the codec can use")  # test_orjson_is_the_codec_when_installed says why
    decode, frame = protocol._CODECS[request.param]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(protocol, "decode_frame", decode)
        patch.setattr(protocol, "_frame", frame)
        patch.setattr(protocol, "JSON_CODEC", request.param)
        yield protocol


# -- codec: decode(encode(x)) == x ---------------------------------------------------------------


@JSON_EXAMPLES
@given(op_names, json_objects)
def test_decode_encode_roundtrip(codec, op, data):
    frame = codec.encode_frame(op, data)
    assert frame.endswith(b"\n") and frame.count(b"\n") == 1
    assert codec.decode_frame(frame[:-1]) == (op, data)


@JSON_EXAMPLES
@given(op_names, json_objects)
def test_roundtrip_survives_a_crlf_line_end(codec, op, data):
    """The original strips white space around the JSON, so a CR before the LF is accepted."""
    assert codec.decode_frame(codec.encode_frame(op, data)[:-1] + b"\r") == (op, data)


@given(st.text(max_size=30), st.text(max_size=60))
def test_encode_fail_roundtrip(codec, reason, message):
    answer = codec.decode_frame(codec.encode_fail(reason, message)[:-1])
    assert answer == ("FAIL", {"reason": reason, "message": message})


@pytest.mark.parametrize("op", ["", "a{b", "a\nb", "{"])
def test_encode_frame_refuses_bad_op_names(codec, op):
    with pytest.raises(ValueError):
        codec.encode_frame(op, {})


@pytest.mark.parametrize("data", [{"x": object()}, {"x": {1, 2}}, {"x": b"bytes"}])
def test_encode_frame_refuses_what_json_cannot_encode(codec, data):
    with pytest.raises((TypeError, ValueError)):
        codec.encode_frame("op", data)


# -- codec: arbitrary bytes raise only MalformedPayload ---------------------------------------------


def _decode_or_malformed(codec, line: bytes) -> None:
    try:
        op, data = codec.decode_frame(line)
    except MalformedPayload as exc:
        assert str(exc)  # a precise message, never an empty one
        return
    assert isinstance(op, str) and op and "{" not in op
    assert type(data) is dict


@given(st.binary(max_size=500))
@example(b"{}")
@example(b"op{")
@example(b"op{\xff}")
@example(b"op{" + b"[" * 5000)
def test_decode_frame_arbitrary_bytes_raise_only_malformed_payload(codec, line):
    _decode_or_malformed(codec, line)


@given(op_names, st.text(max_size=200))
def test_decode_frame_json_like_text_raises_only_malformed_payload(codec, op, text):
    _decode_or_malformed(codec, op.encode() + b"{" + text.encode("utf-8", "surrogatepass"))


json_tokens = st.sampled_from(['{', '}', '[', ']', ',', ':', '"a"', '"\\ud800"', '1', '-0', '1e999', '-1e-999',
                               'true', 'null', 'NaN', 'Infinity', '"\\u00', '"', '\\', ' ', '9' * 50])


@given(op_names, st.lists(json_tokens, max_size=60))
def test_decode_frame_token_soup_raises_only_malformed_payload(codec, op, tokens):
    _decode_or_malformed(codec, op.encode() + b"{" + "".join(tokens).encode())


# -- hostile payloads -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        b"[" * 100_000,  # unterminated
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    ],
    ids=["open-lists", "closed-lists-not-object", "lists-in-object", "objects"],
)
def test_deep_nesting_is_malformed_payload(codec, payload):
    line = b"echo" + payload if payload.startswith(b"{") else b"echo{\"a\":" + payload + b"}"
    with pytest.raises(MalformedPayload):
        codec.decode_frame(line)


def test_deep_nesting_does_not_break_later_decoding(codec):
    with pytest.raises(MalformedPayload):
        codec.decode_frame(b'echo{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    assert codec.decode_frame(b'echo{"a":[[1]]}') == ("echo", {"a": [[1]]})


@pytest.mark.parametrize(
    "line",
    [
        b'echo{"a":"\xff"}',
        b"\xffecho{}",
        b'echo{"a":"\xc0\xaf"}',  # overlong encoding of "/"
        b'echo{"a":"\xed\xa0\x80"}',  # an encoded surrogate
        b'echo{"a":"\xe2\x82"}',  # truncated sequence
        b'ec\x80ho{"a":1}',
    ],
)
def test_invalid_utf8_is_malformed_payload(codec, line):
    with pytest.raises(MalformedPayload, match="UTF-8"):
        codec.decode_frame(line)


def test_huge_numbers(codec):
    """Floats below the double range become 0.0 (as in Python's json); an integer of more than
    4300 digits is refused by Python's int limit, as a MalformedPayload, not a ValueError.
    (Floats past the range: test_decode_refuses_numbers_past_the_double_range.)"""
    assert codec.decode_frame(b'echo{"n": 1e-999999}') == ("echo", {"n": 0.0})
    assert codec.decode_frame(b'echo{"n": -1e-400}') == ("echo", {"n": -0.0})
    assert codec.decode_frame(b'echo{"n": 1.7976931348623157e308}') == ("echo", {"n": 1.7976931348623157e308})
    with pytest.raises(MalformedPayload):
        codec.decode_frame(b'echo{"n": ' + b"9" * 5000 + b"}")
    assert codec.decode_frame(b'echo{"n": ' + b"9" * 4000 + b"}")[1]["n"] == 10**4000 - 1


# The corpus: each bad frame beside (a fragment of) the message that names what is wrong.
BAD_FRAMES = [
    (b"", "JSON data not found"),
    (b"echo", "JSON data not found"),
    (b"echo[1]", "JSON data not found"),
    (b"{}", "Could not find opcode"),
    (b'{"a":1}', "Could not find opcode"),
    (b"echo{", "JSON malformed for opcode: echo"),
    (b"echo{'a':1}", "JSON malformed for opcode: echo"),
    (b'echo{"a":1}}', "JSON malformed for opcode: echo"),
    (b'echo{"a":1} x', "JSON malformed for opcode: echo"),
    (b'echo{"a":1}{"b":2}', "JSON malformed for opcode: echo"),
    (b'echo{"a":}', "JSON malformed for opcode: echo"),
    (b'echo{"a":1,}', "JSON malformed for opcode: echo"),
    (b'echo{"a":tru}', "JSON malformed for opcode: echo"),
    (b"echo{\"n\":" + b"1" * 5000 + b"}", "JSON malformed for opcode: echo"),
    (b'echo{"a":"\x01"}', "JSON malformed for opcode: echo"),  # raw control character in a string
    (b"echo\xff{}", "not valid UTF-8"),
    (b'echo{"a":"\xfe"}', "not valid UTF-8"),
    (b"echo{\"a\":" + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply for opcode: echo"),
]


@pytest.mark.parametrize("line,message", BAD_FRAMES, ids=[repr(line[:24]) for line, _ in BAD_FRAMES])
def test_bad_frame_corpus(codec, line, message):
    with pytest.raises(MalformedPayload) as info:
        codec.decode_frame(line)
    assert message in str(info.value)
    assert info.value.reason == "MalformedPayload"


@pytest.mark.parametrize(
    "line,want",
    [
        (b"echo {}", ("echo ", {})),  # white space belongs to the OPNAME, as in the original
        (b"echo{} ", ("echo", {})),
        (b"echo\t{\"a\": 1}\r", ("echo\t", {"a": 1})),
        (b"a}b{}", ("a}b", {})),
        ('héllo{"ü":"✓"}'.encode(), ("héllo", {"ü": "✓"})),
        (b'echo{"a":"\\ud800"}', ("echo", {"a": "\ud800"})),  # an escaped lone surrogate is valid JSON
    ],
)
def test_good_frames_at_the_edges(codec, line, want):
    assert codec.decode_frame(line) == want


def test_answers_and_pushes_share_one_codec(codec):
    assert json.loads(codec.encode_frame("OKAY", {"a": [1]})[4:]) == {"a": [1]}
    assert codec.decode_frame(codec.encode_fail("FrameTooLarge", "too long")[:-1]) == (
        "FAIL",
        {"reason": "FrameTooLarge", "message": "too long"},
    )


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_encode_refuses_values_that_are_not_json(codec, value):
    with pytest.raises(ValueError):
        codec.encode_frame("op", {"n": value})


def _circular() -> list:
    loop: list = []
    loop.append(loop)
    return loop


@pytest.mark.parametrize(
    "data,error",
    [({"a": object()}, TypeError), ({"a": {1j: 1}}, TypeError), ({"a": _circular()}, ValueError)],
    ids=["object", "complex key", "circular"],
)
def test_encode_errors_are_json_errors_alone(codec, data, error):
    """orjson's refusal, handed to json, must not come chained to json's error: a handler's
    traceback then showed orjson's "'NoneType' object is not callable" above the real reason."""
    with pytest.raises(error) as info:
        codec.encode_frame("op", data)
    assert info.value.__context__ is None and info.value.__cause__ is None
    assert "NoneType" not in str(info.value)


@pytest.mark.parametrize("text", [b'op{"n": NaN}', b'op{"n": Infinity}', b'op{"n": -Infinity}'])
def test_decode_refuses_nan_and_infinity_literals(codec, text):
    with pytest.raises(MalformedPayload):
        codec.decode_frame(text)


@pytest.mark.parametrize(
    "text",
    [
        b'echo{"a": 1e999}',
        b'echo{"a": -1e999}',
        b'echo{"n": 1e999999}',
        b'echo{"a": 1.7976931348623159e308}',  # rounds up past the largest double
        b'echo{"a": 1' + b"0" * 400 + b'.0}',  # no exponent, 401 digits
        b'echo{"a": [1, {"b": 2.5e400}]}',
        b'echo{"pad": "' + b"x" * 2000 + b'", "a": 1E+999}',  # a long line
    ],
    ids=lambda text: repr(text[:30]),
)
def test_decode_refuses_numbers_past_the_double_range(codec, text):
    """json reads them as Infinity, which the README promises is refused both ways (and which
    the answer could not carry back: it failed Unknown)."""
    with pytest.raises(MalformedPayload, match="out of the range of a double"):
        codec.decode_frame(text)


def test_encode_okay_is_an_okay_frame(codec):
    data = {"a": [1, None, 2.5], "s": "é"}
    assert codec.encode_okay(data) == codec.encode_frame("OKAY", data)
    assert codec.encode_okay({}) == b"OKAY{}\n"


# -- codec: the orjson path answers as json does, byte for byte and error for error --------------

needs_orjson = pytest.mark.skipif(not ORJSON_PATH, reason="no orjson the codec can use")
_json_dumps = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode
_json_loads = json.JSONDecoder(parse_constant=protocol._refuse_constant, parse_float=protocol._finite_float).decode


def json_decode_frame(line: bytes) -> tuple[str, dict]:
    """The oracle: decode_frame as it was, on plain json, before it had a fast path."""
    brace = line.find(b"{")
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
        data = _json_loads(text[len(op) :])
    except ValueError as exc:
        raise MalformedPayload(f"JSON malformed for opcode: {op}: {exc}") from None
    except RecursionError:
        raise MalformedPayload(f"JSON nested too deeply for opcode: {op}") from None
    if type(data) is not dict:
        raise MalformedPayload(f"JSON payload for opcode {op} is not an object")
    return op, data


def json_line(data) -> bytes:
    """The oracle: the JSON of ``data`` and an LF, as encode_frame wrote it on plain json."""
    return (_json_dumps(data) + "\n").encode("utf-8")


def decoded(decode, line: bytes):
    """What ``decode`` makes of ``line``: ``repr`` tells 1 from 1.0 and -0.0 from 0.0, and keeps key order."""
    try:
        op, data = decode(line)
    except MalformedPayload as exc:
        return "MalformedPayload", str(exc)
    return op, repr(data)


def encoded(encode, data):
    try:
        return encode(data)
    except (TypeError, ValueError, RecursionError) as exc:
        return type(exc), str(exc)


def assert_decodes_as_json(line: bytes) -> None:
    want = decoded(json_decode_frame, line)
    assert decoded(protocol._decode_frame_stdlib, line) == want
    assert decoded(protocol._decode_frame_orjson, line) == want


def assert_encodes_as_json(data) -> None:
    want = encoded(json_line, data)
    for frame in (protocol._frame_stdlib, protocol._frame_orjson):
        assert encoded(functools.partial(frame, b""), data) == want
        assert encoded(functools.partial(frame, b"OKAY"), data) == (b"OKAY" + want if type(want) is bytes else want)


# Everything orjson would take otherwise: text with lone surrogates, DEL and every plane; integers
# past 64 bits; floats of every spelling, NaN and the infinities; keys json turns into strings.
any_text = st.text(st.characters(exclude_categories=()), max_size=12)
wide_ints = (
    st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 10**19, -(10**19), 10**30])
)
edge_floats = st.floats() | st.sampled_from(
    [0.0, -0.0, 1e-4, 9.999e-5, 1e-5, 1.5e-7, 1e-10, 1e16, 1e-16, 5e-324, 1.7976931348623157e308]
    + [2.0**63, -(2.0**64), 1e22]
)
json_keys = any_text | st.integers() | edge_floats | st.booleans() | st.none()
python_scalars = st.none() | st.booleans() | wide_ints | edge_floats | any_text
python_values = st.recursive(
    python_scalars,
    lambda children: st.lists(children, max_size=4)
    | st.lists(children, max_size=3).map(tuple)
    | st.dictionaries(json_keys, children, max_size=4),
    max_leaves=15,
)
python_objects = st.dictionaries(json_keys, python_values, max_size=5)


@st.composite
def json_lines(draw) -> bytes:
    """A frame of any JSON object, in any spelling json writes, often with one byte changed."""
    text = json.dumps(
        draw(python_objects),
        ensure_ascii=draw(st.booleans()),
        separators=draw(st.sampled_from([(",", ":"), (", ", ": "), (" ,\t", " :\r")])),
    )
    text += draw(st.sampled_from(["", " ", "\r", "\t\n ", "\x0c", "\ufeff", "x", "}", ",{}"]))  # after the object
    line = draw(op_names).encode() + text.encode("utf-8", "surrogatepass")
    if draw(st.booleans()):
        at = draw(st.integers(min_value=0, max_value=len(line)))
        stray = draw(st.sampled_from([b"", b"{", b"}", b"[", b"]", b",", b":", b'"', b"\\", b"-", b"0", b"e", b"\xff"]))
        stray += draw(st.sampled_from([b"", b" ", b"9" * 25]))
        line = line[:at] + stray + line[at + draw(st.integers(min_value=0, max_value=2)) :]
    return line


@needs_orjson
@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(json_lines())
def test_orjson_decoding_is_json_decoding(line):
    assert_decodes_as_json(line)


@needs_orjson
@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(python_objects)
def test_orjson_encoding_is_json_encoding(data):
    assert_encodes_as_json(data)


@needs_orjson
@settings(max_examples=1000)
@given(edge_floats)
@example(1e-5)
@example(1.5e-7)
def test_orjson_floats_are_json_floats(value):
    assert_encodes_as_json({"f": value, "l": [value]})
    if math.isfinite(value):
        assert_decodes_as_json(b'op{"f":%s}' % repr(value).encode())


@needs_orjson
@settings(max_examples=200)
@given(st.from_regex(r"-?(0|[1-9][0-9]{0,24})(\.[0-9]{1,30})?([eE][-+]?[0-9]{1,3})?", fullmatch=True))
def test_orjson_reads_numbers_as_json_does(number):
    """Integers past 64 bits, floats with more digits than a double holds, past its range."""
    assert_decodes_as_json(b'op{"n":%s,"l":[%s]}' % (number.encode(), number.encode()))


def _nested(depth: int, opening: bytes, closing: bytes) -> bytes:
    return b'op{"a":' + opening * depth + b"1" + closing * depth + b"}"


@needs_orjson
@pytest.mark.parametrize(
    "line",
    [
        b'op{"n":18446744073709551615}',  # the widest integer orjson reads as one
        b'op{"n":18446744073709551616}',  # one more, which orjson reads as a float
        b'op{"n":-9223372036854775809}',
        b'op{"n":-9223372036854775808}',
        b'op{"n":100000000000000000000000,"m":1}',
        b'op{"n":' + b"9" * 4000 + b"}",
        b'op{"n":' + b"9" * 5000 + b"}",  # past Python's int digits limit: malformed
        b'op{"pad":"' + b"x" * 2000 + b'","n":18446744073709551616}',  # a long line, few values
        b'op{"v":' + json.dumps(list(range(3000)) + [2**64]).encode() + b"}",  # a long line, many values
        b'op{"v":' + json.dumps(list(range(3000)) + [2.0**64]).encode() + b"}",  # a true wide float
        b'op{"t":1715000000123456789,"s":"12345678901234567890"}',  # 19 digits that fit, 20 in a string
        b'op{"a":"\\ud800","b":"\\udc00\\ud800"}',  # lone surrogates, which orjson refuses
        b'op{"a":"\\ud83d\\ude00"}',
        b'op{"a":1,"b":2,"a":3}',  # the last of duplicate keys wins, in the first one's place
        b'op{"a":-0,"b":-0.0,"c":0e0,"d":-1e-400}',
        b'op{"a":1e400,"b":-1e400,"c":1.7976931348623159e308}',  # past the double range: malformed
        b'op{"c":1.7976931348623159e308}',
        b'op{"a":1e-400,"b":2.2250738585072011e-308,"c":4.9e-324}',
        b'op{"a":0.' + b"3" * 5000 + b"}",
        b'op{"a":1.00000000000000011102230246251565404236316680908203125}',  # halfway between doubles
        b'op{"a":9007199254740993}',
        b'op{"a":NaN}',
        b'op{"a":-Infinity}',
        b'op{"a":1}\x0c',
        b'op{"a":1} \t\r\n',
        b'op\xef\xbb\xbf{"a":1}',  # a BOM belongs to the OPNAME
        b'op{\xef\xbb\xbf"a":1}',
        b'\xc3\xa9{"a":"\xc3\xa9","n":18446744073709551616}',  # a non-ASCII OPNAME shifts offsets
        b'\xc3\xa9{"a":tru}',
        b'op{"a":"\x7f","b":"\x00"}',
        b'op{"a":"\\u0000"}',
        b'op{"a":[1,2,]}',
        b'op{"a":01}',
        b'op{"a":"\xed\xa0\x80"}',  # an encoded surrogate: not UTF-8
        b'op{"a":"\xf4\x90\x80\x80"}',  # past U+10FFFF
        _nested(250, b"[", b"]"),  # a short line, 251 levels
        _nested(255, b"[", b"]"),
        _nested(256, b"[", b"]"),
        _nested(300, b"[", b"]"),
        _nested(300, b'{"a":', b"}"),
        _nested(600, b"[", b"]"),
        _nested(1010, b"[", b"]"),  # within orjson's 1023 levels, past json's recursion limit
        _nested(1010, b'{"a":', b"}"),
        _nested(1030, b"[", b"]"),  # past both
        _nested(5000, b'{"a":', b"}"),
        b'op{"v":[' + b"0," * 3000 + _nested(1010, b"[", b"]")[7:-1] + b"]}",  # deep, after many values
    ],
    ids=lambda line: repr(line[:40]),
)
def test_orjson_edge_cases_decode_as_json(line):
    assert_decodes_as_json(line)


class Colour(enum.IntEnum):
    RED = 1


class Letter(enum.StrEnum):
    A = "a"


Point = collections.namedtuple("Point", "x y")


class Ratio(float):
    pass


def _circular() -> dict:
    data: dict = {"a": []}
    data["a"].append(data)
    return data


def _deep(depth: int) -> list:
    data: list = []
    for _ in range(depth):
        data = [data]
    return data


@needs_orjson
@pytest.mark.parametrize(
    "data",
    [
        {"n": 2**64, "m": -(2**63) - 1},
        {1: "a", 2.5: "b", False: "c", None: "d"},  # keys json turns into strings
        {"a": float("nan")},
        {"a": [1.0, float("inf")]},
        {"a": (1, 2.5, "x"), "b": Point(1, 2)},
        {"a": collections.OrderedDict(b=1), "c": collections.defaultdict(list, d=[1])},
        {"a": Colour.RED, Letter.A: Letter.A, "r": Ratio(0.5)},
        {"a": "\ud800", "b": "\x7f", "c": "é€😀", "d": "\x00\x1f\"\\/"},
        {"b": "\x7f"},  # DEL: json escapes it
        {"c": "é€😀"},
        {"a": datetime.date(2024, 1, 1)},
        {"a": dataclasses.make_dataclass("Pair", ["x"])(1)},
        {"a": object()},
        {"a": b"bytes", "b": {1, 2}},
        {(1, 2): "tuple key"},
        {"a": _deep(300)},  # past orjson's 254 levels
        {"a": _deep(5000)},  # past the recursion limit: RecursionError, as before
        _circular(),
        {"null": None, "text": "null e- 0.0000"},  # the byte filters hit, and nothing is wrong
        {"f": [1e-4, 1e-5, 1e16, 1e-16, 123456.789, -0.0]},
        {"blob": "x" * 70_000, "tiny": 1e-7},  # a long answer: the walk, not the byte filters
        {"many": list(range(5000)) + [1e-7]},
        {"many": list(range(5000)) + [float("nan")]},
    ],
    ids=lambda data: reprlib.repr(data)[:40],  # reprlib stops at 6 levels: the deep and circular ones
)
def test_orjson_edge_cases_encode_as_json(data):
    assert_encodes_as_json(data)


@needs_orjson
@pytest.mark.parametrize("make", [_circular, lambda: {"a": _circular()}, lambda: [_circular()]])
def test_circular_references_are_value_errors(make):
    for frame in (protocol._frame_stdlib, protocol._frame_orjson):
        with pytest.raises(ValueError, match="Circular reference detected"):
            frame(b"OKAY", make())


@needs_orjson
def test_what_orjson_encodes_and_json_refuses():
    """The listed differences (protocol's docstring): if orjson stops taking these, say so there."""

    class Shape(enum.Enum):
        SQUARE = "square"

    value = uuid.UUID(int=5)
    for data, spelled in [
        ({"s": Shape.SQUARE}, b'{"s":"square"}\n'),
        ({"u": value}, b'{"u":"%s"}\n' % str(value).encode()),
        ({"f": orjson.Fragment(b"[1]")}, b'{"f":[1]}\n'),
    ]:
        assert protocol._frame_orjson(b"", data) == spelled
        with pytest.raises(TypeError):
            protocol._frame_stdlib(b"", data)


def test_orjson_is_the_codec_when_installed():
    if os.environ.get(protocol.JSON_CODEC_ENV) == "stdlib" or orjson is None:
        assert protocol.JSON_CODEC == "stdlib"
    else:
        # Else this orjson spells floats or strings in a way the checks do not cover.
        assert protocol._orjson_writes_like_json(), orjson.__version__
        assert protocol.JSON_CODEC == "orjson"


@pytest.mark.parametrize("setting", ["stdlib", "orjson", ""])
def test_the_environment_picks_the_codec(setting):
    env = {**os.environ, protocol.JSON_CODEC_ENV: setting}
    probe = (
        "from simplerpc_mp import protocol as p; "
        "print(p.JSON_CODEC, p.decode_frame.__name__, p._orjson is not None and p._orjson_writes_like_json())"
    )
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout
    codec, decoder, usable = out.split()
    assert decoder == f"_decode_frame_{codec}"
    if setting == "stdlib" or orjson is None:
        assert (codec, usable) == ("stdlib", "False")  # and orjson not even imported
    else:
        assert codec == ("orjson" if usable == "True" else "stdlib")
