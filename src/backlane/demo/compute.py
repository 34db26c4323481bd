"""The CPU-bound work of ``/compute``: counting primes, one slice of numbers at a time.

``python -m backlane.demo.compute LIMIT CHUNK`` counts the primes below ``LIMIT`` in a
process of its own, so that it holds neither the web server's event loop nor its GIL, and
prints ``STOP FOUND`` after each slice: the primes below ``STOP`` number ``FOUND``. This
module stays small: the process imports little else.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys


def small_primes(limit: int) -> list[int]:
    """The primes below ``limit``."""
    if limit < 3:
        return []
    sieve = bytearray([1]) * limit
    sieve[0:2] = b"\x00\x00"
    for n in range(2, math.isqrt(limit - 1) + 1):
        if sieve[n]:
            sieve[n * n :: n] = bytes(len(range(n * n, limit, n)))
    return [n for n in range(limit) if sieve[n]]


def count_primes(start: int, stop: int) -> int:
    """How many primes ``p`` satisfy ``start <= p < stop`` (a segmented sieve)."""
    start = max(start, 2)
    if stop <= start:
        return 0
    segment = bytearray([1]) * (stop - start)
    for p in small_primes(math.isqrt(stop - 1) + 1):
        first = max(p * p, (start + p - 1) // p * p)
        if first < stop:
            segment[first - start :: p] = bytes(len(range(first, stop, p)))
    return segment.count(1)


def main(argv: list[str]) -> int:
    """Count the primes below ``argv[0]`` in slices of ``argv[1]``, printing the running
    count after each slice. Returns the exit code."""
    if len(argv) != 2 or not all(arg.isdigit() for arg in argv) or int(argv[1]) < 1:
        print("usage: python -m backlane.demo.compute LIMIT CHUNK", file=sys.stderr)
        return 2
    limit, chunk = int(argv[0]), int(argv[1])
    with contextlib.suppress(OSError, AttributeError):
        os.nice(5)  # the web server, on the same machine, comes first
    found = 0
    for start in range(0, limit, chunk):
        stop = min(start + chunk, limit)
        found += count_primes(start, stop)
        print(stop, found, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
