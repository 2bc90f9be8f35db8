"""``blockfilter demo``: the whole job through Celery, on embedded defaults.

No credentials and no server to install. In this one process the demo starts:

* the Kaleyra simulator, with a sample blocklist;
* a Celery app of the demo's own on kombu's in-memory transport (``memory://``) with an
  in-memory result backend (``cache+memory://``), and a worker for it in a thread;
* a demo plugin on the plugin manager for the run: its ``blockfilter_dispatch`` and
  ``blockfilter_suppressed`` hooks collect what would be sent and what would not.

Then the sample campaign goes through the real tasks (:func:`blockfilter.tasks.filter_campaign`,
i.e. a group of ``blockfilter.filter_messages`` tasks), and the report says what became of
every message. The settings point at the simulator through the app's ``conf``
(``kaleyra_base_url``...), so nothing in the environment is read for them or changed; no
installed plugin is loaded (a pipeline's dispatch hook must not send the demo's messages).

A real pipeline never creates an app of blockfilter's: it registers the tasks in its own
(``app.autodiscover_tasks(["blockfilter"])``). The demo's app is the demo's alone.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..plugins.hookspecs import hookimpl

DEMO_SID = "DEMO"
DEMO_KEY = "demo-key-not-a-secret"
#: The demo plugin's name on the plugin manager, for the run only.
DEMO_PLUGIN = "blockfilter-demo"
#: About how many messages each ``filter_messages`` task of the demo gets (at least)...
DEMO_CHUNK_SIZE = 250
#: ...and about how many tasks a large demo campaign is split into (at most).
DEMO_MAX_TASKS = 32
#: Worker threads of the demo's in-process worker.
DEMO_CONCURRENCY = 4


# -- the sample data -------------------------------------------------------------------------


def sample_numbers(count: int, seed: int = 7) -> list[str]:
    """Distinct valid Indian mobile numbers, the same for the same seed."""
    rng = random.Random(seed)
    numbers: dict[str, None] = {}
    while len(numbers) < count:
        numbers[f"+91{rng.choice('6789')}{rng.randrange(10**9):09d}"] = None
    return list(numbers)


def sample_blocklist(numbers: list[str], seed: int = 7) -> dict[str, list[str]]:
    """About 8% of the numbers blocklisted on SMS, some of those on WhatsApp and voice too."""
    rng = random.Random(seed + 1)
    sms = [n for n in numbers if rng.random() < 0.08]
    whatsapp = [n for n in sms if rng.random() < 0.4] + [n for n in numbers if rng.random() < 0.02]
    voice = [n for n in whatsapp if rng.random() < 0.5]
    return {"sms": sms, "whatsapp": whatsapp, "voice": voice}


def sample_campaign(count: int, numbers: list[str], seed: int = 7) -> list[dict[str, Any]]:
    """A campaign like real ones: mostly SMS with a WhatsApp/voice fallback, repeats of
    numbers, a few national-format numbers, and a few broken messages."""
    rng = random.Random(seed + 2)
    messages: list[dict[str, Any]] = []
    for index in range(count):
        number = rng.choice(numbers)
        message: dict[str, Any] = {
            "id": f"m{index:06d}",
            "channel": "sms",
            "to": number,
            "text": "Your order has shipped 📦",
        }
        roll = rng.random()
        if roll < 0.5:
            message["fallback"] = ["whatsapp", "voice"]
        elif roll < 0.6:
            message["channel"] = "whatsapp"
        elif roll < 0.65:
            message["to"] = "0" + number[3:8] + " " + number[8:]
            message["region"] = "IN"
        elif roll < 0.66:
            message["to"] = "+91 12345"  # too short: invalid
        elif roll < 0.665:
            message["channel"] = "pigeon"  # unknown channel: invalid
        messages.append(message)
    return messages


def distinct_for(messages: int) -> int:
    """How many distinct numbers a demo campaign of ``messages`` draws from."""
    return max(10, messages // 4)


@contextmanager
def demo_simulator(distinct: int, latency: float = 0.02) -> Iterator[Any]:
    """The simulator with the sample blocklist of ``distinct`` numbers; yields it and them."""
    from .simulator import Simulator

    numbers = sample_numbers(distinct)
    simulator = Simulator(
        sample_blocklist(numbers), sid=DEMO_SID, api_key=DEMO_KEY, latency=latency
    )
    simulator.start()
    try:
        yield simulator, numbers
    finally:
        simulator.stop()


# -- the demo's pipeline ---------------------------------------------------------------------


class DemoPipeline:
    """The demo's plugin: a pipeline that "sends" by keeping what reached its hooks.

    Hooks run in the worker's threads, hence the lock. ``deliveries`` counts every id that
    reached a hook: the demo checks that each message got there exactly once.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.by_verdict: Counter[str] = Counter()
        self.deliveries: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        self.examples: dict[str, dict[str, Any]] = {}
        #: A few numbers "sent" by SMS, for the provider to report on (the loop).
        self.sent_by_sms: list[str] = []

    def _keep(self, hook: str, messages: list[dict[str, Any]]) -> None:
        with self._lock:
            self.calls[hook] += 1
            for message in messages:
                verdict = str(message.get("verdict"))
                if (
                    verdict == "allowed"
                    and message.get("channel") == "sms"
                    and len(self.sent_by_sms) < 8
                ):
                    self.sent_by_sms.append(str(message["e164"]))
                self.by_verdict[verdict] += 1
                self.deliveries[str(message.get("id"))] += 1
                self.examples.setdefault(verdict, dict(message))

    @hookimpl
    def blockfilter_dispatch(self, messages: list[dict[str, Any]]) -> None:
        self._keep("dispatch", messages)

    @hookimpl
    def blockfilter_suppressed(self, messages: list[dict[str, Any]]) -> None:
        self._keep("suppressed", messages)


