"""``blockfilter simulator`` in a process of its own, as a user starts it from a shell."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass
class RunningSimulator:
    process: subprocess.Popen[bytes]
    #: what the command printed first: the URL it answers on
    base_url: str
    #: everything it wrote, once it was stopped
    stdout: bytes = b""
    stderr: bytes = b""


@contextmanager
def simulator_command(
    env: dict[str, str], *options: str, verbose: bool = False
) -> Iterator[RunningSimulator]:
    """Start ``blockfilter [-vv] simulator --port 0 OPTIONS``; stopped (SIGTERM) afterwards,
    when its output is read into the yielded object."""
    command = [sys.executable, "-m", "blockfilter", *(["-vv"] if verbose else [])]
    process = subprocess.Popen(
        [*command, "simulator", "--port", "0", *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert process.stdout is not None
    running = RunningSimulator(process, process.stdout.readline().decode().strip())
    try:
        yield running
    finally:
        process.terminate()
        out, err = process.communicate(timeout=10)
        running.stdout, running.stderr = out, err
