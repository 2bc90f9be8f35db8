"""Requests in flight and wall time of ``blockfilter filter``: the request pool kept full?

Run by hand (each 10**6 run takes half a minute or more; ``--sizes 30000,100000`` for a
quick look)::

    .venv/bin/python benchmarks/bench_flight.py [--vs OTHER_CHECKOUT] [--repeat 3]
        [--sizes 30000,100000,1000000] [--concurrency 64] [--big-concurrency 64]

Only the figures of the cold lookup of :mod:`bench_scale` (its campaigns: every message to a
number of its own, 5% of them blocklisted on sms), through the real command line with no
configuration but the simulator's (a ``memory://`` cache), the simulator in this process at
100 ms latency:

* mean requests in flight / configured concurrency (goal >= 0.9), as the simulator counts them
  from the first request's arrival to the last answer;
* wall time / latency bound (goal <= 1.5 at 10**6), the bound being ceil(requests /
  concurrency) * 100 ms, what a pool always full would take;
* the command's CPU time / wall time (its own user + system, ``wait4``);
* requests / lower bound, which must stay 1.00 (ceil(numbers / 100)): a full pool bought with
  half-empty requests would not count.

``--concurrency`` is used below 10**6 numbers, ``--big-concurrency`` from 10**6 (64 both, as
the goals are set; at 16 the pool is easier to keep full). The sizes
alternate (and, with ``--vs``, the checkouts: A B A B, each running its own ``.venv``), so a
busy moment of a shared machine favours none; each figure is min / median / max of
``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench_core import spread
from bench_scale import LATENCY, make_campaign
from repo_root import ROOT

from blockfilter.testing.simulator import Simulator

SID, KEY = "BENCH", "bench-key-000"


@dataclass
class Figures:
    in_flight: float  # mean in flight / concurrency
    wall_ratio: float  # wall / latency bound
    wall_s: float
    cpu_share: float  # the command's CPU / its wall time
    requests_ratio: float  # requests / lower bound


def python_of(tree: Path) -> str:
    python = tree / ".venv" / "bin" / "python"
    return str(python) if python.exists() else sys.executable


def run_filter(tree: Path, campaign: Path, out: Path, env: dict[str, str]) -> tuple[float, float]:
    """Wall and CPU seconds of one ``blockfilter filter`` of ``tree``."""
    command = [python_of(tree), "-m", "blockfilter", "filter", str(campaign), "--quiet"]
    started = time.monotonic()
    process = subprocess.Popen([*command, "--out", str(out)], env=env, cwd=tree)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.monotonic() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{tree}: blockfilter filter failed")
    return wall, usage.ru_utime + usage.ru_stime


def measure(
    sim: Simulator, tree: Path, campaign: Path, size: int, concurrency: int, workdir: Path
) -> Figures:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KALEYRA_", "BLOCKFILTER_"))}
    env.update(
        KALEYRA_SID=SID,
        KALEYRA_API_KEY=KEY,
        KALEYRA_BASE_URL=sim.base_url,
        BLOCKFILTER_CONCURRENCY=str(concurrency),
        PYTHONPATH=str(tree),
    )
    sim.reset_stats()
    out = workdir / "out.jsonl"
    wall, cpu = run_filter(tree, campaign, out, env)
    stats = sim.snapshot(records=False)
    with out.open("rb") as lines:
        written = sum(1 for _ in lines)
    assert written == size, f"{tree}: {written} records for {size} messages"
    lower_bound = math.ceil(size / 100)
    bound = math.ceil(stats.requests / concurrency) * LATENCY
    return Figures(
        stats.mean_in_flight / concurrency,
        wall / bound,
        wall,
        cpu / wall,
        stats.requests / lower_bound,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vs", type=Path, help="another checkout, to compare with (B)")
    parser.add_argument("--sizes", default="30000,100000,1000000", help="distinct numbers")
    parser.add_argument("--concurrency", type=int, default=64, help="below 10**6 numbers")
    parser.add_argument("--big-concurrency", type=int, default=64, help="from 10**6 numbers")
    parser.add_argument("--repeat", type=int, default=3, help="alternated runs of each")
    args = parser.parse_args()

    sizes = [int(size) for size in args.sizes.split(",")]
    trees = [("A", ROOT)]
    if args.vs is not None:
        trees.append(("B", args.vs.resolve()))
    results: dict[tuple[int, str], list[Figures]] = {}
    with (
        tempfile.TemporaryDirectory() as tmp,
        Simulator(sid=SID, api_key=KEY, latency=LATENCY) as sim,
    ):
        workdir = Path(tmp)
        campaigns = {}
        for size in sizes:
            campaign, blocked, _ = make_campaign(size, workdir)
            sim.block("sms", *blocked)
            campaigns[size] = campaign
        for round_ in range(args.repeat):
            for size in sizes:
                concurrency = args.big_concurrency if size >= 1_000_000 else args.concurrency
                for label, tree in trees:
                    figures = measure(sim, tree, campaigns[size], size, concurrency, workdir)
                    results.setdefault((size, label), []).append(figures)
                    print(
                        f"round {round_ + 1} {label} {size:>9,} @{concurrency}: in flight "
                        f"{figures.in_flight:.2f}, wall {figures.wall_s:.2f} s = "
                        f"{figures.wall_ratio:.2f}x bound, CPU {figures.cpu_share:.2f}, "
                        f"requests {figures.requests_ratio:.2f}x bound",
                        flush=True,
                    )

    print()
    for label, tree in trees:
        print(f"{label}: {tree}")
    print(
        f"{'numbers':>9} {'':2} {'in flight / concurrency':>24} {'wall / bound':>20} "
        f"{'wall s':>22} {'CPU / wall':>20} requests / bound"
    )
    print(f"{'':>9} {'':2} {'(min / median / max of ' + str(args.repeat) + ')':>24}")
    for size in sizes:
        for label, _ in trees:
            runs = results[(size, label)]
            print(
                f"{size:>9,} {label:2} {spread([r.in_flight for r in runs]):>24} "
                f"{spread([r.wall_ratio for r in runs]):>20} "
                f"{spread([r.wall_s for r in runs]):>22} "
                f"{spread([r.cpu_share for r in runs]):>20} "
                f"{spread([r.requests_ratio for r in runs])}"
            )


if __name__ == "__main__":
    main()
