"""Prometheus metrics: what an operator watches (the ``blockfilter[metrics]`` extra).

Names and labels (counters end in ``_total``, durations are in seconds):

* ``blockfilter_verdicts_total{verdict, channel, reason}``: final verdicts handed to the
  hooks (or written by ``blockfilter filter``); ``channel`` is the final one.
* ``blockfilter_api_requests_total{outcome}``: HTTP attempts to Kaleyra, ``ok`` or the error
  code (``WA500``, ``timeout``, ``rate_limited``, ``RBC001``...), and
  ``blockfilter_api_request_duration_seconds``, a histogram of their durations.
* ``blockfilter_cache_hits_total``, ``blockfilter_cache_misses_total``: numbers the status
  cache answered, and could not.
* ``blockfilter_messages_parked_total{reason}``: messages put on the deferred queue;
  ``blockfilter_messages_replayed_total``: sent back through the filter by ``replay``.
* ``blockfilter_collector_batch_fill{channel}``: a histogram of the distinct numbers of one
  channel in a collector batch (100 fill a request).

``reason`` is the verdict's reason code, ``none`` when it has none (``allowed``).

A worker serves them on ``http://0.0.0.0:$BLOCKFILTER_METRICS_PORT/metrics`` when that
setting is given (:func:`serve_worker_metrics`, called when it starts). The prefork pool's
processes each count their own, so the worker uses prometheus-client's multiprocess mode: its
``PROMETHEUS_MULTIPROC_DIR`` (a fresh temporary directory unless set) holds every process's
values and the server adds them up. ``blockfilter filter --metrics-file FILE`` writes the
run's metrics in the text format (for node_exporter's textfile collector).

Without prometheus-client installed every recording function here does nothing; asking for
metrics (a port, a file) is then a configuration error naming the extra.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Final

from .errors import ConfigError

log = logging.getLogger("blockfilter.metrics")

NAMESPACE: Final = "blockfilter"
# Seconds; a request is cut at BLOCKFILTER_REQUEST_TIMEOUT (10 s by default).
LATENCY_BUCKETS: Final = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
FILL_BUCKETS: Final = (1, 10, 25, 50, 75, 90, 99, 100)
NO_REASON: Final = "none"

_lock = threading.Lock()
_metrics: _Metrics | None = None
# True while this process records nothing: prometheus-client is missing, or a command that
# writes no metrics said so (recording_nothing).
_missing = False


def available() -> bool:
    """Whether prometheus-client is installed."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        return False
    return True


def require() -> None:
    """:raises ConfigError: prometheus-client is not installed."""
    if not available():
        raise ConfigError(
            "metrics need prometheus-client: install blockfilter[metrics] "
            "(pip install 'blockfilter[metrics]')"
        )


class _Metrics:
    """The metric objects, made once per process on first use."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.verdicts = Counter(
            "verdicts",
            "Final verdicts, by verdict, channel and reason",
            ["verdict", "channel", "reason"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.api_requests = Counter(
            "api_requests",
            "HTTP attempts to the Kaleyra API, by outcome (ok or the error code)",
            ["outcome"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.api_latency = Histogram(
            "api_request_duration_seconds",
            "Time of one HTTP attempt to the Kaleyra API",
            namespace=NAMESPACE,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.cache_hits = Counter(
            "cache_hits", "Numbers answered from the status cache", namespace=NAMESPACE, registry=r
        )
        self.cache_misses = Counter(
            "cache_misses",
            "Numbers the status cache could not answer",
            namespace=NAMESPACE,
            registry=r,
        )
        self.parked = Counter(
            "messages_parked",
            "Messages put on the deferred queue, by reason",
            ["reason"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.replayed = Counter(
            "messages_replayed",
            "Messages sent from the deferred queue back through the filter",
            namespace=NAMESPACE,
            registry=r,
        )
        self.batch_fill = Histogram(
            "collector_batch_fill",
            "Distinct numbers of one channel in a collector batch (100 fill a request)",
            ["channel"],
            namespace=NAMESPACE,
            buckets=FILL_BUCKETS,
            registry=r,
        )


def _get() -> _Metrics | None:
    global _metrics, _missing
    if _metrics is not None or _missing:
        return _metrics
    with _lock:
        if _metrics is None and not _missing:
            if available():
                _metrics = _Metrics()
            else:
                _missing = True
    return _metrics


@contextmanager
def recording_nothing() -> Iterator[None]:
    """While inside, this process keeps no metrics: every recording function returns at once.

    For a command that shows no metrics (``blockfilter filter`` without ``--metrics-file``):
    importing prometheus-client and making the metric objects cost about as much CPU as
    filtering 30,000 messages, spent on figures nobody reads. Metrics made before are kept,
    and recorded into again once it is left (a test calling the command in its process).
    """
    global _metrics, _missing
    with _lock:
        saved = _metrics, _missing
        _metrics, _missing = None, True
    try:
        yield
    finally:
        with _lock:
            _metrics, _missing = saved


def registry() -> Any:
    """This process's registry (``None`` without prometheus-client)."""
    metrics = _get()
    return metrics.registry if metrics is not None else None


