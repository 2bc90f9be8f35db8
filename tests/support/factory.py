"""Builds the test Celery app; shared by the worker (``app.py``) and the test process.

Every test gets its own queue names and Redis key prefix, so parallel runs and the machine's
shared brokers are not disturbed.
"""

from __future__ import annotations

from typing import Any

from celery import Celery


def make_app(
    *,
    broker: str,
    backend: str,
    queue: str,
    deferred_queue: str,
    keyprefix: str,
    visibility_timeout: float | None = None,
) -> Celery:
    """A Celery app as a user's pipeline would have one, configured for a test."""
    app = Celery("bftest", broker=broker, backend=backend, set_as_current=False)
    transport: dict[str, Any] = {}
    if broker.startswith("redis"):
        # Isolate every kombu key (queues, bindings, the unacked index) under the test's prefix.
        transport["global_keyprefix"] = keyprefix
        if visibility_timeout is not None:
            # A killed worker's batches come back after this long; sweep for them every second.
            transport["visibility_timeout"] = visibility_timeout
            transport["unacked_restore_interval"] = 1
            transport["unacked_restore_throttle"] = 1
    app.conf.update(
        task_default_queue=queue,
        blockfilter_deferred_queue=deferred_queue,
        broker_transport_options=transport,
        result_backend_transport_options={"global_keyprefix": keyprefix},
        result_expires=900,
        # No pidbox or event queues left behind on the shared broker.
        worker_enable_remote_control=False,
        worker_send_task_events=False,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        worker_redirect_stdouts=False,
    )
    # The documented way a user registers the library's tasks.
    app.autodiscover_tasks(["blockfilter"])
    return app
