"""The one launcher of ``celery worker`` processes, for the tests and the benchmarks.

A worker runs in a process group of its own, so a kill takes its pool children with it, and
:meth:`Worker.start` returns once the worker said it is ready (its log's ``ready.`` line, not a
sleep): tasks sent from then on are consumed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support.env import ROOT

#: The test app (configured by ``BFTEST_*`` variables, see :mod:`tests.support.app`).
TEST_APP = "tests.support.app"


class Worker:
    """A ``celery worker`` process, not started until :meth:`start` or :meth:`run_to_exit`.

    Prefork with 2 children on the test app by default; ``app`` names another app module (the
    collector's, an example's, a benchmark's), ``pool``, ``concurrency`` and ``loglevel`` what
    the run needs, ``cwd`` where it runs (the repository by default) and ``nodename`` its
    name (``<name>@localhost`` by default).
    """

    def __init__(
        self,
        env: dict[str, str],
        queue: str,
        log_path: Path,
        name: str,
        *,
        app: str = TEST_APP,
        pool: str = "prefork",
        concurrency: int = 2,
        loglevel: str = "INFO",
        cwd: Path = ROOT,
    ) -> None:
        self.env = env
        self.queue = queue
        self.log_path = log_path
        self.name = name
        self.app = app
        self.pool = pool
        self.concurrency = concurrency
        self.loglevel = loglevel
        self.cwd = cwd
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def nodename(self) -> str:
        return f"{self.name}@localhost"

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "celery",
            "-A",
            self.app,
            "worker",
            f"--pool={self.pool}",
            "-c",
            str(self.concurrency),
            "--without-heartbeat",
            "--without-gossip",
            "--without-mingle",
            "-Q",
            self.queue,
            "-n",
            self.nodename,
            f"--loglevel={self.loglevel}",
        ]

    def launch(self) -> int:
        """Start the process; returns the log's size before it, where its own lines begin."""
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: killed as a whole, children too
            )
        return offset

    def start(self, timeout: float = 40.0) -> Worker:
        """Start the worker and wait until it says it is ready (a ping, not a sleep)."""
        offset = self.launch()
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_bytes()[offset:].decode(errors="replace")
            if " ready." in text:
                return self
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise AssertionError(f"worker did not start; its log:\n{self.log_text()[-4000:]}")

    def run_to_exit(self, timeout: float = 60.0) -> tuple[int, str]:
        """Start a worker that is expected to stop by itself: its exit status and its output."""
        offset = self.launch()
        assert self.process is not None
        try:
            status = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(
                f"the worker did not stop by itself; its log:\n{self.log_text()[-4000:]}"
            ) from None
        return status, self.log_path.read_bytes()[offset:].decode(errors="replace")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def children(self) -> list[int]:
        """The pool's child processes (prefork)."""
        assert self.process is not None
        pid = self.process.pid
        try:
            text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
        except OSError:
            return []
        return [int(p) for p in text.split()]

    def kill(self) -> None:
        """SIGKILL the whole worker (main process and pool): no shutdown, no acks."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self, timeout: float = 15.0) -> None:
        """Warm shutdown (``timeout`` seconds at most), then SIGKILL if it lingers."""
        if self.process is None:
            return
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
            except ProcessLookupError:
                pass
        # Pool children left behind by a killed main process die with the group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
