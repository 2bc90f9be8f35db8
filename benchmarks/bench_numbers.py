"""Number normalisation: the E.164 fast path against phonenumbers.parse (prints a table).

.venv/bin/python benchmarks/bench_numbers.py
"""

from __future__ import annotations

import time
from collections.abc import Callable

import phonenumbers

from blockfilter.numbers import _normalize_slow, normalize


def best_of_three(function: Callable[[str], object], numbers: list[str]) -> float:
    times = []
    for _ in range(3):
        started = time.perf_counter()
        for raw in numbers:
            function(raw)
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    numbers = [f"+9198{n:08d}" for n in range(3000)] + [f"+1201555{n:04d}" for n in range(3000)]
    numbers += [f"+4474001{n:05d}" for n in range(3000)]
    normalize(numbers[0])
    rows = [
        ("phonenumbers.parse", best_of_three(lambda raw: phonenumbers.parse(raw, None), numbers)),
        ("slow path (parse, valid, format)", best_of_three(_normalize_slow, numbers)),
        ("normalize (fast path)", best_of_three(normalize, numbers)),
    ]
    for name, seconds in rows:
        print(f"{name:<34} {seconds / len(numbers) * 1e6:6.2f} us/number")
    print(f"{'fast path speed-up over parse':<34} {rows[0][1] / rows[2][1]:6.1f}x")


if __name__ == "__main__":
    main()
