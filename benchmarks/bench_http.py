"""CPU per API request of the Kaleyra client: this checkout against another, alternated.

Run by hand::

    .venv/bin/python benchmarks/bench_http.py [--vs OTHER_CHECKOUT] [--requests 2000] [--repeat 3]

The simulator runs in this process; each measurement is a child process that makes
``--requests`` lookups of 100 distinct numbers, one after the other, and reports the CPU time
of its own process (user + system) divided by the requests: what one request costs the
client, the simulator's share excluded. With ``--vs``, the child runs the other checkout's
package (its ``.venv`` Python when it has one) and the two alternate A B A B, so a busy
moment of a shared machine does not favour either; each ratio is taken pair by pair. Prints
min / median / max of each.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from blockfilter.testing.simulator import Simulator

SID, KEY = "BENCH", "bench-key-000"
HERE = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time
import blockfilter
try:
    from blockfilter.kaleyra.client import KaleyraClient
except ImportError:  # a checkout from before the package was split
    from blockfilter.client import KaleyraClient
from blockfilter.config import load_settings

base_url, count = sys.argv[1], int(sys.argv[2])
settings = load_settings(environ={}, sid="BENCH", api_key="bench-key-000", base_url=base_url)
client = KaleyraClient(settings)

def batch(i):
    return [f"+9180{i * 100 + j:08d}" for j in range(100)]

for i in range(50):  # warm: connections open, code paths compiled
    client.blocked_batch("sms", batch(i))
batches = [batch(50 + i) for i in range(count)]
cpu, wall = time.process_time(), time.perf_counter()
for numbers in batches:
    client.blocked_batch("sms", numbers)
cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
print(json.dumps({"package": blockfilter.__file__, "cpu_ms": cpu / count * 1000,
                  "wall_ms": wall / count * 1000}))
"""


def measure(tree: Path, base_url: str, count: int) -> dict[str, float]:
    python = tree / ".venv" / "bin" / "python"
    env = dict(os.environ, PYTHONPATH=str(tree))
    done = subprocess.run(
        [str(python) if python.exists() else sys.executable, "-c", CHILD, base_url, str(count)],
        env=env,
        cwd=tree,
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(done.stdout)
    # The figure is only the tree's if the child imported the tree's package.
    assert Path(result["package"]).resolve().is_relative_to(tree.resolve()), result
    return result


def spread(values: list[float]) -> str:
    return f"{min(values):.3f} / {statistics.median(values):.3f} / {max(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vs", type=Path, help="another checkout, to compare with (B)")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    trees = [("A (this checkout)", HERE)]
    if args.vs is not None:
        trees.append((f"B ({args.vs})", args.vs))
    runs: dict[str, list[dict[str, float]]] = {label: [] for label, _ in trees}
    with Simulator({"sms": ["+918000000007"]}, sid=SID, api_key=KEY) as sim:
        for _ in range(args.repeat):
            for label, tree in trees:
                runs[label].append(measure(tree, sim.base_url, args.requests))

    print(f"{args.requests} requests of 100 numbers, {args.repeat} alternated runs each")
    print(f"{'':24}  {'CPU ms / request (min / median / max)':40}  wall ms / request")
    for label, results in runs.items():
        cpu = [r["cpu_ms"] for r in results]
        wall = [r["wall_ms"] for r in results]
        print(f"{label:24}  {spread(cpu):40}  {spread(wall)}")
    if args.vs is not None:
        a, b = (runs[label] for label, _ in trees)
        ratios = [x["cpu_ms"] / y["cpu_ms"] for x, y in zip(a, b, strict=True)]
        print(f"{'A / B, pair by pair':24}  {spread(ratios)}")


if __name__ == "__main__":
    main()