def make_demo_app(
    base_url: str, ledger_url: str | None = None, ledger_key: str | None = None
) -> Any:
    """The demo's Celery app: in-memory broker and results, settings for the simulator and
    the demo's own opt-out ledger (a SQLite file of its own, a key made for the run)."""
    from celery import Celery

    app = Celery("blockfilter-demo", set_as_current=False)
    app.conf.update(
        broker_url="memory://localhost/",
        result_backend="cache+memory://",
        # The in-memory transport polls; the default second would dominate a short run.
        broker_transport_options={"polling_interval": 0.01},
        broker_connection_retry_on_startup=True,
        task_default_queue="blockfilter-demo",
        # Enough to hold the whole campaign: the in-memory transport only notices acks (and
        # takes more) once per 2 s drain cycle when its prefetch window is full.
        worker_prefetch_multiplier=64,
        worker_enable_remote_control=False,
        worker_send_task_events=False,
        worker_hijack_root_logger=False,
        # blockfilter's settings, lower case, as any app may hold them; they take precedence
        # over the environment, which the demo neither needs nor changes.
        kaleyra_sid=DEMO_SID,
        kaleyra_api_key=DEMO_KEY,
        kaleyra_base_url=base_url,
        blockfilter_cache_url="memory://",
        blockfilter_on_error="defer",
        # Only the built-ins and the demo's plugin: an installed pipeline must not "send".
        blockfilter_load_plugins=[],
        blockfilter_disable_plugins=[],
        blockfilter_strict_plugins=False,
        blockfilter_task_retry_backoff=0.2,
        blockfilter_optout_url=ledger_url,
        blockfilter_optout_key=ledger_key,
    )
    app.autodiscover_tasks(["blockfilter"], force=True)
    return app


@contextmanager
def demo_plugin(app: Any) -> Iterator[DemoPipeline]:
    """Register a :class:`DemoPipeline` on the plugin manager the app's tasks use."""
    from ..config import load_settings
    from ..plugins.manager import get_plugin_manager

    pm = get_plugin_manager(load_settings(celery_conf=app.conf))
    if pm.get_plugin(DEMO_PLUGIN) is not None:  # a run before this one, in this process
        pm.unregister(name=DEMO_PLUGIN)
    pipeline = DemoPipeline()
    pm.register(pipeline, name=DEMO_PLUGIN)
    try:
        yield pipeline
    finally:
        if pm.get_plugin(DEMO_PLUGIN) is pipeline:
            pm.unregister(name=DEMO_PLUGIN)


