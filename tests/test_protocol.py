"""The protocol module alone (``simplerpc_mp/protocol.py``): framing and codec, no sockets.

Example tests feed each stream whole, one byte at a time, several frames per chunk and with a
trailing partial frame; ``hypothesis`` checks the same properties on generated streams and
splits; a corpus of bad frames sits beside the reason each must give.
"""

from __future__ import annotations

import json
import math
import time

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from simplerpc_mp.errors import MalformedPayload
from simplerpc_mp.protocol import (
    DEFAULT_MAX_FRAME_BYTES,
    FrameDecoder,
    decode_frame,
    encode_fail,
    encode_frame,
    split_lines,
)

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
    encoded = [encode_frame(op, data) for op, data in items]
    stream = b"".join(encoded)
    lines = feed_all(FrameDecoder(), split_at(stream, cuts))
    assert lines == [frame[:-1] for frame in encoded]
    assert [decode_frame(line) for line in lines] == items


@JSON_EXAMPLES
@given(frames, st.binary(max_size=50).map(lambda b: b.replace(b"\n", b"")))
def test_byte_by_byte_with_trailing_partial(items, tail):
    encoded = [encode_frame(op, data) for op, data in items]
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


# -- codec: decode(encode(x)) == x ---------------------------------------------------------------


@JSON_EXAMPLES
@given(op_names, json_objects)
def test_decode_encode_roundtrip(op, data):
    frame = encode_frame(op, data)
    assert frame.endswith(b"\n") and frame.count(b"\n") == 1
    assert decode_frame(frame[:-1]) == (op, data)


@JSON_EXAMPLES
@given(op_names, json_objects)
def test_roundtrip_survives_a_crlf_line_end(op, data):
    """The original strips white space around the JSON, so a CR before the LF is accepted."""
    assert decode_frame(encode_frame(op, data)[:-1] + b"\r") == (op, data)


@given(st.text(max_size=30), st.text(max_size=60))
def test_encode_fail_roundtrip(reason, message):
    assert decode_frame(encode_fail(reason, message)[:-1]) == ("FAIL", {"reason": reason, "message": message})


@pytest.mark.parametrize("op", ["", "a{b", "a\nb", "{"])
def test_encode_frame_refuses_bad_op_names(op):
    with pytest.raises(ValueError):
        encode_frame(op, {})


@pytest.mark.parametrize("data", [{"x": object()}, {"x": {1, 2}}, {"x": b"bytes"}])
def test_encode_frame_refuses_what_json_cannot_encode(data):
    with pytest.raises((TypeError, ValueError)):
        encode_frame("op", data)


# -- codec: arbitrary bytes raise only MalformedPayload ---------------------------------------------


def _decode_or_malformed(line: bytes) -> None:
    try:
        op, data = decode_frame(line)
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
def test_decode_frame_arbitrary_bytes_raise_only_malformed_payload(line):
    _decode_or_malformed(line)


@given(op_names, st.text(max_size=200))
def test_decode_frame_json_like_text_raises_only_malformed_payload(op, text):
    _decode_or_malformed(op.encode() + b"{" + text.encode("utf-8", "surrogatepass"))


json_tokens = st.sampled_from(['{', '}', '[', ']', ',', ':', '"a"', '"\\ud800"', '1', '-0', '1e999', '-1e-999',
                               'true', 'null', 'NaN', 'Infinity', '"\\u00', '"', '\\', ' ', '9' * 50])


@given(op_names, st.lists(json_tokens, max_size=60))
def test_decode_frame_token_soup_raises_only_malformed_payload(op, tokens):
    _decode_or_malformed(op.encode() + b"{" + "".join(tokens).encode())


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
def test_deep_nesting_is_malformed_payload(payload):
    line = b"echo" + payload if payload.startswith(b"{") else b"echo{\"a\":" + payload + b"}"
    with pytest.raises(MalformedPayload):
        decode_frame(line)


def test_deep_nesting_does_not_break_later_decoding():
    with pytest.raises(MalformedPayload):
        decode_frame(b'echo{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    assert decode_frame(b'echo{"a":[[1]]}') == ("echo", {"a": [[1]]})


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
def test_invalid_utf8_is_malformed_payload(line):
    with pytest.raises(MalformedPayload, match="UTF-8"):
        decode_frame(line)


def test_huge_numbers():
    """Floats past the double range become inf (as in Python's json); an integer of more than
    4300 digits is refused by Python's int limit, as a MalformedPayload, not a ValueError."""
    assert decode_frame(b'echo{"n": 1e999999}') == ("echo", {"n": math.inf})
    assert decode_frame(b'echo{"n": -1e999999}') == ("echo", {"n": -math.inf})
    assert decode_frame(b'echo{"n": 1e-999999}') == ("echo", {"n": 0.0})
    with pytest.raises(MalformedPayload):
        decode_frame(b'echo{"n": ' + b"9" * 5000 + b"}")
    assert decode_frame(b'echo{"n": ' + b"9" * 4000 + b"}")[1]["n"] == 10**4000 - 1


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
def test_bad_frame_corpus(line, message):
    with pytest.raises(MalformedPayload) as info:
        decode_frame(line)
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
def test_good_frames_at_the_edges(line, want):
    assert decode_frame(line) == want


def test_answers_and_pushes_share_one_codec():
    assert json.loads(encode_frame("OKAY", {"a": [1]})[4:]) == {"a": [1]}
    assert decode_frame(encode_fail("FrameTooLarge", "too long")[:-1]) == (
        "FAIL",
        {"reason": "FrameTooLarge", "message": "too long"},
    )


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_encode_refuses_values_that_are_not_json(value):
    with pytest.raises(ValueError):
        encode_frame("op", {"n": value})


@pytest.mark.parametrize("text", [b'op{"n": NaN}', b'op{"n": Infinity}', b'op{"n": -Infinity}'])
def test_decode_refuses_nan_and_infinity_literals(text):
    with pytest.raises(MalformedPayload):
        decode_frame(text)
