"""Pipeline benchmark: a Celery worker with the filter against the same worker without it,
and the collector's batch fill at several arrival rates.

Run by hand (about a minute; RabbitMQ on 127.0.0.1:5672 and Redis on 127.0.0.1:6379)::

    .venv/bin/python benchmarks/bench_pipeline.py [--messages 40000] [--concurrency 8]

Everything runs in one go, on one broker (RabbitMQ), against the simulator with 100 ms
latency per API request:

* throughput: a campaign of distinct numbers (5% blocklisted on SMS, with a WhatsApp
  fallback) through ``blockfilter.filter_messages`` tasks (``filter_campaign``), against the
  same messages in tasks of the same size (1000, then 4000) through ``bench.passthrough``, a
  task that hands its messages straight to the same ``blockfilter_dispatch`` hook. Messages
  per second from the first send to the last message reaching a hook (counted in Redis),
  best of the rounds;
* warm Redis: the same comparison on a worker whose cache is Redis, every status already in
  it: each campaign is sent through the filter twice and the second round is measured (its
  statuses all come from the cache), against the passthrough on the same messages;
  alternated, ``--warm-repeat`` times (3), min / median / max of each and of the ratios;
* collector fill: messages sent one at a time (``blockfilter.collect``, one task each) at a
  paced rate; mean numbers per API request (100 = every request full), from the simulator.

It prints a table and writes it to ``benchmarks/results/pipeline.md``. This file is also the
workers' Celery app (``celery -A bench_pipeline worker``), configured by ``BENCH_*`` variables.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import redis
from celery import Celery
from celery.signals import worker_process_init
from repo_root import ROOT

from blockfilter.plugins.hookspecs import hookimpl
from tests.support.env import subprocess_env
from tests.support.workers import Worker

HERE = ROOT / "benchmarks"
RESULTS = HERE / "results" / "pipeline.md"
RABBIT_URL = "amqp://guest:guest@127.0.0.1:5672//"
REDIS_URL = "redis://127.0.0.1:6379/0"
SID, KEY = "BENCH", "bench-key-000"
LATENCY_S = 0.1
CHUNKS = (1000, 4000)  # filter_campaign's default task size, and a larger one
RATES = (50, 500, 5000)
# The warm worker's cache: its own secret each run, so nothing an earlier run left is read,
# and short TTLs, so what it leaves in Redis is gone minutes later.
WARM_CACHE_URL = "redis://127.0.0.1:6379/0"
WARM_CACHE_TTL_S = 300

# -- the workers' app ------------------------------------------------------------------------

app = Celery("bench_pipeline", broker=os.environ.get("BENCH_BROKER_URL", RABBIT_URL))
app.conf.update(
    task_default_queue=os.environ.get("BENCH_QUEUE", "bench_pipeline"),
    task_ignore_result=True,
    worker_prefetch_multiplier=int(os.environ.get("BENCH_PREFETCH_MULTIPLIER", "1")),
    worker_enable_remote_control=False,
    worker_send_task_events=False,
    broker_connection_retry_on_startup=True,
    blockfilter_deferred_queue=os.environ.get("BENCH_QUEUE", "bench_pipeline") + ".deferred",
    blockfilter_load_plugins=[],  # only the sink below: no installed pipeline may send
)
app.autodiscover_tasks(["blockfilter"], related_name="collector")


class Sink:
    """The pipeline's end: counts the messages that reach a hook, in Redis."""

    def __init__(self) -> None:
        self.redis = redis.Redis.from_url(os.environ.get("BENCH_REDIS_URL", REDIS_URL))
        self.key = os.environ.get("BENCH_COUNT_KEY", "bench:count")

    @hookimpl
    def blockfilter_dispatch(self, messages: list[dict[str, Any]]) -> None:
        self.redis.incrby(self.key, len(messages))

    @hookimpl
    def blockfilter_suppressed(self, messages: list[dict[str, Any]]) -> None:
        self.redis.incrby(self.key, len(messages))


def _plugin_manager() -> Any:
    from blockfilter.config import load_settings
    from blockfilter.plugins.manager import get_plugin_manager

    return get_plugin_manager(load_settings(celery_conf=app.conf))


@worker_process_init.connect
def _register_sink(**_: Any) -> None:
    # In each pool process, after the fork: its own Redis connection, on its own manager.
    _plugin_manager().register(Sink(), name="bench-sink")


