"""The pipeline's Celery app, with blockfilter's tasks registered in it.

    celery -A sms_pipeline.celery_app worker -Q sms_pipeline -c 4
    SMS_PIPELINE_COLLECTOR=1 celery -A sms_pipeline.celery_app worker -Q sms_pipeline.collect

Configured from the environment: ``SMS_PIPELINE_BROKER_URL`` (default: RabbitMQ on
localhost), ``SMS_PIPELINE_RESULT_BACKEND`` (default ``rpc://``, results over the broker),
``SMS_PIPELINE_QUEUE`` (default ``sms_pipeline``). blockfilter's own settings
(``KALEYRA_SID``, ``KALEYRA_API_KEY``, ``BLOCKFILTER_*``) come from the environment too; they
could equally be set here in lower case (``app.conf.blockfilter_on_error = "defer"``).
"""

from __future__ import annotations

import os

from celery import Celery

QUEUE = os.environ.get("SMS_PIPELINE_QUEUE", "sms_pipeline")

app = Celery(
    "sms_pipeline",
    broker=os.environ.get("SMS_PIPELINE_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//"),
    backend=os.environ.get("SMS_PIPELINE_RESULT_BACKEND", "rpc://"),
)
app.conf.update(
    task_default_queue=QUEUE,
    # Messages sent one at a time go to the collector's queue (see blockfilter.pipeline.collector).
    task_routes={"blockfilter.collect": {"queue": f"{QUEUE}.collect"}},
    # Messages whose check could not be made wait here for `blockfilter replay`.
    blockfilter_deferred_queue=f"{QUEUE}.deferred",
    worker_prefetch_multiplier=1,
)
# blockfilter's tasks live in the library; the app is ours.
app.autodiscover_tasks(["blockfilter"])
app.autodiscover_tasks(["blockfilter"], related_name="collector")


if os.environ.get("SMS_PIPELINE_COLLECTOR") == "1":
    # A worker for the collector's queue must be able to hold a batch: no prefetch limit.
    # (On the command line, Celery takes --prefetch-multiplier=0 as "not given".)
    app.conf.worker_prefetch_multiplier = 0
