"""The acceptor's framing decisions that need no socket: which chunks hold a concurrent op."""

import random
import selectors

from simplerpc_mp.acceptor import Acceptor
from simplerpc_mp.config import Settings
from simplerpc_mp.timers import Timers


def test_a_chunk_holds_a_concurrent_op_exactly_when_one_of_its_lines_calls_one():
    """Both ways of looking (substring search for short chunks, line starts for long ones)
    agree with splitting the chunk into lines, for op names that prefix or extend each other."""
    with selectors.DefaultSelector() as selector:
        acceptor = Acceptor(Settings(), selector, Timers())
        acceptor.set_handler_info({"concurrent": ["primes", "cs"], "connect": False, "disconnect": False})
        names = [b"echo", b"primes", b"xprimes", b"primesx", b"cs", b"c", b"prime", b"s", b"scs"]
        rng = random.Random(5)
        for _ in range(2000):
            lines = [
                rng.choice(names) + b'{"a":"' + b"x" * rng.choice([0, 10, 3000, 70000]) + b'"}'
                for _ in range(rng.randint(1, 5))
            ]
            chunk = b"\n".join(lines) + b"\n"
            expected = any(line.partition(b"{")[0] in (b"primes", b"cs") for line in lines)
            assert acceptor._has_concurrent(chunk) == expected, [line[:12] for line in lines]