@app.task(name="bench.passthrough")
def passthrough(messages: list[dict[str, Any]]) -> None:
    """The same pipeline without the filter: straight to the dispatch hook."""
    from blockfilter.plugins.manager import PluginHooks

    PluginHooks(_plugin_manager()).dispatch(messages)


# -- the benchmark ---------------------------------------------------------------------------


def numbers(start: int, count: int) -> list[str]:
    return [f"+9198{index:08d}" for index in range(start, start + count)]


class Bench:
    """One benchmark run's simulator, worker processes, queues and counter."""

    def __init__(self, workdir: Path, concurrency: int) -> None:
        from blockfilter.testing.simulator import Simulator

        self.workdir = workdir
        self.concurrency = concurrency
        self.unique = uuid.uuid4().hex[:8]
        self.redis = redis.Redis.from_url(REDIS_URL)
        self.count_key = f"bench:{self.unique}:count"
        self.simulator = Simulator(sid=SID, api_key=KEY, latency=LATENCY_S).start()
        self.workers: list[Worker] = []
        self.queues: list[str] = []
        self.next_number = 0

    def fresh_numbers(self, count: int) -> list[str]:
        """Numbers no run asked about yet: every run starts with a cold cache."""
        found = numbers(self.next_number, count)
        self.next_number += count
        return found

    def start_worker(self, queue: str, concurrency: int, **env: str) -> None:
        self.queues += [queue, f"{queue}.deferred"]
        worker_env = subprocess_env(
            path=[HERE],
            KALEYRA_SID=SID,
            KALEYRA_API_KEY=KEY,
            KALEYRA_BASE_URL=self.simulator.base_url,
            BENCH_QUEUE=queue,
            BENCH_COUNT_KEY=self.count_key,
            **env,
        )
        worker = Worker(
            worker_env,
            queue,
            self.workdir / f"{queue}.log",
            queue,
            app="bench_pipeline",
            concurrency=concurrency,
            cwd=self.workdir,
        )
        self.workers.append(worker)
        worker.start(timeout=60)

    def reset_count(self) -> None:
        self.redis.delete(self.count_key)

    def wait_count(self, expected: int, timeout: float = 300) -> float:
        """Wait until ``expected`` messages reached a hook; the time.monotonic() of that."""
        deadline = time.monotonic() + timeout
        while (arrived := int(self.redis.get(self.count_key) or 0)) < expected:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {arrived} of {expected} messages reached a hook")
            time.sleep(0.005)
        return time.monotonic()

    def close(self) -> None:
        for worker in self.workers:
            worker.stop(timeout=20)
        self.simulator.stop()
        with app.connection_for_write() as connection:
            for name in self.queues:
                channel: Any = connection.channel()
                with contextlib.suppress(Exception):
                    channel.queue_delete(queue=name)
                with contextlib.suppress(Exception):
                    channel.exchange_delete(exchange=name)
        self.redis.delete(self.count_key)


