"""CPU of `blockfilter --version`: the whole process, start-up and imports included.

Run by hand::

    .venv/bin/python benchmarks/bench_startup.py [--runs 10] [--vs OTHER_CHECKOUT]

Each run is the installed console script (``.venv/bin/blockfilter``) in a process of its own;
its user + system CPU time is the operating system's account of the finished child
(``wait4``). With ``--vs``, the other checkout's script runs in turn (A B A B), and the ratio
is taken pair by pair. Prints min / median / max.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def cpu_of(script: Path) -> float:
    process = subprocess.Popen(
        [str(script), "--version"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{script} --version failed")
    return usage.ru_utime + usage.ru_stime


def spread(values: list[float]) -> str:
    return f"{min(values):.3f} / {statistics.median(values):.3f} / {max(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--vs", type=Path, help="another checkout with its own .venv (B)")
    args = parser.parse_args()
    scripts = {"A (this checkout)": HERE / ".venv" / "bin" / "blockfilter"}
    if args.vs is not None:
        scripts[f"B ({args.vs})"] = args.vs / ".venv" / "bin" / "blockfilter"
    for script in scripts.values():
        cpu_of(script)  # warm the file cache; not counted
    runs: dict[str, list[float]] = {label: [] for label in scripts}
    for _ in range(args.runs):
        for label, script in scripts.items():
            runs[label].append(cpu_of(script))
    print(f"blockfilter --version, CPU s (user + system), {args.runs} alternated runs")
    print(f"{'':24}  min / median / max")
    for label, values in runs.items():
        print(f"{label:24}  {spread(values)}")
    if args.vs is not None:
        a, b = runs.values()
        print(f"{'A / B, pair by pair':24}  {spread([x / y for x, y in zip(a, b, strict=True)])}")


if __name__ == "__main__":
    main()
