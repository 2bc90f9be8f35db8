"""Ledger benchmark: how soon an opt-out takes effect elsewhere, and what the ledger costs.

Run by hand::

    .venv/bin/python benchmarks/bench_ledger.py [--store sqlite|postgres] [--reports 100]

1. **Report to first suppressed verdict in another process.** A second process runs filters
   back to back over the numbers to be reported; this one reports them one at a time
   (``report_send_results``) and notes when each report returned. For each number: the time
   from the return to the start of the first filter in the other process that blocked it,
   and whether that was the *first filter that started after the return* (the goal: no delay
   beyond the one ledger read every filter makes).
2. **CPU path.** ``Filter.run_lines`` over a JSON Lines campaign of 10^5 and 10^6 messages
   over 3,000 numbers (Kaleyra answers from a warm cache), with the ledger (holding 1,000
   opt-outs of other numbers, so the verdicts are the same) and without it (the built-in
   ``ledger`` plugin disabled); best of 3 alternating.

Writes the table to ``benchmarks/results/ledger.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from blockfilter.config import load_settings
from blockfilter.ledger import add_optouts, report_send_results
from blockfilter.ledger.crypto import generate_secret
from blockfilter.ledger.ledger import forget_shared_ledgers
from blockfilter.plugins.manager import build_filter, make_plugin_manager
from blockfilter.testing.simulator import Simulator

SID, KEY = "BENCH", "bench-key-000"
RESULTS = Path(__file__).resolve().parent / "results" / "ledger.md"
PG_BASE = "postgresql://postgres@127.0.0.1:5432/test"

WATCHER = r"""
import json, sys, time
from blockfilter.config import load_settings
from blockfilter.plugins.manager import build_filter, make_plugin_manager
settings = load_settings(environ={}, **json.loads(sys.argv[1]))
numbers = json.loads(sys.argv[2])
pm = make_plugin_manager(settings)
messages = [{"id": str(i), "channel": "sms", "to": n} for i, n in enumerate(numbers)]
first_blocked = {}
starts = []
print("ready", flush=True)
deadline = time.time() + float(sys.argv[3])
while len(first_blocked) < len(numbers) and time.time() < deadline:
    started = time.time()
    starts.append(started)
    with build_filter(settings, pm) as engine:
        for result in engine.run(messages):
            if result["verdict"] == "blocked" and result["to"] not in first_blocked:
                first_blocked[result["to"]] = started
