"""Scale benchmark: the fewest requests, at the highest rate, in bounded memory.

Run from the repository root (needs Redis on 127.0.0.1:6379; about five minutes on two cores,
under a minute with ``--quick``, which stops at 10**5 messages)::

    .venv/bin/python benchmarks/bench_scale.py [--quick] [--concurrency 16] [--big-concurrency 64]

For campaigns of 10**4, 10**5 and 10**6 messages, each to a number of its own (the worst case
for requests), with 5% of the numbers on the sms blocklist, against the Kaleyra simulator
answering in 100 ms, it runs the real ``blockfilter filter`` (a subprocess, as a user runs it)
with a Redis cache, in these ways:

* **cold, lookup**: an empty cache, the list's size unknown: the numbers are looked up, 100 to
  a request. Lower bound: ceil(numbers / 100).
* **warm**: the same campaign again: every status comes from the cache. Lower bound: 0. Its
  speed is the CPU path, compared with a bare json-in / validate / classify / json-out loop
  over the file: the two alternate, three times each, and the range is printed.
* **sync, then filter**: ``blockfilter sync --channel sms`` (its size unknown, so pages go out
  in rounds of 1, 2, 4...) and then the campaign, answered by the cache without a lookup.
  Lower bound: the pages of the list, size // 100 + 1.
* **auto, size known**: a cold cache whose snapshot is too old to answer for clean numbers
  but still tells the list's size (``BLOCKFILTER_CACHE_TTL=1``, a second's wait): the filter
  picks the cheaper strategy itself. Lower bound: min(lookups, pages).
* at 10**5 messages, **cold, rate limit**: ``BLOCKFILTER_RATE_LIMIT``, whose bound is
  requests / rate.
* from 10**5 messages, **memory:// (default)**: the command with no configuration at all (a
  cache of its own process), for the wall time and the memory peak.

Wall time is compared with the bound latency and the rate limit set: ceil(requests /
concurrency) * 100 ms without a rate limit, requests / rate with one (one 100 ms answer
added). Every ``--estimate`` made beforehand is shown next to the requests the run made.
Memory is each process's peak resident set size (``wait4``). ``--concurrency`` is used up to
10**5 messages and ``--big-concurrency`` for 10**6 (64 by default: 10**4 requests of 100 ms at
16 in flight would take a minute whatever the code does).

Writes ``benchmarks/results/scale.md`` (the table) and ``benchmarks/results/scale.png`` (the
plot); ``--quick`` writes ``benchmarks/results/scale-quick.md`` only. Uses database 14 of
the Redis server and deletes every ``bf:*`` key there at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import redis

# The same bare loop the core benchmark races against (stdlib json, the same validation).
from bench_core import BARE_LOOP, spread
from repo_root import ROOT

from blockfilter.testing.simulator import Simulator

RESULTS = ROOT / "benchmarks" / "results"
REDIS_URL = "redis://127.0.0.1:6379/14"
LATENCY = 0.1
BLOCKED_SHARE = 0.05
# Warm runs and bare loops, alternated: one run each says little on a shared machine.
WARM_REPEAT = 3


@dataclass
class Run:
    """One row of the table."""

    size: int
    scenario: str
    requests: int
    lower_bound: int
    wall_s: float
    bound_s: float
    rss_mb: float
    estimate: str = ""
    note: str = ""
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class Proc:
    returncode: int
    stdout: bytes
    stderr: bytes
    wall_s: float
    rss_mb: float


def run_measured(args: list[str], env: dict[str, str]) -> Proc:
    """Run a command; its wall time and its own peak RSS (wait4, not the children's max)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.monotonic()
        process = subprocess.Popen(args, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.monotonic() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        # ru_maxrss is in kilobytes on Linux.
        return Proc(process.returncode, out.read(), err.read(), wall, usage.ru_maxrss / 1024)


def blockfilter(*args: str, env: dict[str, str]) -> Proc:
    proc = run_measured([sys.executable, "-m", "blockfilter", *args], env)
    if proc.returncode != 0:
        raise SystemExit(f"blockfilter {' '.join(args)} failed:\n{proc.stderr.decode()[-2000:]}")
    return proc


def make_campaign(size: int, workdir: Path) -> tuple[Path, list[str], Path]:
    """``size`` messages to ``size`` distinct numbers; 5% of them blocklisted on sms."""
    rng = random.Random(size)
    numbers: dict[str, None] = {}
    while len(numbers) < size:
        numbers[f"+91{rng.choice('6789')}{rng.randrange(10**9):09d}"] = None
    ordered = list(numbers)
    path = workdir / f"campaign-{size}.jsonl"
    with path.open("w") as out:
        for index, number in enumerate(ordered):
            message = {
                "id": f"m{index:07d}",
                "channel": "sms",
                "to": number,
                "template": "order_shipped",
                "params": {"name": "Asha", "order": index},
            }
            out.write(json.dumps(message) + "\n")
    blocked = rng.sample(ordered, int(size * BLOCKED_SHARE))
    blocked_file = workdir / f"blocked-{size}.json"
    blocked_file.write_text(json.dumps(blocked))
    return path, blocked, blocked_file


class Bench:
    def __init__(self, sim: Simulator, workdir: Path, rate_limit: float) -> None:
        self.sim = sim
        self.workdir = workdir
        self.rate_limit = rate_limit
        self.runs: list[Run] = []

    def env(self, concurrency: int, **extra: str) -> dict[str, str]:
        """A fresh account and cache secret: nothing learnt by an earlier scenario is seen.

        The snapshots an earlier scenario left are deleted too, so the one a scenario ages
        is the only one in Redis."""
        clear_sync_marks()
        env = {
            k: v for k, v in os.environ.items() if not k.startswith(("KALEYRA_", "BLOCKFILTER_"))
        }
        env.update(
            KALEYRA_SID=f"B{uuid.uuid4().hex[:10]}",
            KALEYRA_API_KEY="bench-key-000",
            KALEYRA_BASE_URL=self.sim.base_url,
            BLOCKFILTER_CACHE_URL=REDIS_URL,
            BLOCKFILTER_CACHE_SECRET=uuid.uuid4().hex,
            BLOCKFILTER_CONCURRENCY=str(concurrency),
        )
        env.update(extra)
        return env

    def filter(
        self, campaign: Path, env: dict[str, str], *, estimate: bool = True
    ) -> tuple[Proc, int, str]:
        shown = ""
        if estimate:
            said = blockfilter("filter", str(campaign), "--estimate", env=env).stdout.decode()
            match = re.match(r"(\d+(?: to \d+)?) API requests", said)
            shown = match.group(1) if match else said.strip()
        self.sim.reset_stats()
        out = self.workdir / "out.jsonl"
        proc = blockfilter("filter", str(campaign), "--quiet", "--out", str(out), env=env)
        return proc, self.sim.snapshot(records=False).requests, shown

    def latency_bound(self, requests: int, concurrency: int) -> float:
        return math.ceil(requests / concurrency) * LATENCY

    def campaign(self, size: int, concurrency: int, *, memory_default: bool) -> None:
        campaign, blocked, blocked_file = make_campaign(size, self.workdir)
        self.sim.unblock("sms", *self.sim.blocked("sms"))
        self.sim.block("sms", *blocked)
        lookups = math.ceil(size / 100)
        pages = len(blocked) // 100 + 1
        print(f"-- {size:,} messages, {len(blocked):,} blocklisted", flush=True)

        env = self.env(concurrency)
        proc, made, said = self.filter(campaign, env)
        self.add(
            size, "cold, lookup", made, lookups, proc, self.latency_bound(made, concurrency), said
        )
        cold_wall = proc.wall_s

        # Warm against the bare loop: alternated, WARM_REPEAT times, range and pairwise ratios.
        warm_runs: list[tuple[Proc, int, str]] = []
        bare_runs: list[Proc] = []
        for _ in range(WARM_REPEAT):
            warm_runs.append(self.filter(campaign, env, estimate=not warm_runs))
            bare_runs.append(
                run_measured(
                    [sys.executable, "-c", BARE_LOOP, str(campaign)]
                    + [str(self.workdir / "bare.jsonl"), str(blocked_file)],
                    dict(os.environ),
                )
            )
        walls = sorted(range(WARM_REPEAT), key=lambda i: warm_runs[i][0].wall_s)
        proc, made, _ = warm_runs[walls[len(walls) // 2]]  # the median run goes in the table
        warm = self.add(size, "warm", made, 0, proc, 0.0, warm_runs[0][2])
        warm_rate = [size / run[0].wall_s for run in warm_runs]
        bare_rate = [size / run.wall_s for run in bare_runs]
        ratios = [w / b for w, b in zip(warm_rate, bare_rate, strict=True)]
        warm.extra = {
            "msg_s": statistics.median(warm_rate),
            "bare_msg_s": statistics.median(bare_rate),
        }
        warm.note = (
            f"{spread(warm_rate, 0)} msg/s; bare json loop {spread(bare_rate, 0)} msg/s; "
            f"ratio {spread(ratios, 2)} (min / median / max of {WARM_REPEAT}, alternated)"
        )

        env = self.env(concurrency)
        self.sim.reset_stats()
        synced = blockfilter("sync", "--channel", "sms", "--json", "--quiet", env=env)
        sync_pages = self.sim.snapshot(records=False).requests
        proc, made, said = self.filter(campaign, env)
        run = self.add(
            size,
            "sync, then filter",
            sync_pages + made,
            pages,
            proc,
            self.latency_bound(sync_pages, concurrency),
            said,
        )
        run.wall_s += synced.wall_s
        run.note = (
            f"sync {sync_pages} pages in {synced.wall_s:.2f} s (size unknown: rounds of 1, 2, "
            f"4...), then {made} requests; vs cold lookup {cold_wall:.2f} s"
        )

        # A sync made long enough ago that its mark no longer answers for clean numbers (it
        # is aged past BLOCKFILTER_CACHE_TTL in Redis) but still tells the list's size; its
        # blocklisted entries are still in the cache, so the misses are the clean numbers.
        env = self.env(concurrency)
        blockfilter("sync", "--channel", "sms", "--quiet", env=env)
        age_sync_mark("sms", seconds=700)
        proc, made, said = self.filter(campaign, env)
        records = self.sim.snapshot(records=True).records
        made_pages = sum(1 for _, _, numbers, _ in records if numbers == 0)
        misses = size - len(blocked)
        self.add(
            size,
            "auto, size known",
            made,
            min(math.ceil(misses / 100), pages),
            proc,
            self.latency_bound(made, concurrency),
            said,
            note=f"{made_pages} pages, {made - made_pages} lookups; "
            f"lookups would cost {math.ceil(misses / 100)}",
        )

        if size == 100_000 and self.rate_limit:
            env = self.env(concurrency, BLOCKFILTER_RATE_LIMIT=str(self.rate_limit))
            proc, made, said = self.filter(campaign, env)
            bound = made / self.rate_limit + LATENCY
            self.add(size, f"cold, {self.rate_limit:g}/s limit", made, lookups, proc, bound, said)

        if memory_default:
            env = self.env(concurrency)
            env.pop("BLOCKFILTER_CACHE_URL")
            env.pop("BLOCKFILTER_CACHE_SECRET")
            proc, made, said = self.filter(campaign, env, estimate=False)
            self.add(
                size,
                "cold, memory:// (default)",
                made,
                lookups,
                proc,
                self.latency_bound(made, concurrency),
                said,
            )

    def add(
        self,
        size: int,
        scenario: str,
        requests: int,
        lower_bound: int,
        proc: Proc,
        bound_s: float,
        estimate: str,
        note: str = "",
    ) -> Run:
        run = Run(
            size, scenario, requests, lower_bound, proc.wall_s, bound_s, proc.rss_mb, estimate, note
        )
        self.runs.append(run)
        print(
            f"   {scenario}: {requests} requests (bound {lower_bound}), {proc.wall_s:.2f} s, "
            f"{proc.rss_mb:.0f} MB",
            flush=True,
        )
        return run


def ratio(value: float, bound: float) -> str:
    if bound == 0:
        return "0" if value == 0 else "-"
    return f"{value / bound:.2f}"


def table(runs: list[Run], concurrency: int, big_concurrency: int) -> str:
    lines = [
        "| messages | scenario | requests / lower bound | estimate | wall time / bound "
        "| peak RSS | notes |",
        "|---:|---|---|---|---|---:|---|",
    ]
    for run in runs:
        wall = f"{run.wall_s:.2f} s"
        if run.bound_s:
            wall += f" / {run.bound_s:.2f} s = {run.wall_s / run.bound_s:.2f}x"
        lines.append(
            f"| {run.size:,} | {run.scenario} | {run.requests:,} / {run.lower_bound:,} = "
            f"{ratio(run.requests, run.lower_bound)} | {run.estimate or '-'} | {wall} "
            f"| {run.rss_mb:.0f} MB | {run.note} |"
        )
    return "\n".join(lines)


def plot(runs: list[Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({run.size for run in runs})
    scenarios = ["cold, lookup", "sync, then filter", "auto, size known", "warm"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    width = 0.2
    for offset, scenario in enumerate(scenarios):
        rows = {run.size: run for run in runs if run.scenario == scenario}
        xs = [i + (offset - 1.5) * width for i in range(len(sizes))]
        made = [rows[s].requests if s in rows else 0 for s in sizes]
        bars = axes[0].bar(xs, [m or float("nan") for m in made], width, label=scenario)
        for x, m in zip(xs, made, strict=True):
            if m == 0:  # nothing to draw on a log scale: say it
                axes[0].text(x, 1.1, "0", ha="center", color=bars.patches[0].get_facecolor())
        bounds = [rows[s].lower_bound if s in rows else 0 for s in sizes]
        axes[0].scatter(xs, [b or float("nan") for b in bounds], marker="_", s=200, color="black")
        walls = [rows[s].wall_s if s in rows else 0 for s in sizes]
        axes[1].bar(xs, walls, width, label=scenario)
        bound_s = [rows[s].bound_s if s in rows else 0 for s in sizes]
        axes[1].scatter(xs, [b or float("nan") for b in bound_s], marker="_", s=200, color="black")
    axes[0].set_yscale("log")
    axes[0].set_ylim(bottom=0.8)
    axes[0].set_title("API requests (bars) and lower bound (black)")
    axes[1].set_yscale("log")
    axes[1].set_title("wall time, s (bars) and latency bound (black)")
    for axis in axes[:2]:
        axis.set_xticks(range(len(sizes)), [f"{s:,}" for s in sizes])
        axis.set_xlabel("messages (all distinct numbers)")
    axes[0].legend(fontsize=8)
    for scenario, marker in (
        ("cold, lookup", "o"),
        ("warm", "s"),
        ("cold, memory:// (default)", "^"),
    ):
        rows = [run for run in runs if run.scenario == scenario]
        if rows:
            axes[2].plot(
                [r.size for r in rows], [r.rss_mb for r in rows], marker=marker, label=scenario
            )
    axes[2].axhline(300, color="red", linestyle="--", linewidth=1, label="300 MB")
    axes[2].set_xscale("log")
    axes[2].set_title("peak RSS of blockfilter filter, MB")
    axes[2].set_xlabel("messages")
    axes[2].legend(fontsize=8)
    fig.suptitle(f"blockfilter filter against the simulator at {LATENCY * 1000:.0f} ms latency")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def age_sync_mark(channel: str, seconds: float) -> None:
    """Make the channel's snapshot look ``seconds`` older (its meta field ``#`` is
    ``<synced_at> <members> <listed>``)."""
    client = redis.Redis.from_url(REDIS_URL)
    # The key ends with a hash of the account's cache secret (one per campaign here).
    keys = list(client.scan_iter(match=f"*bf:n:{channel}:*"))
    assert len(keys) == 1, f"one snapshot to age, not {len(keys)}"
    (key,) = keys
    raw = client.hget(key, "#")
    assert raw is not None, "the snapshot expired"
    at, members, listed = raw.split(b" ")
    client.hset(key, "#", f"{float(at) - seconds:.6f} {int(members)} {int(listed)}")
    client.close()


def clear_sync_marks() -> None:
    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter(match="*bf:n:*"):
        client.delete(key)
    client.close()


def clean_redis() -> None:
    client = redis.Redis.from_url(REDIS_URL)
    batch: list[bytes] = []
    for key in client.scan_iter(match="bf:*", count=10_000):
        batch.append(key)
        if len(batch) >= 10_000:
            client.delete(*batch)
            batch = []
    if batch:
        client.delete(*batch)
    client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10**4 and 10**5 messages only")
    parser.add_argument("--concurrency", type=int, default=16, help="up to 10**5 messages")
    parser.add_argument("--big-concurrency", type=int, default=64, help="for 10**6 messages")
    parser.add_argument("--rate-limit", type=float, default=100.0, help="requests/s at 10**5")
    args = parser.parse_args()

    sizes = [10_000, 100_000] if args.quick else [10_000, 100_000, 1_000_000]
    clean_redis()
    try:
        with tempfile.TemporaryDirectory() as tmp, Simulator(latency=LATENCY) as sim:
            bench = Bench(sim, Path(tmp), args.rate_limit)
            for size in sizes:
                big = size >= 1_000_000
                bench.campaign(
                    size,
                    args.big_concurrency if big else args.concurrency,
                    memory_default=size >= 100_000,
                )
    finally:
        clean_redis()

    runs = bench.runs
    when = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    command = "benchmarks/bench_scale.py" + (" --quick" if args.quick else "")
    header = (
        f"`{command}` on {platform.node()} ({os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}), {when}: the simulator in the benchmark's process at "
        f"{LATENCY * 1000:.0f} ms latency, `blockfilter filter` as a subprocess with a Redis "
        f"cache, {args.concurrency} requests in flight up to 10^5 messages and "
        f"{args.big_concurrency} at 10^6; every message to a number of its own, "
        f"{BLOCKED_SHARE:.0%} of them blocklisted."
    )
    text = "\n".join(
        [
            "# Scale benchmark results",
            "",
            "Written by `benchmarks/bench_scale.py`; the plot is `scale.png`.",
            "",
            header,
            "",
            table(runs, args.concurrency, args.big_concurrency),
            "",
        ]
    )
    print()
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.quick:  # a quick look leaves the full run's table and plot as they were
        (RESULTS / "scale-quick.md").write_text(text)
        print(f"wrote {RESULTS / 'scale-quick.md'}")
        return
    (RESULTS / "scale.md").write_text(text)
    try:
        import matplotlib  # noqa: F401  (only for the plot: not one of the test extras)
    except ImportError:
        print(f"wrote {RESULTS / 'scale.md'}; no plot (pip install matplotlib for scale.png)")
        return
    plot(runs, RESULTS / "scale.png")
    print(f"wrote {RESULTS / 'scale.md'} and {RESULTS / 'scale.png'}")


if __name__ == "__main__":
    main()
