"""Core benchmark: requests against the lower bound, requests in flight, and CPU throughput.

Run by hand (it takes a few minutes)::

    .venv/bin/python benchmarks/bench_core.py [--messages 200000] [--distinct 3000] [--repeat 3]

Everything runs against the real simulator (in this process) over HTTP with 100 ms latency,
and through the real command line, ``blockfilter filter`` as a subprocess:

* requests made / lower bound (goal 1.00): the lower bound is, per channel,
  ceil(distinct numbers / 100), plus the same for the fallback round;
* mean requests in flight / configured concurrency (goal >= 0.9), as the simulator counts
  them while the command runs;
* messages per second of ``blockfilter filter`` against two bare loops over the same file:
  json in, the number validated as blockfilter validates it (``blockfilter.numbers``, once
  per distinct number), classified, json out; one loop with the stdlib's json, one with
  orjson. The three
  alternate, ``--repeat`` times; every figure is min / median / max, and the ratios are taken
  round by round.

Also writes the table to ``benchmarks/results/core.md`` (not with ``--cpu-only``, which runs
the CPU race alone).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import repo_root  # noqa: F401  (this checkout's blockfilter, whoever imports this module first)

from blockfilter.testing.simulator import Simulator

SID, KEY = "BENCH", "bench-key-000"
RESULTS = Path(__file__).resolve().parent / "results" / "core.md"

# A bare loop: json in, the number validated as blockfilter validates it (blockfilter.numbers,
# once per distinct number and region, as blockfilter remembers its routes), classified
# against the blocklist, json out. {json} is the stdlib's or orjson; the rest is the same.
_BARE_TEMPLATE = r"""
import sys
from blockfilter.numbers import InvalidNumber, normalize
{json}
blocked = set(loads(open(sys.argv[3], "rb").read()))
verdicts = {{}}
with open(sys.argv[1], "rb") as src, open(sys.argv[2], "wb") as out:
    for line in src:
        message = loads(line)
        key = (message["to"], message.get("region"))
        verdict = verdicts.get(key)
        if verdict is None:
            try:
                number = normalize(*key)
            except InvalidNumber:
                verdict = "invalid"
            else:
                verdict = "blocked" if number in blocked else "allowed"
            verdicts[key] = verdict
        message["verdict"] = verdict
        out.write(dumps(message) + b"\n")
