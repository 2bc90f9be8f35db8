"""Memory benchmark: peak RSS of ``blockfilter filter`` per distinct number.

Run from the repository root (about a minute a run at 10**6 on two cores)::

    .venv/bin/python benchmarks/bench_memory.py [--distinct 1000000] [--repeat 3]
        [--python OTHER_CHECKOUT/.venv/bin/python]

A campaign of ``--distinct`` messages, each to a number of its own (5% of them on the sms
blocklist), goes through the real ``blockfilter filter`` (a subprocess, as a user runs it) with
no cache configured (``memory://``, the default) and ``BLOCKFILTER_CONCURRENCY=64``, against the
Kaleyra simulator answering in 100 ms. So does a tiny campaign (``--tiny`` messages), whose peak
is the baseline: what the interpreter, the imports and the fixed buffers cost. The figure is

    (peak RSS of the big run - peak RSS of the tiny run) / distinct numbers

for each of ``--repeat`` rounds (tiny and big alternate), printed as min / median / max.
Peak RSS is the command's own (``wait4``: its largest process's, the reader process of the
first pass included). The same figure is printed for all its processes together: the peak of
their proportional set sizes added up, sampled every 20 ms. ``--python`` runs another
checkout's command (its virtualenv's interpreter), to compare with it on the same campaign.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_core import spread
from bench_scale import make_campaign

from blockfilter.testing.simulator import Simulator

SID, KEY = "BENCH", "bench-key-000"
GOAL_BYTES = 120


# Starts the command and prints its peak RSS in kB, and the peak of the proportional set
# sizes of the command and its children added up (the reader process of the first pass is a
# child; PSS counts the pages they share once), sampled every 20 ms. Linux carries the peak of
# the process that forked a child over into the child's own (the memory it had before its
# exec): measured straight from this benchmark, which holds the campaign and the simulator's
# blocklist, a small run would read as big as the benchmark. This launcher is small when it
# forks the command.
_LAUNCHER = r"""
import os, subprocess, sys, time

def pss_kb(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0

def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as listed:
            return [int(child) for child in listed.read().split()]
    except OSError:
        return []

child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
together = 0
while True:
    pid, status, usage = os.wait4(child.pid, os.WNOHANG)  # (0, 0, ...) while it runs
    if pid:
        break
    together = max(together, pss_kb(child.pid) + sum(map(pss_kb, children(child.pid))))
    time.sleep(0.02)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss, together)
"""


def filter_rss(python: str, campaign: Path, out: Path, env: dict[str, str]) -> tuple[float, float]:
    """Peak RSS (bytes) of one ``blockfilter filter`` run over ``campaign`` (its largest
    process's), and the peak of its processes' PSS together."""
    command = [python, "-m", "blockfilter", "filter", str(campaign), "--quiet", "--out", str(out)]
    launched = subprocess.run(
        [sys.executable, "-c", _LAUNCHER, *command],
        # Not this checkout's folder: `-m` would import the blockfilter found there first,
        # whichever interpreter runs it.
        cwd=campaign.parent,
        env=env,
        capture_output=True,
        check=True,
        text=True,
    )
    returncode, max_rss_kb, together_kb = map(int, launched.stdout.split())
    if returncode != 0:
        raise SystemExit(f"blockfilter filter failed:\n{launched.stderr[-2000:]}")
    return max_rss_kb * 1024.0, together_kb * 1024.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--distinct", type=int, default=1_000_000)
    parser.add_argument("--tiny", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--python", default=sys.executable, help="the interpreter to run")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        big, big_blocked, _ = make_campaign(args.distinct, workdir)
        tiny, tiny_blocked, _ = make_campaign(args.tiny, workdir)
        with Simulator(
            {"sms": big_blocked + tiny_blocked}, sid=SID, api_key=KEY, latency=0.1
        ) as sim:
            env = {
                key: value
                for key, value in os.environ.items()
                if not key.startswith(("BLOCKFILTER_", "KALEYRA_"))
            }
            env.update(
                KALEYRA_SID=SID,
                KALEYRA_API_KEY=KEY,
                KALEYRA_BASE_URL=sim.base_url,
                BLOCKFILTER_CONCURRENCY=str(args.concurrency),
            )
            tiny_peaks: list[tuple[float, float]] = []
            big_peaks: list[tuple[float, float]] = []
            for _ in range(args.repeat):
                tiny_peaks.append(filter_rss(args.python, tiny, workdir / "tiny.out", env))
                big_peaks.append(filter_rss(args.python, big, workdir / "big.out", env))
                print(
                    f"tiny {tiny_peaks[-1][0] / 2**20:.1f} MiB, "
                    f"big {big_peaks[-1][0] / 2**20:.1f} MiB "
                    f"({big_peaks[-1][1] / 2**20:.1f} MiB its processes together)",
                    flush=True,
                )

    mib = 2**20
    print(f"interpreter: {args.python}")
    for which, label in ((0, "peak RSS"), (1, "together")):
        tiny_mib = [peaks[which] / mib for peaks in tiny_peaks]
        big_mib = [peaks[which] / mib for peaks in big_peaks]
        pairs = zip(big_peaks, tiny_peaks, strict=True)
        per_distinct = [(b[which] - t[which]) / args.distinct for b, t in pairs]
        if which == 1:
            print("the command's processes together (PSS added up, sampled every 20 ms):")
        print(f"{label}, {args.tiny} messages:     {spread(tiny_mib, 1)} MiB")
        print(f"{label}, {args.distinct:,} distinct: {spread(big_mib, 1)} MiB")
        print(
            f"per distinct number:        {spread(per_distinct, 1)} B "
            f"(min / median / max of {args.repeat}; goal <= {GOAL_BYTES} B at 10**6)"
        )
        print(f"median: {statistics.median(per_distinct):.1f} B")


if __name__ == "__main__":
    main()
