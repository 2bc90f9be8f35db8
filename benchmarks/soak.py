"""Soak benchmark: a million messages through two Celery workers on RabbitMQ, 5% failing.

Run by hand from the repository root (needs RabbitMQ on 127.0.0.1:5672 and Redis on
127.0.0.1:6379; about ten minutes for a million messages on two cores, one with ``--quick``)::

    .venv/bin/python benchmarks/soak.py            # 10**6 messages
    .venv/bin/python benchmarks/soak.py --quick    # 10**5 messages

What runs: the Kaleyra simulator in a process of its own (``wa500`` on a random 5% of requests,
20 ms latency), two ``celery worker`` processes (prefork, one pool process each, the library's
default settings), and this script as the producer: it builds the campaign, sends it with
``blockfilter.tasks.filter_campaign`` and waits. A counting plugin (entry point
``bfsoak_counter``) marks every message id that reaches ``blockfilter_dispatch`` or
``blockfilter_suppressed`` in a Redis bitmap, so the run can tell that every message came
out, and how many came out more than once.

It prints, and writes to ``benchmarks/results/soak.md``: throughput (messages per second, from
the first task sent to the last hook call), API requests and how many failed, the client's and
the task's retries (counted in the workers' logs), deferred messages, and
the exactly-once check (distinct ids out == messages in, repeats == 0), plus whether every
verdict matches the blocklist. Exit status 0 when every check holds, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import redis
from repo_root import ROOT

from blockfilter.tasks import filter_campaign, merge_summaries
from blockfilter.testing.simulator import RemoteSimulator, parse_fault_spec
from tests.support.campaigns import truth
from tests.support.counting_plugin import (
    ENTRY_POINT,
    Tally,
    install_counting_dist,
)
from tests.support.env import subprocess_env
from tests.support.factory import make_app
from tests.support.workers import Worker

RABBIT_URL = "amqp://guest:guest@127.0.0.1:5672//"
REDIS_URL = "redis://127.0.0.1:6379/0"
SID, KEY = "SOAKSID", "soak-key-0123456789"
CHANNELS = ("sms", "whatsapp", "voice")
RESULTS = ROOT / "benchmarks" / "results" / "soak.md"

# The simulator in a process of its own, so it does not share this script's interpreter lock.
SIMULATOR = (
    "import sys\n"
    "from blockfilter.testing.simulator import run_simulator\n"
    "run_simulator('127.0.0.1', 0, sys.argv[1], [], 0.0,"
    " lambda url: print(url, flush=True), seed=int(sys.argv[2]))\n"
)


# -- the campaign ----------------------------------------------------------------------------


def make_campaign(
    size: int, seed: int
) -> tuple[list[dict[str, Any]], dict[str, set[str]], Counter[str]]:
    """``size`` messages (ids ``m0``...), 80% distinct numbers, 30% with fallbacks, 2% of the
    numbers blocklisted on each channel; the blocklist; the expected verdict counts."""
    rng = random.Random(seed)
    distinct = max(1, size * 4 // 5)
    numbers = [f"+9196{k:08d}" for k in range(distinct)]
    blocked: dict[str, set[str]] = {channel: set() for channel in CHANNELS}
    for offset, channel in enumerate(CHANNELS):
        blocked[channel] = {n for k, n in enumerate(numbers) if k % 50 == offset * 7}
    messages: list[dict[str, Any]] = []
    for i in range(size):
        channel = rng.choices(CHANNELS, weights=(6, 3, 1))[0]
        message: dict[str, Any] = {
            "id": f"m{i}",
            "channel": channel,
            "to": numbers[i if i < distinct else rng.randrange(distinct)],
            "body": {"template": "promo-7", "n": i},
        }
        if rng.random() < 0.3:
            message["fallback"] = [c for c in CHANNELS if c != channel]
        messages.append(message)
    expected = Counter(verdict for _, verdict, _ in truth(messages, blocked))
    return messages, blocked, expected


# -- the processes ---------------------------------------------------------------------------


def start_simulator(blocked: dict[str, set[str]], tmp: Path, seed: int) -> subprocess.Popen[str]:
    blocklist = tmp / "blocked.csv"
    with blocklist.open("w", encoding="utf-8") as handle:
        for channel, numbers in blocked.items():
            for n in sorted(numbers):
                handle.write(f"{channel},{n}\n")
    return subprocess.Popen(
        [sys.executable, "-c", SIMULATOR, str(blocklist), str(seed)],
        env=subprocess_env(KALEYRA_SID=SID, KALEYRA_API_KEY=KEY),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )


def stop(process: subprocess.Popen[Any]) -> None:
    """Warm shutdown of the process group we started, then SIGKILL if it lingers."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


def queue_length(app: Any, name: str) -> int:
    with app.connection_for_write() as connection:
        channel: Any = connection.default_channel  # an amqp channel: kombu types it loosely
        try:
            return int(channel.queue_declare(queue=name, passive=True).message_count)
        except Exception:  # not declared: nothing was parked
            return 0


