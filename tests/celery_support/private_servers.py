"""Private RabbitMQ and Redis servers that a test may stop, kill and restart.

The machine's shared services (RabbitMQ on 5672, Redis on 6379) are never touched: each
server here runs on free ports with its data in the test's temporary directory, and is stopped
by its own node name or process id.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

# The real scripts: the /usr/sbin wrappers switch to the rabbitmq user (and its HOME), which
# could not write the test's directory nor share its Erlang cookie.
RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")


def free_port() -> int:
    """A TCP port nothing listens on right now (on 127.0.0.1)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float, *, up: bool = True) -> bool:
    """Wait until 127.0.0.1:``port`` accepts connections (or, ``up=False``, refuses them)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                is_up = True
        except OSError:
            is_up = False
        if is_up == up:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def rabbit_unavailable_reason() -> str | None:
    """Why a private RabbitMQ node cannot be started here, or ``None`` when it can."""
    server = RABBIT_BIN / "rabbitmq-server"
    if not server.exists() or not (RABBIT_BIN / "rabbitmqctl").exists():
        return f"RabbitMQ's scripts are not in {RABBIT_BIN}"
    if os.geteuid() != 0:
        return "a private RabbitMQ node is started as root (its files in a temporary HOME)"
    if shutil.which("erl") is None and not Path("/usr/lib/erlang/bin/erl").exists():
        return "Erlang (erl) is not installed"
    return None


class PrivateRabbit:
    """A RabbitMQ node of the test's own: ``bftest-<random>@localhost`` on free ports.

    Its Mnesia directory (durable queues, persistent messages) lives in ``base`` and survives
    :meth:`stop` / :meth:`start`. No plugin is enabled, no config of the machine is read.
    """

    def __init__(self, base: Path) -> None:
        self.base = base
        self.base.mkdir(parents=True, exist_ok=True)
        self.node = f"bftest-{uuid.uuid4().hex[:8]}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}//"
        self.pid_file = base / "node.pid"
        (base / "enabled_plugins").write_text("[].\n", encoding="utf-8")
        (base / "rabbitmq-env.conf").write_text("", encoding="utf-8")
        (base / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
            "loopback_users.guest = true\n"
            "disk_free_limit.absolute = 1MB\n",
            encoding="utf-8",
        )

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            {
                # The Erlang cookie is made in HOME: the node and rabbitmqctl share this one.
                "HOME": str(self.base),
                "RABBITMQ_CONF_ENV_FILE": str(self.base / "rabbitmq-env.conf"),
                "RABBITMQ_CONFIG_FILE": str(self.base / "rabbitmq.conf"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
                "RABBITMQ_NODENAME": self.node,
                "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
                "RABBITMQ_NODE_PORT": str(self.port),
                "RABBITMQ_DIST_PORT": str(self.dist_port),
                "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
                "RABBITMQ_LOG_BASE": str(self.base / "log"),
                "RABBITMQ_PID_FILE": str(self.pid_file),
                "ERL_EPMD_ADDRESS": "127.0.0.1",
                "ERL_CRASH_DUMP": str(self.base / "erl_crash.dump"),
                "ERL_FLAGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            }
        )
        return env

    def _ctl(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(RABBIT_BIN / "rabbitmqctl"), "-n", self.node, *args],
            env=self._env(),
            cwd=self.base,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start(self, timeout: float = 90.0) -> PrivateRabbit:
        """Start the node (detached) and wait until it accepts AMQP connections."""
        self.pid_file.unlink(missing_ok=True)
        subprocess.run(
            [str(RABBIT_BIN / "rabbitmq-server"), "-detached"],
            env=self._env(),
            cwd=self.base,
            capture_output=True,
            timeout=30,
            check=True,
        )
        # The script's own limit first: on a loaded machine the node takes its time.
        waited = self._ctl(
            "wait", str(self.pid_file), "--timeout", str(int(timeout)), timeout=timeout + 30
        )
        if waited.returncode != 0 or not wait_for_port(self.port, 10):
            raise RuntimeError(
                f"private RabbitMQ node {self.node} did not start: {waited.stdout[-1500:]}"
                f"{waited.stderr[-1500:]}\n{self.log_tail()}"
            )
        return self

    def pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int(self.pid_file.read_text().strip())
        return None

    def stop(self) -> None:
        """Stop the node cleanly (``rabbitmqctl stop``), or kill it by its pid."""
        pid = self.pid()
        result = self._ctl("stop", timeout=60)
        if pid is not None:
            deadline = time.monotonic() + 30
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        elif result.returncode != 0 and wait_for_port(self.port, 0.2):
            raise RuntimeError(f"could not stop {self.node}: {result.stderr[-1000:]}")
        wait_for_port(self.port, 10, up=False)

    def log_tail(self, size: int = 3000) -> str:
        logs = sorted((self.base / "log").glob("*.log")) if (self.base / "log").exists() else []
        return "\n".join(p.read_text(errors="replace")[-size:] for p in logs)


class PrivateRedis:
    """A ``redis-server`` of the test's own on a free port, no persistence."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.base.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> PrivateRedis:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.base),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        if not wait_for_port(self.port, timeout):
            self.kill()
            raise RuntimeError(f"private redis-server did not listen on {self.port}")
        return self

    def kill(self) -> None:
        """SIGKILL: the server is gone at once, without a goodbye to its clients."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def pause(self) -> None:
        """SIGSTOP: the server still accepts connections (the kernel does) but never answers."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process is None:
            return
        self.resume()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
