"""blockfilter's Celery tasks, registered in your own app.

This is the module ``app.autodiscover_tasks(["blockfilter"])`` imports (or import it
yourself): importing it registers every task, ``blockfilter.filter_messages`` and
``blockfilter.collect`` (:mod:`blockfilter.pipeline`) and ``blockfilter.send_results``,
``blockfilter.inbound`` and ``blockfilter.optout`` (:mod:`blockfilter.ledger.tasks`), with the
worker's start-up checks and the monitoring guards that come with them. It only gathers
them: the tasks themselves import nothing from here, so no module imports itself back.

The names of :mod:`blockfilter.pipeline.tasks` (``filter_campaign``, ``merge_summaries``,
``filter_messages``...) are importable from here too, as before the package was split.
"""

from __future__ import annotations

import logging
from importlib import import_module

from ._moved import names_from
from .ledger import tasks as ledger_tasks  # noqa: F401  (send_results, inbound, optout)
from .pipeline.tasks import (  # noqa: F401  (the public names, as before)
    DEFERRED_QUEUE,
    TASK_NAME,
    filter_campaign,
    filter_messages,
    merge_summaries,
    park_deferred,
    split_campaign,
)

try:
    # blockfilter.collect needs celery-batches, the ``blockfilter[collector]`` extra (which pins
    # Celery below 5.7): without it the other tasks are registered all the same.
    collector = import_module(".pipeline.collector", __package__)
except ModuleNotFoundError as _missing:  # pragma: no cover - exercised by the Celery 5.7 CI run
    if _missing.name != "celery_batches":
        raise
    logging.getLogger("blockfilter.tasks").debug(
        "blockfilter.collect is not registered: install blockfilter[collector] for it"
    )


# Every other name of the tasks module, as ``blockfilter.tasks.X`` worked before the move.
__getattr__ = names_from("blockfilter.pipeline.tasks", __name__)