"""
BARE_LOOP = _BARE_TEMPLATE.format(
    json="import json\nloads = json.loads\ndumps = lambda value: json.dumps(value).encode()"
)
ORJSON_LOOP = _BARE_TEMPLATE.format(json="from orjson import dumps, loads")


def spread(values: list[float], digits: int = 2) -> str:
    """min / median / max."""
    low, mid, high = min(values), statistics.median(values), max(values)
    return f"{low:,.{digits}f} / {mid:,.{digits}f} / {high:,.{digits}f}"


def make_numbers(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    found: dict[str, None] = {}
    while len(found) < count:
        found[f"+91{rng.choice('6789')}{rng.randrange(10**9):09d}"] = None
    return list(found)


def requests_and_concurrency(distinct: int, concurrency: int, workdir: Path) -> dict[str, float]:
    """One channel and a fallback round, lots of distinct numbers, through the command line:
    full requests, a full pool."""
    numbers = make_numbers(distinct, seed=1)
    rng = random.Random(2)
    blocked = rng.sample(numbers, distinct // 20)
    source = workdir / "lookups.jsonl"
    with source.open("w") as out:
        for i, n in enumerate(numbers):
            message = {"id": str(i), "channel": "sms", "to": n, "fallback": ["whatsapp"]}
            out.write(json.dumps(message) + "\n")
    with Simulator({"sms": blocked}, sid=SID, api_key=KEY, latency=0.1) as sim:
        env = dict(os.environ)
        env.update(
            KALEYRA_SID=SID,
            KALEYRA_API_KEY=KEY,
            KALEYRA_BASE_URL=sim.base_url,
            BLOCKFILTER_CONCURRENCY=str(concurrency),
        )
        command = [sys.executable, "-m", "blockfilter", "filter", str(source), "--quiet"]
        elapsed = timed([*command, "--out", str(workdir / "lookups.out")], env)
        stats = sim.stats
    lower_bound = math.ceil(distinct / 100) + math.ceil(len(blocked) / 100)
    # Each round's requests go concurrency at a time, one latency a wave.
    primary_requests = math.ceil(distinct / 100)
    fallback_requests = math.ceil(len(blocked) / 100)
    ideal = (
        math.ceil(primary_requests / concurrency) + math.ceil(fallback_requests / concurrency)
    ) * 0.1
    return {
        "requests": stats.requests,
        "lower_bound": lower_bound,
        "mean_in_flight": stats.mean_in_flight,
        "concurrency": concurrency,
        "elapsed_s": elapsed,
        "ideal_s": ideal,
    }


def timed(command: list[str], env: dict[str, str]) -> float:
    started = time.monotonic()
    subprocess.run(command, env=env, check=True)
    return time.monotonic() - started


def check_same_verdicts(filtered: Path, bare: Path) -> None:
    """The race is only fair if both did the job: same messages, same verdicts."""
    with filtered.open() as ours, bare.open() as theirs:
        for our_line, their_line in zip(ours, theirs, strict=True):
            record, reference = json.loads(our_line), json.loads(their_line)
            assert record["id"] == reference["id"], (record, reference)
            assert record["verdict"] == reference["verdict"], (record, reference)


def cpu_path(messages: int, distinct: int, workdir: Path, repeat: int) -> dict[str, list[float]]:
    """Seconds of each run of the filter and of the two bare loops, alternated."""
    numbers = make_numbers(distinct, seed=3)
    rng = random.Random(4)
    blocked = rng.sample(numbers, distinct // 20)
    source = workdir / "campaign.jsonl"
    with source.open("w") as out:
        for index in range(messages):
            message = {
                "id": f"m{index:07d}",
                "channel": "sms",
                "to": rng.choice(numbers),
                "template": "order_shipped",
                "params": {"name": "Asha", "order": index},
            }
            out.write(json.dumps(message) + "\n")
    blocked_file = workdir / "blocked.json"
    blocked_file.write_text(json.dumps(blocked))
    commands = {
        "filter": [sys.executable, "-m", "blockfilter", "filter", str(source), "--quiet"]
        + ["--out", str(workdir / "filter.jsonl")],
        "stdlib": [sys.executable, "-c", BARE_LOOP, str(source)]
        + [str(workdir / "stdlib.jsonl"), str(blocked_file)],
        "orjson": [sys.executable, "-c", ORJSON_LOOP, str(source)]
        + [str(workdir / "orjson.jsonl"), str(blocked_file)],
    }
    times: dict[str, list[float]] = {name: [] for name in commands}
    with Simulator({"sms": blocked}, sid=SID, api_key=KEY, latency=0.1) as sim:
        env = dict(os.environ)
        env.update(KALEYRA_SID=SID, KALEYRA_API_KEY=KEY, KALEYRA_BASE_URL=sim.base_url)
        # Every command runs on bytecode compiled once, as an installed package's is: where
        # the environment sets PYTHONDONTWRITEBYTECODE (to keep a checkout clean), each run
        # would compile the checkout's modules from source again, which no installation
        # does (some 60 ms of the filter's run, a few of the bare loops'). The cache lives
        # in the temporary folder; one untimed run of each fills it.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(workdir / "bytecode")
        for command in commands.values():
            timed(command, env)
        # Alternated, so that a busy moment of the shared machine favours none of them.
        for _ in range(repeat):
            for name, command in commands.items():
                times[name].append(timed(command, env))
    check_same_verdicts(workdir / "filter.jsonl", workdir / "stdlib.jsonl")
    check_same_verdicts(workdir / "filter.jsonl", workdir / "orjson.jsonl")
    return times


def lookup_rows(distinct: int, rc: dict[str, float]) -> list[tuple[str, str, str]]:
    """The table's rows of the lookup run."""
    return [
        ("lookup: distinct numbers", f"{distinct:,}", "blockfilter filter"),
        (
            "requests made / lower bound",
            f"{rc['requests']} / {rc['lower_bound']}",
            f"{rc['requests'] / rc['lower_bound']:.2f} (goal 1.00)",
        ),
        (
            "mean in flight / concurrency",
            f"{rc['mean_in_flight']:.1f} / {rc['concurrency']}",
            f"{rc['mean_in_flight'] / rc['concurrency']:.2f} (goal >= 0.90)",
        ),
        (
            "wall time / latency bound",
            f"{rc['elapsed_s']:.2f} s / {rc['ideal_s']:.2f} s",
            f"{rc['elapsed_s'] / rc['ideal_s']:.2f}x",
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--distinct", type=int, default=3_000)
    parser.add_argument("--lookup-distinct", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3, help="alternated runs of each")
    parser.add_argument(
        "--cpu-only",
        action="store_true",
        help="only the CPU race (the filter against the bare loops), not the lookup run",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        rc = None
        if not args.cpu_only:
            rc = requests_and_concurrency(args.lookup_distinct, args.concurrency, Path(tmp))
        times = cpu_path(args.messages, args.distinct, Path(tmp), args.repeat)

    rate = {name: [args.messages / t for t in runs] for name, runs in times.items()}
    versus = {
        bare: [f / b for f, b in zip(rate["filter"], rate[bare], strict=True)]
        for bare in ("stdlib", "orjson")
    }
    rows = [] if rc is None else lookup_rows(args.lookup_distinct, rc)
    rows += [
        (
            "cpu: messages",
            f"{args.messages:,} over {args.distinct:,} numbers",
            f"{args.repeat} alternated runs each, min / median / max",
        ),
        ("blockfilter filter", f"{spread(rate['filter'], 0)} msg/s", ""),
        ("bare loop, stdlib json", f"{spread(rate['stdlib'], 0)} msg/s", "same validation"),
        ("bare loop, orjson", f"{spread(rate['orjson'], 0)} msg/s", "same validation"),
        ("filter / stdlib loop", spread(versus["stdlib"]), "round by round"),
        ("filter / orjson loop", spread(versus["orjson"]), "round by round (goal >= 0.70)"),
    ]
    width = max(len(r[0]) for r in rows)
    value_width = max(len(r[1]) for r in rows)
    printed = [
        f"{name:<{width}}  {value:<{value_width}}  {note}".rstrip() for name, value, note in rows
    ]
    print("\n".join(printed))
    if args.cpu_only:
        return  # benchmarks/results/core.md keeps the whole table of a full run
    when = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    RESULTS.write_text(
        "# Core benchmark results\n\n"
        f"Written by `benchmarks/bench_core.py` on {platform.node()} ({os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}), {when}; the simulator at 100 ms latency.\n\n"
        "```\n" + "\n".join(printed) + "\n```\n"
    )
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