@contextmanager
def in_process_worker(app: Any, concurrency: int = DEMO_CONCURRENCY) -> Iterator[Any]:
    """A Celery worker for ``app`` in a thread of this process (pool ``threads``).

    As :func:`celery.contrib.testing.worker.start_worker` does, with a quicker stop: the
    consumer loop of a polling transport (``memory://``) looks at the stop flag between
    2-second waits for a message, and waits once more after seeing it; two no-op tasks wake
    it both times instead of letting a short demo idle for 4 seconds.
    """
    from celery.contrib.testing.worker import TestWorkController
    from celery.utils.nodenames import anon_nodename
    from celery.worker import state

    app.finalize()
    # The threads pool runs tasks by name in the default app (as start_worker arranges too):
    # in the demo's process, that is the demo's app.
    app.set_current()
    app.set_default()
    worker = TestWorkController(
        app=app,
        concurrency=concurrency,
        hostname=anon_nodename(),
        pool="threads",
        loglevel="ERROR",
        ready_callback=None,
        without_heartbeat=True,
        without_mingle=True,
        without_gossip=True,
    )
    thread = threading.Thread(target=worker.start, name="blockfilter-demo-worker", daemon=True)
    thread.start()
    # TestWorkController.ensure_started() would wait forever on a worker that died starting.
    deadline = time.monotonic() + 30.0
    started: threading.Event = worker._on_started  # type: ignore[attr-defined]
    while not started.wait(0.05):
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the demo's in-process Celery worker did not start")
    try:
        yield worker
    finally:
        state.should_terminate = 0  # type: ignore[assignment]
        try:
            for _ in range(2):
                app.send_task("celery.accumulate", args=(0,), ignore_result=True)
            thread.join(30.0)
        finally:
            state.should_terminate = None


@contextmanager
def counting_tasks(app: Any) -> Iterator[Counter[str]]:
    """Count the tasks the app's workers ran, by name, while the block runs."""
    from celery import signals

    counts: Counter[str] = Counter()
    lock = threading.Lock()

    def ran(sender: Any = None, task: Any = None, **_: Any) -> None:
        if task is not None and task.app is app:
            with lock:
                counts[task.name] += 1

    signals.task_postrun.connect(ran, weak=False)
    try:
        yield counts
    finally:
        signals.task_postrun.disconnect(ran)


def run_demo(messages: int = 2000, *, timeout: float = 60.0) -> dict[str, Any]:
    """Run the sample campaign through the Celery tasks against the embedded simulator.

    :param messages: the campaign's size.
    :param timeout: seconds to wait for the tasks.
    :return: the report (see :func:`format_report`); JSON-serialisable.
    """
    import tempfile

    from celery.result import allow_join_result

    from ..ledger.crypto import generate_secret
    from ..ledger.ledger import forget_shared_ledgers
    from ..tasks import TASK_NAME, filter_campaign, merge_summaries

    with (
        demo_simulator(distinct_for(messages)) as (simulator, numbers),
        tempfile.TemporaryDirectory(prefix="blockfilter-demo-") as ledger_dir,
    ):
        campaign = sample_campaign(messages, numbers)
        app = make_demo_app(
            simulator.base_url, f"sqlite:///{ledger_dir}/optout.sqlite3", generate_secret()
        )
        try:
            with (
                demo_plugin(app) as pipeline,
                counting_tasks(app) as tasks_run,
                in_process_worker(app),
            ):
                started = time.monotonic()
                # Several tasks, but not so many that they overflow the prefetch window.
                chunk_size = max(DEMO_CHUNK_SIZE, math.ceil(messages / DEMO_MAX_TASKS))
                result = filter_campaign(campaign, chunk_size, app=app)
                # A worker in this process marks every thread as "inside a task", where
                # waiting on a result would deadlock; this thread is not one of its threads.
                with allow_join_result():
                    summaries = result.get(timeout=timeout, interval=0.02, propagate=True)
                elapsed = time.monotonic() - started
                stats = simulator.stats
                with allow_join_result():
                    loop = close_the_loop(app, pipeline, timeout)
        finally:
            app.close()
            forget_shared_ledgers()

    summary = merge_summaries(summaries)
    repeats = sum(n - 1 for n in pipeline.deliveries.values() if n > 1)
    primary: dict[str, set[Any]] = {}
    for message in campaign:
        channel = str(message.get("channel", "")).lower()
        primary.setdefault(channel, set()).add(message.get("to"))
    return {
        "messages": len(campaign),
        "dispatched": pipeline.by_verdict["allowed"],
        "rerouted": pipeline.by_verdict["rerouted"],
        "blocked": pipeline.by_verdict["blocked"],
        "invalid": pipeline.by_verdict["invalid"],
        "deferred": pipeline.by_verdict["deferred"],
        "reached_hooks": len(pipeline.deliveries),
        "repeats": repeats,
        "hook_calls": dict(pipeline.calls),
        "requests": stats.requests,
        "numbers_asked": stats.numbers_asked,
        "tasks": tasks_run[TASK_NAME],
        "elapsed_s": round(elapsed, 3),
        "summary": summary,
        "examples": [pipeline.examples[v] for v in sorted(pipeline.examples)],
        "primary_lower_bound": sum(math.ceil(len(v) / 100) for v in primary.values() if v),
        "loop": loop,
    }