# -- the run ---------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    size = 100_000 if args.quick and args.messages is None else (args.messages or 1_000_000)
    unique = uuid.uuid4().hex[:10]
    prefix = f"bfsoak:{unique}:"
    queue = f"bfsoak.{unique}"
    deferred_queue = f"{queue}.deferred"
    tmp = Path(tempfile.mkdtemp(prefix="bfsoak-"))
    client = redis.Redis.from_url(REDIS_URL)
    app = make_app(
        broker=RABBIT_URL,
        backend=REDIS_URL,
        queue=queue,
        deferred_queue=deferred_queue,
        keyprefix=prefix,
    )
    print(f"soak: building a campaign of {size:,} messages", flush=True)
    started = time.monotonic()
    messages, blocked, expected = make_campaign(size, args.seed)
    build_s = time.monotonic() - started

    processes: list[subprocess.Popen[Any]] = []
    workers: list[Worker] = []
    try:
        simulator_process = start_simulator(blocked, tmp, args.seed)
        processes.append(simulator_process)
        assert simulator_process.stdout is not None
        base_url = simulator_process.stdout.readline().strip()
        if not base_url.startswith("http"):
            raise SystemExit("soak: the simulator did not start")
        simulator = RemoteSimulator(base_url)
        simulator.set_faults(
            [parse_fault_spec(f"wa500:probability={args.fault_probability}")],
            latency=args.latency,
        )
        simulator.reset_stats()

        plugin_dir = install_counting_dist(tmp / "plugins")
        # No upstream argument: the library's default retry settings are what a soak measures.
        env = subprocess_env(
            path=[plugin_dir],
            strip=("BFTEST_", "BFSOAK_"),
            KALEYRA_SID=SID,
            KALEYRA_API_KEY=KEY,
            KALEYRA_BASE_URL=base_url,
            BLOCKFILTER_LOAD_PLUGINS=ENTRY_POINT,
            BFTEST_BROKER_URL=RABBIT_URL,
            BFTEST_RESULT_BACKEND=REDIS_URL,
            BFTEST_QUEUE=queue,
            BFTEST_DEFERRED_QUEUE=deferred_queue,
            BFTEST_KEYPREFIX=prefix,
            BFSOAK_REDIS_URL=REDIS_URL,
            BFSOAK_PREFIX=prefix,
        )
        for index in range(args.workers):
            # The task's retries are logged at INFO (the Worker's default level).
            worker = Worker(
                env,
                queue,
                tmp / f"worker-{index}.log",
                f"bfsoak-{unique}-{index}",
                concurrency=args.concurrency,
            )
            workers.append(worker)
            worker.start(timeout=60)

        print(f"soak: sending {size:,} messages in tasks of about {args.chunk_size}", flush=True)
        started = time.monotonic()
        result = filter_campaign(messages, chunk_size=args.chunk_size, app=app)
        sent_s = time.monotonic() - started
        tasks = len(result.results or [])
        del messages  # the producer's copy is no longer needed
        deadline = started + args.timeout
        tally = Tally.read(client, prefix)
        last_print = 0.0
        while tally.records < size and time.monotonic() < deadline:
            time.sleep(1.0)
            tally = Tally.read(client, prefix)
            if time.monotonic() - last_print >= 10:
                last_print = time.monotonic()
                rate = tally.records / (last_print - started)
                print(f"soak: {tally.records:,} of {size:,} out, {rate:,.0f}/s", flush=True)
        done_s = time.monotonic() - started
        summaries = result.get(timeout=max(60.0, deadline - time.monotonic()))
        time.sleep(1.0)  # a repeat would come now, if at all
        tally = Tally.read(client, prefix)
        stats = simulator.fetch_stats()
        summary = merge_summaries(summaries)
        parked = queue_length(app, deferred_queue)
        logs = "".join(
            (tmp / f"worker-{i}.log").read_text(errors="replace") for i in range(args.workers)
        )
    finally:
        for worker in reversed(workers):
            worker.stop(timeout=30)
        for process in reversed(processes):
            stop(process)
        with contextlib.suppress(Exception), app.connection_for_write() as connection:
            channel: Any = connection.default_channel
            for name in (queue, deferred_queue):
                with contextlib.suppress(Exception):
                    channel.queue_delete(queue=name)
            with contextlib.suppress(Exception):
                channel.exchange_delete(exchange=queue)
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            client.delete(key)
        app.close()
        shutil.rmtree(tmp, ignore_errors=True)

    faults = sum(n for k, n in stats.by_outcome.items() if k.startswith("fault:"))
    deferred = summary["verdicts"].get("deferred", 0)
    checked = {k: v for k, v in summary["verdicts"].items() if k != "deferred"}
    figures: dict[str, Any] = {
        "messages": size,
        "tasks": tasks,
        "workers": f"{args.workers} x prefork -c {args.concurrency}",
        "build_s": round(build_s, 1),
        "split_and_send_s": round(sent_s, 1),
        "end_to_end_s": round(done_s, 1),
        "throughput_msg_per_s": round(size / done_s),
        "api_requests": stats.requests,
        "api_requests_ok": stats.by_outcome.get("ok", 0),
        "api_requests_failed": faults,
        "failed_share": round(faults / max(1, stats.requests), 4),
        # From the workers' logs: the client's retry warnings, the task's retry notes.
        "client_retries": logs.count("Kaleyra request failed with"),
        "task_retries": logs.count("could not be checked; retrying them"),
        "summary_requests": summary["requests"],
        "numbers_asked": stats.numbers_asked,
        "max_in_flight": stats.max_in_flight,
        "mean_in_flight": round(stats.mean_in_flight, 1),
        "deferred": deferred,
        "parked_on_deferred_queue": parked,
        "records_out": tally.records,
        "distinct_ids_out": tally.distinct,
        "repeats": tally.repeats,
        "repeated_ids_sample": tally.repeated_ids[:5],
        "verdicts": summary["verdicts"],
        "expected_verdicts": dict(expected),
        "task_failures_in_logs": logs.count("raised unexpected"),
    }
    checks = {
        "every message out (distinct ids == messages)": tally.distinct == size,
        "none twice (repeats == 0)": tally.repeats == 0 and tally.records == size,
        "summary total == messages": summary["total"] == size,
        "verdicts match the blocklist (deferred aside)": all(
            checked.get(v, 0) <= n for v, n in expected.items()
        )
        and sum(checked.values()) + deferred == size
        and (deferred > 0 or checked == dict(expected)),
        "deferred == parked": deferred == parked,
        "requests in summary == requests seen by the API": summary["requests"] == stats.requests,
        "no task failed": figures["task_failures_in_logs"] == 0,
    }
    print(json.dumps(figures, indent=2))
    for name, ok in checks.items():
        print(f"soak: {'ok  ' if ok else 'FAIL'} {name}")
    if args.out:
        write_report(Path(args.out), args, figures, checks)
    return 0 if all(checks.values()) else 1


