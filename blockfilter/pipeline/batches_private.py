"""What the collector needs of celery-batches beyond its public API, all in one place.

celery-batches' :class:`~celery_batches.Batches` offers, to override or to set: its
``flush_every`` and ``flush_interval`` options, ``Strategy()`` and ``flush(requests)``; and
:class:`~celery_batches.SimpleRequest` and :func:`celery_batches.trace.apply_batches_task`
to run a batch in the pool. The collector decides itself when a batch leaves (per channel,
by age, at ``MAX_BUFFER``), so it needs three private parts too, used only through this
module and checked by :func:`check_supported` when a worker builds the collector's strategy
(and by ``tests/test_collector.py`` against the installed version, in the pin's range):

* ``_buffer``: the queue Batches' message handler puts each request into. The handler binds
  ``self._buffer.put`` when ``Strategy()`` builds it, so a buffer installed just before sees
  every request as it arrives (:func:`install_buffer`).
* ``_pending``: the requests whose ETA is not due yet; they count toward ``MAX_BUFFER``
  (:func:`pending_count`).
* ``_do_flush()``: Batches' flush of everything waiting, which sorts out the ETAs (the due
  ones leave, the others wait in ``_pending``) and calls ``flush()`` with the rest
  (:func:`flush_everything`). Written out again here, it would be a copy to keep in step.
"""

from __future__ import annotations

from queue import Queue
from typing import Any

from celery_batches import Batches

from ..errors import UnsupportedBatches


def check_supported(task: Batches) -> None:
    """Raise :class:`UnsupportedBatches` unless ``task`` has the private parts used here."""
    missing = [
        name
        for name, kind in (("_buffer", Queue), ("_pending", Queue))
        if not isinstance(getattr(task, name, None), kind)
    ]
    if not callable(getattr(Batches, "_do_flush", None)):
        missing.append("_do_flush()")
    if missing:
        raise UnsupportedBatches(
            f"this celery-batches has no {', '.join(missing)} of the kind blockfilter.collect "
            "relies on; install a version within blockfilter's pin (celery-batches<1)"
        )


def install_buffer(task: Batches, buffer: Queue[Any]) -> None:
    """Make ``buffer`` the queue Batches puts requests into; call it before ``Strategy()``."""
    task._buffer = buffer


def pending_count(task: Batches) -> int:
    """How many requests wait for their ETA in Batches' own queue."""
    return task._pending.qsize()


def flush_everything(task: Batches) -> None:
    """Batches' flush of every request waiting whose ETA (if any) is due."""
    Batches._do_flush(task)