def campaign(bench: Bench, size: int) -> list[dict[str, Any]]:
    rng = random.Random(size)
    found = bench.fresh_numbers(size)
    bench.simulator.block("sms", *rng.sample(found, size // 20))
    return [
        {
            "id": f"m{index}",
            "channel": "sms",
            "to": number,
            "fallback": ["whatsapp"],
            "template": "order_shipped",
            "params": {"name": "Asha", "order": index},
        }
        for index, number in enumerate(found)
    ]


def throughput(bench: Bench, queue: str, size: int, rounds: int, chunk: int) -> dict[str, float]:
    """Messages per second, best of ``rounds``, with and without the filter, in tasks of
    ``chunk`` messages."""
    from blockfilter.tasks import filter_campaign

    best = {"with": 0.0, "without": 0.0}
    requests = 0
    for _ in range(rounds):
        for kind in ("without", "with"):
            messages = campaign(bench, size)
            bench.reset_count()
            bench.simulator.reset_stats()
            started = time.monotonic()
            if kind == "with":
                filter_campaign(messages, chunk, app=app, queue=queue)
            else:
                with app.producer_or_acquire() as producer:
                    for start in range(0, size, chunk):
                        passthrough.apply_async(
                            (messages[start : start + chunk],), queue=queue, producer=producer
                        )
            finished = bench.wait_count(size)
            best[kind] = max(best[kind], size / (finished - started))
            if kind == "with":
                requests = bench.simulator.stats.requests
    return {**best, "requests": requests, "chunk": chunk}


def warm_throughput(bench: Bench, queue: str, size: int, repeat: int, chunk: int) -> dict[str, Any]:
    """Messages per second through a worker with a warm Redis cache, with and without the
    filter, in tasks of ``chunk`` messages: ``repeat`` alternated rounds."""
    from blockfilter.tasks import filter_campaign

    with_rates: list[float] = []
    without_rates: list[float] = []
    requests = 0

    def filtered(messages: list[dict[str, Any]]) -> None:
        filter_campaign(messages, chunk, app=app, queue=queue)

    def passed(messages: list[dict[str, Any]]) -> None:
        with app.producer_or_acquire() as producer:
            for start in range(0, size, chunk):
                passthrough.apply_async(
                    (messages[start : start + chunk],), queue=queue, producer=producer
                )

    def timed(send: Any, messages: list[dict[str, Any]]) -> float:
        bench.reset_count()
        started = time.monotonic()
        send(messages)
        return size / (bench.wait_count(size) - started)

    for _ in range(repeat):
        messages = campaign(bench, size)
        timed(filtered, messages)  # cold: fills the cache
        bench.simulator.reset_stats()
        with_rates.append(timed(filtered, messages))
        requests += bench.simulator.stats.requests
        without_rates.append(timed(passed, messages))
    ratios = [w / wo for w, wo in zip(with_rates, without_rates, strict=True)]
    return {
        "chunk": chunk,
        "with": with_rates,
        "without": without_rates,
        "ratio": ratios,
        "requests": requests,
    }


def spread(values: list[float], digits: int) -> str:
    return " / ".join(
        f"{v:,.{digits}f}" for v in (min(values), statistics.median(values), max(values))
    )


def collector_fill(bench: Bench, queue: str, rate: int, seconds: float) -> dict[str, float]:
    """Send SMS messages one at a time at ``rate`` for ``seconds``; the batch fill."""
    count = max(1, int(rate * seconds))
    messages = [
        {"id": f"c{rate}-{index}", "channel": "sms", "to": number}
        for index, number in enumerate(bench.fresh_numbers(count))
    ]
    bench.reset_count()
    bench.simulator.reset_stats()
    started = time.monotonic()
    with app.producer_or_acquire() as producer:
        for index, message in enumerate(messages):
            app.send_task("blockfilter.collect", args=[message], queue=queue, producer=producer)
            # Paced: message n leaves at n / rate seconds (a burst catches up if we lag).
            ahead = started + (index + 1) / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
    sent_s = time.monotonic() - started
    bench.wait_count(count)
    time.sleep(0.2)
    stats = bench.simulator.snapshot(records=True)
    sizes = [size for _, _, size, _ in stats.records]
    return {
        "rate": rate,
        "achieved": count / sent_s,
        "messages": count,
        "requests": len(sizes),
        "mean_fill": sum(sizes) / len(sizes) if sizes else 0.0,
        "full": sum(1 for s in sizes if s == 100) / len(sizes) if sizes else 0.0,
    }


def warm_table(warm: list[dict[str, Any]], args: Any) -> list[str]:
    lines = [
        "## Throughput with a warm Redis cache",
        "",
        "| messages per task | without the filter, msg/s | with the filter, msg/s "
        "| with / without | API requests |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in warm:
        lines.append(
            f"| {row['chunk']:,} | {spread(row['without'], 0)} | {spread(row['with'], 0)} "
            f"| {spread(row['ratio'], 2)} | {row['requests']} |"
        )
    lines += [
        "",
        f"{args.messages:,} distinct numbers per round (as above), on a worker whose "
        f"`BLOCKFILTER_CACHE_URL` is Redis: each round sends the campaign through the filter "
        "once to fill the cache, then again, measured (every status from the cache: no API "
        "request), then through the passthrough. Min / median / max of "
        f"{args.warm_repeat} alternated rounds; the ratios are each round's own.",
        "",
    ]
    return lines


def table(
    throughputs: list[dict[str, float]],
    fills: list[dict[str, float]],
    args: Any,
    warm: list[dict[str, Any]] | None = None,
) -> str:
    lines = [
        "# Pipeline benchmark",
        "",
        f"`benchmarks/bench_pipeline.py --messages {args.messages} --concurrency "
        f"{args.concurrency} --rounds {args.rounds}`, "
        f"{datetime.now(timezone.utc).strftime('%Y-%m-%d')}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs; RabbitMQ broker, simulator latency {LATENCY_S * 1000:.0f} ms "
        f"(in the benchmark's process), one worker (prefork, {args.concurrency} processes).",
        "",
        "## Throughput: the same worker with and without the filter",
        "",
        "| messages per task | without the filter, msg/s | with the filter, msg/s "
        "| with / without | API requests |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in throughputs:
        lines.append(
            f"| {row['chunk']:,.0f} | {row['without']:,.0f} | {row['with']:,.0f} "
            f"| {row['with'] / row['without']:.2f} | {row['requests']:.0f} |"
        )
    lines += [
        "",
        f"{args.messages:,} distinct numbers per run, 5% blocklisted on SMS with a WhatsApp "
        "fallback; best of the rounds, from the first message sent to the last one at a hook. "
        "Without the filter: `bench.passthrough`, a task that hands its messages straight to "
        "the same `blockfilter_dispatch` hook. With it: `filter_campaign` (which splits the "
        "campaign, in the sending process) and `blockfilter.filter_messages` tasks. A filtered "
        "task waits for at least two API round trips (its numbers, then the fallback round "
        "for the blocklisted ones), so throughput is latency-bound: it grows with worker "
        "processes and with messages per task (up to `BLOCKFILTER_CONCURRENCY` requests, 16, "
        "in flight per task).",
        "",
        *warm_table(warm or [], args),
        "## Collector: batch fill at several arrival rates",
        "",
        "| target msg/s | achieved msg/s | messages | API requests | mean numbers/request "
        "| full requests |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for fill in fills:
        lines.append(
            f"| {fill['rate']:,.0f} | {fill['achieved']:,.0f} | {fill['messages']:,.0f} "
            f"| {fill['requests']:.0f} | {fill['mean_fill']:.1f} | {fill['full']:.0%} |"
        )
    lines += [
        "",
        "SMS only, distinct numbers, one `blockfilter.collect` task per message (sent by one "
        'Python process: "achieved" is as fast as it could publish); a collector worker '
        f"({args.collector_concurrency} processes, unlimited prefetch) with the default "
        "settings: a batch leaves at 100 distinct numbers on a channel, or once its oldest "
        "message has waited 1 s. At low rates the wait decides (about rate x 1 s numbers per "
        "request).",
        "",
    ]
    return "\n".join(lines)


@contextlib.contextmanager
def bench_run(concurrency: int) -> Iterator[Bench]:
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(Path(tmp), concurrency)
        try:
            yield bench
        finally:
            bench.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=40_000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--collector-concurrency", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=4.0, help="per collector rate")
    parser.add_argument("--warm-repeat", type=int, default=3, help="alternated warm rounds")
    parser.add_argument(
        "--warm-only", action="store_true", help="only the warm Redis comparison (printed)"
    )
    args = parser.parse_args()

    with bench_run(args.concurrency) as bench:
        queue = f"bench.{bench.unique}"
        warm_queue = f"bench.{bench.unique}.warm"
        collect_queue = f"bench.{bench.unique}.collect"
        bench.start_worker(
            warm_queue,
            args.concurrency,
            BLOCKFILTER_CACHE_URL=WARM_CACHE_URL,
            BLOCKFILTER_CACHE_SECRET=uuid.uuid4().hex,
            BLOCKFILTER_CACHE_TTL=str(WARM_CACHE_TTL_S),
            BLOCKFILTER_CACHE_TTL_BLOCKED=str(WARM_CACHE_TTL_S),
        )
        warm = [
            warm_throughput(bench, warm_queue, args.messages, args.warm_repeat, chunk)
            for chunk in CHUNKS
        ]
        if args.warm_only:
            print("\n".join(warm_table(warm, args)))
            return
        bench.start_worker(queue, args.concurrency)
        bench.start_worker(collect_queue, args.collector_concurrency, BENCH_PREFETCH_MULTIPLIER="0")
        throughputs = [
            throughput(bench, queue, args.messages, args.rounds, chunk) for chunk in CHUNKS
        ]
        fills = [
            collector_fill(bench, collect_queue, rate, max(args.seconds, 200 / rate))
            for rate in RATES
        ]
    text = table(throughputs, fills, args, warm)
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text, encoding="utf-8")
    print(f"(saved to {RESULTS.relative_to(HERE.parent)})")


if __name__ == "__main__":
    main()
