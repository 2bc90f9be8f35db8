"""A :class:`~tests.support.harness.Stack` whose workers get settings of the test's own.

The failure tests need smaller budgets than the harness's defaults (so a fault matrix runs in
minutes) or another cache (a private Redis that the test kills); they also drain the deferred
queue between cases, so one worker can serve many cases.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, cast

from tests.support.harness import Stack


@dataclass
class TunedStack(Stack):
    """A stack whose worker environment is the harness's, updated with ``overrides``."""

    overrides: dict[str, str] = field(default_factory=dict)

    def worker_env(self) -> dict[str, str]:
        env = super().worker_env()
        env.update(self.overrides)
        return env

    def clear_records(self) -> None:
        """Forget what the test plugin recorded so far (between the cases of one worker)."""
        self.redis.delete(self.record_key)

    def worker_logs(self, tail: int = 4000) -> str:
        return "\n".join(w.log_text()[-tail:] for w in self.workers)

    def drain_deferred(self, expected: int, timeout: float = 10.0, grace: float = 0.5) -> list[Any]:
        """Take (and acknowledge) every message on the deferred queue; returns their bodies.

        Waits up to ``timeout`` for ``expected`` of them, then ``grace`` more for any extra
        one: a message another connection published a moment ago may not be counted yet.
        """
        from blockfilter.tasks import deferred_queue

        bodies: list[Any] = []
        with self.app.connection_for_read() as connection:
            inbox = connection.SimpleQueue(cast(Any, deferred_queue(self.app)))
            try:
                deadline = time.monotonic() + timeout
                while len(bodies) < expected and time.monotonic() < deadline:
                    with contextlib.suppress(inbox.Empty):
                        message = inbox.get(block=True, timeout=0.25)
                        bodies.append(message.decode())
                        message.ack()
                deadline = time.monotonic() + grace
                while time.monotonic() < deadline:
                    with contextlib.suppress(inbox.Empty):
                        message = inbox.get(block=True, timeout=0.1)
                        bodies.append(message.decode())
                        message.ack()
            finally:
                inbox.close()
        return bodies