def close_the_loop(app: Any, pipeline: DemoPipeline, timeout: float) -> dict[str, Any]:
    """The provider reports ``NOT-SENT/OPT-OUT`` for a number the campaign just sent; the next
    batch to it is suppressed by the ledger, though Kaleyra (and the cache) still say clean."""
    from ..ledger.tasks import SEND_RESULTS_TASK
    from ..redact import mask_number
    from ..tasks import TASK_NAME

    if len(pipeline.sent_by_sms) < 2:
        return {}
    target, other = pipeline.sent_by_sms[:2]
    result = {"to": target, "channel": "sms", "provider": "kaleyra", "code": "NOT-SENT/OPT-OUT"}
    report = app.send_task(SEND_RESULTS_TASK, args=[[{**result, "id": "demo-dlr-1"}]]).get(
        timeout=timeout
    )
    with demo_plugin(app) as after:  # the next batch's own hooks
        next_batch = [
            {"id": "next-1", "channel": "sms", "to": target, "text": "Your order is out"},
            {"id": "next-2", "channel": "sms", "to": other, "text": "Your order is out"},
        ]
        summary = app.send_task(TASK_NAME, args=[next_batch]).get(timeout=timeout)
    suppressed = dict(after.examples.get("blocked") or {})
    return {
        "reported": mask_number(target),
        "recorded": report["opted_out"],
        "next_batch": {
            "dispatched": after.by_verdict["allowed"],
            "blocked": after.by_verdict["blocked"],
        },
        "blocked_by": suppressed.get("source"),
        "summary": summary,
    }


def format_report(report: dict[str, Any]) -> str:
    """The human report of :func:`run_demo`."""
    lines = [
        "blockfilter demo: a sample campaign through Celery tasks, against the embedded",
        "Kaleyra simulator (in-memory broker, worker in this process)",
        "",
        f"  messages    {report['messages']:>7}",
        f"  dispatched  {report['dispatched']:>7}   (allowed: sent on their channel)",
        f"  rerouted    {report['rerouted']:>7}   (blocklisted, sent on a fallback channel)",
        f"  blocked     {report['blocked']:>7}   (blocklisted on every channel offered)",
        f"  invalid     {report['invalid']:>7}   (unusable message or number)",
        f"  deferred    {report['deferred']:>7}   (could not be checked)",
        "",
        f"  API requests made  {report['requests']}  (numbers asked: {report['numbers_asked']})",
        f"  tasks run          {report['tasks']}  (blockfilter.filter_messages)",
        f"  hook calls         {report['hook_calls'].get('dispatch', 0)} dispatch, "
        f"{report['hook_calls'].get('suppressed', 0)} suppressed; "
        f"{report['reached_hooks']} messages reached them, {report['repeats']} repeats",
        f"  elapsed            {report['elapsed_s']:.2f} s",
        "",
        "  one record of each verdict:",
    ]
    for example in report["examples"]:
        shown = {k: v for k, v in example.items() if k != "text"}
        lines.append(f"    {shown}")
    loop = report.get("loop") or {}
    if loop:
        lines += [
            "",
            "  the loop (send -> result -> ledger -> next check):",
            f"    the provider reported NOT-SENT/OPT-OUT for {loop['reported']}, sent above;",
            f"    blockfilter.send_results recorded {loop['recorded']} opt-out in the ledger;",
            f"    the next batch: {loop['next_batch']['blocked']} message to it blocked "
            f"(source: {loop['blocked_by']}), {loop['next_batch']['dispatched']} other sent",
        ]
    return "\n".join(lines)
