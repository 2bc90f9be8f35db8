"""An example pipeline: a Celery app whose messages go through blockfilter before they are sent.

* :mod:`sms_pipeline.hooks`: the blockfilter plugin (sending, suppressing, an opt-out table);
* :mod:`sms_pipeline.store`: the pipeline's own SQLite database (outbox, suppressed, opt-outs);
* :mod:`sms_pipeline.celery_app`: the Celery app, with blockfilter's tasks registered in it;
* ``python -m sms_pipeline``: send a campaign, add opt-outs, look at the outbox.
"""
