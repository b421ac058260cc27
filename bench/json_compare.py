"""The JSON work of a worker, per RPC: standard-library ``json`` against ``orjson`` (and ``msgspec``
when installed), on typical payloads.

    python bench/json_compare.py [--quick]

The raw libraries, not ``simplerpc_mp.protocol`` (which uses orjson where its result is json's
and json elsewhere: see its docstring). For each payload: ``decode`` (a request line's JSON bytes
to a dict: ``json.loads(bytes.decode())``, ``orjson.loads(bytes)``), ``encode`` (a dict to the bytes of
an answer: the compact ``JSONEncoder`` + ``.encode()``, ``orjson.dumps``) and ``both`` (what an
echo RPC costs a worker in JSON). Microseconds per operation (best of 5 timings) and the
speed-up over the standard library. It also says whether each library's bytes equal the
standard library's (they must, for answers to stay byte-identical on the wire).
"""

from __future__ import annotations

import argparse
import json
import timeit

_stdlib_dumps = json.JSONEncoder(separators=(",", ":")).encode

PAYLOADS = {
    "echo (60 B)": {"seq": 123456, "msg": "hello, simplerpc", "n": 12345, "ok": True},
    "record (1 KB)": {
        "user": {"id": 42, "name": "Ada Lovelace", "email": "ada@example.org", "tags": ["admin", "math", "poet"]},
        "items": [{"sku": f"SKU-{i:05d}", "qty": i % 7, "price": round(1.25 * i, 2)} for i in range(14)],
        "note": "café ünïcode ok",
    },
    "numbers (8 KB)": {"values": [i * 1.5 for i in range(500)] + list(range(500))},
    "blob (64 KiB)": {"blob": "x" * (64 * 1024 - 16)},
}


def libraries() -> dict:
    libs = {
        "json": (lambda b: json.loads(b.decode("utf-8")), lambda d: _stdlib_dumps(d).encode("utf-8")),
    }
    try:
        import orjson

        libs["orjson"] = (orjson.loads, orjson.dumps)
    except ImportError:
        pass
    try:
        import msgspec

        encoder, decoder = msgspec.json.Encoder(), msgspec.json.Decoder()
        libs["msgspec"] = (decoder.decode, encoder.encode)
    except ImportError:
        pass
    return libs


def best_us(fn, seconds: float) -> float:
    """Best of 5 timings of about ``seconds / 5`` each, in microseconds per call."""
    timer = timeit.Timer(fn)
    each = max(timer.timeit(10) / 10, 1e-8)
    number = max(1, int(seconds / 5 / each))
    return min(timer.repeat(5, number)) / number * 1e6


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    budget = 0.1 if args.quick else 0.5  # seconds per measurement
    libs = libraries()
    rows = []
    for label, data in PAYLOADS.items():
        raw = _stdlib_dumps(data).encode("utf-8")
        base = {}
        for name, (loads, dumps) in libs.items():
            same = dumps(data) == raw
            times = {
                "decode": best_us(lambda: loads(raw), budget),
                "encode": best_us(lambda: dumps(data), budget),
                "both": best_us(lambda: dumps(loads(raw)), budget),
            }
            if name == "json":
                base = times
            rows.append((label, name, *(f"{times[k]:.2f} ({base[k] / times[k]:.1f}x)" for k in ("decode", "encode", "both")),
                         "yes" if same else "no (non-ASCII kept as UTF-8)" if not raw.isascii() or not dumps(data).isascii() else "no"))
    header = ("payload", "library", "decode us", "encode us", "decode+encode us", "same bytes as json")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))


if __name__ == "__main__":
    main()