# -- recording (each a no-op without prometheus-client) ---------------------------------------


def count_verdicts(results: Iterable[Mapping[str, Any]]) -> None:
    metrics = _get()
    if metrics is None:
        return
    counts: dict[tuple[str, str, str], int] = {}
    for result in results:
        channel = result.get("channel")
        key = (
            str(result.get("verdict")),
            channel.lower() if isinstance(channel, str) else "unknown",
            str(result.get("reason") or NO_REASON),
        )
        counts[key] = counts.get(key, 0) + 1
    for (verdict, channel, reason), n in counts.items():
        metrics.verdicts.labels(verdict, channel, reason).inc(n)


def observe_api_request(outcome: str, seconds: float) -> None:
    metrics = _get()
    if metrics is not None:
        metrics.api_requests.labels(outcome).inc()
        metrics.api_latency.observe(seconds)


def count_cache(hits: int, misses: int) -> None:
    metrics = _get()
    if metrics is not None:
        if hits > 0:
            metrics.cache_hits.inc(hits)
        if misses > 0:
            metrics.cache_misses.inc(misses)


def count_parked(reason: str, n: int) -> None:
    metrics = _get()
    if metrics is not None and n:
        metrics.parked.labels(reason).inc(n)


def count_replayed(n: int) -> None:
    metrics = _get()
    if metrics is not None and n:
        metrics.replayed.inc(n)


def observe_batch_fill(numbers_by_channel: Mapping[str, int]) -> None:
    metrics = _get()
    if metrics is None:
        return
    for channel, numbers in numbers_by_channel.items():
        metrics.batch_fill.labels(channel).observe(numbers)


def count_run(engine: Any) -> None:
    """A filter run's cache hits and misses (call once per filter, after its run)."""
    hits = int(engine.summary.cache_hits)
    count_cache(hits, int(getattr(engine, "numbers_looked_up", 0)) - hits)


# -- exposing them ------------------------------------------------------------------------


def write_file(path: str) -> None:
    """Write this process's metrics to ``path`` in Prometheus' text format (atomically)."""
    require()
    from prometheus_client import write_to_textfile

    metrics = _get()
    assert metrics is not None
    write_to_textfile(path, metrics.registry)


def serve_worker_metrics(port: int, *, addr: str = "0.0.0.0") -> None:  # noqa: S104
    """Serve a worker's metrics, every pool process's added up, on ``port``.

    Call it in the worker's main process before the pool starts (the worker does, when
    ``BLOCKFILTER_METRICS_PORT`` is set): the pool processes must inherit the multiprocess
    directory.
    """
    require()
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        directory = tempfile.mkdtemp(prefix="blockfilter-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
    else:
        # prometheus-client's rule: the directory is wiped between runs of the program.
        for name in os.listdir(directory):
            if name.endswith(".db"):
                os.unlink(os.path.join(directory, name))
    from prometheus_client import CollectorRegistry, start_http_server, values
    from prometheus_client.multiprocess import MultiProcessCollector

    # The value class is chosen when prometheus-client is first imported: had the app
    # imported it before the directory was set, the metrics made from now on still share it.
    if values.ValueClass is values.MutexValue:
        values.ValueClass = values.get_value_class()
    served = CollectorRegistry()
    MultiProcessCollector(served)
    start_http_server(port, addr=addr, registry=served)
    log.info("metrics on http://%s:%d/metrics (multiprocess dir %s)", addr, port, directory)


def forget_process(pid: int) -> None:
    """A pool process ended: drop its live gauges (counters stay counted)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR") and available():
        from prometheus_client.multiprocess import mark_process_dead

        mark_process_dead(pid)