def write_report(
    path: Path, args: argparse.Namespace, figures: dict[str, Any], checks: dict[str, bool]
) -> None:
    """Add this run's figures to the results file (newest first)."""
    when = datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
    command = "benchmarks/soak.py " + " ".join(sys.argv[1:])
    lines = [
        f"## {figures['messages']:,} messages, {when}",
        "",
        f"`{command.strip()}` on {platform.node() or 'this machine'} "
        f"({os.cpu_count()} CPUs, Python {platform.python_version()}): RabbitMQ broker, Redis "
        f"results, {figures['workers']} workers, library default settings; simulator with "
        f"`wa500:probability={args.fault_probability}` and {args.latency * 1000:.0f} ms latency.",
        "",
        "| figure | value |",
        "|---|---|",
    ]
    rows = [
        ("throughput, end to end", f"{figures['throughput_msg_per_s']:,} msg/s"),
        ("end to end (first task sent to last hook call)", f"{figures['end_to_end_s']} s"),
        ("split and send", f"{figures['split_and_send_s']} s ({figures['tasks']} tasks)"),
        ("API requests", f"{figures['api_requests']:,}"),
        (
            "failed requests",
            f"{figures['api_requests_failed']:,} ({figures['failed_share']:.1%})",
        ),
        ("client retries (of a request)", f"{figures['client_retries']:,}"),
        ("task retries (of a batch's deferred messages)", f"{figures['task_retries']:,}"),
        (
            "requests in flight, mean / max",
            f"{figures['mean_in_flight']} / {figures['max_in_flight']}",
        ),
        ("deferred (parked)", f"{figures['deferred']} ({figures['parked_on_deferred_queue']})"),
        (
            "records out / distinct ids out",
            f"{figures['records_out']:,} / {figures['distinct_ids_out']:,}",
        ),
        ("repeats", f"{figures['repeats']}"),
        ("verdicts", ", ".join(f"{k} {v:,}" for k, v in sorted(figures["verdicts"].items()))),
    ]
    lines += [f"| {name} | {value} |" for name, value in rows]
    lines += [
        "",
        "Checks: " + "; ".join(f"{n}: {'ok' if ok else 'FAIL'}" for n, ok in checks.items()),
    ]
    lines += [""]
    header = "# Soak benchmark results\n\nWritten by `benchmarks/soak.py`; newest first.\n\n"
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    body = old[len(header) :] if old.startswith(header) else old
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + "\n".join(lines) + "\n" + body, encoding="utf-8")
    print(f"soak: figures added to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, help="campaign size (default 1,000,000)")
    parser.add_argument("--quick", action="store_true", help="100,000 messages")
    parser.add_argument("--workers", type=int, default=2, help="celery worker processes")
    parser.add_argument("--concurrency", type=int, default=1, help="pool processes per worker")
    parser.add_argument("--chunk-size", type=int, default=1000, help="messages per task")
    parser.add_argument("--fault-probability", type=float, default=0.05)
    parser.add_argument("--latency", type=float, default=0.02, help="simulator latency, s")
    parser.add_argument("--timeout", type=float, default=3600.0, help="give up after, s")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS), help="results file ('' for none)")
    sys.exit(run(parser.parse_args()))


if __name__ == "__main__":
    main()