print(json.dumps({"first": first_blocked, "starts": starts}), flush=True)
"""


def make_numbers(count: int, base: int) -> list[str]:
    return [f"+91985{base + i:07d}" for i in range(count)]


def ledger_place(store: str, tmp: Path) -> tuple[str, str | None]:
    if store == "sqlite":
        return f"sqlite:///{tmp / 'optout.sqlite3'}", None
    import psycopg

    schema = f"bfbench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_BASE, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    return f"{PG_BASE}?options=-csearch_path%3D{schema}", schema


def drop_schema(schema: str | None) -> None:
    if schema:
        import psycopg

        with psycopg.connect(PG_BASE, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def latency(sim: Simulator, values: dict[str, object], reports: int) -> dict[str, float]:
    numbers = make_numbers(reports, 0)
    settings = load_settings(environ={}, **values)  # type: ignore[arg-type]
    watcher = subprocess.Popen(
        [sys.executable, "-c", WATCHER, json.dumps(values), json.dumps(numbers), "300"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert watcher.stdout is not None
    assert watcher.stdout.readline().strip() == "ready"
    time.sleep(1.0)
    returned: dict[str, float] = {}
    for number in numbers:
        report_send_results(
            [{"to": number, "channel": "sms", "provider": "kaleyra", "code": "OPT-OUT"}],
            settings=settings,
        )
        returned[number] = time.time()
        time.sleep(0.05)
    seen = json.loads(watcher.stdout.readline())
    watcher.wait(60)
    first_blocked, starts = seen["first"], seen["starts"]
    # A filter that started after the report returned and still let the number through.
    misses = sum(1 for n in numbers if any(returned[n] < s < first_blocked[n] for s in starts))
    delays = sorted(max(0.0, first_blocked[n] - returned[n]) for n in numbers)
    early = sum(1 for n in numbers if first_blocked[n] < returned[n])
    return {
        "p50_ms": statistics.median(delays) * 1000,
        "p99_ms": delays[min(len(delays) - 1, int(len(delays) * 0.99))] * 1000,
        "max_ms": delays[-1] * 1000,
        # A filter that started before the report returned but read the ledger after the
        # commit may block the number earlier still: counted, never a miss.
        "seen_by_a_filter_started_before_return": early,
        "missed_by_a_filter_started_after_return": misses,
        "filters": len(starts),
    }


def cpu_path(sim: Simulator, values: dict[str, object], sizes: list[int], tmp: Path) -> list[dict]:
    distinct = make_numbers(3000, 100_000)
    settings = load_settings(environ={}, **values)  # type: ignore[arg-type]
    # A ledger of 1,000 opt-outs of numbers this campaign does not send to: both runs give the
    # same verdicts, so the difference is the ledger's read and nothing else.
    add_optouts(make_numbers(1000, 500_000), "sms", settings=settings)
    rows = []
    for size in sizes:
        path = tmp / f"campaign-{size}.jsonl"
        with path.open("w") as handle:
            for i in range(size):
                handle.write(
                    json.dumps({"id": str(i), "channel": "sms", "to": distinct[i % 3000]}) + "\n"
                )

        def open_lines(path: Path = path):
            with path.open("rb") as handle:
                yield from handle

        timings: dict[str, list[float]] = {"with": [], "without": []}
        managers = {
            "with": make_plugin_manager(settings),
            "without": make_plugin_manager(settings.replace(disable_plugins=["ledger"])),
        }
        for _ in range(3):
            for label, pm in managers.items():
                started = time.perf_counter()
                with build_filter(settings, pm) as engine:
                    blocked = sum(
                        1 for line in engine.run_lines(open_lines) if b'"blocked"' in line
                    )
                timings[label].append(time.perf_counter() - started)
                assert blocked == 0, (label, blocked)
        best_with, best_without = min(timings["with"]), min(timings["without"])
        rows.append(
            {
                "messages": size,
                "with_s": best_with,
                "without_s": best_without,
                "ratio": best_with / best_without,
            }
        )
        path.unlink()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--reports", type=int, default=100)
    parser.add_argument("--sizes", default="100000,1000000")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_dir, Simulator(sid=SID, api_key=KEY) as sim:
        tmp = Path(tmp_dir)
        url, schema = ledger_place(args.store, tmp)
        values: dict[str, object] = {
            "sid": SID,
            "api_key": KEY,
            "base_url": sim.base_url,
            "optout_url": url,
            "optout_key": generate_secret(),
            "load_plugins": [],
        }
        try:
            lat = latency(sim, values, args.reports)
            cpu = cpu_path(sim, values, [int(s) for s in args.sizes.split(",")], tmp)
        finally:
            forget_shared_ledgers()
            drop_schema(schema)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    lines = [
        f"# Ledger benchmark ({args.store}, {when}, {os.cpu_count()} CPUs)",
        "",
        "| what | figure |",
        "|---|---|",
        f"| report returned -> first blocked verdict in another process, {args.reports} reports "
        f"| p50 {lat['p50_ms']:.1f} ms, p99 {lat['p99_ms']:.1f} ms, max {lat['max_ms']:.1f} ms |",
        f"| ... of which seen by a filter already running when the report returned "
        f"| {lat['seen_by_a_filter_started_before_return']} |",
        f"| filters started after a report returned that still allowed its number "
        f"(goal 0; {lat['filters']} filters ran) "
        f"| {lat['missed_by_a_filter_started_after_return']} |",
    ]
    for row in cpu:
        lines.append(
            f"| CPU path, {row['messages']:,} messages over 3,000 numbers, with / without the "
            f"ledger (best of 3) | {row['with_s']:.2f} s / {row['without_s']:.2f} s = "
            f"{row['ratio']:.3f} |"
        )
    table = "\n".join(lines)
    print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(table + "\n")


if __name__ == "__main__":
    main()
