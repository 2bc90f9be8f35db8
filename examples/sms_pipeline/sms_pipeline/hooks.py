"""The pipeline's blockfilter plugin, found through its entry point (``pyproject.toml``)::

    [project.entry-points.blockfilter]
    sms-pipeline = "sms_pipeline.hooks"

blockfilter calls these in the Celery worker, per batch, with keyword arguments.
"""

from __future__ import annotations

from typing import Any

from blockfilter import Settings, hookimpl

from . import store


@hookimpl
def blockfilter_startup(settings: Settings) -> None:
    # Once per worker process: the tables exist before the first batch.
    store.create_tables()


@hookimpl
def blockfilter_dispatch(messages: list[dict[str, Any]]) -> None:
    # Allowed and rerouted messages: send each on its (possibly new) channel. A repeat of an
    # id (a batch run again after a crash) is recognised and not sent twice.
    store.send(messages)


@hookimpl
def blockfilter_suppressed(messages: list[dict[str, Any]]) -> None:
    # Blocked, invalid, and deferred for good: keep a record of why each was not sent.
    store.suppress(messages)


@hookimpl
def blockfilter_blocklisted(channel: str, numbers: list[str]) -> list[str]:
    # The pipeline's own opt-out table, joined to Kaleyra's blocklist: a number on either is
    # not contacted on that channel (and a fallback channel is tried, if the message has one).
    return store.opted_out(channel, numbers)
