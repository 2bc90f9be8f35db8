"""The Celery app of a test worker: ``celery -A tests.support.app worker ...``.

Configured from ``BFTEST_*`` variables set by the test that starts the worker;
``BFTEST_EXTRA_CONF`` (a JSON object) adds conf keys of the test's own
(``{"result_extended": true}``).
"""

from __future__ import annotations

import json
import os

from tests.support.factory import make_app

_visibility = os.environ.get("BFTEST_VISIBILITY_TIMEOUT")

app = make_app(
    broker=os.environ.get("BFTEST_BROKER_URL", "memory://"),
    backend=os.environ.get("BFTEST_RESULT_BACKEND", "cache+memory://"),
    queue=os.environ.get("BFTEST_QUEUE", "bftest"),
    deferred_queue=os.environ.get("BFTEST_DEFERRED_QUEUE", "bftest.deferred"),
    keyprefix=os.environ.get("BFTEST_KEYPREFIX", "bftest:"),
    visibility_timeout=float(_visibility) if _visibility else None,
)
app.conf.update(json.loads(os.environ.get("BFTEST_EXTRA_CONF") or "{}"))
