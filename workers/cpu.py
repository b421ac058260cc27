"""CPU-heavy handlers in pure Python, registered concurrent so one client can use every worker.

``primes{"n": 10000}`` counts the primes below n (about 5 ms of pure Python for n=10000 on a
2020s core); ``sha{"data": "...", "rounds": 1000}`` hashes repeatedly (mostly C, for contrast).
"""

import hashlib

from simplerpc_mp import ArgumentValueError, Handlers

handlers = Handlers()

MAX_N = 10_000_000


def count_primes(n: int) -> int:
    """Primes below n by trial division over odd numbers: deliberately pure-Python work."""
    if n < 3:
        return 0
    count = 1  # 2
    for candidate in range(3, n, 2):
        limit = int(candidate**0.5)
        for divisor in range(3, limit + 1, 2):
            if candidate % divisor == 0:
                break
        else:
            count += 1
    return count


@handlers.on("primes", concurrent=True)
def primes(conn, data):
    n = data.get("n", 10000)
    if not isinstance(n, int) or not 0 <= n <= MAX_N:
        raise ArgumentValueError(f"n must be an integer from 0 to {MAX_N}")
    return {"n": n, "count": count_primes(n)}


@handlers.on("sha", concurrent=True)
def sha(conn, data):
    payload = str(data.get("data", "")).encode()
    rounds = data.get("rounds", 1000)
    if not isinstance(rounds, int) or not 0 < rounds <= 1_000_000:
        raise ArgumentValueError("rounds must be an integer from 1 to 1000000")
    digest = payload
    for _ in range(rounds):
        digest = hashlib.sha256(digest).digest()
    return {"hex": digest.hex()}
